"""Everything done to a loaded DiT before it denoises, in one place and a fixed order, undone by one handle.

Order: the attention kernel (diffusers' backend for every attention that does not go through USP), the
context cache (cross-attention keys and values once per prompt), the sequence split (hooks from the
declarative plan and the USP self-attention processor), FSDP2 (each block and the root sharded over the
DiT ranks, the next block's all-gather prefetched), fp8 storage (diffusers' layerwise casting), block
offload (diffusers' group offloading), then compilation, which traces the hooks and processors installed
before it. With FSDP the model is parallelized on the meta device and its shards filled afterwards
(loading.load_transformer_sharded), so no rank ever holds a replica; fp8 storage set on the meta shards
makes the shards, and so the all-gathers, fp8.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from diffusers.hooks import HookRegistry, ModelHook

from .attention import DIFFUSERS_BACKENDS
from .context_cache import ContextCache, cache_context_kv
from .model_hooks import ModelHooks
from .sequence import parallelize_sequence


@dataclass
class DitHandle:
    """What `parallelize_dit` installed; `remove()` gives the model back as it was."""

    parts: list[ModelHooks] = field(default_factory=list)
    context_cache: ContextCache | None = None
    _backends: list[tuple[object, object]] = field(default_factory=list)
    _active_backend: object | None = None
    _compiled: list[torch.nn.Module] = field(default_factory=list)
    _offloaded: torch.nn.Module | None = None

    def remove(self) -> None:
        """Everything but FSDP2's sharding and fp8 storage, which cannot come off: casting the weights
        back would not bring back the precision fp8 lost (diffusers' casting hook refuses it too), so a
        model stored in fp8 keeps its casting hooks and stays usable. After block offload, the weights
        stay in CPU memory."""
        for block in self._compiled:
            # nn.Module.compile() keeps the compiled call here; None is what an uncompiled module has.
            block._compiled_call_impl = None
        if self._offloaded is not None:
            from diffusers.hooks.group_offloading import (
                _GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING,
            )

            # The hooks diffusers itself takes off before offloading a model again.
            registry = HookRegistry.check_if_exists_or_initialize(self._offloaded)
            for name in (_GROUP_OFFLOADING, _LAYER_EXECUTION_TRACKER, _LAZY_PREFETCH_GROUP_OFFLOADING,
                         _OFFLOAD_LEAD):
                registry.remove_hook(name, recurse=True)
            self._offloaded = None
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

    # FSDP2 wants one dtype per unit among parameters that train; inference trains none, and a block holds
    # bf16 (or fp8) layers beside the fp32 ones the class keeps.
    transformer.requires_grad_(False)
    blocks = list(transformer.blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    # The root too frees its gathered weights after each forward: they are needed again only next step.
    fully_shard(transformer, mesh=mesh, reshard_after_forward=True)
    for block, following in zip(blocks, blocks[1:]):
        block.set_modules_to_forward_prefetch([following])


class _KeepGatheredWeights(ModelHook):
    """Under FSDP2 a layer's weights, while its block runs, are views of the block's all-gather buffer,
    which FSDP frees after the block and fills again next time. Layerwise casting swaps each weight's data
    for a compute-dtype copy before the layer and for a storage-dtype copy after it: the weight would then
    no longer see the next all-gather, and its copy would outlive FSDP's free (over all blocks, a whole
    fp8 replica). Registered after the casting hook, so around it: the gathered view is put back."""

    def __init__(self) -> None:
        super().__init__()
        self.gathered: list[tuple[torch.nn.Parameter, torch.Tensor]] = []

    def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
        self.gathered = [(p, p.data) for p in module.parameters(recurse=False)]
        return args, kwargs

    def post_forward(self, module: torch.nn.Module, output):
        for param, data in self.gathered:
            param.data = data
        self.gathered = []
        return output


def _store_in(transformer: torch.nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype,
              sharded: bool) -> None:
    """diffusers' layerwise casting as `enable_layerwise_casting` applies it (the model's own skip
    patterns). On a sharded model it casts the meta shards, so FSDP2 stores and all-gathers fp8."""
    from diffusers.hooks.layerwise_casting import _LAYERWISE_CASTING_HOOK

    transformer.enable_layerwise_casting(storage_dtype=storage_dtype, compute_dtype=compute_dtype)
    if sharded:
        for module in transformer.modules():
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and registry.get_hook(_LAYERWISE_CASTING_HOOK) is not None:
                registry.register_hook(_KeepGatheredWeights(), "wan_dist_keep_gathered_weights")


# The host waits, after launching each offloaded block, for the block before it (below).
_OFFLOAD_LEAD = "wan_dist_offload_lead"


def offload_options(device: torch.device) -> dict[str, object]:
    """diffusers' group offloading, one block a group, as `parallelize_dit` applies it onto `device`."""
    streamed = device.type == "cuda"
    return dict(onload_device=device, offload_device=torch.device("cpu"), offload_type="block_level",
                num_blocks_per_group=1, use_stream=streamed, non_blocking=streamed,
                # Without it each block's offload waits for the compute stream to drain: a host sync per
                # block, and the device idles while the host launches the next block.
                record_stream=streamed,
                # The blocks are loaded into pinned memory (loading.load_transformer_to_host), which
                # diffusers then pins no second time; pinning per transfer instead would copy every block
                # into fresh pinned memory at every forward.
                low_cpu_mem_usage=False)


class _OffloadLead(ModelHook):
    """With record_stream, a block's device memory, offloaded, is reused only once the compute stream has
    run past that block; the host is held back only by the side stream's copies, which are the shorter
    whenever the prefetch hides them, so it would run ahead block after block, each one onloaded: up to
    the whole DiT on the device. After launching a block, the host waits for the block before it: the
    block just launched keeps the device busy meanwhile, and the device holds at most three blocks (the
    one finishing, the one launched, the next one arriving)."""

    def __init__(self, previous: list[torch.cuda.Event]) -> None:
        super().__init__()
        self.previous = previous  # shared by every block's hook: the last block's end, once recorded

    def post_forward(self, module: torch.nn.Module, output):
        end = torch.cuda.Event()
        end.record()
        if self.previous:
            self.previous.pop().synchronize()
        self.previous.append(end)
        return output


def _offload_blocks(transformer: torch.nn.Module, device: torch.device) -> None:
    """On CUDA the blocks sit in pinned CPU memory and the next block is copied in on a side stream while
    the current one runs; on a CPU (tests) the hooks run without a stream and move nothing."""
    from diffusers.hooks import apply_group_offloading

    options = offload_options(device)
    apply_group_offloading(transformer, **options)
    if options["record_stream"]:
        previous: list[torch.cuda.Event] = []
        for block in transformer.blocks:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(_OffloadLead(previous), _OFFLOAD_LEAD)


def parallelize_dit(
    transformer: torch.nn.Module,
    *,
    kernels: dict[str, str],
    device: torch.device,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    context_cache: bool = True,
    shard_mesh: DeviceMesh | None = None,
    storage_dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | None = None,
    offload: bool = False,
    compile_blocks: bool = False,
) -> DitHandle:
    """Apply, in order, the kernels (`kernels`: the plan's kernel per attention use), the context cache
    (not with compilation, whose traced blocks would bypass it), the sequence split over the ulysses x
    ring groups (nothing when both have one rank), FSDP2 over `shard_mesh` (None: no sharding), fp8
    storage (`storage_dtype`, cast per layer to `compute_dtype`; None: none), block offload to the CPU with
    `device` the onload device, and per-block compilation."""
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
    if storage_dtype is not None:
        if compute_dtype is None:
            raise ValueError("storage_dtype needs the compute_dtype the layers are cast to")
        _store_in(transformer, storage_dtype, compute_dtype, sharded=shard_mesh is not None)
    if offload:
        _offload_blocks(transformer, device)
        handle._offloaded = transformer
    if compile_blocks:
        for block in transformer.blocks:
            block.compile()
            handle._compiled.append(block)
    return handle
