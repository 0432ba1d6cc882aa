"""Multi-node torchrun as launch/slurm/generate.sbatch runs it on each node: two agents (`--nnodes=2`, one
rank each) meeting by c10d rendezvous on 127.0.0.1, against the same run on one node with two ranks. The
one-node run is what `make run` runs: it is checked as tests/e2e/test_generate_cli.py checks `make run`
(whose own test runs it again only under make test-full)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from tests.e2e.test_generate_cli import assert_make_run_outputs
from tests.launching import free_port, launch_env
from tests.reference import TOLERANCE, max_abs_error

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def _run_args(out: Path) -> list[str]:
    # Hydra's run dir beside the outputs, not in them: `make run`'s folder holds its outputs alone.
    return ["launch/generate.py", f"output.dir={out}", "output.save_frames=true", f"hydra.run.dir={out}_hydra"]


def test_two_node_torchrun_matches_one_node(tmp_path):
    env = launch_env(WAN_DIST_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run"]

    one_node = tmp_path / "one_node"
    single = subprocess.run([*torchrun, "--standalone", "--nproc_per_node=2", *_run_args(one_node)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert single.returncode == 0, single.stderr[-3000:]

    two_nodes = tmp_path / "two_nodes"
    port = free_port()
    # --local-addr: each agent tells the other its address as 127.0.0.1, whatever the host name resolves to.
    agent = [*torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
             f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id=wan_dist_test_{port}", "--local-addr=127.0.0.1",
             *_run_args(two_nodes)]
    # Their output to files: read once they have ended, while this process compares with diffusers.
    logs = [tmp_path / f"agent{i}.log" for i in range(2)]
    agents = []
    try:
        for log in logs:
            with open(log, "wb") as handle:
                agents.append(subprocess.Popen(agent, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT))
        # While the agents start: the one-node run, `make run`'s, against diffusers (in this process).
        assert_make_run_outputs(one_node, tmp_path / "cache")
        for proc in agents:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc in agents:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    outputs = [log.read_text(errors="replace") for log in logs]
    for proc, output in zip(agents, outputs):
        assert proc.returncode == 0, output[-3000:]

    report = json.loads((two_nodes / "run.json").read_text())
    assert report["world_size"] == 2 and report["mesh"]["cfg"] == 2
    # Rank 0 (started by one of the agents) saw the world of both.
    assert "2 rank(s)" in "".join(outputs)
    frames = np.load(two_nodes / "frames.npy")
    assert frames.shape == (9, 64, 64, 3)
    assert max_abs_error(frames, np.load(one_node / "frames.npy")) <= TOLERANCE
