"""The denoising loop. It asks one function for the guided noise at each step and knows nothing about
where the model lives or how it is split. Nothing in it waits for the device: on a GPU the host queues
step after step while the previous ones run."""

from __future__ import annotations

import time
from itertools import pairwise
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

NoisePredictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LatentShape:
    channels: int
    frames: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (1, self.channels, self.frames, self.height, self.width)

    def num_tokens(self, patch_size: tuple[int, int, int]) -> int:
        pt, ph, pw = patch_size
        return (self.frames // pt) * (self.height // ph) * (self.width // pw)


def latent_shape(vae_config: dict, *, height: int, width: int, num_frames: int) -> LatentShape:
    temporal = vae_config.get("scale_factor_temporal", 4)
    spatial = vae_config.get("scale_factor_spatial", 8)
    return LatentShape(
        channels=vae_config.get("z_dim", 16), frames=(num_frames - 1) // temporal + 1,
        height=height // spatial, width=width // spatial,
    )


def initial_noise(shape: LatentShape, seed: int, device: torch.device) -> torch.Tensor:
    """Drawn as diffusers draws it: one CPU generator for the whole latent, then moved; so every split
    and every world size starts from the same noise."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(shape.shape, generator=generator, dtype=torch.float32).to(device)


class StepClock:
    """Wall time per step without a host synchronisation inside the loop: on CUDA, events recorded on
    the stream and read once after the loop; elsewhere, the host clock (the host is the device)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def seconds(self) -> list[float]:
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in pairwise(self.marks)]
        return [b - a for a, b in pairwise(self.marks)]


@dataclass
class DenoiseResult:
    latents: torch.Tensor
    step_seconds: list[float]


@torch.no_grad()
def denoise(
    *,
    latents: torch.Tensor,
    scheduler,
    steps: int,
    predict_noise: NoisePredictor,
    model_dtype: torch.dtype,
    condition: torch.Tensor | None = None,
    show_progress: bool = True,
    description: str = "denoising",
) -> DenoiseResult:
    """Wan2.1's sampling loop, step for step as diffusers' WanPipeline / WanImageToVideoPipeline run it:
    model input in the DiT dtype (with the I2V condition concatenated on channels), latents kept in fp32,
    the scheduler stepping on the guided noise."""
    scheduler.set_timesteps(steps, device=latents.device)
    scheduler.set_begin_index(0)
    clock = StepClock(latents.device)
    clock.mark()
    for t in tqdm(scheduler.timesteps, desc=description, disable=not show_progress, unit="step"):
        model_input = latents if condition is None else torch.cat([latents, condition], dim=1)
        noise = predict_noise(model_input.to(model_dtype), t.expand(latents.shape[0]))
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        clock.mark()
    return DenoiseResult(latents=latents, step_seconds=clock.seconds())
