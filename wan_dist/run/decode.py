"""The fp32 VAE decode on rank 0, as diffusers' Wan pipelines decode."""

from __future__ import annotations

import numpy as np
import torch


def _latent_statistics(latents: torch.Tensor, vae_config) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's per-channel latent mean and 1/std, shaped to broadcast over (B, C, F, H, W)."""
    mean = torch.tensor(vae_config.latents_mean).view(1, vae_config.z_dim, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(vae_config.latents_std).view(1, vae_config.z_dim, 1, 1, 1).to(latents)
    return mean, inv_std


def normalize_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """VAE-encoder latents to the DiT's scale, as diffusers' Wan pipelines normalise them."""
    mean, inv_std = _latent_statistics(latents, vae_config)
    return (latents - mean) * inv_std


def denormalize_latents(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """The DiT's latents back to the VAE decoder's scale (the inverse of normalize_latents, written as
    diffusers writes it, so the decode input is bit for bit diffusers')."""
    mean, inv_std = _latent_statistics(latents, vae_config)
    return latents / inv_std + mean


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae, group=None) -> np.ndarray | None:
    """Frames (F, H, W, 3), float32 in [0, 1], before quantization. With a process `group` every rank of it
    decodes a band of rows of every frame (parallel/vae_bands.py, exact): each passes the whole latents, the frames
    come back on the group's rank 0 and None on the others."""
    from diffusers.video_processor import VideoProcessor

    device = next(vae.parameters()).device
    latents = latents.to(device=device, dtype=vae.dtype)
    if group is None:
        video = vae.decode(denormalize_latents(latents, vae.config), return_dict=False)[0]
    else:
        from ..parallel.vae_bands import decode_patch_parallel

        video = decode_patch_parallel(denormalize_latents(latents, vae.config), vae, group, dst=0)
        if video is None:
            return None
    processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
    return processor.postprocess_video(video, output_type="np")[0].astype(np.float32)
