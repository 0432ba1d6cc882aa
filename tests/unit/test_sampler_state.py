"""A loop stopped at a step and resumed from its SamplerState (in a fresh scheduler, after a trip through
the wire format) takes the same steps as one uninterrupted loop."""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from wan_dist.wan.building import wan_scheduler
from wan_dist.wan.pipeline import Experts, SamplerState, denoise, expert_step_counts
from wan_dist.parallel.handoff import _header


def _scheduler(kind: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    return wan_scheduler(3.0)


def _expert(scale: float):
    def predict(latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        return torch.sin(latents * scale + timestep.float() / 1000)
    return predict


@pytest.mark.parametrize("kind", ["unipc", "euler"])
@pytest.mark.parametrize("stop", [1, 2, 4])
def test_resumed_loop_equals_one_loop(kind, stop):
    noise = torch.randn(1, 4, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    experts = Experts(_expert(1.3), _expert(0.7), boundary_timestep=875.0)
    whole = denoise(latents=noise, scheduler=_scheduler(kind), steps=5, experts=experts, model_dtype=torch.float32,
                    show_progress=False).latents
    first = denoise(latents=noise, scheduler=_scheduler(kind), steps=5, experts=experts, model_dtype=torch.float32,
                    show_progress=False, stop=stop)
    assert first.state is not None and int(first.state.step_index) == stop
    # Only the tensors travel: rebuild the state from its fields as a receiver would.
    state = SamplerState(**{f.name: None if getattr(first.state, f.name) is None
                            else getattr(first.state, f.name).clone() for f in fields(SamplerState)})
    rest = denoise(latents=state, scheduler=_scheduler(kind), steps=5, experts=experts, model_dtype=torch.float32,
                   show_progress=False)
    assert rest.state is None and len(rest.step_seconds) == 5 - stop
    torch.testing.assert_close(rest.latents, whole, rtol=0, atol=0)
    _header(state, torch.device("cpu"))  # it fits the handoff's header


def test_expert_step_counts_follow_the_switch():
    scheduler = _scheduler("unipc")
    scheduler.set_timesteps(10)
    high, low = expert_step_counts(scheduler.timesteps, 875.0)
    assert high + low == 10 and high == sum(1 for t in scheduler.timesteps if t >= 875)
    assert 0 < high < 10
