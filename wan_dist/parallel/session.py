"""The distributed session: ranks from torchrun or Slurm, one device per local rank, the process group, the
values every rank must agree on, and teardown that always happens. The run's own groups (the layout's
mesh, the handoff's hops, the VAE bands') are the World's (world.py)."""

from __future__ import annotations

import datetime
import logging
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..config.errors import ConfigError

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.5
# After the watch gives up on a peer: how long the main thread may take to notice before the process is
# ended for it (well inside the 45 s a run may take past parallel.timeout_s to end).
GRACE_S = 30.0
POLL_S = 0.05  # how often a wait for another rank's post looks at the store
# How the watch stops the main thread: a signal of the library's own while a session runs, so that the
# user's Ctrl-C (SIGINT) and the launcher's SIGTERM keep their meaning.
INTERRUPT_SIGNAL = signal.SIGUSR1


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
    # The rendezvous store's view of the other ranks (None in a world of one, or where the process group
    # was started by someone else): waits on another rank's progress go through it.
    peers: Heartbeat | None = None

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

    def follow_rank_zero(self, name: str) -> None:
        """Every rank continues once rank 0 reaches `name`, however long rank 0's own work before it takes
        (a decode, writing a video): the collective that follows then waits only for the transfer."""
        if self.peers is None:
            return
        if self.rank == 0:
            self.peers.post(name)
        else:
            self.peers.await_post(name, src=0, consume=False)

    def meet(self, name: str) -> None:
        """Every rank continues once all have reached `name` (before collectives that follow work of
        each rank's own, such as planning or loading)."""
        if self.peers is not None:
            self.peers.meet(name)

    def gather_to_zero(self, value: Any) -> list[Any] | None:
        self.follow_rank_zero("gather_to_zero")
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(value, out, dst=0)
        return out


def check_gpus_per_node(device_count: int, ranks_on_node: int) -> None:
    """nccl needs a GPU of its own per rank: two ranks on one GPU fail in NCCL's init ("Duplicate GPU
    detected") with a message that names neither count, so they are refused before any NCCL init."""
    if ranks_on_node > device_count:
        raise ConfigError(
            f"{ranks_on_node} ranks on this node but {device_count} GPUs: nccl needs one GPU per rank; start "
            f"at most {device_count} ranks per node (torchrun --nproc_per_node={device_count}, or srun with "
            f"--ntasks-per-node={device_count})")


def pick_device(local_rank: int, local_world_size: int = 1) -> torch.device:
    """This rank's GPU (the current CUDA device from here on), or the CPU where there is none.
    `local_world_size`: the ranks on this node where the launcher says (torchrun), all seeing every GPU."""
    if torch.cuda.is_available():
        count = torch.cuda.device_count()
        check_gpus_per_node(count, local_world_size)
        # Slurm may bind each task to GPUs of its own (--gpus-per-task): its local rank 3 then sees cuda:0.
        device = torch.device("cuda", local_rank % count)
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


class Heartbeat:
    """Each rank bumps a counter in the rendezvous store every HEARTBEAT_S from a thread of its own, which
    runs while the main thread waits in a collective or computes. A rank whose counter stands still died
    or hangs (a stopped process, a wedged device).

    The same thread watches the peers: once one has been silent for `timeout_s` (and neither finished nor
    said it is failing), it interrupts the main thread, which then fails naming that rank, wherever it is:
    computing (a DiT rank denoising while rank 0 is gone talks to nobody), or waiting in Python. A main
    thread stuck in a native wait that no interrupt reaches (a collective entered just before the peer
    went, a communicator's init) is given GRACE_S more; then `on_hang` gets the message, to say it and end
    the process. So a lost peer ends every rank within timeout_s + GRACE_S and a few heartbeats."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, *, timeout_s: float | None = None,
                 on_hang: Callable[[str], None] | None = None, grace_s: float = GRACE_S) -> None:
        self._store, self.rank, self.world_size = store, rank, world_size
        self._timeout_s, self._on_hang, self._grace_s = timeout_s, on_hang, grace_s
        self._peers = [r for r in range(world_size) if r != rank]
        self._stop = threading.Event()
        self._failing = threading.Event()  # the main thread is diagnosing a failure of its own
        self._main_thread: int | None = None  # where `interrupting` installed the handler
        self.lost_message: str | None = None  # set by the watch once it gives up on a peer
        self._posted: dict[str, int] = {}
        self._thread = threading.Thread(target=self._beat, name="wan_dist-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        seen = {r: (-1, time.monotonic()) for r in self._peers}  # counter, when it last moved
        while True:
            try:
                self._store.add(f"heartbeat/{self.rank}", 1)
                if self._timeout_s is not None:
                    silent = self._silent_for(seen, self._timeout_s)
                    if silent:
                        return self._give_up(_lost_peers_message(
                            silent, None, self._timeout_s,
                            f"no heartbeat for parallel.timeout_s={self._timeout_s:g} s, so this rank gave up"))
            except Exception as error:  # the store's host is gone
                if self._stop.is_set() or self._timeout_s is None:
                    return
                return self._give_up(_lost_peers_message(None, error, self._timeout_s))
            if self._stop.wait(HEARTBEAT_S):
                return

    def _silent_for(self, seen: dict[int, tuple[int, float]], limit_s: float) -> list[int]:
        now, silent = time.monotonic(), []
        for peer in self._peers:
            count = self._store.add(f"heartbeat/{peer}", 0)
            if count != seen[peer][0]:
                seen[peer] = (count, now)
            elif now - seen[peer][1] > limit_s and not any(
                    self._store.check([f"{state}/{peer}"]) for state in ("done", "failed")):
                silent.append(peer)
        return silent

    def _give_up(self, message: str) -> None:
        self.lost_message = message
        try:
            self._store.set(f"failed/{self.rank}", "1")  # this rank's silence from now on is no loss
        except Exception:
            pass
        if self._stop.is_set():
            return
        if not self._failing.is_set() and self._main_thread is not None:  # else it is on its way out already
            signal.pthread_kill(self._main_thread, INTERRUPT_SIGNAL)
        if not self._stop.wait(self._grace_s) and self._on_hang is not None:
            self._on_hang(message)

    @contextmanager
    def interrupting(self) -> Iterator[None]:
        """While inside (on the main thread), a peer given up on raises PeerLostError in the main thread:
        at its next bytecode, so also out of a sleep or a lock's wait, not out of a native wait (which
        ends by its own timeout, or the process by `on_hang`). Raised wherever it lands, the error
        carries the one line itself."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(INTERRUPT_SIGNAL, self._raise_lost)
        self._main_thread = threading.get_ident()
        try:
            yield
        finally:
            self._main_thread = None
            signal.signal(INTERRUPT_SIGNAL, previous)

    def _raise_lost(self, _signum: int, _frame: Any) -> None:
        if self.lost_message is not None and not self._failing.is_set():
            self._failing.set()
            raise PeerLostError(self.lost_message)

    def silent_peers(self) -> list[int] | None:
        """The other ranks that neither beat for 4 heartbeats nor said they are failing too (a rank that
        fails because of a lost peer is not lost itself); None when the store cannot be reached."""
        self._failing.set()
        try:
            self._store.set(f"failed/{self.rank}", "1")
            first = {r: self._store.add(f"heartbeat/{r}", 0) for r in self._peers}
            deadline = time.monotonic() + 4 * HEARTBEAT_S
            silent = set(self._peers)
            while silent and time.monotonic() < deadline:
                silent = {r for r in silent if self._store.add(f"heartbeat/{r}", 0) == first[r]}
                self._stop.wait(HEARTBEAT_S / 4)
            return sorted(r for r in silent if not self._store.check([f"failed/{r}"]))
        except Exception:
            return None

    def diagnose(self, error: BaseException) -> str | None:
        """The one line for `error`, when it is a lost peer's doing; None when nobody is lost (then the
        error is this rank's own, or the user's Ctrl-C)."""
        if self.lost_message is not None:
            self._failing.set()
            return self.lost_message
        if not isinstance(error, (Exception, Terminated)):
            return None
        silent = self.silent_peers()
        return self.lost_message or _lost_peers_message(silent, error, self._timeout_s)

    def post(self, name: str) -> None:
        """Say that this rank has reached `name` (its n-th time), for `await_post` on another rank."""
        count = self._posted[name] = self._posted.get(name, 0) + 1
        self._store.set(f"posted/{name}/{count}", "1")

    def await_post(self, name: str, src: int, *, consume: bool = True) -> None:
        """Wait until rank `src` posts `name` (its n-th time on the n-th call here), as long as that takes
        while `src` is alive: a rank waiting for rank 0's decode or a DiT rank's denoise must not run into
        the collective timeout, which bounds a transfer, not the work before it. A lost peer ends the wait
        (the watch interrupts it), and so does `src` failing. `consume`: this rank is the post's only
        reader, which then removes it from the store."""
        count = self._posted[name] = self._posted.get(name, 0) + 1
        key = f"posted/{name}/{count}"
        while not self._store.check([key]):
            if self.lost_message is not None:
                self._failing.set()
                raise PeerLostError(self.lost_message)
            if self._store.check([f"failed/{src}"]):
                raise PeerLostError(f"rank {src} failed (its own error says why) while this rank waited for it")
            time.sleep(POLL_S)
        if consume:
            self._store.delete_key(key)

    def meet(self, name: str) -> None:
        """Every rank continues once all have reached `name`, however long each one's own work took."""
        self.post(f"{name}/{self.rank}")
        for peer in self._peers:
            self.await_post(f"{name}/{peer}", peer, consume=False)

    def finish(self) -> None:
        """This rank is done: its silence from now on is no loss."""
        self._store.set(f"done/{self.rank}", "1")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _lost_peers_message(lost: list[int] | None, error: BaseException | None, timeout_s: float | None,
                        reason: str | None = None) -> str | None:
    if reason is None:
        text = str(error).strip()
        reason = text.splitlines()[0][:200] if text else type(error).__name__
    if lost is None:
        return f"lost contact with the rendezvous store (its host, rank 0's node, is likely gone): {reason}"
    if not lost:
        if error is not None and ("timed out" in reason.lower() or "timeout" in reason.lower()):
            return (f"a collective timed out after parallel.timeout_s={timeout_s:g} s while every rank was alive: "
                    f"some rank's work between two collectives took longer; set parallel.timeout_s to more "
                    f"seconds than that work takes: {reason}")
        return None
    who = f"rank {lost[0]}" if len(lost) == 1 else f"ranks {', '.join(map(str, lost))}"
    if error is None:
        return f"{who} stopped responding: {reason}"
    if "timed out" in reason.lower() or "timeout" in reason.lower():
        return (f"{who} stopped responding (no heartbeat) and this rank gave up after "
                f"parallel.timeout_s={timeout_s:g} s: {reason}")
    return f"{who} was lost (its process ended or stopped responding): {reason}"


@contextmanager
def _signals_deferred() -> Iterator[None]:
    """While a failure is being diagnosed, the launcher's SIGTERM (torchrun stops every rank once one has
    failed) and SIGINT must not cut the diagnosis short: the process is about to exit with the better error
    anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    deferred = (signal.SIGTERM, signal.SIGINT, INTERRUPT_SIGNAL)
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in deferred}
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


def new_group_with_timeout(ranks: list[int], timeout_s: float | None,
                           device: torch.device | None = None) -> dist.ProcessGroup:
    """`dist.new_group` with the collective timeout (a new group otherwise takes the backend's default,
    not the default group's: gloo 30 min, nccl 10 min). Collective: every rank calls it.

    With `device`, the group's members run one collective on it at once. On nccl a group's communicator
    is created by its first collective, in a blocking init that no timeout covers; made here, while every
    member is known to be arriving, it exists before the group's first point-to-point transfer, so that
    `dist.batch_isend_irecv` runs on it between any two members (its docs: only a group's first
    collective needs all of the group's ranks) instead of creating a communicator of its own for the
    pair, as an unbatched send/recv would, lazily and outside every timeout."""
    timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
    group = dist.new_group(ranks, timeout=timeout)
    if device is not None and dist.get_rank() in ranks:
        dist.all_reduce(torch.zeros(1, device=device), group=group)
    return group


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
    on_hang: Callable[[str], None] | None = None,
) -> Iterator[Session]:
    """Start the process group; always tear down. A ConfigError raised inside (the plan is deterministic,
    so raised on all ranks alike) ends every rank non-zero without blaming a peer. A lost peer raises
    PeerLostError naming it; `on_hang` (see Heartbeat) gets its message where this rank's main thread is
    stuck in a wait that cannot be interrupted: it should say it and end the process."""
    env = env or rank_env()
    device = pick_device(env.local_rank, env.local_world_size)
    store = init_process_group(env, device, timeout_s, store_prefix)
    heartbeat = Heartbeat(store, env.rank, env.world_size, timeout_s=timeout_s, on_hang=on_hang) \
        if store is not None else None
    try:
        log.debug("rank %d of %d on %s (%s)", env.rank, env.world_size, device, socket.gethostname())
        with heartbeat.interrupting() if heartbeat is not None else nullcontext():
            yield Session(env=env, device=device, timeout_s=timeout_s, peers=heartbeat)
    except GeneratorExit:
        # The watch's PeerLostError landed in the caller's `with` machinery before it came back here: the
        # error is on its way out already; only the teardown is left.
        if dist.is_initialized():
            _abandon_process_group()
        raise
    except BaseException as error:
        # Deferred also: the watch's interrupt, where it gave up on a peer while this rank was failing of
        # its own accord (it comes at the main thread's next bytecode, wherever that is).
        with _signals_deferred():
            # A ConfigError is raised on every rank alike: nobody is lost.
            lost_message = heartbeat.diagnose(error) \
                if heartbeat is not None and not isinstance(error, ConfigError) else None
            if dist.is_initialized():
                _abandon_process_group()
        if lost_message:
            raise PeerLostError(lost_message) from error
        raise
    else:
        if heartbeat is not None:
            heartbeat.finish()
        dist.destroy_process_group()
    finally:
        if heartbeat is not None:
            heartbeat.close()
