"""LoRA, the Euler sampler, no guidance, compiled blocks and prompt queues (one process, a stage split, the
expert pipeline), each against diffusers; and what run.json says about who holds which weights."""

from __future__ import annotations

import json

import pytest

from tests.matrix import QUEUE, params
from tests.reference import TOLERANCE, max_abs_error, reference_frames


@pytest.mark.parametrize("name", params(["lora", "euler", "no_guidance", "lora_cfg", "no_guidance_ulysses",
                                         "cache_cold", "cache_warm", "compiled_ulysses", "expert_loras_ulysses"]))
def test_feature_matches_diffusers(matrix, name):
    case, out_dir = matrix[name]
    error = max_abs_error(out_dir / "frames.npy", reference_frames(case.folder, **case.reference_kwargs()))
    assert error <= TOLERANCE, f"{name}: {error:.3g}"


@pytest.mark.cases("lora")
def test_lora_changes_the_video(matrix):
    case, out_dir = matrix["lora"]
    without = reference_frames(case.folder, **{**case.reference_kwargs(), "lora": ()})
    assert max_abs_error(out_dir / "frames.npy", without) > 100 * TOLERANCE


@pytest.mark.cases("expert_loras_ulysses")
def test_an_expert_lora_goes_into_the_experts_it_names(matrix):
    """With the second LoRA in the high-noise expert only, diffusers gives other frames: ours went into
    the low-noise expert too."""
    case, out_dir = matrix["expert_loras_ulysses"]
    high_only = tuple((path, scale, "high") for path, scale, _ in case.lora)
    other = reference_frames(case.folder, **{**case.reference_kwargs(), "lora": high_only})
    assert max_abs_error(out_dir / "frames.npy", other) > 100 * TOLERANCE


@pytest.mark.parametrize("name", params(["queue_single", "queue_stage_split", "queue_expert_split"]))
def test_prompt_queue_one_video_per_line(matrix, name):
    case, out_dir = matrix[name]
    report = json.loads((out_dir / "run.json").read_text())
    assert [video["prompt"] for video in report["videos"]] == QUEUE
    for index, prompt in enumerate(QUEUE):
        assert (out_dir / f"video_{index}.mp4").stat().st_size > 0
        reference = reference_frames(case.folder, **{**case.reference_kwargs(), "prompt": prompt})
        error = max_abs_error(out_dir / f"frames_{index}.npy", reference)
        assert error <= TOLERANCE, f"{name} video {index}: {error:.3g}"
    assert not (out_dir / "video.mp4").exists()


@pytest.mark.cases("queue_stage_split")
def test_stage_split_memory_report(matrix):
    """The encoder/VAE rank never holds DiT weights and the DiT rank never holds encoder or VAE weights."""
    _, out_dir = matrix["queue_stage_split"]
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


@pytest.mark.cases("queue_expert_split")
def test_expert_pipeline_reports_both_groups(matrix):
    """Each video's steps are the high-noise group's and then the low-noise group's; each rank loaded
    only its expert."""
    _, out_dir = matrix["queue_expert_split"]
    report = json.loads((out_dir / "run.json").read_text())
    assert [(g["expert"], g["ranks"]) for g in report["mesh"]["expert_groups"]] == [("dit", [0]), ("dit_2", [1])]
    assert [len(steps) for steps in report["timings"]["steps_s"]] == [3] * len(QUEUE)
    assert set(report["memory"][0]["loaded_parameter_bytes"]) == {"text_encoder", "vae", "dit"}
    assert set(report["memory"][1]["loaded_parameter_bytes"]) == {"dit_2"}


@pytest.mark.cases("cache_cold", "cache_warm")
def test_warm_embedding_cache_never_loads_the_text_encoder(matrix):
    loaded = {}
    for name in ("cache_cold", "cache_warm"):
        _, out_dir = matrix[name]
        loaded[name] = json.loads((out_dir / "run.json").read_text())["memory"][0]["loaded_parameter_bytes"]
    assert "text_encoder" in loaded["cache_cold"]
    assert "text_encoder" not in loaded["cache_warm"] and "vae" in loaded["cache_warm"]
