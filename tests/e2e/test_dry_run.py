"""dry_run=true: the plan printed and written to plan.json, no weight read, exit 0; with plain python and
under torchrun on 2 ranks. The weights are guarded by tests/e2e/no_weight_reads.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import launch_env

ROOT = Path(__file__).resolve().parents[2]
GUARD = ROOT / "tests" / "e2e" / "no_weight_reads.py"


def _dry_run(tmp_path: Path, launcher: list[str], folder: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    log = tmp_path / "reads.log"
    env = launch_env(WAN_DIST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", NO_WEIGHT_READS_LOG=str(log))
    cmd = [*launcher, str(GUARD), "launch/generate.py", "dry_run=true", f"model.path={folder}",
           f"output.dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300), log


def _reads(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


@pytest.mark.parametrize("launcher, world", [
    ([sys.executable], 1),
    ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"], 2),
], ids=["python", "torchrun2"])
def test_dry_run_reads_no_weights(tmp_path, t2v_folder, launcher, world):
    result, log = _dry_run(tmp_path, launcher, t2v_folder, "parallel=stage_split" if world == 2 else "parallel=single")
    assert result.returncode == 0, result.stderr[-3000:]
    reads = _reads(log)
    assert not [line for line in reads if not line.startswith("header read:")], reads
    assert any("transformer" in line for line in reads)  # the plan did size the DiT from its header
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    assert plan["world_size"] == world
    assert [r["rank"] for r in plan["ranks"]] == list(range(world))
    assert not (tmp_path / "out" / "video.mp4").exists() and not (tmp_path / "out" / "run.json").exists()
    dit_bytes = plan["components"]["dit"]["weight_bytes"]
    assert dit_bytes > 0
    if world == 2:  # stage split: rank 0 holds the encoders and VAE, rank 1 the DiT alone
        assert plan["ranks"][0]["role"] == "encoders+vae" and "dit" not in plan["ranks"][0]["components"]
        assert plan["ranks"][1]["components"] == ["dit"] and plan["ranks"][1]["weight_bytes"]["dit"] == dit_bytes
    # The table on the console names every rank and its role.
    for rank in plan["ranks"]:
        assert f"{rank['rank']:>4}  {rank['role']}" in result.stdout


def test_guard_catches_a_real_run(tmp_path, t2v_folder):
    """The guard is not toothless: a run that loads weights fails under it."""
    log = tmp_path / "reads.log"
    env = launch_env(WAN_DIST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", NO_WEIGHT_READS_LOG=str(log))
    cmd = [sys.executable, str(GUARD), "launch/generate.py", f"model.path={t2v_folder}", "parallel=single",
           "steps=1", f"output.dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert any(not line.startswith("header read:") for line in _reads(log))
