"""Sequence parallelism for the Wan DiT, applied with removable hooks and an attention processor.

The plan (the same points diffusers' `_cp_plan` for Wan names):
- the transformer's input fixes the token count N and pads it to a multiple of the sp degree;
- `rope`'s output (cos, sin) and `blocks.0`'s hidden states are split on the token dim: each rank keeps
  its contiguous shard, so rotary embeddings stay at each token's true position;
- every block's self-attention (`attn1`) runs through USP attention over the ulysses x ring axes, with
  the padding masked; cross-attention keeps its full text/image keys and values and needs nothing;
- `proj_out`'s output is gathered back to all N tokens, so the model returns the full noise prediction.

Shard order: sp_index = ring_rank * ulysses_degree + ulysses_rank, the order USP attention expects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from .attention import SequenceParallelAttention
from .model_hooks import ModelHooks


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


def parallelize_sequence(
    transformer: torch.nn.Module,
    *,
    ulysses_group: dist.ProcessGroup,
    ring_group: dist.ProcessGroup,
    device: torch.device,
    kernel: str = "auto",
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
    patch_t, patch_h, patch_w = transformer.config.patch_size

    def count_tokens(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        _, _, frames, height, width = hidden.shape
        layout.set_tokens((frames // patch_t) * (height // patch_h) * (width // patch_w))

    def shard_rope(module, args, output):
        return tuple(layout.shard(freqs, dim=1) for freqs in output)

    def shard_hidden(module, args, kwargs):
        if "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": layout.shard(kwargs["hidden_states"], dim=1)}
        else:
            args = (layout.shard(args[0], dim=1), *args[1:])
        return args, kwargs

    def gather_output(module, args, output):
        return layout.gather(output, dim=1)

    handle.hooks += [
        transformer.register_forward_pre_hook(count_tokens, with_kwargs=True),
        transformer.rope.register_forward_hook(shard_rope),
        transformer.blocks[0].register_forward_pre_hook(shard_hidden, with_kwargs=True),
        transformer.proj_out.register_forward_hook(gather_output),
    ]
    attention = SequenceParallelAttention(ulysses_group=ulysses_group, ring_group=ring_group, device=device,
                                          kernel=kernel)
    processor = SequenceParallelAttnProcessor(attention, layout)
    for block in transformer.blocks:
        handle.set_processor(block.attn1, processor)
    return handle
