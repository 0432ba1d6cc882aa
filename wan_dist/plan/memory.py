"""What a rank's memory will hold, predicted before loading, and what it did hold, measured.

The plan's memory model per rank: the weights (exact, from the safetensors headers, the dtype and the
shard), the DiT's activations (the largest live set inside one block, from the tokens this rank holds, the
width, the FFN size and the sequence split), the FSDP gather buffers (the block running, the one being
prefetched, and the root's own weights while the forward runs), the context cache, and the VAE decode
(per latent-frame chunk at full resolution, or per tile). The predicted peak is the weights plus the
larger of the denoise and the decode phase.

The block's live set follows diffusers' WanTransformerBlock: in the self-attention the input, its fp32
norm temporaries, q, k and v, the rotary temporaries and the attention output are alive together; in the
feed-forward the input, the normed input and the two FFN-wide intermediates. `measure_peak_bytes` measures
the same on a CPU (torch's profiler, every allocation and free in order), which is what the model is
checked against.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config.presets import IMAGE_TOKENS, TEXT_MAX_TOKENS


@dataclass(frozen=True)
class RankMemory:
    """Bytes, per rank. `peak` is what the device must hold at the worst moment."""

    weights: int
    activations: int = 0  # the DiT's live set in one block forward, with the tensors that outlive blocks
    gather_buffers: int = 0  # FSDP: whole blocks gathered at once (the running and the prefetched one)
    context_cache: int = 0
    decode: int = 0  # the VAE decode's activations and the decoded video

    @property
    def peak(self) -> int:
        return self.weights + max(self.activations + self.gather_buffers + self.context_cache, self.decode)

    def to_json(self) -> dict[str, int]:
        return {"weights_bytes": self.weights, "activations_bytes": self.activations,
                "gather_buffers_bytes": self.gather_buffers, "context_cache_bytes": self.context_cache,
                "decode_bytes": self.decode, "peak_bytes": self.peak}


def block_activation_bytes(dit_config: dict, tokens: int, dtype_bytes: int, *, ulysses: int = 1,
                           ring: int = 1) -> int:
    """The largest live set of one block forward holding `tokens` tokens (this rank's shard), per token:
    self-attention 4 model-dtype and 3 fp32 widths (the input, q, k, v and the output; the fp32 norm,
    modulation and rotary temporaries), feed-forward 3 model-dtype widths and two FFN-wide tensors.
    Measured on a CPU (measure_peak_bytes) at fp32 and bf16, 512 to 5120 wide: within 3%.

    The sequence split adds a phase of its own, after the fp32 temporaries are freed, so it raises the
    peak only where it outgrows them: Ulysses holds the input, q, k, v, their copies re-laid by the
    all-to-alls and the output in both layouts (9 to 10 model-dtype widths, the gloo buffers' share
    varying from run to run); Ring the input, q, k, v, the next key/value block in flight and an fp32
    output accumulator, never above the fp32 temporaries in fp32 or bf16. Measured on 2 gloo ranks
    (tests/dist/test_memory_sequence.py): Ulysses' phase sets the peak of fp32 attention-bound blocks
    (within 11%); in bf16, and with Ring, the peak stays the unsplit block's (within 3%)."""
    dim = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
    ffn = dit_config["ffn_dim"]
    b = dtype_bytes
    attention = dim * (4 * b + 12)
    if ulysses > 1:
        attention = max(attention, dim * 10 * b)
    if ring > 1:
        attention = max(attention, dim * (6 * b + 4))
    feed_forward = b * (3 * dim + 2 * ffn)
    return tokens * max(attention, feed_forward)


def outside_block_bytes(dit_config: dict, tokens: int, total_tokens: int, dtype_bytes: int, *,
                        image: bool) -> int:
    """What lives through the whole forward beside the block: the hidden states, the rotary tables of this
    rank's tokens, the projected text (and image) context, and the full-length output before it is
    un-patchified (fp32)."""
    dim = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
    context = TEXT_MAX_TOKENS + (IMAGE_TOKENS if image else 0)
    out_channels = dit_config["out_channels"] * math.prod(dit_config["patch_size"])
    return (tokens * dim * dtype_bytes + tokens * dit_config["attention_head_dim"] * 2 * 4
            + context * dim * dtype_bytes + total_tokens * out_channels * 4)


def context_cache_bytes(dit_config: dict, dtype_bytes: int, *, contexts: int, image: bool) -> int:
    """Every block's cross-attention keys and values for `contexts` prompts (context_cache=true)."""
    dim = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
    tokens = TEXT_MAX_TOKENS + (IMAGE_TOKENS if image else 0)
    return dit_config["num_layers"] * contexts * 2 * tokens * dim * dtype_bytes


def vae_decode_bytes(vae_config: dict, *, height: int, width: int, num_frames: int, tiled: bool,
                     tile: int = 256) -> int:
    """The decode's peak beside the VAE weights: at full resolution (or one tile) the last up-block's
    working set and every causal conv's two-frame cache there, about 34 frame-planes of its width in fp32,
    plus the decoded video (fp32) and its uint8/float copies for writing."""
    channels = vae_config.get("base_dim", 96) * (vae_config.get("dim_mult") or [1])[0]
    h, w = (min(height, tile), min(width, tile)) if tiled else (height, width)
    working = 34 * channels * h * w * 4
    video = 2 * 3 * num_frames * height * width * 4
    return working + video


def measure_peak_bytes(fn: Callable[[], object]) -> int:
    """The most bytes that were alive at once while `fn` ran, over what was alive when it started: every
    CPU allocation and free, in order, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
