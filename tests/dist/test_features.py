"""LoRA, the Euler sampler, no guidance, compiled blocks and prompt queues (one process, a stage split, the
expert pipeline), each against diffusers; and what run.json says about who holds which weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import write_random_lora
from tests.dist_utils import run_on_ranks
from tests.modes import Case, run_cases
from tests.reference import TOLERANCE, max_abs_error, reference_frames

QUEUE = ["a red kite over a beach", "snow falling on a quiet street", "a bowl of ripe oranges"]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("queue") / "prompts.txt"
    path.write_text("\n".join(QUEUE[:1] + [""] + QUEUE[1:]) + "\n")  # blank lines are skipped
    return path


@pytest.fixture(scope="module")
def feature_results(t2v_folder, lora_path, family_folders, prompts_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    folder = str(t2v_folder)
    lora = ((str(lora_path), 0.7),)
    # Two experts of 2 and 1 blocks: a LoRA of 2 blocks into the high-noise one, one of 1 block into both.
    moe = family_folders["moe_t2v"]
    expert_loras = ((str(write_random_lora(moe, root / "high.safetensors", seed=2)), 0.7, "high"),
                    (str(write_random_lora(moe, root / "low.safetensors", seed=3, subfolder="transformer_2")), 0.5,
                     "both"))
    worlds = {
        1: [Case("lora", folder, lora=lora), Case("euler", folder, scheduler="euler"),
            Case("no_guidance", folder, guidance_scale=1.0), Case("queue_single", folder, prompts_file=str(prompts_file))],
        2: [Case("queue_stage_split", folder, stage_split=True, prompts_file=str(prompts_file)),
            Case("lora_cfg", folder, cfg=2, lora=lora), Case("no_guidance_ulysses", folder, ulysses=2, guidance_scale=1.0),
            # torch.compile'd blocks trace the sequence split's hooks and processor (inductor's CPU code).
            Case("compiled_ulysses", folder, ulysses=2, compile=True),
            Case("expert_loras_ulysses", str(moe), ulysses=2, lora=expert_loras, guidance_scale_2=2.0),
            # The expert pipeline over a queue: rank 0 encodes, runs the high-noise steps of video i+1 while
            # rank 1 runs the low-noise steps of video i, and decodes.
            Case("queue_expert_split", str(moe), expert_split=True, prompts_file=str(prompts_file), scheduler="euler",
                 guidance_scale_2=2.0)],
    }
    cache = str(root / "embeddings")
    worlds[1] += [Case("cache_cold", folder, embedding_cache=cache), Case("cache_warm", folder, embedding_cache=cache)]
    results = {}
    for world, cases in worlds.items():
        run_on_ranks(world, run_cases, cases, str(root), timeout=600)
        results.update({case.name: (case, root / case.name) for case in cases})
    return results


@pytest.mark.parametrize("name", ["lora", "euler", "no_guidance", "lora_cfg", "no_guidance_ulysses", "cache_cold",
                                  "cache_warm", "compiled_ulysses", "expert_loras_ulysses"])
def test_feature_matches_diffusers(feature_results, name):
    case, out_dir = feature_results[name]
    error = max_abs_error(out_dir / "frames.npy", reference_frames(case.folder, **case.reference_kwargs()))
    assert error <= TOLERANCE, f"{name}: {error:.3g}"


def test_lora_changes_the_video(feature_results):
    case, out_dir = feature_results["lora"]
    without = reference_frames(case.folder, **{**case.reference_kwargs(), "lora": ()})
    assert max_abs_error(out_dir / "frames.npy", without) > 100 * TOLERANCE


def test_an_expert_lora_goes_into_the_experts_it_names(feature_results):
    """With the second LoRA in the high-noise expert only, diffusers gives other frames: ours went into
    the low-noise expert too."""
    case, out_dir = feature_results["expert_loras_ulysses"]
    high_only = tuple((path, scale, "high") for path, scale, _ in case.lora)
    other = reference_frames(case.folder, **{**case.reference_kwargs(), "lora": high_only})
    assert max_abs_error(out_dir / "frames.npy", other) > 100 * TOLERANCE


@pytest.mark.parametrize("name", ["queue_single", "queue_stage_split", "queue_expert_split"])
def test_prompt_queue_one_video_per_line(feature_results, name):
    case, out_dir = feature_results[name]
    report = json.loads((out_dir / "run.json").read_text())
    assert [video["prompt"] for video in report["videos"]] == QUEUE
    for index, prompt in enumerate(QUEUE):
        assert (out_dir / f"video_{index}.mp4").stat().st_size > 0
        reference = reference_frames(case.folder, **{**case.reference_kwargs(), "prompt": prompt})
        error = max_abs_error(out_dir / f"frames_{index}.npy", reference)
        assert error <= TOLERANCE, f"{name} video {index}: {error:.3g}"
    assert not (out_dir / "video.mp4").exists()


def test_stage_split_memory_report(feature_results):
    """The encoder/VAE rank never holds DiT weights and the DiT rank never holds encoder or VAE weights."""
    _, out_dir = feature_results["queue_stage_split"]
    report = json.loads((out_dir / "run.json").read_text())
    assert report["mesh"]["stage_split"] is True and report["mesh"]["dit_ranks"] == [1]
    zero, dit = report["memory"]
    assert set(zero["loaded_parameter_bytes"]) == {"vae", "text_encoder"}
    assert set(dit["loaded_parameter_bytes"]) == {"dit"}
    assert dit["held_parameter_bytes_at_end"] == {}  # released after the last video
    assert all(m["peak_bytes"] > 0 for m in report["memory"])
    timings = report["timings"]
    assert len(timings["steps_s"]) == len(QUEUE) and all(len(s) == 3 for s in timings["steps_s"])
    for key in ("load_s", "encode_s", "denoise_s", "decode_s", "total_s"):
        assert timings[key] > 0, key


def test_expert_pipeline_reports_both_groups(feature_results):
    """Each video's steps are the high-noise group's and then the low-noise group's; each rank loaded
    only its expert."""
    _, out_dir = feature_results["queue_expert_split"]
    report = json.loads((out_dir / "run.json").read_text())
    assert [(g["expert"], g["ranks"]) for g in report["mesh"]["expert_groups"]] == [("dit", [0]), ("dit_2", [1])]
    assert [len(steps) for steps in report["timings"]["steps_s"]] == [3] * len(QUEUE)
    assert set(report["memory"][0]["loaded_parameter_bytes"]) == {"text_encoder", "vae", "dit"}
    assert set(report["memory"][1]["loaded_parameter_bytes"]) == {"dit_2"}


def test_warm_embedding_cache_never_loads_the_text_encoder(feature_results):
    loaded = {}
    for name in ("cache_cold", "cache_warm"):
        _, out_dir = feature_results[name]
        loaded[name] = json.loads((out_dir / "run.json").read_text())["memory"][0]["loaded_parameter_bytes"]
    assert "text_encoder" in loaded["cache_cold"]
    assert "text_encoder" not in loaded["cache_warm"] and "vae" in loaded["cache_warm"]
