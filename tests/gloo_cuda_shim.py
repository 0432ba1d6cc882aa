"""Point-to-point calls on gloo with tensors in GPU memory, for tests that run several ranks on one GPU.

Gloo's collectives take CUDA tensors: all-to-all, all-gather, broadcast and all-reduce each have a CUDA
work that copies through pinned host memory. Its send and recv do not: they hand the tensor's data
pointer to the TCP transport as it is, which then reads or writes device memory as if it were host
memory. `staged_point_to_point()` gives send and recv what the collectives already do: while it is
entered, torch.distributed's `isend`, `irecv`, `send` and `recv` copy a device tensor to a pinned host
buffer and send that, or receive into one and copy it to the caller's tensor once the transfer is over
(in the returned work's `wait`).

The library stays as it is. Every point-to-point call reaches gloo through these four module functions:
the handoff's `dist.isend`/`dist.recv`, yunchang's ring (`dist.P2POp(dist.isend, ...)` and
`batch_isend_irecv`, which on gloo, a backend without coalescing, calls each op's function and returns
its work) and torch's own `send`/`recv`. They are replaced in `torch.distributed` and in
`torch.distributed.distributed_c10d` alike, because `P2POp` accepts only ops that are the latter's
`isend`/`irecv`, and `batch_isend_irecv` tells a send from a receive by comparing with them.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

_NAMES = ("isend", "irecv", "send", "recv")
_MODULES = (dist, dist.distributed_c10d)


@dataclass
class StagingCounts:
    """How many tensors went through a host buffer, each way: a test can tell that the shim saw the
    traffic it is there for."""

    sent: int = 0
    received: int = 0


class _StagedWork:
    """The work of a transfer from or into a host copy: keeps the copy alive until the transfer is over
    and, for a receive, copies it into the caller's tensor on `wait`, as a receive's result is only
    defined after its wait."""

    def __init__(self, work: Any, host: torch.Tensor, target: torch.Tensor | None = None) -> None:
        self._work, self._host, self._target = work, host, target

    def wait(self, *args: Any, **kwargs: Any) -> bool:
        done = self._work.wait(*args, **kwargs)
        if self._target is not None:
            self._target.copy_(self._host)
            self._target = None
        return done

    def __getattr__(self, name: str) -> Any:
        return getattr(self._work, name)


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    # Pinned, as gloo's own CUDA works use: the device copies run at full speed.
    return torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=tensor.is_cuda)


@contextlib.contextmanager
def staged_point_to_point(*, also_cpu: bool = False) -> Iterator[StagingCounts]:
    """While entered, point-to-point calls in this process stage device tensors through host memory.
    `also_cpu` stages host tensors the same way, so that a machine without a GPU runs the same code."""
    originals = {name: getattr(dist.distributed_c10d, name) for name in _NAMES}
    counts = StagingCounts()
    # Set while an original runs: torch's `send`/`recv` call `isend`/`irecv`, which then must pass the
    # host copy through instead of staging it again.
    inside = threading.local()

    def staged(tensor: torch.Tensor) -> bool:
        return not getattr(inside, "active", False) and (also_cpu or tensor.device.type != "cpu")

    def call(fn: Callable[..., Any], host: torch.Tensor, args: tuple, kwargs: dict) -> Any:
        inside.active = True
        try:
            return fn(host, *args, **kwargs)
        finally:
            inside.active = False

    def staged_send(name: str) -> Callable[..., Any]:
        original = originals[name]

        def send(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not staged(tensor):
                return original(tensor, *args, **kwargs)
            host = _host_copy(tensor).copy_(tensor)
            counts.sent += 1
            work = call(original, host, args, kwargs)
            # `send` returns once done; `isend` returns a work, which must keep the copy alive.
            return None if work is None else _StagedWork(work, host)

        return functools.wraps(original)(send)

    def staged_receive(name: str) -> Callable[..., Any]:
        original = originals[name]

        def receive(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if not staged(tensor):
                return original(tensor, *args, **kwargs)
            host = _host_copy(tensor)
            counts.received += 1
            result = call(original, host, args, kwargs)
            if name == "recv":  # done already; returns the source rank
                tensor.copy_(host)
                return result
            return None if result is None else _StagedWork(result, host, tensor)

        return functools.wraps(original)(receive)

    replacements = {"isend": staged_send("isend"), "send": staged_send("send"),
                    "irecv": staged_receive("irecv"), "recv": staged_receive("recv")}
    saved = [(module, name, getattr(module, name)) for module in _MODULES for name in _NAMES]
    for module in _MODULES:
        for name, fn in replacements.items():
            setattr(module, name, fn)
    try:
        yield counts
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)
