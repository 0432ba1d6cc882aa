"""`launch/vae_bench.py` end to end on a small VAE: one rank against two, as the script prints and writes it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SMALL_VAE = {"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1}


def test_vae_bench_one_rank_against_two(tmp_path):
    out = tmp_path / "vae_bench.json"
    cmd = [sys.executable, "launch/vae_bench.py", "--ranks", "1", "2", "--height", "32", "--width", "24",
           "--num-frames", "5", "--config", json.dumps(SMALL_VAE), "--json", str(out)]
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    one, two = report["results"]
    assert (one["ranks"], two["ranks"]) == (1, 2)
    assert one["speedup"] == 1.0 and two["speedup"] == one["seconds"] / two["seconds"]
    assert len(one["peak_bytes"]) == 1 and len(two["peak_bytes"]) == 2
    # The bands are exact, and each holds about half the activations.
    assert two["max_abs_diff"] < 1e-4
    assert max(two["peak_bytes"]) < one["peak_bytes"][0]
    assert report["config"]["base_dim"] == 8 and report["config"]["z_dim"] == 16
    assert "| 2 |" in result.stdout and "peak per rank (MiB)" in result.stdout
