"""dry_run=true: the plan printed and written to plan.json, no weight read, exit 0; with plain python and
under torchrun on 2 ranks. The weights are guarded by tests/e2e/no_weight_reads.py. The module's runs are
started together (each only where its test is selected) and checked as they end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launching import launch_env

ROOT = Path(__file__).resolve().parents[2]
GUARD = ROOT / "tests" / "e2e" / "no_weight_reads.py"
TORCHRUN2 = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone"]
# Each test's run: its launcher and what follows the guard on the command line.
RUNS = {
    "test_dry_run_reads_no_weights[python]": ([sys.executable], ["dry_run=true", "parallel=single"]),
    "test_dry_run_reads_no_weights[torchrun2]": (TORCHRUN2, ["dry_run=true", "parallel=stage_split"]),
    # The guard is not toothless: a run that loads weights fails under it.
    "test_guard_catches_a_real_run": ([sys.executable], ["parallel=single", "steps=1"]),
}


def _command(launcher: list[str], folder: Path, overrides: list[str], tmp_path: Path) -> list[str]:
    return [*launcher, str(GUARD), "launch/generate.py", f"model.path={folder}", *overrides,
            f"output.dir={tmp_path / 'out'}", f"hydra.run.dir={tmp_path / 'hydra'}"]


@pytest.fixture(scope="module")
def runs(request, t2v_folder, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path, Path]]:
    """Per selected test: its run's result, its folder and its guard's log."""
    chosen = [item.name for item in request.session.items if getattr(item, "module", None) is request.module]
    started = {}
    try:
        for name, (launcher, overrides) in RUNS.items():
            if name not in chosen:
                continue
            tmp_path = tmp_path_factory.mktemp("dry_run")
            log = tmp_path / "reads.log"
            env = launch_env(WAN_DIST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
                             NO_WEIGHT_READS_LOG=str(log))
            cmd = _command(launcher, t2v_folder, overrides, tmp_path)
            proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            started[name] = (cmd, proc, tmp_path, log)
        results = {}
        for name, (cmd, proc, tmp_path, log) in started.items():
            stdout, stderr = proc.communicate(timeout=300)
            results[name] = (subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr), tmp_path, log)
        return results
    finally:
        for _, proc, _, _ in started.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _reads(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


# One rank is the same plan in a world of one: make test-full.
@pytest.mark.parametrize("world", [pytest.param(1, id="python", marks=pytest.mark.full),
                                   pytest.param(2, id="torchrun2")])
def test_dry_run_reads_no_weights(request, runs, world):
    result, tmp_path, log = runs[request.node.name]
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


def test_guard_catches_a_real_run(request, runs):
    """The guard is not toothless: a run that loads weights fails under it."""
    result, _, log = runs[request.node.name]
    assert result.returncode != 0
    assert any(not line.startswith("header read:") for line in _reads(log))
