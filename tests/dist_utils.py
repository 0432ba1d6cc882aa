"""Run a function on N ranks of a real process group, each rank in its own spawned process."""

from __future__ import annotations

import datetime
import gc
import multiprocessing
import multiprocessing.connection
import os
import pickle
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tests.launching import free_port



# Ranks are forked from a server process that imported torch, diffusers, transformers and the library
# once: a spawned rank would spend seconds of CPU importing them again, for every world of every test
# (minutes over the suite). Nothing in the server has run a kernel, started a thread or touched CUDA, so
# forking it is safe.
multiprocessing_context = multiprocessing.get_context("forkserver")
multiprocessing_context.set_forkserver_preload([
    "torch", "tests.modes", "wan_dist.run.stages", "diffusers.models.transformers.transformer_wan",
    "diffusers.models.autoencoders.autoencoder_kl_wan", "transformers.models.umt5.modeling_umt5",
])


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _worker(
    rank: int,
    world_size: int,
    backend: str,
    port: int,
    timeout: float,
    result_dir: str,
    call: bytes,
    environ: dict[str, str],
) -> None:
    # The caller's environment as it is now (the server's is from when it started).
    os.environ.clear()
    os.environ.update(environ)
    # Several ranks share a few cores: more than one thread each only makes them fight.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    # The preloaded modules' objects live as long as the rank: kept out of the collector's scans, so that
    # the stages' gc.collect() between phases costs milliseconds instead of a quarter second each.
    gc.freeze()
    result_path = Path(result_dir) / f"{rank}.pkl"
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        fn, args = pickle.loads(call)
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        # Pickle here, so that an unpicklable result fails in this rank with a traceback.
        payload = pickle.dumps((True, result, time.time()))
    except BaseException:
        payload = pickle.dumps((False, traceback.format_exc(), time.time()))
    _write_atomically(result_path, payload)


def run_on_ranks(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 300,
    backend: str = "gloo",
) -> list[Any]:
    """Call ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the results in rank order.

    ``fn`` must be a module-level function and its arguments and result picklable. Each rank runs in a
    new process (forked from the preloaded server) with a fresh process group on a free local port (``backend="nccl"`` also pins
    rank i to GPU i). If any rank raises, the others are terminated and a RuntimeError carries the
    traceback of the rank that failed first (later failures are usually its peers losing connection).
    """
    ctx = multiprocessing_context
    port = free_port()
    # Pickled by value here: multiprocessing's own pickler would pass each tensor as a shared-memory file
    # descriptor, and a fork server takes a few hundred of those at most.
    call = pickle.dumps((fn, args))
    with tempfile.TemporaryDirectory(prefix="run_on_ranks_") as result_dir:
        procs = [
            ctx.Process(
                target=_worker,
                args=(rank, world_size, backend, port, timeout, result_dir, call, dict(os.environ)),
                name=f"rank{rank}",
                daemon=True,
            )
            for rank in range(world_size)
        ]
        for proc in procs:
            proc.start()
        try:
            return _collect(procs, Path(result_dir), time.monotonic() + timeout)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()


def _collect(
    procs: list[multiprocessing.process.BaseProcess], result_dir: Path, deadline: float
) -> list[Any]:
    results: dict[int, Any] = {}
    pending = set(range(len(procs)))
    while pending:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"ranks {sorted(pending)} did not finish in time")
        multiprocessing.connection.wait([procs[r].sentinel for r in pending], timeout=remaining)
        for rank in sorted(pending):
            if procs[rank].exitcode is None:
                continue
            pending.discard(rank)
            path = result_dir / f"{rank}.pkl"
            if not path.exists():
                raise RuntimeError(
                    f"rank {rank} exited with code {procs[rank].exitcode} without a result"
                )
            ok, payload, _ = pickle.loads(path.read_bytes())
            if not ok:
                raise RuntimeError(_first_failure(result_dir))
            results[rank] = payload
    return [results[rank] for rank in range(len(procs))]


def _first_failure(result_dir: Path) -> str:
    failures = []
    for path in result_dir.glob("*.pkl"):
        ok, payload, when = pickle.loads(path.read_bytes())
        if not ok:
            failures.append((when, int(path.stem), payload))
    when, rank, trace = min(failures)
    others = sorted(r for _, r, _ in failures if r != rank)
    also = f" (ranks {others} failed later)" if others else ""
    return f"rank {rank} raised{also}:\n{trace}"
