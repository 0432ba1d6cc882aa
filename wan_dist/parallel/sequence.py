"""Sequence parallelism for the Wan DiT: a declarative split plan applied by generic removable hooks, and
an attention processor for the self-attention.

The plan (`WAN_SEQUENCE_PLAN`, the same points diffusers' `_cp_plan` for Wan names) says which module's
input or output is split or gathered on which dim:
- a per-token timestep (Wan2.2 TI2V: 2-D, one per token) is split with the tokens; Wan2.1's one timestep
  per video (1-D) is left whole;
- `rope`'s outputs (cos, sin) and `blocks.0`'s hidden states are split on the token dim: each rank keeps
  its contiguous shard, so rotary embeddings stay at each token's true position;
- `proj_out`'s output is gathered back to all N tokens, so the model returns the full noise prediction.
Every split pads the N tokens to a multiple of the sp degree; every block's self-attention (`attn1`) runs
through USP attention over the ulysses x ring axes with the padding masked. Cross-attention keeps its
full text/image keys and values and needs nothing.

Shard order: sp_index = ring_rank * ulysses_degree + ulysses_rank, the order USP attention expects.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from .attention import SequenceParallelAttention
from .model_hooks import ModelHooks


@dataclass(frozen=True)
class Split:
    """This rank's shard of a tensor along `dim` (the tokens padded to equal shards). With `ndim` set, only
    a tensor of that many dims is split (others pass whole)."""

    dim: int
    ndim: int | None = None


@dataclass(frozen=True)
class Gather:
    """All ranks' shards concatenated along `dim`, the padding cut off."""

    dim: int


# Module path -> what happens there: named inputs (str keys) or positions of the output tuple (int keys)
# to split, or the module's whole output to gather. "" is the transformer itself.
SequencePlan = dict[str, "dict[str | int, Split] | Gather"]
WAN_SEQUENCE_PLAN: SequencePlan = {
    "": {"timestep": Split(dim=1, ndim=2)},
    "rope": {0: Split(dim=1), 1: Split(dim=1)},
    "blocks.0": {"hidden_states": Split(dim=1)},
    "proj_out": Gather(dim=1),
}


@dataclass
class _ShardLayout:
    """Per-forward layout shared by the hooks of one parallelized model."""

    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    sp_rank: int
    sp_size: int
    num_tokens: int = 0
    shard_len: int = 0

    def set_tokens(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.shard_len = math.ceil(num_tokens / self.sp_size)

    @property
    def padded(self) -> bool:
        return self.shard_len * self.sp_size != self.num_tokens

    @property
    def num_valid(self) -> int | None:
        """Real tokens in this rank's shard; None on every rank when nothing was padded."""
        if not self.padded:
            return None
        return max(0, min(self.shard_len, self.num_tokens - self.sp_rank * self.shard_len))

    def shard(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        self.set_tokens(tensor.shape[dim])  # every split of one forward sees the same N tokens
        missing = self.shard_len * self.sp_size - tensor.shape[dim]
        if missing:
            pad = [0, 0] * (tensor.ndim - 1 - dim) + [0, missing]
            tensor = F.pad(tensor, pad)
        return tensor.narrow(dim, self.sp_rank * self.shard_len, self.shard_len).contiguous()

    def gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        for group in (self.ulysses_group, self.ring_group):
            size = dist.get_world_size(group)
            if size == 1:
                continue
            parts = [torch.empty_like(tensor) for _ in range(size)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            tensor = torch.cat(parts, dim=dim)
        return tensor.narrow(dim, 0, self.num_tokens)


def _apply_rotary(hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Identical arithmetic to diffusers' WanAttnProcessor, so results match bit for bit on one rank.
    x1, x2 = hidden.unflatten(-1, (-1, 2)).unbind(-1)
    cos = cos[..., 0::2]
    sin = sin[..., 1::2]
    out = torch.empty_like(hidden)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden)


class SequenceParallelAttnProcessor:
    """Wan self-attention with the token dim sharded: projections, q/k norms and rotary embeddings on
    the local shard, attention over all shards through USP."""

    def __init__(self, attention: SequenceParallelAttention, layout: _ShardLayout) -> None:
        self.attention = attention
        self.layout = layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("the sequence-parallel processor serves self-attention without a mask only")
        from diffusers.models.transformers.transformer_wan import _get_qkv_projections

        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query = attn.norm_q(query).unflatten(2, (attn.heads, -1))
        key = attn.norm_k(key).unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        if rotary_emb is not None:
            query = _apply_rotary(query, *rotary_emb)
            key = _apply_rotary(key, *rotary_emb)
        out = self.attention(
            query, key, value, scale=query.shape[-1] ** -0.5, num_valid=self.layout.num_valid
        )
        out = out.flatten(2, 3).type_as(query)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


class SequenceParallelHandle(ModelHooks):
    """Undoes `parallelize_sequence`: `remove()` takes the hooks off and restores the processors."""


def _input_hook(module: torch.nn.Module, splits: dict[str, Split], layout: _ShardLayout):
    positions = list(inspect.signature(module.forward).parameters)

    def split_inputs(module, args, kwargs):
        args = list(args)
        for name, rule in splits.items():
            if name in kwargs:
                value, put = kwargs[name], lambda v, name=name: kwargs.__setitem__(name, v)
            elif positions.index(name) < len(args):
                value, put = args[positions.index(name)], lambda v, i=positions.index(name): args.__setitem__(i, v)
            else:
                continue
            if isinstance(value, torch.Tensor) and (rule.ndim is None or value.ndim == rule.ndim):
                put(layout.shard(value, rule.dim))
        return tuple(args), kwargs

    return split_inputs


def _output_hook(rule: dict[int, Split] | Gather, layout: _ShardLayout):
    def split_or_gather(module, args, output):
        if isinstance(rule, Gather):
            return layout.gather(output, dim=rule.dim)
        parts = list(output)
        for index, split in rule.items():
            if split.ndim is None or parts[index].ndim == split.ndim:
                parts[index] = layout.shard(parts[index], split.dim)
        return type(output)(parts)

    return split_or_gather


def _apply_plan(transformer: torch.nn.Module, plan: SequencePlan, layout: _ShardLayout,
                handle: ModelHooks) -> None:
    for path, rule in plan.items():
        module = transformer.get_submodule(path)
        named = {key: split for key, split in rule.items() if isinstance(key, str)} if isinstance(rule, dict) else {}
        outputs = rule if isinstance(rule, Gather) else {k: s for k, s in rule.items() if isinstance(k, int)}
        if named:
            handle.hooks.append(module.register_forward_pre_hook(_input_hook(module, named, layout), with_kwargs=True))
        if outputs:
            handle.hooks.append(module.register_forward_hook(_output_hook(outputs, layout)))


def parallelize_sequence(
    transformer: torch.nn.Module,
    *,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    device: torch.device,
    kernel: str = "auto",
    plan: SequencePlan = WAN_SEQUENCE_PLAN,
) -> SequenceParallelHandle:
    """Shard a WanTransformer3DModel's tokens over the ulysses x ring groups (see the module doc)."""
    ulysses, ring = dist.get_world_size(ulysses_group), dist.get_world_size(ring_group)
    layout = _ShardLayout(
        ulysses_group=ulysses_group, ring_group=ring_group,
        sp_rank=dist.get_rank(ring_group) * ulysses + dist.get_rank(ulysses_group), sp_size=ulysses * ring,
    )
    handle = SequenceParallelHandle()
    if layout.sp_size == 1:
        return handle
    _apply_plan(transformer, plan, layout, handle)
    attention = SequenceParallelAttention(ulysses_group=ulysses_group, ring_group=ring_group, device=device,
                                          kernel=kernel)
    processor = SequenceParallelAttnProcessor(attention, layout)
    for block in transformer.blocks:
        handle.set_processor(block.attn1, processor)
    return handle
