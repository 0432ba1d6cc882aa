"""A bad command line in a process of its own: exit code 2 and exactly one line (the walk over many more
cases is tests/e2e/test_bad_input_walk.py, which also checks this line, from one interpreter; under torchrun
its ranks exit 2 each, in processes of their own). Under make test-full."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.full
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
