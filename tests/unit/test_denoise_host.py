"""The denoising loop decides everything from the host before its first step: the expert of each step
(diffusers' `t >= boundary_timestep`, at the boundary too) and, for the fresh-noise sampler, every step's
noise (bit for bit what diffusers' own stochastic step draws); no step reads a tensor back to the host."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.overrides import TorchFunctionMode

from wan_dist.wan.pipeline import Experts, denoise, high_noise_steps
from wan_dist.wan.schedulers import DistilledEulerScheduler

# What makes the host wait for a device tensor's value.
HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
              torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy}


class CountHostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.reads += func in HOST_READS
        return func(*args, **(kwargs or {}))


def _schedule(steps: int) -> torch.Tensor:
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(steps)
    return scheduler.timesteps


def _recording(name: str, calls: list[tuple[str, float]]):
    def predict(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        calls.append((name, timestep))
        return torch.sin(latents + timestep / 1000)
    return predict


def _boundary_on_a_step(timesteps: torch.Tensor, index: int) -> float:
    return float(timesteps[index])  # the step's float32 value exactly: `t >= boundary` holds at equality


def test_expert_of_each_step_is_diffusers_rule_at_the_boundary_too():
    timesteps = _schedule(7)
    at = _boundary_on_a_step(timesteps, 3)
    just_above = torch.nextafter(timesteps[3], torch.tensor(2000.0)).item()
    for boundary in (at, just_above, 875.0, None):
        expected = [boundary is None or bool(t >= boundary) for t in timesteps]  # WanPipeline's loop
        assert high_noise_steps(timesteps, boundary) == expected
    assert high_noise_steps(timesteps, at)[3] and not high_noise_steps(timesteps, just_above)[3]


def test_loop_runs_the_precomputed_expert_of_each_step():
    timesteps = _schedule(6)
    boundary = _boundary_on_a_step(timesteps, 2)
    calls: list[tuple[str, float]] = []
    experts = Experts(_recording("high", calls), _recording("low", calls), boundary_timestep=boundary)
    denoise(latents=torch.zeros(1, 2, 1, 2, 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), steps=6,
            experts=experts, model_dtype=torch.float32, show_progress=False)
    assert [name for name, _ in calls] == ["high"] * 3 + ["low"] * 3
    assert [float(t) for _, t in calls] == timesteps.tolist()


def test_a_missing_expert_fails_before_the_first_step():
    calls: list[tuple[str, float]] = []
    timesteps = _schedule(4)
    experts = Experts(_recording("high", calls), None, boundary_timestep=_boundary_on_a_step(timesteps, 1))
    with pytest.raises(RuntimeError, match="no expert was given for timestep"):
        denoise(latents=torch.zeros(1, 2, 1, 2, 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                steps=4, experts=experts, model_dtype=torch.float32, show_progress=False)
    assert calls == []
    # Stopping before the low-noise steps (the high-noise group of an expert split) needs no low expert.
    denoise(latents=torch.zeros(1, 2, 1, 2, 2), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
            steps=4, experts=experts, model_dtype=torch.float32, show_progress=False, stop=2)
    assert len(calls) == 2


def _lcm(seed: int) -> DistilledEulerScheduler:
    scheduler = DistilledEulerScheduler(shift=5.0, stochastic_sampling=True)
    scheduler.noise_seed = seed
    return scheduler


@pytest.mark.parametrize("scheduler", ["euler", "lcm_distill"])
def test_no_host_read_per_step(scheduler):
    """Host reads over a whole loop do not grow with its steps: none is made per step (with two experts,
    whose switch used to compare each step's timestep on the host)."""
    def reads(steps: int) -> int:
        timesteps = _schedule(steps)
        experts = Experts(_recording("high", []), _recording("low", []),
                          boundary_timestep=_boundary_on_a_step(timesteps, steps // 2))
        sampler = FlowMatchEulerDiscreteScheduler(shift=3.0) if scheduler == "euler" else _lcm(3)
        with CountHostReads() as counted:
            denoise(latents=torch.zeros(1, 2, 1, 2, 2), scheduler=sampler, steps=steps, experts=experts,
                    model_dtype=torch.float32, show_progress=False)
        return counted.reads

    assert reads(8) == reads(4)


@pytest.mark.parametrize("model_dtype", [torch.float32, torch.bfloat16])
def test_fresh_noise_is_the_librarys_stochastic_step_bit_for_bit(model_dtype):
    """Against diffusers' own stochastic step given the seed's generator after the initial latent's draw,
    every step of two videos (set_timesteps starts the stream again)."""
    shape = (1, 4, 3, 5, 7)
    ours = _lcm(11)
    library = FlowMatchEulerDiscreteScheduler.from_config(ours.config)
    for _ in range(2):
        ours.set_timesteps(4)
        library.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
        torch.testing.assert_close(ours.sigmas, library.sigmas, rtol=0, atol=0)
        generator = torch.Generator().manual_seed(11)
        sample = torch.randn(shape, generator=generator)
        a = b = sample
        for t in ours.timesteps:
            velocity = torch.cos(a * 3 + t / 1000).to(model_dtype)
            a = ours.step(velocity, t, a, return_dict=False)[0]
            b = library.step(velocity, t, b, generator=generator, return_dict=False)[0]
            assert a.dtype == b.dtype and torch.equal(a, b)
