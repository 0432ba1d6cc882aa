"""The 4-step distilled path: `+experiment=distilled_4step` with a LoRA in LightX2V's (and CausVid's) key
format, on two ranks, against diffusers running the same LoRA with the same scheduler; and the fresh-noise
sampler LightX2V's Wan2.1 runner steps with (`scheduler=lcm_distill`), also continued by the low-noise
group of an expert split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_lightx2v_lora
from tests.matrix import DISTILLED, group, params
from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.plan.checks import check_loras, validate_run
from wan_dist.config.schema import RunConfig, compose_run
from wan_dist.wan.loading import load_scheduler, read_component_config

# LightX2V's training timesteps: 1000, 750, 500, 250 shifted by 5 (its WanStepDistillScheduler).
LIGHTX2V_TIMESTEPS = [1000.0, 937.5, 2500.0 / 3, 625.0]


@pytest.fixture(scope="module")
def distilled_run(t2v_folder, tmp_path_factory) -> RunConfig:
    """The experiment as tests/matrix.py's distilled cases run it."""
    lora = write_lightx2v_lora(t2v_folder, tmp_path_factory.mktemp("lightx2v") / "lightx2v_4step.safetensors")
    return compose_run([*DISTILLED, f"model.path={t2v_folder}", f"lora=[{{path: '{lora}', scale: 1.0}}]"])


def test_experiment_sets_the_distilled_sampling(distilled_run):
    run = distilled_run
    assert run.guidance_scale == 1.0  # one branch: the LoRAs are CFG-distilled too
    scheduler = load_scheduler(Path(run.model.path), run.scheduler, run.flow_shift)
    scheduler.set_timesteps(run.steps)
    assert scheduler.timesteps.tolist() == pytest.approx(LIGHTX2V_TIMESTEPS)


def test_fresh_noise_continues_the_seeds_stream(distilled_run):
    """lcm_distill's step: the clean-latent prediction noised to the next sigma with the draw that follows
    the initial latent's on the seed's generator; each video (set_timesteps) starts the stream again."""
    import torch

    scheduler = load_scheduler(Path(distilled_run.model.path), "lcm_distill", distilled_run.flow_shift, seed=7)
    generator = torch.Generator().manual_seed(7)
    sample, fresh = torch.randn(1, 4, 2, 3, 5, generator=generator), torch.randn(1, 4, 2, 3, 5, generator=generator)
    velocity = torch.randn(sample.shape)
    for _ in range(2):
        scheduler.set_timesteps(4)
        sigma, following = scheduler.sigmas[0], scheduler.sigmas[1]
        stepped = scheduler.step(velocity, scheduler.timesteps[0], sample, return_dict=False)[0]
        expected = (1 - following) * (sample - sigma * velocity) + following * fresh
        torch.testing.assert_close(stepped, expected)


def test_lightx2v_lora_passes_the_checks(distilled_run):
    validate_run(distilled_run)  # the key names, from the header
    check_loras(distilled_run, [read_component_config(distilled_run.model.path, "transformer")])  # the sizes


@pytest.mark.parametrize("name", params(group("distilled")))
def test_distilled_matches_diffusers(matrix, name):
    case, out_dir = matrix[name]
    frames = out_dir / "frames.npy"
    error = max_abs_error(frames, reference_frames(case.folder, **case.reference_kwargs()))
    assert error <= TOLERANCE, f"{name}: {error:.3g}"


@pytest.mark.cases("experiment_ulysses")
def test_the_lora_changes_the_video(matrix):
    case, out_dir = matrix["experiment_ulysses"]
    frames = out_dir / "frames.npy"
    without = reference_frames(case.folder, **{**case.reference_kwargs(), "lora": ()})
    assert max_abs_error(frames, without) > 100 * TOLERANCE


@pytest.mark.cases("experiment_ulysses", "lcm_ring")
def test_fresh_noise_steps_change_the_video(matrix):
    """Fresh-noise steps give other frames than Euler steps from the same start: matching diffusers with
    them means drawing its noise, step for step."""
    euler, fresh = (matrix[name][1] / "frames.npy" for name in ("experiment_ulysses", "lcm_ring"))
    assert max_abs_error(fresh, np.load(euler)) > 100 * TOLERANCE
