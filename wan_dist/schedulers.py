"""The sampler the 4-step distilled Wan LoRAs were trained for, as a diffusers scheduler, so that the same
object drives our denoising loop and diffusers' own pipelines (which call `set_timesteps(steps)` and nothing
more).

LightX2V's step distillation (Wan2.1 and Wan2.2 LoRAs, and Wan2.2-Lightning) trains on the timesteps
1000, 750, 500, 250 after Wan's flow shift (5.0): 1000, 937.5, 833.3, 625 (LightX2V's
`denoising_step_list` with `sample_shift`, WanStepDistillScheduler in ModelTC/LightX2V). diffusers'
flow-match Euler spaces its steps between its first and last training sigma and shifts that twice, so at
4 steps it samples 1000, 909.7, 717.3, 24.4; here the unshifted sigmas are the evenly spaced N of the
training range instead, and the library's own shift and Euler step do the rest.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler


class DistilledEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-match Euler on the N training timesteps 1000, 1000 (N-1)/N, ..., 1000/N, each shifted by
    `shift`, then to sigma 0: LightX2V's 4-step schedule at N=4."""

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, **kwargs) -> None:
        if sigmas is None and num_inference_steps is not None:
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()
        super().set_timesteps(device=device, sigmas=sigmas, **kwargs)
