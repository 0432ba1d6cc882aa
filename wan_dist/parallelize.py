"""Everything done to a loaded DiT before it denoises, in one place and a fixed order, undone by one handle.

Order: the attention kernel (diffusers' backend for every attention that does not go through USP), the
context cache (cross-attention keys and values once per prompt), the sequence split (hooks from the
declarative plan and the USP self-attention processor), FSDP2 (each block and the root sharded over the
DiT ranks, the next block's all-gather prefetched), then compilation, which traces the hooks and
processors installed before it. With FSDP the model is parallelized on the meta device and its shards
filled afterwards (loading.load_transformer_sharded), so no rank ever holds a replica.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

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


def _shard(transformer: torch.nn.Module, mesh: DeviceMesh) -> None:
    """Each block a unit of its own (its weights gathered just before it runs and freed right after),
    the rest (embeddings, output projection) the root's; while a block runs, the next one's all-gather is
    already under way. Sharding cannot be taken off again: the handle leaves it in place."""
    from torch.distributed.fsdp import fully_shard

    blocks = list(transformer.blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # The root too frees its gathered weights after each forward: they are needed again only next step.
    fully_shard(transformer, mesh=mesh, reshard_after_forward=True)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])


def parallelize_dit(
    transformer: torch.nn.Module,
    *,
    kernels: dict[str, str],
    device: torch.device,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    context_cache: bool = True,
    shard_mesh: DeviceMesh | None = None,
    compile_blocks: bool = False,
) -> DitHandle:
    """Apply, in order, the kernels (`kernels`: the plan's kernel per attention use), the context cache
    (not with compilation, whose traced blocks would bypass it), the sequence split over the ulysses x
    ring groups (nothing when both have one rank), FSDP2 over `shard_mesh` (None: no sharding) and
    per-block compilation."""
    handle = DitHandle()
    if kernels["cross_attention"] != "sdpa":
        _set_backend(transformer, kernels["cross_attention"], handle)
    if context_cache and not compile_blocks:
        cache_handle = cache_context_kv(transformer)
        handle.parts.append(cache_handle)
        handle.context_cache = cache_handle.cache
    handle.parts.append(parallelize_sequence(transformer, ulysses_group=ulysses_group, ring_group=ring_group,
                                             device=device, kernel=kernels["sequence_parallel"]))
    if shard_mesh is not None:
        _shard(transformer, shard_mesh)
    if compile_blocks:
        for block in transformer.blocks:
            block.compile()
            handle._compiled.append(block)
    return handle
