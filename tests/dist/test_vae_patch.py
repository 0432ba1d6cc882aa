"""Patch-parallel VAE decode and encode against diffusers' own AutoencoderKLWan on the same weights: 2, 3
and 4 ranks, latent heights that do not divide by them, an image height that is not a multiple of the
encoder's row factor, Wan2.1 and the Wan2.2 48-channel VAE; per-rank peak below the whole decode's; the VAE
given back bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_on_ranks
from wan_dist.parallel.live_memory import LiveTensorBytes
from wan_dist.parallel.vae_bands import (
    apply_patch_parallel, check_bands, decode_patch_parallel, decode_peak_bytes, encode_bands,
    encode_patch_parallel,
)

TOLERANCE = 1e-4
# Small random VAEs of both kinds; the mid block's attention and every up/down sampling kind are there.
CONFIGS = {
    "wan2.1": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True, True]),
    "wan2.2": dict(base_dim=8, decoder_base_dim=16, z_dim=48, in_channels=12, out_channels=12, is_residual=True,
                   patch_size=2, scale_factor_spatial=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                   temperal_downsample=[False, True, True]),
}
# 7 latent rows: bands of 4+3, 3+2+2, 2+2+2+1. 3 latent frames: the first chunk and two later ones.
LATENT = dict(frames=3, height=7, width=5)
# 7 frames: the encoder's chunks of 1 and 4 frames, and 2 frames diffusers leaves out. Wan2.1: 60 rows,
# 7 latent rows of 8 and 4 rows more (the last band's; the last downsample still reads them); Wan2.2:
# 112 rows, 7 latent rows of 16.
VIDEO = {"wan2.1": dict(frames=7, height=60, width=40), "wan2.2": dict(frames=7, height=112, width=80)}


def _vae(kind: str):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    vae = AutoencoderKLWan(**CONFIGS[kind]).eval()
    with torch.no_grad():
        # At init the RMS norms' gains are 1 and biases 0; random values make every layer count.
        for param in vae.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return vae


def _inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    z_dim, channels = CONFIGS[kind]["z_dim"], 3
    latents = torch.randn(1, z_dim, LATENT["frames"], LATENT["height"], LATENT["width"], generator=generator)
    v = VIDEO[kind]
    video = torch.rand(1, channels, v["frames"], v["height"], v["width"], generator=generator) * 2 - 1
    return latents, video


def _load(kind: str, state: dict):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan(**CONFIGS[kind]).eval()
    vae.load_state_dict(state)
    return vae


def _hook_count(vae) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in vae.modules())


def _all_on_ranks(rank: int, world: int, states: dict, peak_latents: torch.Tensor) -> dict:
    """Every check in one world of 4 processes (starting one costs seconds of imports): decode and encode
    on the groups of the first 2, 3 and 4 ranks, the peak on 2, the VAE given back on 4."""
    import torch.distributed as dist

    vaes = {kind: _load(kind, state) for kind, state in states.items()}
    out: dict = {"bands": {}}
    for size in (2, 3, 4):
        group = dist.new_group(list(range(size)))
        if rank >= size:
            continue
        for kind, vae in vaes.items():
            latents, video = _inputs(kind)
            out["bands"][size, kind] = {
                "decoded": decode_patch_parallel(latents, vae, group),
                "encoded": encode_patch_parallel(video, vae, group, dst=None),
            }
    pair = dist.new_group([0, 1])
    if rank < 2:
        with LiveTensorBytes() as live:
            decode_patch_parallel(peak_latents, vaes["wan2.1"], pair)
        out["peak"] = live.peak
    vae = vaes["wan2.1"]
    latents, _ = _inputs("wan2.1")
    with torch.no_grad():
        before = vae.decode(latents).sample
        hooks = apply_patch_parallel(vae)
        out["hooked"] = _hook_count(vae)
        hooks.remove()
        out["left"] = _hook_count(vae)
        out["same_output"] = torch.equal(before, vae.decode(latents).sample)
    out["same_state"] = all(torch.equal(vae.state_dict()[k], v) for k, v in states["wan2.1"].items())
    return out


@pytest.fixture(scope="module")
def references() -> dict:
    out = {}
    with torch.no_grad():
        for kind in CONFIGS:
            vae = _vae(kind)
            latents, video = _inputs(kind)
            out[kind] = {
                "state": vae.state_dict(),
                "decoded": vae.decode(latents).sample,
                "encoded": vae.encode(video).latent_dist.mode(),
            }
        # At this size the activations outweigh the video, so the bands' saving shows; 5 latent frames
        # are more than decode_peak_bytes runs, so its extrapolation is checked too.
        out["peak_latents"] = torch.randn(1, 16, 5, 16, 12, generator=torch.Generator().manual_seed(2))
        vae = _vae("wan2.1")
        with LiveTensorBytes() as live:
            vae.decode(out["peak_latents"])
        out["whole_peak"] = live.peak
    return out


@pytest.fixture(scope="module")
def ranks(references) -> list[dict]:
    states = {kind: references[kind]["state"] for kind in CONFIGS}
    return run_on_ranks(4, _all_on_ranks, states, references["peak_latents"], timeout=300)


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("size", [2, 3, 4])
def test_decode_matches_diffusers(ranks, references, kind, size):
    expected = references[kind]["decoded"]
    decoded = ranks[0]["bands"][size, kind]["decoded"]
    assert decoded.shape == expected.shape
    error = (decoded - expected).abs().max().item()
    assert error <= TOLERANCE, f"{kind} on {size} ranks: {error:.3g}"
    assert all(r["bands"][size, kind]["decoded"] is None for r in ranks[1:size])
    # A band that saw zeros where its neighbour's rows belong would be off by far more.
    assert expected.abs().max() > 0.1


@pytest.mark.parametrize("kind", list(CONFIGS))
@pytest.mark.parametrize("size", [2, 3, 4])
def test_encode_matches_diffusers(ranks, references, kind, size):
    expected = references[kind]["encoded"]
    for rank in range(size):
        encoded = ranks[rank]["bands"][size, kind]["encoded"]
        assert encoded.shape == expected.shape
        error = (encoded - expected).abs().max().item()
        assert error <= TOLERANCE, f"{kind} on {size} ranks, rank {rank}: {error:.3g}"


def test_bands_rule():
    assert check_bands(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert check_bands(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    with pytest.raises(ValueError, match="3 latent rows cannot be split into 4 bands"):
        check_bands(3, 4)
    # Encoder bands start at multiples of the row factor; the last takes the rows the encoder drops.
    assert encode_bands(60, 2, CONFIGS["wan2.1"]) == [(0, 32), (32, 60)]
    assert encode_bands(112, 3, CONFIGS["wan2.2"]) == [(0, 48), (48, 80), (80, 112)]


def test_band_peak_below_whole_decode(ranks, references):
    """Each of 2 ranks' peak of live tensor bytes (rank 0's includes the whole video it gathers) against
    the whole decode's in one process."""
    whole = references["whole_peak"]
    peaks = [ranks[0]["peak"], ranks[1]["peak"]]
    assert max(peaks) < 0.75 * whole, (peaks, whole)
    # Each band's own activations are about half the whole's: a band computing nothing would not pass.
    assert min(peaks) > 0.25 * whole, (peaks, whole)


def test_peak_estimate_matches_measured(ranks, references):
    config = CONFIGS["wan2.1"]
    shape = tuple(references["peak_latents"].shape[2:])
    (whole,) = decode_peak_bytes(config, shape, 1)
    assert whole == pytest.approx(references["whole_peak"], rel=0.01)
    estimated = decode_peak_bytes(config, shape, 2)
    assert estimated == pytest.approx([ranks[0]["peak"], ranks[1]["peak"]], rel=0.01)


def test_remove_restores_the_vae(ranks):
    for result in ranks:
        assert result["hooked"] > 0 and result["left"] == 0
        assert result["same_state"] and result["same_output"]


def test_tiling_refused():
    vae = _vae("wan2.1")
    vae.enable_tiling()
    latents, video = _inputs("wan2.1")
    with pytest.raises(ValueError, match="tiling is on"):
        decode_patch_parallel(latents, vae)
    with pytest.raises(ValueError, match="tiling is on"):
        encode_patch_parallel(video, vae)
