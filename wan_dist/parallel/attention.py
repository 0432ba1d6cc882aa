"""Sequence-parallel self-attention for the Wan DiT: xDiT's USP (Ulysses x Ring).

This is the only module that imports ``yunchang`` or ``xfuser``. Both are imported lazily: ``xfuser``
refuses to import without a GPU, and neither is needed by code that never builds an attention layer.

Layout of the work. Every rank holds one shard of the global token sequence. The shards are in "sp
order": ``sp_index = ring_rank * ulysses_degree + ulysses_rank``. A Ulysses all-to-all trades the
sequence split for a head split inside each Ulysses group, ring attention passes key/value blocks around
the ring group and merges the partial results by their log-sum-exp, and a second all-to-all restores
the sequence split.

Kernels, chosen per use by ``choose_kernel`` from the device's compute capability, the dtype, the head dim
and what the installed libraries say they can run (fastest first):
- ``fa3``/``fa2``: xfuser's ``xFuserLongContextAttention`` with ``AttnType.FA3``/``AttnType.FA``; counted
  only where yunchang and diffusers both import the package (their own flags) and the GPU fits (FA3:
  Hopper, FA2: sm80+).
- ``cudnn``: the yunchang layer with cuDNN's fused attention as the block kernel (sm80+).
- ``sdpa``: the same with torch's CUDA flash op; on CPU torch's CPU flash op, which returns the true
  log-sum-exp (yunchang's ``TORCH_MATH`` kernel returns a zero one, so its ring merge is a plain average
  of the blocks: wrong as soon as the ring degree is > 1).
The fast kernels take fp16/bf16 and head dims that are multiples of 8 only: fp32 takes torch's
memory-efficient op, and a head dim that is no multiple of 8 is padded with zero channels here. Where
padded tokens must be masked, every kernel is replaced by one that takes a key bias (torch's CPU flash op,
or the CUDA memory-efficient op): the head dim is never widened for the mask. yunchang's own
``TORCH_FLASH`` kernel is not used: it casts the log-sum-exp to the input dtype, and a bf16 LSE (spacing
0.06 at 10) skews the ring merge weights by several percent.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DIFFUSERS_BACKENDS", "SequenceParallelAttention", "available_kernels", "choose_kernel",
    "device_capability", "installed_kernel_libraries", "resolve_kernel", "usable_kernels",
]

# The kernels by name, fastest first where more than one is installed, and diffusers' name for each
# (used for everything that does not go through USP: cross-attention, and self-attention on one rank).
DIFFUSERS_BACKENDS = {"fa3": "_flash_3", "fa2": "flash", "cudnn": "_native_cudnn", "sdpa": "native"}

# Score added to every (query, padding key) pair. exp(-30000 - max) is exactly 0 in fp32, and so far
# below any real score that a block holding only padding keys gets zero weight in the ring merge too.
_MASK_SCORE = 30000.0
# CUDA flash kernels only take head dims that are multiples of 8.
_HEAD_DIM_MULTIPLE = 8
_HALF_DTYPES = (torch.float16, torch.bfloat16)
# Largest head dim each fast kernel takes (FlashAttention-2/-3 and torch's flash op: 256; cuDNN: 128 on
# every GPU generation torch enables it for).
_MAX_HEAD_DIM = {"fa3": 256, "fa2": 256, "cudnn": 128, "sdpa": 256}
# The first compute capability each fast kernel runs on, and the last (FA3 is built for Hopper only).
_CAPABILITY = {"fa3": ((9, 0), (9, 9)), "fa2": ((8, 0), (9, 9)), "cudnn": ((8, 0), (99, 99))}


def installed_kernel_libraries() -> frozenset[str]:
    """What the libraries that will call a kernel say they can import: ``flash_attn`` (FA2, for yunchang's
    ring and diffusers' ``flash`` backend, which also wants version >= 2.6.3), ``flash_attn_3``
    (``flash_attn_interface``) and ``cudnn``. A package that merely exists (an ABI-broken build, one older
    than diffusers accepts) is not counted."""
    found = set()
    if torch.backends.cudnn.is_available():
        found.add("cudnn")
    if not torch.cuda.is_available():
        return frozenset(found)
    from diffusers.models import attention_dispatch
    from yunchang import globals as yunchang_globals

    if yunchang_globals.HAS_FLASH_ATTN and attention_dispatch._CAN_USE_FLASH_ATTN:
        found.add("flash_attn")
    if yunchang_globals.HAS_FLASH_ATTN_HOPPER and attention_dispatch._CAN_USE_FLASH_ATTN_3:
        found.add("flash_attn_3")
    return frozenset(found)


def device_capability(device: torch.device) -> tuple[int, int] | None:
    """The CUDA compute capability, or None for a CPU."""
    device = torch.device(device)
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else None


_LIBRARY = {"fa3": "flash_attn_3", "fa2": "flash_attn", "cudnn": "cudnn"}


def usable_kernels(capability: tuple[int, int] | None, installed: frozenset[str]) -> list[str]:
    """The kernels a device of this capability can run with these libraries, fastest first; pure."""
    if capability is None:
        return ["sdpa"]
    kernels = [kernel for kernel, (low, high) in _CAPABILITY.items()
               if _LIBRARY[kernel] in installed and low <= tuple(capability) <= high]
    return kernels + ["sdpa"]


def choose_kernel(
    requested: str, *, capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int,
    installed: frozenset[str],
) -> str:
    """The kernel for one use (diffusers' backend for the whole model, or the USP block kernel, whose
    head dim is padded to a multiple of 8 first), as a pure function of what it depends on.

    ``auto`` is the fastest usable kernel that takes this dtype and head dim, ``sdpa`` (diffusers'
    ``native``, which picks a kernel per call) where none does; a named kernel must be usable on the
    device (ConfigError otherwise) and falls back to ``sdpa`` where it cannot take the dtype or head dim
    (fp32, a head dim that is no multiple of 8 or too large)."""
    from ..config.schema import ConfigError

    usable = usable_kernels(capability, installed)
    if requested != "auto" and requested not in usable:
        where = "cpu" if capability is None else f"cuda sm{capability[0]}{capability[1]}"
        raise ConfigError(f"attention={requested!r} is not allowed: one of auto, {', '.join(usable)} on this "
                          f"device ({where})")
    candidates = usable if requested == "auto" else [requested]
    for kernel in candidates:
        if kernel == "sdpa" or (dtype in _HALF_DTYPES and head_dim % _HEAD_DIM_MULTIPLE == 0
                                and head_dim <= _MAX_HEAD_DIM[kernel]):
            return kernel
    return "sdpa"


def available_kernels(device: torch.device) -> list[str]:
    """The attention kernels this device can run, fastest first (``usable_kernels`` for this machine)."""
    return usable_kernels(device_capability(device), installed_kernel_libraries())


def resolve_kernel(name: str, device: torch.device) -> str:
    """The kernel for fp16/bf16 attention at Wan's head dim (128) on this device: `auto` is the fastest
    available; a named one must be available (ConfigError otherwise)."""
    return choose_kernel(name, capability=device_capability(device), dtype=torch.bfloat16, head_dim=128,
                         installed=installed_kernel_libraries())


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


def _key_bias(pad: Tensor, like: Tensor) -> Tensor:
    """The additive bias (B, H, Sq, Sk) that masks the keys flagged in ``pad`` (Sk,): one row, broadcast
    over batch, heads and queries (stride 0), in ``like``'s dtype. Its row is allocated to a multiple of
    16 elements, the alignment torch's memory-efficient CUDA kernel asks of a bias (as SDPA does)."""
    batch, heads, queries = like.shape[:3]
    keys = pad.shape[0]
    row = like.new_zeros(_round_up(keys, 16))[:keys].masked_fill(pad, -_MASK_SCORE)
    return row.expand(batch, heads, queries, keys)


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
    kernel: str = "sdpa",
    masked: bool = False,
) -> tuple[Tensor, Tensor]:
    """One ring step's block attention: (B, S, H, D) in; (out (B, S, H, D), lse (B, H, S) fp32) out.

    The signature is the one yunchang's ring loop calls an ``attn_processor`` with; ``kernel`` and
    ``masked`` are bound with functools.partial. ``kernel="cudnn"`` runs cuDNN's fused attention for
    fp16/bf16 on CUDA. ``masked``: keys whose first channel is NaN are padding (``_pad`` flags them so, in
    band, because the ring hands this function blocks from other ranks without saying whose), zeroed and
    masked by a key bias.
    """
    if dropout_p or causal or tuple(window_size) != (-1, -1) or softcap or alibi_slopes is not None:
        raise NotImplementedError("only plain non-causal attention without dropout is supported")
    if return_softmax:
        raise NotImplementedError("return_softmax is not supported")
    # The transposed views are not contiguous: aten's cuDNN op computes wrong results on such inputs
    # (diffusers makes them contiguous before it too), and the other CUDA ops copy them anyway.
    qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    bias = None
    if masked:
        pad = kt[0, 0, :, 0].isnan()
        kt = kt.masked_fill(pad[:, None], 0.0)
        bias = _key_bias(pad, qt)
    if q.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            qt, kt, vt, 0.0, False, attn_mask=bias, scale=softmax_scale
        )[:2]
    elif bias is None and kernel == "cudnn" and q.dtype in _HALF_DTYPES:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
            qt, kt, vt, None, True, 0.0, False, False, scale=softmax_scale
        )[:2]
        lse = lse.reshape(out.shape[:3])  # some cuDNN versions add a trailing dim of 1
    elif bias is None and q.dtype in _HALF_DTYPES:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            qt, kt, vt, 0.0, False, False, scale=softmax_scale
        )[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, bias, True, 0.0, False, scale=softmax_scale
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
        self._groups = (ulysses_group, ring_group)
        self._capability = device_capability(device)
        self._installed = installed_kernel_libraries()
        # Checked now, so that a kernel this device cannot run fails before the first forward.
        self.requested = kernel
        self.kernel = choose_kernel(kernel, capability=self._capability, dtype=torch.bfloat16,
                                    head_dim=_HEAD_DIM_MULTIPLE, installed=self._installed)
        self._layers: dict[str, torch.nn.Module] = {}

    def _layer(self, kernel: str, *, masked: bool) -> torch.nn.Module:
        """The USP layer for one block kernel, built on first use (no collectives: it only keeps the
        groups)."""
        name = "masked" if masked else kernel
        if name not in self._layers:
            from yunchang import LongContextAttention

            with _yunchang_groups(*self._groups):
                if name in ("fa3", "fa2"):
                    from xfuser.core.long_ctx_attention import xFuserLongContextAttention
                    from yunchang.kernels import AttnType

                    # With use_kv_cache=False (the default) xfuser's forward and ring function touch
                    # none of xfuser's global state (no init_distributed_environment needed): they use
                    # only the two groups captured here.
                    self._layers[name] = xFuserLongContextAttention(
                        attn_type=AttnType.FA3 if name == "fa3" else AttnType.FA)
                else:
                    # attn_type=None is no AttnType, so yunchang's select_flash_attn_impl falls through
                    # to attn_processor for every ring step.
                    self._layers[name] = LongContextAttention(attn_type=None, attn_processor=functools.partial(
                        _attention_with_lse, kernel=kernel, masked=masked))
        return self._layers[name]

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

        q, k, v = self._pad(query, key, value, num_valid=num_valid)
        kernel = choose_kernel(self.requested, capability=self._capability, dtype=q.dtype,
                               head_dim=q.shape[-1], installed=self._installed)
        layer = self._layer(kernel, masked=num_valid is not None)
        # xfuser's layer takes the attention module first (unused without a KV cache); yunchang's not.
        args = (None, q, k, v) if num_valid is None and kernel in ("fa3", "fa2") else (q, k, v)
        out = layer(*args, softmax_scale=scale)
        if out.shape[2:] != (heads, head_dim):
            out = out[:, :, :heads, :head_dim].contiguous()
        return out

    def _pad(
        self, query: Tensor, key: Tensor, value: Tensor, *, num_valid: int | None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Pad heads to a multiple of the Ulysses degree and the head dim to a multiple of 8; flag the
        padding tokens' keys for the masked block kernel.

        Zero heads attend uniformly over zero values and so produce zeros, harmlessly; zero channels add
        nothing to any score. A padding token gets a zero query and value and a NaN key, which the
        masked kernel turns into a zero key with a bias of -30000, so that whatever the caller left there
        (even inf/nan) cannot reach a real row.
        """
        heads, head_dim = query.shape[2:]
        padded_heads = _round_up(heads, self._ulysses_degree)
        padded_dim = _round_up(head_dim, _HEAD_DIM_MULTIPLE)
        if padded_heads == heads and padded_dim == head_dim and num_valid is None:
            return query, key, value
        pad = (0, padded_dim - head_dim, 0, padded_heads - heads)
        q, k, v = (F.pad(t, pad) for t in (query, key, value))
        if num_valid is not None:
            q[:, num_valid:] = 0
            v[:, num_valid:] = 0
            k[:, num_valid:] = float("nan")
        return q, k, v

