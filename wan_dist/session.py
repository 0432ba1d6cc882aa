"""The distributed session: ranks from torchrun or Slurm, one device per local rank, the process group and
mesh, the values every rank must agree on, and teardown that always happens."""

from __future__ import annotations

import datetime
import logging
import os
import re
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .parallel_dims import ParallelDims

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str


def _first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as `gpu[03-05,07],cpu1` (what `scontrol show hostnames`
    would print first), without needing scontrol on the compute node."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match:
        return nodelist
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def rank_env(environ: dict[str, str] | None = None) -> RankEnv:
    """torchrun's variables first; then Slurm's (`srun python launch/generate.py`); else a world of one."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return RankEnv(
            rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"), master_port=int(env.get("MASTER_PORT", 29500)),
            launcher="torchrun",
        )
    # Only an srun step's tasks are ranks: the batch script itself also sees SLURM_PROCID=0 and the job's
    # SLURM_NTASKS, and would wait forever for peers that never start. Steps carry SLURM_STEP_ID.
    if "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        job_id = int(env.get("SLURM_JOB_ID", "0"))
        return RankEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            # One port per job, so two jobs sharing a node do not collide.
            master_port=int(env.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    return RankEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=0, launcher="python")


@dataclass
class Session:
    env: RankEnv
    device: torch.device
    dims: ParallelDims
    mesh: DeviceMesh
    # Point-to-point traffic runs on two groups of its own: inputs out of rank 0 and latents back to it.
    # On nccl, sends and receives between two ranks on one communicator complete in issue order, so
    # rank 0 handing over video i+1 while the DiT leader hands back video i would deadlock on one group.
    inputs_group: dist.ProcessGroup | None = None
    latents_group: dist.ProcessGroup | None = None

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def is_dit_rank(self) -> bool:
        return self.dims.is_dit_rank(self.rank)

    @property
    def backend(self) -> str:
        return dist.get_backend()

    def group(self, axis: str) -> dist.ProcessGroup:
        return self.mesh.get_group(axis)

    def axis_rank(self, axis: str) -> int:
        return self.mesh.get_local_rank(axis)

    def agree(self, value: Any, src: int = 0) -> Any:
        """`value` as rank `src` has it, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_to_zero(self, value: Any) -> list[Any] | None:
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0)
        return out

    def barrier(self) -> None:
        dist.barrier()


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def init_process_group(env: RankEnv, device: torch.device, timeout_s: float, store_prefix: str = "") -> None:
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size == 1 and env.launcher == "python":
        # A world of one still gets a real group, so every code path is the same as with N ranks.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return
    os.environ.setdefault("MASTER_ADDR", env.master_addr)
    os.environ.setdefault("MASTER_PORT", str(env.master_port))
    store, _, _ = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
    if store_prefix:
        # Under torchrun the store outlives a process group (it is the agent's): a Hydra multirun that
        # starts a group per job must not read the previous job's addresses.
        store = dist.PrefixStore(store_prefix, store)
    dist.init_process_group(
        backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout,
        device_id=device if device.type == "cuda" else None,
    )


def build_session(env: RankEnv, device: torch.device, dims: ParallelDims) -> Session:
    """Mesh and point-to-point groups on an initialized process group; collective: every rank calls it."""
    mesh = dims.build_mesh(device.type)
    ranks = list(range(env.world_size))
    return Session(env=env, device=device, dims=dims, mesh=mesh,
                   inputs_group=dist.new_group(ranks), latents_group=dist.new_group(ranks))


def _abandon_process_group() -> None:
    """After a failure: nccl's orderly destroy can block on the peers' unmatched operations, and a rank
    that never exits keeps torchrun/srun from stopping the others. Abort instead; gloo destroys fine."""
    if dist.get_backend() == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


@contextmanager
def distributed_session(
    resolve_dims: Callable[[int], ParallelDims], *, timeout_s: float, env: RankEnv | None = None,
    store_prefix: str = "",
) -> Iterator[Session]:
    """Start the process group, agree on the split, build the mesh; always tear down.

    `resolve_dims(world_size)` is called on every rank; it is deterministic, so a configuration error is
    raised on all ranks alike and every rank exits non-zero.
    """
    env = env or rank_env()
    device = pick_device(env.local_rank)
    init_process_group(env, device, timeout_s, store_prefix)
    try:
        dims = resolve_dims(env.world_size)
        log.debug("rank %d on %s (%s), mesh %s", env.rank, device, socket.gethostname(), dims.describe())
        yield build_session(env, device, dims)
    except BaseException:
        if dist.is_initialized():
            _abandon_process_group()
        raise
    else:
        dist.destroy_process_group()
