"""launch/slurm/generate.sbatch on a real (throwaway, one-node) Slurm cluster: `sbatch --wait`, CPU and gloo,
in both of its shapes: one task per node running torchrun (c10d rendezvous on the first node), and one task
per rank without torchrun (ranks from Slurm's variables); and a Hydra sweep through
`hydra/launcher=submitit_slurm`. Skipped without root or Slurm installed.

One cluster serves every test (the session fixture). `make test` runs the task-per-rank shape against
diffusers and a bad config on every task; `make test-full` adds the torchrun shape, its default rank count
and exit code, and the submitit sweep (Slurm's variables as in the task-per-rank shape, the summary as
with the torchrun launcher: tests/e2e/test_sweep.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.launching import launch_env
from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.wan.building import TINY_FORMAT_VERSION
from tests.slurm_cluster import SlurmCluster, slurm_cluster  # noqa: F401  (the fixture)

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "launch/slurm/generate.sbatch"


# How each shape is asked for: sbatch options and the script's environment.
SHAPES = {
    "torchrun": (["--ntasks-per-node=1", "--cpus-per-task=2"], {"NPROC_PER_NODE": "2"}),
    "tasks": (["--ntasks-per-node=2", "--cpus-per-task=1"], {}),
}


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory) -> Path:
    """WAN_DIST_CACHE for the runs that succeed: the first builds the tiny model, the others reuse it."""
    return tmp_path_factory.mktemp("slurm_cache")


def _sbatch(cluster: SlurmCluster, tmp_path: Path, *overrides: str, shape: str = "tasks",
            script_env: dict[str, str] | None = None,
            cache: Path | None = None) -> tuple[subprocess.CompletedProcess, str]:
    """Submit the project's script from the repo root, as a user would, and wait for the job to end.
    Returns sbatch's result and the job's output file (all tasks' stdout and stderr)."""
    options, shape_env = SHAPES[shape]
    # SLURM_LABELIO: srun prefixes each output line with its task's rank ("1: ...").
    env = launch_env(cluster.env(), WAN_DIST_CACHE=str(cache or tmp_path / "cache"), OMP_NUM_THREADS="1",
                     PYTHONUNBUFFERED="1", SLURM_LABELIO="1", **(shape_env if script_env is None else script_env))
    # The script defaults to the checkout's .venv/bin/python; only another interpreter needs naming.
    if Path(sys.executable) != ROOT / ".venv" / "bin" / "python":
        env["WAN_DIST_PYTHON"] = sys.executable
    log = tmp_path / "job.out"
    cmd = ["sbatch", "--wait", *options, f"--output={log}", SCRIPT,
           # after the script's own hydra.run.dir, so it wins: nothing is written into the checkout
           f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]
    result = subprocess.run(cmd, check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    output = log.read_text(errors="replace") if log.exists() else "(no job output file)"
    return result, output


@pytest.mark.parametrize("shape", [pytest.param("tasks"), pytest.param("torchrun", marks=pytest.mark.full)])
def test_sbatch_two_ranks_matches_diffusers(slurm_cluster, model_cache, tmp_path, shape):
    out = tmp_path / "out"
    result, output = _sbatch(slurm_cluster, tmp_path, f"output.dir={out}", "output.save_frames=true", shape=shape,
                             cache=model_cache)
    assert result.returncode == 0, f"{result.stderr}\n--- job output\n{output[-4000:]}\n{slurm_cluster.logs()}"
    assert (out / "video.mp4").is_file() and (out / "run.json").is_file(), output[-4000:]

    report = json.loads((out / "run.json").read_text())
    # Two ranks; the only sources of rank and world size in the job were Slurm's variables ("tasks") or
    # the torchrun the script started ("torchrun").
    assert report["world_size"] == 2 and len(report["memory"]) == 2
    banner = {"torchrun": "1 node(s) x 2 rank(s)", "tasks": "2 tasks on 1 node(s), one rank each"}[shape]
    assert f"wan_dist: {banner}" in output, output[-4000:]
    assert report["backend"] == "gloo"
    assert report["mesh"]["cfg"] == 2  # parallel=auto on two ranks with guidance 5
    assert "2 rank(s)" in output, output[-4000:]

    folder = model_cache / "models" / f"tiny-v{TINY_FORMAT_VERSION}"
    reference = reference_frames(str(folder), prompt=report["config"]["prompt"], height=64, width=64, steps=4)
    saved = np.load(out / "frames.npy")
    assert max_abs_error(saved, reference) <= TOLERANCE


def test_sbatch_bad_config_fails_on_every_task(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    result, output = _sbatch(slurm_cluster, tmp_path, "height=50", f"output.dir={out}")
    assert result.returncode != 0, output
    ranks = [int(rank) for rank in re.findall(r"^\s*(\d+): error: height=50 is not allowed", output, re.MULTILINE)]
    # Each task says why, in one line. The script's srun --kill-on-bad-exit stops the other tasks once one
    # has failed, so a task that reaches the check a little later may be terminated before it prints
    # (every task printed in 40 runs here, but nothing orders them): such a task must show as terminated,
    # by srun (killed while it imported) or by its own line (it was inside the run, which turns SIGTERM into
    # a clean exit that leaves no half-written output).
    assert ranks and len(ranks) == len(set(ranks)), output[-4000:]
    stopped = {int(rank) for rank in re.findall(r"^\s*(\d+): error: rank \d+ stopped by SIGTERM", output, re.MULTILINE)}
    if set(ranks) | stopped != {0, 1}:
        assert re.search(r"^srun: error: .*tasks? [\d,-]+: Terminated", output, re.MULTILINE), output[-4000:]
    assert not (out / "video.mp4").exists()
    assert not (tmp_path / "cache" / "models").exists(), "the tiny model was built before the error"


@pytest.mark.full
def test_sbatch_torchrun_default_ranks_and_exit_code(slurm_cluster, tmp_path):
    """Without NPROC_PER_NODE or GPUs, one rank per node; a failing run fails the job."""
    out = tmp_path / "out"
    result, output = _sbatch(slurm_cluster, tmp_path, "height=50", f"output.dir={out}", shape="torchrun",
                             script_env={})
    assert "wan_dist: 1 node(s) x 1 rank(s)" in output, output[-4000:]
    assert result.returncode != 0, output[-4000:]
    assert "error: height=50 is not allowed" in output, output[-4000:]
    assert not (out / "video.mp4").exists()


@pytest.mark.full
def test_submitit_sweep_one_task_per_rank(slurm_cluster, tmp_path):
    """`hydra/launcher=submitit_slurm`: each job a Slurm job of two tasks, ranks from Slurm's variables; the
    summary and the shared embedding cache as with the torchrun launcher."""
    sweep = tmp_path / "sweep"
    env = launch_env(slurm_cluster.env(), WAN_DIST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "launch/generate.py", "-m", "hydra/launcher=submitit_slurm",
           "hydra.launcher.tasks_per_node=2", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=10",
           "parallel=cfg,ulysses", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stderr[-4000:]}\n{slurm_cluster.logs()}"
    reports = [json.loads((sweep / str(job) / "run.json").read_text()) for job in range(2)]
    assert [(r["world_size"], r["mesh"]["cfg"], r["mesh"]["ulysses"]) for r in reports] == [(2, 2, 1), (2, 1, 2)]
    assert all((sweep / str(job) / "video.mp4").is_file() for job in range(2))
    assert {r["config"]["embedding_cache"] for r in reports} == {str(sweep / "embeddings")}
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert [line.split(",")[:4] for line in summary[1:]] == [["0", "parallel=cfg", "ok", "2"],
                                                            ["1", "parallel=ulysses", "ok", "2"]]
