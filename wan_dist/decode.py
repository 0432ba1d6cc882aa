"""The fp32 VAE decode on rank 0, as diffusers' Wan pipelines decode."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def decode_latents(latents: torch.Tensor, vae) -> np.ndarray:
    """Frames (F, H, W, 3), float32 in [0, 1], before quantization."""
    from diffusers.video_processor import VideoProcessor

    device = next(vae.parameters()).device
    latents = latents.to(device=device, dtype=vae.dtype)
    mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1).to(latents)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
    return processor.postprocess_video(video, output_type="np")[0].astype(np.float32)
