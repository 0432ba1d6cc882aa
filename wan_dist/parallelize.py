"""Everything done to a loaded DiT before it denoises, in one place and a fixed order, undone by one handle.

Order: the attention kernel (diffusers' backend for every attention that does not go through USP), the
context cache (cross-attention keys and values once per prompt), the sequence split (hooks from the
declarative plan and the USP self-attention processor), then compilation, which traces the hooks and
processors installed before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from .attention import DIFFUSERS_BACKENDS
from .context_cache import ContextCache, cache_context_kv
from .model_hooks import ModelHooks
from .sequence_parallel import parallelize_sequence


@dataclass
class DitHandle:
    """What `parallelize_dit` installed; `remove()` gives the model back as it was."""

    parts: list[ModelHooks] = field(default_factory=list)
    context_cache: ContextCache | None = None
    _backends: list[tuple[object, object]] = field(default_factory=list)
    _active_backend: object | None = None
    _compiled: list[torch.nn.Module] = field(default_factory=list)

    def remove(self) -> None:
        for block in self._compiled:
            # nn.Module.compile() keeps the compiled call here; None is what an uncompiled module has.
            block._compiled_call_impl = None
        for part in reversed(self.parts):
            part.remove()
        for processor, backend in self._backends:
            processor._attention_backend = backend
        if self._active_backend is not None:
            from diffusers.models.attention_dispatch import _AttentionBackendRegistry

            # set_attention_backend also makes its backend the process-wide default: put that back too.
            _AttentionBackendRegistry.set_active_backend(self._active_backend)
        self.parts.clear()
        self._backends.clear()
        self._compiled.clear()
        self._active_backend = self.context_cache = None


def _set_backend(transformer: torch.nn.Module, kernel: str, handle: DitHandle) -> None:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    handle._backends = [(m.processor, m.processor._attention_backend) for m in transformer.modules()
                        if hasattr(getattr(m, "processor", None), "_attention_backend")]
    handle._active_backend = _AttentionBackendRegistry.get_active_backend()[0]
    transformer.set_attention_backend(DIFFUSERS_BACKENDS[kernel])


def parallelize_dit(
    transformer: torch.nn.Module,
    *,
    kernels: dict[str, str],
    device: torch.device,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    context_cache: bool = True,
    compile_blocks: bool = False,
) -> DitHandle:
    """Apply, in order, the kernels (`kernels`: the plan's kernel per attention use), the context cache
    (not with compilation, whose traced blocks would bypass it), the sequence split over the ulysses x
    ring groups (nothing when both have one rank) and per-block compilation."""
    handle = DitHandle()
    if kernels["cross_attention"] != "sdpa":
        _set_backend(transformer, kernels["cross_attention"], handle)
    if context_cache and not compile_blocks:
        cache_handle = cache_context_kv(transformer)
        handle.parts.append(cache_handle)
        handle.context_cache = cache_handle.cache
    handle.parts.append(parallelize_sequence(transformer, ulysses_group=ulysses_group, ring_group=ring_group,
                                             device=device, kernel=kernels["sequence_parallel"]))
    if compile_blocks:
        for block in transformer.blocks:
            block.compile()
            handle._compiled.append(block)
    return handle
