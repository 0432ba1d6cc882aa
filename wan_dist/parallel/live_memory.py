"""The peak of live tensor bytes over a stretch of code, counted tensor by tensor.

Process RSS on CPU mixes the allocator's caching, the libraries and other threads into the number; this
counts only what the code under measurement allocates: every tensor storage an operator creates while
the counter is active is added when it appears and subtracted when it is freed, and the highest total is
the peak. It is deterministic (the same code gives the same number on a busy machine) and works on any
device, `meta` included (so a run on meta tensors measures what the same run would hold, without
computing). Tensors that existed before (weights, inputs) are not counted; kernels' private workspaces are
not seen. ``phase`` labels the code running now, and ``peaks`` keeps each label's own peak.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as live: ...`` then ``live.peak`` (bytes) and ``live.current``."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self.phase = ""
        self.peaks: dict[str, int] = {}
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage: torch.UntypedStorage) -> None:
        # The storage's Python object lives as long as its memory (PyObject preservation): its id names
        # the storage (meta storages all have address 0), and its finalizer runs when the last view goes.
        key = id(storage)
        # Views and in-place results share a storage already counted.
        if key in self._sizes:
            return
        nbytes = storage.nbytes()
        self._sizes[key] = nbytes
        self.current += nbytes
        self.peak = max(self.peak, self.current)
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), self.current)
        weakref.finalize(storage, self._freed, key)

    def _freed(self, key: int) -> None:
        self.current -= self._sizes.pop(key)
