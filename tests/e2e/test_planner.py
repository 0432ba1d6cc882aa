"""launch/plan.py: per world size and GPU size, the layout that fits and each rank's memory, as JSON in
the format DESIGN names; a real preset planned from its shapes alone (no download, no disk). `make test`
plans the 14B; `make test-full` a two-expert preset too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from wan_dist.wan.building import TINY_FORMAT_VERSION

ROOT = Path(__file__).resolve().parents[2]


def _plan(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    out = tmp_path / "plan.json"
    env = {**os.environ, "WAN_DIST_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "launch/plan.py", *overrides, f"plan.out={out}"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(out.read_text())


def test_planner_picks_what_fits(tmp_path):
    result, planned = _plan(tmp_path, "model=t2v_14b", "plan.world_sizes=[1,2,4]", "plan.gpu_memory_gib=[24,80]")
    rows = {(r["world_size"], r["gpu_memory_gib"]): r for r in planned}
    for row in rows.values():
        assert set(row) >= {"world_size", "gpu_memory_gib", "fits", "overrides", "ranks"}
        for rank in row["ranks"]:
            assert set(rank) >= {"rank", "role", "weights_bytes", "activations_bytes", "peak_bytes"}
    # A 28.6 GB bf16 replica: on one or two 24 GB cards only with its blocks streamed from host memory,
    # on four sharded; on one 80 GB card as it is.
    for world in (1, 2):
        assert rows[(world, 24)]["fits"] and "model.dit_offload=block" in rows[(world, 24)]["overrides"]
    assert rows[(4, 24)]["fits"] and "parallel.fsdp=true" in rows[(4, 24)]["overrides"]
    dit = [r["weights_bytes"]["dit"] for r in rows[(4, 24)]["ranks"] if "dit" in r["weights_bytes"]]
    assert len(dit) == 4 and max(dit) - min(dit) < 0.01 * max(dit) and sum(dit) > 28e9
    assert rows[(1, 80)]["fits"] and rows[(1, 80)]["overrides"] == []
    # The architecture was planned from a folder of configs and header-only sparse weights.
    folder = tmp_path / "cache" / "models" / f"t2v_14b-shapes-v{TINY_FORMAT_VERSION}"
    weights = folder / "transformer" / "model.safetensors"
    assert weights.stat().st_size > 28e9 and os.stat(weights).st_blocks * 512 < 1e6
    assert "| 4 | 24 | yes |" in result.stdout


@pytest.mark.full
def test_a_two_expert_preset_is_planned_from_its_shapes(tmp_path):
    """A two-expert plan counts each expert's steps from the folder's scheduler, which the shapes-only
    folder holds too; both experts are on every DiT rank."""
    _, (row,) = _plan(tmp_path, "model=t2v_a14b", "plan.world_sizes=[2]", "plan.gpu_memory_gib=[24]")
    assert row["fits"]
    assert all({"dit", "dit_2"} <= set(rank["weights_bytes"]) for rank in row["ranks"])
