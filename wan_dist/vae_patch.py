"""Exact patch-parallel decode (and encode) with diffusers' own Wan VAE, one horizontal band per rank.

The Wan VAE (``AutoencoderKLWan``, Wan2.1 and the Wan2.2 48-channel variant) is causal in time and local
in space, with one exception, so every rank of a group can run the unchanged ``vae.decode`` /
``vae.encode`` on a band of rows of every frame and get exactly its rows of the whole result:

- Bands. The latent rows are split into contiguous bands, one per rank in group-rank order, as evenly as
  possible (the first ``rows % ranks`` bands one row taller). A band holds at least one latent row: more
  ranks than latent rows is refused (``check_bands``). In the decoder a band of latent rows ``[a, b)``
  becomes image rows ``[f*a, f*b)`` (``f = row_factor``: nearest upsampling and unpatchify are local);
  in the encoder the same split is applied to the image in units of ``f`` rows (the last band also takes
  rows beyond the last whole multiple, which the encoder drops as diffusers does), so every band boundary
  stays at an even row through every stride-2 downsample and every 2x2 patch or ``AvgDown3D`` block.
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

from wan_dist.model_hooks import ModelHooks

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
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.has_above = self.rank > 0
        self.has_below = self.rank < self.size - 1

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
                ops.append(dist.P2POp(dist.isend, first.contiguous(), group=self.group, group_peer=self.rank - 1))
            if last is not None:
                above = torch.empty_like(last, memory_format=torch.contiguous_format)
                ops.append(dist.P2POp(dist.irecv, above, group=self.group, group_peer=self.rank - 1))
        if self.has_below:
            if last is not None:
                ops.append(dist.P2POp(dist.isend, last.contiguous(), group=self.group, group_peer=self.rank + 1))
            if first is not None:
                below = torch.empty_like(first, memory_format=torch.contiguous_format)
                ops.append(dist.P2POp(dist.irecv, below, group=self.group, group_peer=self.rank + 1))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return above, below

    def row_counts(self, rows: int, device: torch.device) -> list[int]:
        counts = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([rows], dtype=torch.int64, device=device), group=self.group)
        return [int(c) for c in counts]

    def all_gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The bands' ``x`` stacked along the rows, on every rank, and each band's row count."""
        counts = self.row_counts(x.shape[ROWS], x.device)
        # all_gather wants equal shapes: the shorter bands are padded to the tallest and trimmed after.
        padded = torch.nn.functional.pad(x, (0, 0, 0, max(counts) - x.shape[ROWS])).contiguous()
        gathered = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(gathered, padded, group=self.group)
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
            dist.send(x.contiguous(), group=self.group, group_dst=dst)
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
                dist.recv(band, group=self.group, group_src=rank)
                target.copy_(band)
            start += rows
        return whole


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
    bands = _Bands(group)
    hooks = ModelHooks()
    if bands.size == 1:
        return hooks
    downsample_convs = {
        id(module.resample[1])
        for module in vae.modules()
        if isinstance(module, WanResample) and module.mode.startswith("downsample")
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


def _on_bands(vae: nn.Module, group: dist.ProcessGroup | None, run) -> torch.Tensor:
    hooks = apply_patch_parallel(vae, group)
    try:
        return run()
    finally:
        hooks.remove()


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
    bands = _Bands(group)
    start, stop = check_bands(latents.shape[ROWS], bands.size)[bands.rank]
    band = latents.narrow(ROWS, start, stop - start)
    video = _on_bands(vae, group, lambda: vae.decode(band, return_dict=False)[0])
    return bands.gather_rows(video, dst)


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
    latents = _on_bands(vae, group, lambda: vae.encode(band).latent_dist.mode())
    return bands.gather_rows(latents, dst)
