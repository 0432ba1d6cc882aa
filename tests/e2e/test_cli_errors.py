"""Bad command lines fail fast, with one clear line naming the key, before any weight is read or built."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# Python + torch/diffusers imports dominate; building the tiny model would add several seconds more.
FAST_S = 60


@pytest.mark.parametrize("override, line_fragments", [
    ("height=50", ("height=50", "multiple of 16")),
    ("model=t2v_14b", ("model.path", "Wan-AI/Wan2.1-T2V-14B-Diffusers")),
    ("num_frames=10", ("num_frames=10", "4k+1")),
    ("foo=1", ("'foo'",)),
    ("parallel=bogus", ("parallel/bogus",)),
], ids=["height", "real-preset-without-path", "num_frames", "unknown-key", "unknown-parallel-preset"])
def test_bad_input_fails_before_loading(tmp_path, override, line_fragments):
    cache = tmp_path / "cache"
    out = tmp_path / "out"
    env = {**os.environ, "WAN_DIST_CACHE": str(cache), "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    cmd = [sys.executable, "launch/generate.py", override, f"output.dir={out}",
           f"hydra.run.dir={tmp_path / 'hydra_run'}"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    text = proc.stdout + proc.stderr

    assert proc.returncode != 0, text
    lines = [line for line in text.splitlines() if all(f in line for f in line_fragments)]
    assert lines, f"no line naming {line_fragments} in:\n{text}"
    assert "Traceback" not in text, text
    assert not list(tmp_path.rglob("*.mp4")), "a video was written"
    assert not (out / "run.json").exists()
    assert not (cache / "models").exists(), "the tiny model was built before the error"
    assert elapsed < FAST_S, f"took {elapsed:.1f} s"


def test_config_error_is_one_line_with_exit_code_2(tmp_path):
    env = {**os.environ, "WAN_DIST_CACHE": str(tmp_path / "cache")}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, "launch/generate.py", "steps=0", "scheduler=ddim", f"output.dir={tmp_path / 'out'}",
         f"hydra.run.dir={tmp_path / 'hydra_run'}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    # the first broken rule in validation order, with its value and what is allowed
    assert errors[0] == "error: steps=0 is not allowed: a positive number of denoising steps"
    assert not (tmp_path / "cache" / "models").exists()
