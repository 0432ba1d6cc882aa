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


def high_noise_steps(timesteps: torch.Tensor, boundary_timestep: float | None) -> list[bool]:
    """Per step, whether the high-noise expert runs it: diffusers' rule `t >= boundary_timestep`, the same
    comparison (the scheduler's dtype against the boundary) made for all steps at once, on host timesteps."""
    if boundary_timestep is None:
        return [True] * len(timesteps)
    return (timesteps.cpu() >= boundary_timestep).tolist()


@dataclass(frozen=True)
class Experts:
    """Which model predicts the noise at each step: `high` while the timestep is at or above
    `boundary_timestep`, `low` below it (Wan2.2's two experts, switched as diffusers switches them); a
    one-expert model has only `high`. A loop that runs only one expert's steps gives only that one."""

    high: NoisePredictor | None
    low: NoisePredictor | None = None
    boundary_timestep: float | None = None

    def per_step(self, timesteps: torch.Tensor, start: int = 0, stop: int | None = None) -> dict[int, NoisePredictor]:
        """The expert of each step from `start` to `stop`, from the schedule's host `timesteps`: the choice
        is made before the loop, so that no step waits for the device to compare its timestep."""
        stop = len(timesteps) if stop is None else stop
        high = high_noise_steps(timesteps, self.boundary_timestep)
        chosen = {i: self.high if high[i] else self.low for i in range(start, stop)}
        missing = [i for i, expert in chosen.items() if expert is None]
        if missing:
            raise RuntimeError(f"no expert was given for timestep {float(timesteps[missing[0]])}")
        return chosen


def expert_step_counts(timesteps: torch.Tensor, boundary_timestep: float) -> tuple[int, int]:
    """How many of the steps each expert runs (high noise first, as in Experts.per_step)."""
    high = sum(high_noise_steps(timesteps, boundary_timestep))
    return high, len(timesteps) - high


@dataclass(frozen=True)
class SamplerState:
    """Where sampling stands between two steps: the latents and the scheduler's memory of the steps run
    so far (UniPC's multistep history; flow-match Euler keeps only its step index). A loop resumed from it
    takes the next step exactly as one uninterrupted loop would."""

    latents: torch.Tensor
    step_index: torch.Tensor  # int64, (): the next step to run
    # UniPC's, None for Euler. Its history slots, oldest first, that are not yet filled are zeros here and
    # 0 in `filled`.
    model_outputs: torch.Tensor | None = None  # (solver_order, *latents.shape)
    filled: torch.Tensor | None = None  # int64 (solver_order,)
    timestep_list: torch.Tensor | None = None  # int64 (solver_order,)
    last_sample: torch.Tensor | None = None
    orders: torch.Tensor | None = None  # int64 (2,): lower_order_nums, this_order

    @staticmethod
    def capture(scheduler, latents: torch.Tensor) -> "SamplerState":
        step_index = torch.tensor(scheduler.step_index, dtype=torch.int64)
        if not hasattr(scheduler, "model_outputs"):
            return SamplerState(latents=latents, step_index=step_index)
        slots = scheduler.model_outputs
        template = next(m for m in slots if m is not None)
        return SamplerState(
            latents=latents, step_index=step_index,
            model_outputs=torch.stack([torch.zeros_like(template) if m is None else m for m in slots]),
            filled=torch.tensor([m is not None for m in slots], dtype=torch.int64),
            timestep_list=torch.tensor([0 if t is None else int(t) for t in scheduler.timestep_list],
                                       dtype=torch.int64),
            last_sample=scheduler.last_sample,
            orders=torch.tensor([scheduler.lower_order_nums, scheduler.this_order], dtype=torch.int64),
        )

    def restore(self, scheduler) -> None:
        """Into a scheduler whose timesteps are set for the same steps."""
        scheduler._step_index = int(self.step_index)
        if self.model_outputs is None:
            return
        device = scheduler.timesteps.device
        filled = self.filled.tolist()
        scheduler.model_outputs = [m if on else None for m, on in zip(self.model_outputs.unbind(0), filled)]
        scheduler.timestep_list = [torch.tensor(t, device=device) if on else None
                                   for t, on in zip(self.timestep_list.tolist(), filled)]
        scheduler.last_sample = self.last_sample
        scheduler.lower_order_nums, scheduler.this_order = self.orders.tolist()


class TextOnly:
    """Text-to-video: the latents are the model input; one timestep for the whole video."""

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        return t.expand(latents.shape[0])

    def final(self, latents: torch.Tensor) -> torch.Tensor:
        return latents


@dataclass(frozen=True)
class ChannelCondition(TextOnly):
    """Wan2.1 I2V/FLF2V and Wan2.2 I2V-A14B: the condition (mask channels + the VAE latent of the given
    frames) concatenated to the latents on the channel dim."""

    condition: torch.Tensor

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.cat([latents, self.condition], dim=1)


@dataclass(frozen=True)
class TokenTimesteps(TextOnly):
    """Wan2.2 TI2V (`expand_timesteps`): one timestep per DiT token, the step's timestep times a mask. For
    image-to-video the first latent frame is the image's latent, its mask 0 (its tokens at timestep 0),
    blended in before every step and at the end; for text-to-video the mask is all ones. As diffusers'
    WanPipeline / WanImageToVideoPipeline compute it."""

    mask: torch.Tensor  # (1, 1, latent frames, h, w), 0 where the image's latent stands
    patch: tuple[int, int]  # the DiT's spatial patch: one token per patch
    condition: torch.Tensor | None = None  # (1, C, 1, h, w): the image's latent, or None for text-to-video

    @staticmethod
    def of(shape: "LatentShape", patch: tuple[int, int], condition: torch.Tensor | None,
           device: torch.device) -> "TokenTimesteps":
        mask = torch.ones(1, 1, shape.frames, shape.height, shape.width, device=device)
        if condition is not None:
            mask[:, :, 0] = 0
            condition = condition.to(device)
        return TokenTimesteps(mask=mask, patch=patch, condition=condition)

    def model_input(self, latents: torch.Tensor) -> torch.Tensor:
        return self.final(latents)

    def timestep(self, t: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        ph, pw = self.patch
        return (self.mask[0][0][:, ::ph, ::pw] * t).flatten().unsqueeze(0).expand(latents.shape[0], -1)

    def final(self, latents: torch.Tensor) -> torch.Tensor:
        if self.condition is None:
            return latents
        return (1 - self.mask) * self.condition + self.mask * latents


@dataclass
class DenoiseResult:
    latents: torch.Tensor
    step_seconds: list[float]
    state: SamplerState | None = None  # where the loop stopped, when it stopped before the last step


@torch.no_grad()
def denoise(
    *,
    latents: torch.Tensor | SamplerState,
    scheduler,
    steps: int,
    experts: Experts,
    model_dtype: torch.dtype,
    conditioning: TextOnly = TextOnly(),
    show_progress: bool = True,
    description: str = "denoising",
    stop: int | None = None,
) -> DenoiseResult:
    """Wan's sampling loop, step for step as diffusers' WanPipeline / WanImageToVideoPipeline run it: the
    expert of the step's timestep, model input in the DiT dtype (conditioned as the model family
    conditions), latents kept in fp32, the scheduler stepping on the guided noise.

    `latents`: the initial noise, or the state an earlier loop over the same steps stopped at; `stop`: the
    step to stop before (default: run to the end), which returns the state to continue from."""
    device = latents.latents.device if isinstance(latents, SamplerState) else latents.device
    # The schedule is set first on the CPU to choose the experts from: reading the device's timesteps
    # would wait for the device, which may still be running the previous video.
    scheduler.set_timesteps(steps, device="cpu")
    host_timesteps = scheduler.timesteps
    scheduler.set_timesteps(steps, device=device)
    scheduler.set_begin_index(0)
    start = 0
    if isinstance(latents, SamplerState):
        latents.restore(scheduler)
        start, latents = int(latents.step_index), latents.latents
    stop = len(scheduler.timesteps) if stop is None else stop
    chosen = experts.per_step(host_timesteps, start, stop)
    clock = StepClock(latents.device)
    clock.mark()
    for i in tqdm(range(start, stop), desc=description, disable=not show_progress, unit="step"):
        t = scheduler.timesteps[i]
        noise = chosen[i](conditioning.model_input(latents).to(model_dtype), conditioning.timestep(t, latents))
        latents = scheduler.step(noise, t, latents, return_dict=False)[0]
        clock.mark()
    if stop < len(scheduler.timesteps):
        return DenoiseResult(latents=latents, step_seconds=clock.seconds(),
                             state=SamplerState.capture(scheduler, latents))
    return DenoiseResult(latents=conditioning.final(latents), step_seconds=clock.seconds())
