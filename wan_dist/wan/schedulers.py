"""The samplers the 4-step distilled Wan LoRAs were trained for, as diffusers schedulers, so that the same
object drives our denoising loop and diffusers' own pipelines (which call `set_timesteps(steps)` and `step`
and nothing more).

LightX2V's step distillation (Wan2.1 and Wan2.2 LoRAs, and Wan2.2-Lightning) trains on the timesteps
1000, 750, 500, 250 after Wan's flow shift (5.0): 1000, 937.5, 833.3, 625 (LightX2V's
`denoising_step_list` with `sample_shift`, WanStepDistillScheduler in ModelTC/LightX2V). diffusers'
flow-match Euler spaces its steps evenly down to its last training sigma (already shifted) and shifts them
again, so at 4 steps it samples 1000, 909.7, 717.3, 24.4; here the unshifted sigmas are the evenly spaced N of the
training range instead, and the library's own shift and step do the rest. Between steps LightX2V's Wan2.2
runner (and Wan2.2-Lightning) takes an Euler step; its Wan2.1 runner predicts the clean latent and noises it
afresh to the next sigma, the DMD-style step diffusers' `stochastic_sampling` takes.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput


class DistilledEulerScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-match Euler on the N training timesteps 1000, 1000 (N-1)/N, ..., 1000/N, each shifted by
    `shift`, then to sigma 0: LightX2V's 4-step schedule at N=4.

    With `stochastic_sampling`, each step's fresh noise continues the CPU generator seeded with
    `noise_seed` after the initial latent's draw (one generator for the whole video, as LightX2V uses it),
    so every rank draws the same noise and so does diffusers' pipeline given this scheduler, which passes
    no generator to `step`. (An attribute, not a config entry: diffusers reads a scheduler's config keys
    from its constructor's signature.)"""

    noise_seed: int | None = None
    _noise: torch.Tensor | None = None  # (steps, *sample shape): every step's draw, in host memory

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None,
                      sigmas: list[float] | None = None, **kwargs) -> None:
        if sigmas is None and num_inference_steps is not None:
            sigmas = np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1].tolist()
        super().set_timesteps(device=device, sigmas=sigmas, **kwargs)
        self._noise = None  # a new video starts its noise stream again

    def _drawn(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """Every step's noise, drawn at the first step as the library's step draws it (one `randn` per step,
        fp32, on the CPU generator, in step order), into pinned memory when the sample is on a GPU: each
        step then copies its draw without waiting, where a copy from pageable memory would make the host
        wait for the device every step."""
        if self._noise is None:
            generator = torch.Generator("cpu").manual_seed(self.noise_seed)
            torch.randn(shape, generator=generator, dtype=torch.float32)  # the initial latent's
            self._noise = torch.empty((len(self.timesteps), *shape), dtype=torch.float32,
                                      pin_memory=device.type == "cuda")
            for draw in self._noise:
                torch.randn(shape, generator=generator, dtype=torch.float32, out=draw)
        return self._noise[self.step_index].to(device, non_blocking=True)

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor, *args,
             generator: torch.Generator | None = None, return_dict: bool = True,
             **kwargs) -> FlowMatchEulerDiscreteSchedulerOutput | tuple:
        if generator is not None or not self.config.stochastic_sampling or self.noise_seed is None:
            return super().step(model_output, timestep, sample, *args, generator=generator,
                                return_dict=return_dict, **kwargs)
        if kwargs.get("per_token_timesteps") is not None:
            raise ValueError("the fresh-noise step takes one timestep for the whole sample")
        # The library's stochastic step, term for term (same dtypes, same order), on the drawn noise: its
        # own step would draw from a generator itself and copy the draw to the device from pageable memory.
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma, sigma_next = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        x0 = sample - sigma * model_output
        prev_sample = (1.0 - sigma_next) * x0 + sigma_next * self._drawn(sample.shape, sample.device)
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev_sample)
