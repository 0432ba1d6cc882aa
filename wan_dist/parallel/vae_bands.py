"""Exact patch-parallel decode (and encode) with diffusers' own Wan VAE, one horizontal band per rank.

The Wan VAE (``AutoencoderKLWan``, Wan2.1 and the Wan2.2 48-channel variant) is causal in time and local
in space, with one exception, so every rank of a group can run the unchanged ``vae.decode`` /
``vae.encode`` on a band of rows of every frame and get exactly its rows of the whole result:

- Bands. The latent rows are split into contiguous bands, one per rank in group-rank order, as evenly as
  possible (the first ``rows % ranks`` bands one row taller). A band holds at least one latent row: more
  ranks than latent rows is refused (``check_bands``). In the decoder a band of latent rows ``[a, b)``
  becomes image rows ``[f*a, f*b)`` (``f = row_factor``: nearest upsampling and unpatchify are local);
  in the encoder the same split is applied to the image in units of ``f`` rows (the last band also takes
  the rows past the last whole multiple of ``f``), so every band boundary stays at an even row through
  every stride-2 downsample and every 2x2 patch or ``AvgDown3D`` block.
- Halos. Before each convolution whose kernel spans more than one row (3x3x3 ``WanCausalConv3d``, the
  3x3 ``Conv2d`` after each nearest upsampling) a forward pre-hook appends the neighbouring bands' edge
  rows (point to point, ``batch_isend_irecv``) on the sides that have a neighbour; the convolution's own
  zero padding still acts at the image's top and bottom. A forward hook crops the rows computed from the
  halo. The stride-2 downsampling ``Conv2d`` follows a ``ZeroPad2d`` that adds one zero row at the bottom:
  inside the image that row must be the next band's first row, which its pre-hook puts there.
- Time cache. diffusers decodes one latent frame at a time (encodes 1, then 4 frames at a time) and each
  causal convolution receives the previous chunk's last frames (``feat_cache``). On a band these cached
  frames are the band's own rows, so each rank's cache is its band of the whole decode's cache; the halo
  pre-hook exchanges the cached frames' edge rows together with the input's, so the time padding a
  convolution sees is the whole decode's too.
- Attention. The middle block's ``WanAttentionBlock`` attends over the whole frame (at latent
  resolution, small): its pre-hook all-gathers the band inputs into the whole frame, every rank computes
  the attention on it, and its forward hook keeps the own band's rows.
- Everything else (RMS norms over channels, SiLU, nearest upsampling, 1x1 and time-only convolutions,
  ``DupUp3D`` / ``AvgDown3D``, (un)patchify, the clamp) is per pixel or per aligned block.

The result is the band results stacked in rank order, gathered to one rank (or all). All ranks of the
group must call together: every hooked module communicates. The hooks are removed afterwards, leaving the
VAE exactly as it was; ``apply_patch_parallel`` exposes them for other uses of the same module.

Memory: a rank holds its band's activations and time cache (plus one halo row per side per convolution and
the whole latent-resolution frame at the attention), about ``1 / ranks`` of the whole decode's;
``decode_activation_bytes`` estimates it (the gathering rank adds the whole video it receives).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from diffusers.models.autoencoders.autoencoder_kl_wan import (
    WanAttentionBlock,
    WanCausalConv3d,
    WanResample,
)
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from wan_dist.parallel.live_memory import LiveTensorBytes
from wan_dist.parallel.model_hooks import ModelHooks

# The tensor dim of image rows, in the 5D (batch, channels, frames, rows, columns) activations and in the
# 4D (batch * frames, channels, rows, columns) ones of the per-frame 2D convolutions alike.
ROWS = -2


def check_bands(latent_height: int, num_ranks: int) -> list[tuple[int, int]]:
    """The latent rows ``[start, stop)`` of each rank's band, in group-rank order.

    Bands are as even as possible (the first ``latent_height % num_ranks`` one row taller). Every band
    needs at least one row (a convolution's halo is one row, taken from the neighbouring band only), so
    ``num_ranks > latent_height`` raises a ValueError naming both. Reads no weights: usable to check a
    configuration before anything is loaded.
    """
    if num_ranks < 1:
        raise ValueError(f"patch-parallel VAE: the number of ranks must be at least 1, got {num_ranks}")
    if latent_height < num_ranks:
        raise ValueError(
            f"patch-parallel VAE: {latent_height} latent rows cannot be split into {num_ranks} bands of at "
            f"least one row each; use at most {latent_height} ranks for it, or a taller video"
        )
    base, taller = divmod(latent_height, num_ranks)
    bands, start = [], 0
    for rank in range(num_ranks):
        stop = start + base + (rank < taller)
        bands.append((start, stop))
        start = stop
    return bands


def row_factor(vae_config: Mapping[str, Any]) -> int:
    """Image rows per latent row of an ``AutoencoderKLWan`` config: one stride-2 stage per level but the
    last, times the patch size (Wan2.2)."""
    return 2 ** (len(vae_config["dim_mult"]) - 1) * (vae_config.get("patch_size") or 1)


def encode_bands(height: int, num_ranks: int, vae_config: Mapping[str, Any]) -> list[tuple[int, int]]:
    """The image rows ``[start, stop)`` each rank encodes: the latent bands (``check_bands``) in units of
    ``row_factor`` rows, the last band to the image's bottom."""
    factor = row_factor(vae_config)
    bands = [(factor * start, factor * stop) for start, stop in check_bands(height // factor, num_ranks)]
    bands[-1] = (bands[-1][0], height)
    return bands


class _Bands:
    """This rank's place among the bands of a group, and the exchanges between them."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError("patch-parallel VAE: this rank is not in the group it was given")
        self._place(rank, dist.get_world_size(group))

    def _place(self, rank: int, size: int) -> None:
        self.rank = rank
        self.size = size
        self.has_above = rank > 0
        self.has_below = rank < size - 1

    # The communication primitives, all in group ranks; _SimulatedBands replaces them.
    def _p2p(self, ops: list[tuple[Any, torch.Tensor, int]]) -> None:
        works = dist.batch_isend_irecv(
            [dist.P2POp(op, tensor, group=self.group, group_peer=peer) for op, tensor, peer in ops]
        )
        for work in works:
            work.wait()

    def _all_gather(self, outs: list[torch.Tensor], x: torch.Tensor) -> None:
        dist.all_gather(outs, x, group=self.group)

    # Batched even when alone: on nccl a batch runs on the group's communicator, a lone send/recv would
    # create one for the pair, lazily and outside every timeout (session.new_group_with_timeout).
    def _send(self, x: torch.Tensor, dst: int) -> None:
        self._p2p([(dist.isend, x, dst)])

    def _recv(self, x: torch.Tensor, src: int) -> None:
        self._p2p([(dist.irecv, x, src)])

    def row_counts(self, rows: int, device: torch.device) -> list[int]:
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.size)]
        self._all_gather(counts, torch.tensor([rows], dtype=torch.int64, device=device))
        return [int(c) for c in counts]

    def exchange(
        self, first: torch.Tensor | None, last: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Send ``first`` (this band's first rows) up and ``last`` (its last rows) down; return the band
        above's ``last`` and the band below's ``first`` (None at the image's edge, or where not asked).
        Every rank passes the same shapes, or None in the same places."""
        above = below = None
        ops = []
        if self.has_above:
            if first is not None:
                ops.append((dist.isend, first.contiguous(), self.rank - 1))
            if last is not None:
                above = torch.empty_like(last, memory_format=torch.contiguous_format)
                ops.append((dist.irecv, above, self.rank - 1))
        if self.has_below:
            if last is not None:
                ops.append((dist.isend, last.contiguous(), self.rank + 1))
            if first is not None:
                below = torch.empty_like(first, memory_format=torch.contiguous_format)
                ops.append((dist.irecv, below, self.rank + 1))
        if ops:
            self._p2p(ops)
        return above, below

    def all_gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The bands' ``x`` stacked along the rows, on every rank, and each band's row count."""
        counts = self.row_counts(x.shape[ROWS], x.device)
        # all_gather wants equal shapes: the shorter bands are padded to the tallest and trimmed after.
        padded = F.pad(x, (0, 0, 0, max(counts) - x.shape[ROWS])).contiguous()
        gathered = [torch.empty_like(padded) for _ in counts]
        self._all_gather(gathered, padded)
        whole = torch.cat([g.narrow(ROWS, 0, n) for g, n in zip(gathered, counts)], dim=ROWS)
        return whole, counts

    def gather_rows(self, x: torch.Tensor, dst: int | None) -> torch.Tensor | None:
        """The bands' ``x`` stacked along the rows on group rank ``dst`` (None there elsewhere), or on
        every rank when ``dst`` is None."""
        if self.size == 1:
            return x
        if dst is None:
            return self.all_gather_rows(x)[0]
        counts = self.row_counts(x.shape[ROWS], x.device)
        if self.rank != dst:
            self._send(x.contiguous(), dst)
            return None
        # One band in flight at a time: the receiving rank holds the whole result plus one band, never
        # every band twice.
        shape = list(x.shape)
        shape[ROWS] = sum(counts)
        whole = x.new_empty(shape)
        start = 0
        for rank, rows in enumerate(counts):
            target = whole.narrow(ROWS, start, rows)
            if rank == self.rank:
                target.copy_(x)
            else:
                shape[ROWS] = rows
                band = x.new_empty(shape)
                self._recv(band, rank)
                target.copy_(band)
            start += rows
        return whole


class _SimulatedBands(_Bands):
    """One band of a group that does not exist: what is received is left as allocated (meant for meta
    tensors, to measure a band's memory without running the others)."""

    def __init__(self, rank: int, latent_rows: list[int]) -> None:
        self.group = None
        self._place(rank, len(latent_rows))
        self.latent_rows = latent_rows

    def _p2p(self, ops) -> None:
        pass

    def _all_gather(self, outs, x) -> None:
        pass

    def _send(self, x, dst) -> None:
        pass

    def _recv(self, x, src) -> None:
        pass

    def row_counts(self, rows: int, device: torch.device) -> list[int]:
        # Every level's rows are the latent rows times one factor (the attention's 1, the output's f).
        scale = rows // self.latent_rows[self.rank]
        return [scale * n for n in self.latent_rows]


def _with_halo(bands: _Bands, parts: list[torch.Tensor], halo: int) -> list[torch.Tensor]:
    """``parts`` (a convolution's input and its cached frames, same rows) with ``halo`` rows of the
    neighbouring bands added above and below; one message per neighbour for all parts."""
    first = torch.cat([p.narrow(ROWS, 0, halo).reshape(-1) for p in parts])
    last = torch.cat([p.narrow(ROWS, p.shape[ROWS] - halo, halo).reshape(-1) for p in parts])
    above, below = bands.exchange(first, last)
    padded, offset = [], 0
    for part in parts:
        shape = list(part.shape)
        shape[ROWS] = halo
        size = math.prod(shape)
        pieces = [part]
        if above is not None:
            pieces.insert(0, above[offset:offset + size].view(shape))
        if below is not None:
            pieces.append(below[offset:offset + size].view(shape))
        padded.append(torch.cat(pieces, dim=ROWS))
        offset += size
    return padded


def _add_halo_hooks(hooks: ModelHooks, bands: _Bands, conv: nn.Module, halo: int) -> None:
    def add_rows(module, args, kwargs):
        x, *rest = args
        cache = rest[0] if rest else kwargs.get("cache_x")
        # Only WanCausalConv3d takes cached frames; "Rep" (a first chunk's marker) reaches no spatial conv.
        if isinstance(cache, torch.Tensor):
            x, cache = _with_halo(bands, [x, cache], halo)
            if rest:
                return (x, cache), kwargs
            return (x,), {**kwargs, "cache_x": cache}
        (x,) = _with_halo(bands, [x], halo)
        return (x, *rest), kwargs

    def crop(module, args, out):
        top = halo if bands.has_above else 0
        bottom = halo if bands.has_below else 0
        return out.narrow(ROWS, top, out.shape[ROWS] - top - bottom)

    hooks.hooks.append(conv.register_forward_pre_hook(add_rows, with_kwargs=True))
    hooks.hooks.append(conv.register_forward_hook(crop))


def _add_downsample_hook(hooks: ModelHooks, bands: _Bands, conv: nn.Conv2d) -> None:
    def next_band_row(module, args):
        (x,) = args
        own = x.shape[ROWS] - 1  # the last row is ZeroPad2d's
        if bands.has_below and own % 2:
            raise RuntimeError(
                f"patch-parallel VAE encode: a band of {own} rows reached a stride-2 downsample; band "
                "boundaries must be multiples of the encoder's row factor (use encode_bands)"
            )
        _, below = bands.exchange(x.narrow(ROWS, 0, 1), None)
        if below is None:
            return None
        return (torch.cat([x.narrow(ROWS, 0, own), below], dim=ROWS),)

    hooks.hooks.append(conv.register_forward_pre_hook(next_band_row))


def _add_attention_hooks(hooks: ModelHooks, bands: _Bands, attention: WanAttentionBlock) -> None:
    own_rows: list[tuple[int, int]] = []

    def gather(module, args):
        x, *rest = args
        whole, counts = bands.all_gather_rows(x)
        own_rows.append((sum(counts[:bands.rank]), counts[bands.rank]))
        return (whole, *rest)

    def keep_own(module, args, out):
        start, rows = own_rows.pop()
        # A copy, so the whole frame's output is freed at once rather than kept alive by a view.
        return out.narrow(ROWS, start, rows).contiguous()

    hooks.hooks.append(attention.register_forward_pre_hook(gather))
    hooks.hooks.append(attention.register_forward_hook(keep_own))


def apply_patch_parallel(vae: nn.Module, group: dist.ProcessGroup | None = None) -> ModelHooks:
    """Hook ``vae`` (an ``AutoencoderKLWan``) so that its ``decode`` / ``encode`` on this rank's band
    computes exactly that band of the whole result (module docstring). Every rank of ``group`` must run
    the same calls. ``remove()`` on the result restores the VAE. With a group of one rank nothing is
    hooked.

    Raises NotImplementedError for a convolution spanning rows that is not one of the Wan VAE's known
    kinds, rather than compute something wrong.
    """
    return _install(vae, _Bands(group))


def _install(vae: nn.Module, bands: _Bands) -> ModelHooks:
    hooks = ModelHooks()
    if bands.size == 1:
        return hooks
    # The downsampling conv's rule holds after a ZeroPad2d adding one column right and one row below.
    downsample_convs = {
        id(module.resample[1])
        for module in vae.modules()
        if isinstance(module, WanResample) and module.mode.startswith("downsample")
        and isinstance(module.resample[0], nn.ZeroPad2d) and tuple(module.resample[0].padding) == (0, 1, 0, 1)
    }
    for name, module in vae.named_modules():
        if isinstance(module, WanAttentionBlock):
            _add_attention_hooks(hooks, bands, module)
        elif not isinstance(module, (nn.Conv2d, nn.Conv3d)) or module.kernel_size[ROWS] == 1:
            continue
        elif id(module) in downsample_convs and (module.kernel_size[0], module.stride[0]) == (3, 2) \
                and module.padding[0] == 0:
            _add_downsample_hook(hooks, bands, module)
        elif isinstance(module, WanCausalConv3d) and module.stride[1] == 1 \
                and module.kernel_size[1] == 2 * module._padding[2] + 1:
            _add_halo_hooks(hooks, bands, module, module._padding[2])
        elif type(module) is nn.Conv2d and module.stride[0] == 1 \
                and module.kernel_size[0] == 2 * module.padding[0] + 1:
            _add_halo_hooks(hooks, bands, module, module.padding[0])
        else:
            hooks.remove()
            raise NotImplementedError(
                f"patch-parallel VAE: no band rule for {name} ({module}); only row-symmetric stride-1 "
                "convolutions and the ZeroPad2d + stride-2 downsample are supported"
            )
    return hooks


def _refuse_tiling(vae: nn.Module) -> None:
    if getattr(vae, "use_tiling", False):
        raise ValueError("patch-parallel VAE: tiling is on (vae.enable_tiling()); the bands are exact and "
                         "tiles blend, so use one or the other (vae.disable_tiling())")


def _on_band(vae: nn.Module, bands: _Bands, run, dst: int | None) -> torch.Tensor | None:
    hooks = _install(vae, bands)
    try:
        result = run()
    finally:
        hooks.remove()
    return bands.gather_rows(result, dst)


def _decode_on(bands: _Bands, latents: torch.Tensor, vae: nn.Module, dst: int | None) -> torch.Tensor | None:
    start, stop = check_bands(latents.shape[ROWS], bands.size)[bands.rank]
    band = latents.narrow(ROWS, start, stop - start)
    return _on_band(vae, bands, lambda: vae.decode(band, return_dict=False)[0], dst)


@torch.no_grad()
def decode_patch_parallel(
    latents: torch.Tensor,
    vae: nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    dst: int | None = 0,
) -> torch.Tensor | None:
    """``vae.decode(latents).sample`` computed in bands over ``group``: the video ``(B, C, F, H, W)``
    on group rank ``dst`` (every rank when ``dst`` is None), None on the others.

    ``latents`` is what goes into ``vae.decode`` (already de-normalised with the VAE's latents mean and
    std), the whole tensor on every rank of the group (each rank reads its band of it), on the VAE's
    device and dtype. Every rank of ``group`` must call. The VAE must not have tiling enabled.
    """
    _refuse_tiling(vae)
    return _decode_on(_Bands(group), latents, vae, dst)


@functools.lru_cache(maxsize=4)
def _meta_vae(config_json: str, dtype: torch.dtype) -> nn.Module:
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        vae = AutoencoderKLWan.from_config(json.loads(config_json)).eval()
    # nn.Module's own cast: ModelMixin.to warns about modules to keep in fp32, and the Wan VAE has none.
    return nn.Module.to(vae, dtype)


class _FusedAttentionOnMeta(TorchFunctionMode):
    """On meta tensors scaled_dot_product_attention takes the math path, which holds the tokens x tokens
    matrix that the fused kernels (CPU's flash, CUDA's flash and memory-efficient) never allocate; the
    CPU flash kernel has a meta version, so the simulated decode uses that."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is F.scaled_dot_product_attention and len(args) == 3 and not kwargs:
            return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*args)[0]
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def _simulated_peaks(vae: nn.Module, bands: _Bands, latent_shape: tuple[int, ...], dst: int | None,
                     dtype: torch.dtype) -> tuple[int, int]:
    """The peak live bytes inside the decoder's calls and outside them (the video's concatenation, the
    clamp, the gather), of one band's decode run on meta tensors."""
    latents = torch.empty(latent_shape, device="meta", dtype=dtype)
    live = LiveTensorBytes()
    live.phase = "around"

    def enter(module, args, kwargs):
        live.phase = "decoder"

    def leave(module, args, kwargs, out):
        live.phase = "around"

    phases = [vae.decoder.register_forward_pre_hook(enter, with_kwargs=True),
              vae.decoder.register_forward_hook(leave, with_kwargs=True)]
    try:
        with _FusedAttentionOnMeta(), live:
            _decode_on(bands, latents, vae, dst)
    finally:
        for hook in phases:
            hook.remove()
    return live.peaks.get("decoder", 0), live.peaks.get("around", 0)


def decode_peak_bytes(
    vae_config: Mapping[str, Any],
    latent_shape: tuple[int, int, int],
    num_ranks: int = 1,
    *,
    dst: int | None = 0,
    dtype: torch.dtype = torch.float32,
) -> list[int]:
    """Each rank's peak bytes of activations (beyond the weights and the input latents) in a decode of
    latents ``(frames, height, width)`` by ``decode_patch_parallel`` over ``num_ranks`` ranks gathering
    to ``dst``; ``num_ranks=1`` is the plain ``vae.decode`` on one rank. Reads no weights.

    Measured, not modelled: the same code runs on ``meta`` tensors (no memory, no arithmetic) with the
    other bands simulated, under ``LiveTensorBytes``, so halos, the attention's whole frame, the time
    cache, the concatenated video and the gather are all in it. It is the live tensors' peak: an
    allocator's caching and fragmentation (CUDA's caching allocator, glibc) come on top. For more than 4
    latent frames, 3 and 4 are run and the rest extrapolated: from the third chunk on every chunk has the
    same shapes, so the peak inside the decoder (the chunk's working set, the cache, the video so far) and
    the one outside it (the concatenation, the clamp, the gather) each grow by the same amount per frame.
    Bands of equal place and size share one run.
    """
    config_json = json.dumps(dict(vae_config), sort_keys=True)
    return list(_decode_peaks(config_json, tuple(latent_shape), num_ranks, dst, dtype))


@functools.lru_cache(maxsize=64)
def _decode_peaks(config_json: str, latent_shape: tuple[int, int, int], num_ranks: int, dst: int | None,
                  dtype: torch.dtype) -> tuple[int, ...]:
    frames, height, width = latent_shape
    rows = [stop - start for start, stop in check_bands(height, num_ranks)]
    vae = _meta_vae(config_json, dtype)
    z_dim = vae.config.z_dim

    def peak(rank: int) -> int:
        def run(f: int) -> tuple[int, int]:
            return _simulated_peaks(vae, _SimulatedBands(rank, rows), (1, z_dim, f, height, width), dst, dtype)

        if frames <= 4:
            return max(run(frames))
        (inside3, around3), (inside4, around4) = run(3), run(4)
        more = frames - 4
        return max(inside4 + more * (inside4 - inside3), around4 + more * (around4 - around3))

    by_place: dict[tuple, int] = {}
    peaks = []
    for rank in range(num_ranks):
        place = (rows[rank], rank > 0, rank < num_ranks - 1, dst is None or rank == dst)
        if place not in by_place:
            by_place[place] = peak(rank)
        peaks.append(by_place[place])
    return tuple(peaks)


@torch.no_grad()
def encode_patch_parallel(
    video: torch.Tensor,
    vae: nn.Module,
    group: dist.ProcessGroup | None = None,
    *,
    dst: int | None = 0,
) -> torch.Tensor | None:
    """``vae.encode(video).latent_dist.mode()`` computed in bands over ``group``: the latents
    ``(B, z_dim, F', H / f, W / f)`` (not normalised, as diffusers returns them) on group rank ``dst``
    (every rank when ``dst`` is None), None on the others.

    ``video`` is the whole ``(B, C, F, H, W)`` input in [-1, 1] on every rank of the group, on the VAE's
    device and dtype; each rank encodes the image rows ``encode_bands`` gives it. Every rank of ``group``
    must call. The VAE must not have tiling enabled.
    """
    _refuse_tiling(vae)
    bands = _Bands(group)
    start, stop = encode_bands(video.shape[ROWS], bands.size, vae.config)[bands.rank]
    band = video.narrow(ROWS, start, stop - start)
    return _on_band(vae, bands, lambda: vae.encode(band).latent_dist.mode(), dst)
