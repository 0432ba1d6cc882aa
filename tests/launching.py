"""What tests that start launchers (torchrun, sbatch, a sweep) share: free ports, and an environment
without the launcher variables of whatever runs pytest."""

from __future__ import annotations

import os
import socket

# Set by torchrun or srun around pytest itself; in a process a test starts, ranks must come from the
# launcher the test starts, and nowhere else.
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
                 "MASTER_PORT", "TORCHELASTIC_RUN_ID", "SLURM_PROCID", "SLURM_STEP_ID", "NPROC_PER_NODE")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(base: dict[str, str] | None = None, **extra: str) -> dict[str, str]:
    """`base` (default: this process's environment) without the launcher variables, plus `extra`."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in LAUNCHER_VARS}
    env.update(extra)
    return env
