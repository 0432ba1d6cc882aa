"""Sequence-parallel self-attention for the Wan DiT: xDiT's USP (Ulysses x Ring).

This is the only module that imports ``yunchang`` or ``xfuser``. Both are imported lazily: ``xfuser``
refuses to import without a GPU, and neither is needed by code that never builds an attention layer.

Layout of the work. Every rank holds one shard of the global token sequence. The shards are in "sp
order": ``sp_index = ring_rank * ulysses_degree + ulysses_rank``. A Ulysses all-to-all trades the
sequence split for a head split inside each Ulysses group, ring attention passes key/value blocks around
the ring group and merges the partial results by their log-sum-exp, and a second all-to-all restores
the sequence split.

Kernels:
- CPU: yunchang's ``LongContextAttention`` with our own block kernel (torch's CPU flash attention op,
  which returns the true log-sum-exp). yunchang's ``TORCH_MATH`` kernel returns a zero log-sum-exp, so
  its ring merge is a plain average of the blocks' outputs: wrong as soon as the ring degree is > 1.
- CUDA, fp16/bf16, the kernel chosen by ``resolve_kernel`` (fastest available first):
  ``fa3``/``fa2``: xfuser's ``xFuserLongContextAttention`` with ``AttnType.FA3``/``AttnType.FA`` (needs
  flash_attn_interface / flash_attn); ``cudnn``: the yunchang layer with cuDNN's fused attention as the
  block kernel; ``sdpa``: the same with torch's CUDA flash op. fp32, which flash kernels refuse, always
  takes the yunchang layer with torch's memory-efficient op. yunchang's own
  ``TORCH_FLASH`` kernel is not used: it casts the log-sum-exp to the input dtype, and a bf16 LSE
  (spacing 0.06 at 10) skews the ring merge weights by several percent.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DIFFUSERS_BACKENDS", "SequenceParallelAttention", "available_kernels", "resolve_kernel"]

# The kernels by name, fastest first where more than one is installed, and diffusers' name for each
# (used for everything that does not go through USP: cross-attention, and self-attention on one rank).
DIFFUSERS_BACKENDS = {"fa3": "_flash_3", "fa2": "flash", "cudnn": "_native_cudnn", "sdpa": "native"}

# Score given to every (query, padding key) pair. exp(-30000 - max) is exactly 0 in fp32, and so far
# below any real score that a block holding only padding keys gets zero weight in the ring merge too.
_MASK_SCORE = 30000.0
# CUDA flash kernels only take head dims that are multiples of 8.
_HEAD_DIM_MULTIPLE = 8
_HALF_DTYPES = (torch.float16, torch.bfloat16)


def available_kernels(device: torch.device) -> list[str]:
    """The attention kernels this device can run, fastest first. FlashAttention-3 and -2 need their
    packages (flash_attn_interface, flash_attn); cuDNN attention needs an sm80+ GPU; SDPA runs anywhere."""
    import importlib.util

    if torch.device(device).type != "cuda":
        return ["sdpa"]
    kernels = []
    if importlib.util.find_spec("flash_attn_interface") is not None:
        kernels.append("fa3")
    if importlib.util.find_spec("flash_attn") is not None:
        kernels.append("fa2")
    if torch.backends.cudnn.is_available() and torch.cuda.get_device_capability(device) >= (8, 0):
        kernels.append("cudnn")
    return kernels + ["sdpa"]


def resolve_kernel(name: str, device: torch.device) -> str:
    """`auto` is the fastest available kernel; a named one must be available (ConfigError otherwise)."""
    from .config import ConfigError

    available = available_kernels(device)
    if name == "auto":
        return available[0]
    if name not in available:
        raise ConfigError(f"attention={name!r} is not allowed: one of auto, {', '.join(available)} on this "
                          f"device ({torch.device(device).type})")
    return name


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@contextlib.contextmanager
def _yunchang_groups(
    ulysses_group: dist.ProcessGroup, ring_group: dist.ProcessGroup
) -> Iterator[None]:
    """Expose the groups through yunchang's module-level singleton while a layer is constructed.

    yunchang and xfuser layers read ``PROCESS_GROUP`` only in their constructors and keep their own
    references, so restoring the previous values afterwards leaves no global parallel state behind.
    """
    from yunchang.globals import PROCESS_GROUP

    saved = (PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG)
    PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = ulysses_group, ring_group
    try:
        yield
    finally:
        PROCESS_GROUP.ULYSSES_PG, PROCESS_GROUP.RING_PG = saved


def _attention_with_lse(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float | None = 0.0,
    alibi_slopes: Tensor | None = None,
    return_softmax: bool = False,
    use_cudnn: bool = False,
) -> tuple[Tensor, Tensor]:
    """One ring step's block attention: (B, S, H, D) in; (out (B, S, H, D), lse (B, H, S) fp32) out.

    The signature is the one yunchang's ring loop calls an ``attn_processor`` with; ``use_cudnn`` picks
    cuDNN's fused attention for fp16/bf16 on CUDA (bound with functools.partial).
    """
    if dropout_p or causal or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("only plain non-causal attention without dropout is supported")
    if return_softmax:
        raise NotImplementedError("return_softmax is not supported")
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, False, attn_mask=None, scale=softmax_scale
        )
    elif use_cudnn and q.dtype in _HALF_DTYPES:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, False, False, scale=softmax_scale
        )[:2]
        lse = lse.reshape(out.shape[:3])  # some cuDNN versions add a trailing dim of 1
    elif q.dtype in _HALF_DTYPES:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qt, kt, vt, 0.0, False, False, scale=softmax_scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, None, True, 0.0, False, scale=softmax_scale
        )[:2]
        # The memory-efficient kernel pads its LSE along the sequence to a multiple of 32.
        lse = lse[..., : q.shape[1]]
    return out.transpose(1, 2), lse.float()


class SequenceParallelAttention:
    """Exact self-attention over a token sequence sharded across ``ulysses_group`` x ``ring_group``.

    Call contract (every rank of the sequence-parallel group calls with the same shapes and the same
    padding decision, because the collectives inside must match):

    - ``query``, ``key``, ``value``: (batch, local_seq, heads, head_dim), this rank's shard of the global
      sequence, which is the concatenation of all shards in sp order
      ``sp_index = ring_rank * ulysses_degree + ulysses_rank``. ``local_seq`` is the same on every rank
      (the caller pads the global sequence at its end).
    - ``scale``: the softmax scale (usually ``head_dim ** -0.5``); always applied as given.
    - ``num_valid``: how many of this rank's tokens are real; the last ``local_seq - num_valid`` are
      padding, with zero influence on every real query (padding rows of the output are finite but
      meaningless). Pass it on EVERY rank whenever the global sequence was padded, even where it equals
      ``local_seq``, and ``None`` on every rank otherwise: the choice of path is made from
      ``num_valid is not None`` alone, so that no collective is needed to agree on it.

    Head counts that do not divide by the Ulysses degree are padded with zero heads, which are dropped
    again before returning. Returns (batch, local_seq, heads, head_dim) in the input dtype.
    Inference only: the custom block kernel has no backward.
    """

    def __init__(
        self,
        *,
        ulysses_group: dist.ProcessGroup,
        ring_group: dist.ProcessGroup,
        device: torch.device,
        kernel: str = "auto",
    ) -> None:
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"SequenceParallelAttention supports cpu and cuda devices, got {device}")
        self._ulysses_degree = dist.get_world_size(ulysses_group)
        self.kernel = resolve_kernel(kernel, device)

        from yunchang import LongContextAttention

        with _yunchang_groups(ulysses_group, ring_group):
            # attn_type=None is no AttnType, so yunchang's select_flash_attn_impl falls through to
            # attn_processor for every ring step.
            self._exact_attention = LongContextAttention(
                attn_type=None, attn_processor=_attention_with_lse
            )
            self._half_attention: torch.nn.Module | None = None
            if self.kernel in ("fa3", "fa2"):
                from xfuser.core.long_ctx_attention import xFuserLongContextAttention
                from yunchang.kernels import AttnType

                # With use_kv_cache=False (the default) xfuser's forward and ring function touch none
                # of xfuser's global state (no init_distributed_environment needed): they use only
                # the two groups captured here.
                self._half_attention = xFuserLongContextAttention(
                    attn_type=AttnType.FA3 if self.kernel == "fa3" else AttnType.FA)
            elif self.kernel == "cudnn":
                self._half_attention = LongContextAttention(
                    attn_type=None, attn_processor=functools.partial(_attention_with_lse, use_cudnn=True))

    def __call__(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        *,
        scale: float,
        num_valid: int | None = None,
    ) -> Tensor:
        if query.dim() != 4 or query.shape != key.shape or query.shape != value.shape:
            raise ValueError(
                "query, key and value must share one (batch, local_seq, heads, head_dim) shape, got "
                f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
            )
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        _, local_seq, heads, head_dim = query.shape
        if num_valid is not None and not 0 <= num_valid <= local_seq:
            raise ValueError(f"num_valid must be in [0, {local_seq}], got {num_valid}")

        q, k, v = self._pad(query, key, value, scale=scale, num_valid=num_valid)
        if self._half_attention is not None and q.dtype in _HALF_DTYPES:
            # xfuser's layer takes the attention module first (unused without a KV cache); yunchang's not.
            args = (None, q, k, v) if self.kernel in ("fa3", "fa2") else (q, k, v)
            out = self._half_attention(*args, softmax_scale=scale)
        else:
            out = self._exact_attention(q, k, v, softmax_scale=scale)
        if out.shape[2:] != (heads, head_dim):
            out = out[:, :, :heads, :head_dim].contiguous()
        return out

    def _pad(
        self, query: Tensor, key: Tensor, value: Tensor, *, scale: float, num_valid: int | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pad heads to a multiple of the Ulysses degree and, for masking, add a flag channel.

        Zero heads attend uniformly over zero values and so produce zeros, harmlessly. Masking adds
        channel ``head_dim``: ``+c`` on every query, ``0`` on real keys and ``-c`` on padding keys,
        with ``c * c * scale = _MASK_SCORE``, so a padding key's score drops by 30000 and a real key's
        score is unchanged; ``c`` is split evenly so that it stays small enough for fp16.
        """
        heads, head_dim = query.shape[2:]
        padded_heads = _round_up(heads, self._ulysses_degree)
        masked = num_valid is not None
        padded_dim = _round_up(head_dim + int(masked), _HEAD_DIM_MULTIPLE)
        if padded_heads == heads and padded_dim == head_dim:
            return query, key, value
        pad = (0, padded_dim - head_dim, 0, padded_heads - heads)
        q, k, v = (F.pad(t, pad) for t in (query, key, value))
        if masked:
            # Zero the padding tokens too, so that whatever the caller left there (even inf/nan)
            # cannot reach a real row through 0 * x.
            for t in (q, k, v):
                t[:, num_valid:] = 0
            c = math.sqrt(_MASK_SCORE / scale)
            q[..., head_dim] = c
            k[:, num_valid:, :, head_dim] = -c
        return q, k, v
