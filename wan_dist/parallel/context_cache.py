"""Cross-attention keys and values computed once per prompt instead of once per denoising step.

Every block's cross-attention projects the text (and, for I2V, CLIP image) context to keys and values.
The context is the same at every step of a video, so diffusers' pipeline recomputes the same tensors
`steps` times per branch. Here a forward pre-hook notes which context the call carries (the caller's own
tensors: the same objects step after step) and an attention processor on every `attn2` keeps, per
context, each block's keys and values. The queries and the attention itself run as in diffusers'
`WanAttnProcessor`, so the output is bit for bit the same.

It matters where the video is short next to the 512-token text context: on the CPU bench model (1,200
tokens) the context projections are 3.9% of a forward's FLOPs, and with a sequence split every rank
repeats them in full. At 480p x 81 frames on the 1.3B model (32,760 tokens) they are 0.05%.

The entries are keyed by the context tensors' identity and version: they are held while cached, so an
id cannot be reused by another tensor, and an in-place change bumps the version and misses the cache.
`capacity` contexts are kept (the conditional and unconditional prompt of one video). Calls with
gradients enabled, and inference-mode calls or tensors, bypass the cache. The weights must stay as they are while it is installed: fuse LoRAs
or change dtypes before, or `remove()` it and install it again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .model_hooks import ModelHooks
from ..config.presets import TEXT_MAX_TOKENS

ContextKey = tuple[tuple[int, int] | None, tuple[int, int] | None]


def _identity(tensor: torch.Tensor | None) -> tuple[int, int] | None:
    return None if tensor is None else (id(tensor), tensor._version)


@dataclass
class _Entry:
    held: tuple[torch.Tensor | None, torch.Tensor | None]  # keeps the ids in the key valid
    layers: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)


class ContextCache:
    """The cached keys and values per context, and the entry of the forward call now running."""

    def __init__(self, capacity: int = 2) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.capacity = capacity
        self._entries: OrderedDict[ContextKey, _Entry] = OrderedDict()
        self.current: _Entry | None = None

    def select(self, text: torch.Tensor | None, image: torch.Tensor | None) -> None:
        if text is None or torch.is_grad_enabled() or torch.is_inference_mode_enabled() \
                or any(t is not None and t.is_inference() for t in (text, image)):
            # Not a no_grad call on a fixed context (inference tensors have no version counter to key
            # on): compute as usual.
            self.current = None
            return
        key = (_identity(text), _identity(image))
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = _Entry(held=(text, image))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        self._entries.move_to_end(key)
        self.current = entry

    def clear(self) -> None:
        self._entries.clear()
        self.current = None

    def __len__(self) -> int:
        return len(self._entries)


def _context_kv(attn, encoder_hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keys and values of the text context and, when the block has image projections, of the image
    context before it: the arithmetic of diffusers' WanAttnProcessor."""
    from diffusers.models.transformers.transformer_wan import _get_added_kv_projections

    image = None
    if attn.add_k_proj is not None:
        # diffusers' processor: the text context is the last 512 tokens, the image context before them.
        image_length = encoder_hidden_states.shape[1] - TEXT_MAX_TOKENS
        image = encoder_hidden_states[:, :image_length]
        encoder_hidden_states = encoder_hidden_states[:, image_length:]
    if attn.fused_projections:
        key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
    else:
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
    kv = (attn.norm_k(key).unflatten(2, (attn.heads, -1)), value.unflatten(2, (attn.heads, -1)))
    if image is not None:
        key_img, value_img = _get_added_kv_projections(attn, image)
        kv += (attn.norm_added_k(key_img).unflatten(2, (attn.heads, -1)), value_img.unflatten(2, (attn.heads, -1)))
    return kv


class CachedContextAttnProcessor:
    """Wan cross-attention that takes the context's keys and values from the cache when it has them."""

    # Read by diffusers' context-parallel checks on every processor; this one never splits the context.
    _parallel_config = None

    def __init__(self, cache: ContextCache, attention_backend: object | None = None) -> None:
        self.cache = cache
        self._attention_backend = attention_backend  # set_attention_backend() sets it, as on diffusers'

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is None or attention_mask is not None or rotary_emb is not None:
            raise ValueError("the cached-context processor serves cross-attention without a mask only")
        entry = self.cache.current
        kv = entry.layers.get(id(attn)) if entry is not None else None
        if kv is None:
            kv = _context_kv(attn, encoder_hidden_states)
            if entry is not None:
                entry.layers[id(attn)] = kv
        query = attn.norm_q(attn.to_q(hidden_states)).unflatten(2, (attn.heads, -1))

        def attend(key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
            out = dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                        backend=self._attention_backend, parallel_config=None)
            return out.flatten(2, 3).type_as(query)

        # Image first, then text, added in diffusers' order.
        image_out = attend(*kv[2:]) if len(kv) > 2 else None
        out = attend(*kv[:2])
        if image_out is not None:
            out = out + image_out
        out = attn.to_out[0](out)
        return attn.to_out[1](out)


@dataclass
class ContextCacheHandle(ModelHooks):
    """Undoes `cache_context_kv`: removes the hooks, restores the processors, frees the cache."""

    cache: ContextCache = field(default_factory=ContextCache)

    def remove(self) -> None:
        super().remove()
        self.cache.clear()


def cache_context_kv(transformer: torch.nn.Module, *, capacity: int = 2) -> ContextCacheHandle:
    """Reuse each block's cross-attention keys and values across the forward calls that carry the same
    context tensors (see the module doc)."""
    cache = ContextCache(capacity)
    handle = ContextCacheHandle(cache=cache)

    def begin(module, args, kwargs):
        text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else \
            (args[2] if len(args) > 2 else None)
        image = kwargs["encoder_hidden_states_image"] if "encoder_hidden_states_image" in kwargs else \
            (args[3] if len(args) > 3 else None)
        cache.select(text, image)

    def end(module, args, kwargs, output):
        cache.current = None

    handle.hooks += [
        transformer.register_forward_pre_hook(begin, with_kwargs=True),
        transformer.register_forward_hook(end, with_kwargs=True, always_call=True),
    ]
    for block in transformer.blocks:
        backend = getattr(block.attn2.processor, "_attention_backend", None)
        handle.set_processor(block.attn2, CachedContextAttnProcessor(cache, backend))
    return handle
