"""The distributed session: ranks from torchrun or Slurm, one device per local rank, the process group, the
values every rank must agree on, and teardown that always happens. The layout's mesh is the plan's
(parallel_dims), the point-to-point groups the handoff's (stage_split)."""

from __future__ import annotations

import datetime
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5


class PeerLostError(RuntimeError):
    """Other ranks died or stopped responding; the message names them, in one line."""


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every `finally` runs and no temp file stays behind.
    torchrun sends it to the other ranks as soon as one rank dies, often before their next collective
    would have failed, so it too leads to asking which peers are lost."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"the launcher stopped this rank with {signal.Signals(signum).name}")
        self.signum = signum


def raise_terminated(signum: int, _frame: Any) -> None:
    """A signal handler: `signal.signal(signal.SIGTERM, raise_terminated)`."""
    raise Terminated(signum)


@dataclass(frozen=True)
class RankEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str
    local_world_size: int = 1  # ranks on this node, where the launcher says (torchrun)


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
            launcher="torchrun", local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)),
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
    timeout_s: float | None = None  # every group of the run is created with it

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    @property
    def backend(self) -> str:
        return dist.get_backend()

    def agree(self, value: Any, src: int = 0) -> Any:
        """`value` as rank `src` has it, on every rank."""
        box = [value]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def least(self, value: int) -> int:
        """The smallest of the ranks' `value`s, on every rank."""
        # nccl reduces device tensors only; gloo host ones.
        device = self.device if self.backend == "nccl" else torch.device("cpu")
        box = torch.tensor([value], dtype=torch.int64, device=device)
        dist.all_reduce(box, op=dist.ReduceOp.MIN)
        return int(box.item())

    def gather_to_zero(self, value: Any) -> list[Any] | None:
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0)
        return out


def pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class Heartbeat:
    """Each rank bumps a counter in the rendezvous store every HEARTBEAT_S from a thread of its own, which
    runs while the main thread waits in a collective. When a collective fails, the ranks whose counter
    stands still are the ones that died or hang (a stopped process, a wedged device): the error names them
    instead of leaving the user to find out which of N ranks went first."""

    def __init__(self, store: dist.Store, rank: int, world_size: int) -> None:
        self._store, self.rank, self.world_size = store, rank, world_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="wan_dist-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while True:
            try:
                self._store.add(f"heartbeat/{self.rank}", 1)
            except Exception:  # the store's host is gone; the main thread will hear of it from its collective
                return
            if self._stop.wait(HEARTBEAT_S):
                return

    def silent_peers(self) -> list[int] | None:
        """The other ranks that neither beat for 4 heartbeats nor said they are failing too (a rank that
        fails because of a lost peer is not lost itself); None when the store cannot be reached."""
        try:
            self._store.set(f"failed/{self.rank}", "1")
            peers = [r for r in range(self.world_size) if r != self.rank]
            first = {r: self._store.add(f"heartbeat/{r}", 0) for r in peers}
            deadline = time.monotonic() + 4 * HEARTBEAT_S
            silent = set(peers)
            while silent and time.monotonic() < deadline:
                silent = {r for r in silent if self._store.add(f"heartbeat/{r}", 0) == first[r]}
                self._stop.wait(HEARTBEAT_S / 4)
            return sorted(r for r in silent if not self._store.check([f"failed/{r}"]))
        except Exception:
            return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _lost_peers_message(lost: list[int] | None, error: BaseException, timeout_s: float) -> str | None:
    reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
    if lost is None:
        return f"lost contact with the rendezvous store (its host, rank 0's node, is likely gone): {reason}"
    if not lost:
        return None
    who = f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))}"
    if "timed out" in reason.lower() or "timeout" in reason.lower():
        return (f"{who} stopped responding (no heartbeat) and a collective timed out after "
                f"parallel.timeout_s={timeout_s:g} s: {reason}")
    return f"{who} was lost (its process ended or stopped responding): {reason}"


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """While a failure is being diagnosed, the launcher's SIGTERM (torchrun stops every rank once one has
    failed) must not cut the diagnosis short: the process is about to exit with the better error anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# How nccl reports a failed or timed-out collective. torchrun sets 1 for its workers (the watchdog aborts
# the communicators and kills the process, so no Python handler runs and nobody says which rank was lost);
# 2 aborts the communicators too, which releases a main thread blocked in a CUDA sync on a collective
# that cannot finish, and then raises in the main thread, where the heartbeat names the lost rank.
# Blocking wait (TORCH_NCCL_BLOCKING_WAIT) would do the same but makes every collective wait on the
# host, which the step loop avoids.
NCCL_ERROR_ENV = {"TORCH_NCCL_ASYNC_ERROR_HANDLING": "2"}


def init_process_group(
    env: RankEnv, device: torch.device, timeout_s: float, store_prefix: str = ""
) -> dist.Store | None:
    """Start the process group; returns the rendezvous store (None for a world of one)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        # Read when each nccl group is constructed; set over torchrun's value on purpose.
        os.environ.update(NCCL_ERROR_ENV)
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.world_size == 1 and env.launcher == "python":
        # A world of one still gets a real group, so every code path is the same as with N ranks.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
        return None
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
    return store


def new_group_with_timeout(ranks: list[int], timeout_s: float | None) -> dist.ProcessGroup:
    """`dist.new_group` with the collective timeout (a new group otherwise takes the backend's default,
    not the default group's: gloo 30 min, nccl 10 min). Collective: every rank calls it."""
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    return dist.new_group(ranks, timeout=timeout)


def _abandon_process_group() -> None:
    """After a failure: nccl's orderly destroy can block on the peers' unmatched operations, and a rank
    that never exits keeps torchrun/srun from stopping the others. Abort instead; gloo destroys fine."""
    if dist.get_backend() == "nccl" and hasattr(dist.distributed_c10d, "_abort_process_group"):
        dist.distributed_c10d._abort_process_group()
    else:
        dist.destroy_process_group()


@contextmanager
def distributed_session(
    *, timeout_s: float, env: RankEnv | None = None, store_prefix: str = "",
) -> Iterator[Session]:
    """Start the process group; always tear down. A ConfigError raised inside (the plan is deterministic,
    so raised on all ranks alike) ends every rank non-zero without blaming a peer."""
    env = env or rank_env()
    device = pick_device(env.local_rank)
    store = init_process_group(env, device, timeout_s, store_prefix)
    heartbeat = Heartbeat(store, env.rank, env.world_size) if store is not None else None
    try:
        log.debug("rank %d of %d on %s (%s)", env.rank, env.world_size, device, socket.gethostname())
        yield Session(env=env, device=device, timeout_s=timeout_s)
    except BaseException as error:
        lost_message = None
        # A ConfigError is raised on every rank alike and KeyboardInterrupt is the user's: nobody is lost.
        if heartbeat is not None and isinstance(error, (Exception, Terminated)) and not isinstance(error, ConfigError):
            with _signals_deferred():
                lost_message = _lost_peers_message(heartbeat.silent_peers(), error, timeout_s)
        if dist.is_initialized():
            _abandon_process_group()
        if lost_message:
            raise PeerLostError(lost_message) from error
        raise
    else:
        dist.destroy_process_group()
    finally:
        if heartbeat is not None:
            heartbeat.close()
