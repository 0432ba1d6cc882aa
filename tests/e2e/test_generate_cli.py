"""The command line as users type it: torchrun launch/generate.py with Hydra overrides."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.wan.building import TINY_FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[2]
SMALL = ("steps=1", "height=32", "width=32", "num_frames=5")


def _torchrun(nproc: int, *overrides: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WAN_DIST_CACHE": str(cache), "OMP_NUM_THREADS": "1"}
    # --standalone: a free rendezvous port per run, so tests never collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           "launch/generate.py", *overrides, f"hydra.run.dir={cache.parent / 'hydra'}"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def assert_make_run_outputs(out: Path, cache: Path) -> None:
    """What `make run` leaves (launch/generate.py on two ranks with the defaults and output.save_frames=true,
    the tiny model built under `cache`), compared with diffusers on the folder it built."""
    import imageio.v2 as imageio

    reader = imageio.get_reader(out / "video.mp4", format="FFMPEG")
    frames = [frame for frame in reader]
    reader.close()
    assert len(frames) == 9 and frames[0].shape == (64, 64, 3)
    report = json.loads((out / "run.json").read_text())
    assert report["world_size"] == 2 and report["mesh"]["cfg"] == 2  # auto: guidance 5 -> cfg first
    assert len(report["memory"]) == 2
    # One thread per rank: on CPU, each rank on cores of its own where the machine has two (parallel.pin_cpus).
    cores = [set(m["cpu_cores"]) for m in report["memory"]]
    assert [m["threads"] for m in report["memory"]] == [1, 1]
    if report["memory"][0]["device"] == "cpu" and len(os.sched_getaffinity(0)) >= 2:
        assert len(cores[0]) == len(cores[1]) >= 1 and not cores[0] & cores[1]
    assert set(report["timings"]) >= {"load_s", "encode_s", "denoise_s", "steps_s", "decode_s", "total_s"}
    saved = np.load(out / "frames.npy")
    assert saved.shape == (9, 64, 64, 3) and saved.dtype == np.float32
    # Same as diffusers on the folder the run built.
    folder = cache / "models" / f"tiny-v{TINY_FORMAT_VERSION}"
    reference = reference_frames(str(folder), prompt=report["config"]["prompt"], height=64, width=64, steps=4)
    assert max_abs_error(saved, reference) <= TOLERANCE
    # Only rank 0 writes: nothing but the outputs in the folder, no temp files.
    assert sorted(p.name for p in out.iterdir()) == ["frames.npy", "run.json", "video.mp4"]


# Under make test, tests/e2e/test_multinode.py checks the same run (it is its one-node run).
@pytest.mark.full
def test_make_run_default_two_ranks(tmp_path):
    """What `make run` does: the embedded tiny model, built on first use, on two CPU ranks."""
    out = tmp_path / "out"
    result = _torchrun(2, f"output.dir={out}", "output.save_frames=true", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    assert_make_run_outputs(out, tmp_path / "cache")


# The command line again, for another task and layout: under make test, tests/dist/test_modes.py compares
# I2V in a stage split with diffusers and tests/unit/test_config.py composes image= from overrides.
@pytest.mark.full
def test_i2v_stage_split_cli(tmp_path, i2v_folder, image_path):
    out = tmp_path / "out"
    result = _torchrun(2, "model=tiny_i2v", f"model.path={i2v_folder}", f"image={image_path}", "parallel=stage_split",
                       "height=48", "width=80", "steps=3", "prompt=a quiet harbor", "negative_prompt=blurry",
                       f"output.dir={out}", "output.save_frames=true", cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    reference = reference_frames(str(i2v_folder), prompt="a quiet harbor", negative_prompt="blurry",
                                 image=str(image_path), height=48, width=80, steps=3)
    assert max_abs_error(out / "frames.npy", reference) <= TOLERANCE
    report = json.loads((out / "run.json").read_text())
    assert report["mesh"]["stage_split"] and report["config"]["model"]["task"] == "i2v"


# Refused inside the process group on every rank alike, as the unwritable output dir below is under make test.
@pytest.mark.full
def test_bad_degrees_fail_on_every_rank(tmp_path):
    """A split that does not fit the world stops all ranks, non-zero, before any weight is read."""
    out = tmp_path / "out"
    result = _torchrun(2, "parallel.ulysses_degree=4", f"output.dir={out}", cache=tmp_path / "cache")
    assert result.returncode != 0
    # Both ranks say why, in one line each.
    assert result.stderr.count("error: parallel.ulysses_degree=4 is not allowed") == 2, result.stderr[-2000:]
    assert not (tmp_path / "cache" / "models").exists()
    assert not (out / "video.mp4").exists()


def test_sweep_under_torchrun(tmp_path):
    """A multirun inside one torchrun world: the jobs run in that world, a process group each, sharing the
    sweep's embedding cache; the summary is written once, by rank 0."""
    sweep = tmp_path / "sweep"
    # Small videos: what is checked is where the jobs ran and what they shared, not their frames.
    result = _torchrun(2, "-m", "+experiment=layouts_2ranks", f"hydra.sweep.dir={sweep}", *SMALL,
                       cache=tmp_path / "cache")
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads((sweep / str(job) / "run.json").read_text()) for job in range(4)]
    assert [(r["mesh"]["cfg"], r["mesh"]["ulysses"], r["mesh"]["ring"], r["mesh"]["stage_split"])
            for r in reports] == [(2, 1, 1, False), (1, 2, 1, False), (1, 1, 2, False), (1, 1, 1, True)]
    loaded = ["text_encoder" in r["memory"][0]["loaded_parameter_bytes"] for r in reports]
    assert loaded == [True, False, False, False]
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert len(summary) == 5 and summary[1].startswith("0,parallel=cfg,ok,2,")


def test_unwritable_output_dir_stops_before_denoising(tmp_path):
    """Rank 0 finds it and tells the others (inside the process group, before any model is built): every
    rank says why and exits 2, with no traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = _torchrun(2, f"output.dir={blocker}/out", "steps=1", cache=tmp_path / "cache")
    assert result.returncode != 0
    assert result.stderr.count("error: output.dir=") == 2, result.stderr[-2000:]
    assert "denoising" not in result.stderr
    assert not (tmp_path / "cache" / "models").exists()
    exit_codes = re.findall(r"exitcode\s*:\s*(-?\d+)", result.stderr)
    assert "2" in exit_codes and "0" not in exit_codes, result.stderr[-3000:]
    assert 'generate.py", line' not in result.stderr and "wan_dist/" not in result.stderr, result.stderr[-3000:]
