"""launch/gpu_check.py in its CPU mode: what a lent GPU runs, kept working where no GPU is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_runs_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WAN_DIST_CACHE": str(tmp_path / "cache"), "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "launch/gpu_check.py", "--out", str(tmp_path / "out")], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert summary["device"] == "cpu"
    merges = {(row["kernel"], row["dtype"]): row for row in summary["lse_merge"]}
    assert set(merges) == {("cpu_flash", "float32"), ("cpu_flash", "bfloat16"), ("masked", "float32"),
                           ("masked", "bfloat16")}
    for (_, dtype), row in merges.items():
        assert row["ok"], row
        assert row["max_abs_err"] <= (1e-5 if dtype == "float32" else 2e-2), row
    (failing,) = summary["torchrun"]
    assert failing["ok"] and failing["exit"] == 1, failing
    assert "torchrun failing: ok" in result.stdout
    two_ranks = summary["two_ranks_one_gpu"]
    assert two_ranks["ok"] and (two_ranks["device"], two_ranks["dtype"]) == ("cpu", "bf16"), two_ranks
    (ring,) = two_ranks["cases"]
    assert ring["layout"] == "ring" and ring["max_abs_err"] <= two_ranks["tolerance"], ring
    # Host tensors stand in for device ones: both ranks' transfers went through the shim's host copies.
    assert all(counts["sent"] > 0 and counts["received"] > 0 for counts in ring["staged"]), ring
