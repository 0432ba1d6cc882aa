"""Every parallel mode reproduces diffusers' single-process pipeline (fp32 tiny models, gloo ranks).

Shapes are awkward on purpose: 48x80 pixels give 45 DiT tokens (divisible by neither 2 nor 4) and the
tiny DiT has 3 heads (divisible by neither 2 nor 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.matrix import group, params
from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.config.schema import RunConfig
from wan_dist.plan.sampling import SCHEDULER_CONFIG


@pytest.mark.parametrize("name", params(group("layouts")))
def test_mode_matches_diffusers(matrix, name):
    case, out_dir = matrix[name]
    reference = reference_frames(case.folder, **case.reference_kwargs())
    error = max_abs_error(out_dir / "frames.npy", reference)
    assert error <= TOLERANCE, f"{name}: max abs error {error:.3g} > {TOLERANCE}"
    assert (out_dir / "video.mp4").stat().st_size > 0
    assert (out_dir / "run.json").is_file()


@pytest.mark.parametrize("name", params(["moe_i2v_cfg_fsdp", "moe_t2v_usp_fsdp", "moe_i2v_stage_split_ulysses3",
                                         "moe_t2v_single"]))
def test_every_dit_rank_holds_both_experts_as_planned(matrix, name):
    """Each DiT rank loads both experts, whole or its FSDP shard of each: run.json's loaded bytes per
    expert equal the plan's, from the headers."""
    _, out_dir = matrix[name]
    report = json.loads((out_dir / "run.json").read_text())
    for planned, measured in zip(report["plan"]["ranks"], report["memory"]):
        for expert in ("dit", "dit_2"):
            assert measured["loaded_parameter_bytes"].get(expert) == planned["weight_bytes"].get(expert)
        assert ("dit" in planned["weight_bytes"]) == ("dit" in planned["role"])
    if "fsdp" in name:
        ranks = report["plan"]["ranks"]
        whole = report["plan"]["components"]["dit_2"]["weight_bytes"]
        assert sum(r["weight_bytes"]["dit_2"] for r in ranks if "dit_2" in r["weight_bytes"]) == whole


@pytest.mark.cases("moe_t2v_ulysses")
def test_the_low_noise_expert_and_its_guidance_are_used(matrix):
    """The two-expert comparison can fail: with the low-noise expert's guidance left at guidance_scale,
    diffusers gives other frames, so the low-noise expert ran the later steps with guidance_scale_2."""
    case, out_dir = matrix["moe_t2v_ulysses"]
    kwargs = dict(case.reference_kwargs(), guidance_scale_2=None)
    assert max_abs_error(out_dir / "frames.npy", reference_frames(case.folder, **kwargs)) > 100 * TOLERANCE


@pytest.mark.cases("moe_i2v_cfg_fsdp")
def test_a_folder_given_alone_samples_as_diffusers_samples_it(matrix):
    """The two-expert I2V folder's scheduler says shift 12 and its cases leave flow_shift open: each of its
    layouts matched diffusers' pipeline on the folder as it is (above). That comparison can fail: at the
    default preset's shift the frames differ. run.json says where the shift came from."""
    case, out_dir = matrix["moe_i2v_cfg_fsdp"]
    report = json.loads((out_dir / "run.json").read_text())
    assert report["plan"]["sampling"]["flow_shift"] == {"value": 12.0, "source": f"folder {SCHEDULER_CONFIG}"}
    assert report["config"]["flow_shift"] == 12.0
    default_shift = reference_frames(case.folder, **dict(case.reference_kwargs(), flow_shift=RunConfig.flow_shift))
    assert max_abs_error(out_dir / "frames.npy", default_shift) > 100 * TOLERANCE


@pytest.mark.cases("ti2v_i2v_single", "ti2v_t2v_single")
def test_ti2v_image_sets_the_first_frame(matrix):
    """TI2V image-to-video differs from its text-to-video at the same size and seed: the image's latent
    holds the first latent frame."""
    _, i2v_dir = matrix["ti2v_i2v_single"]
    _, t2v_dir = matrix["ti2v_t2v_single"]
    assert max_abs_error(i2v_dir / "frames.npy", np.load(t2v_dir / "frames.npy")) > 100 * TOLERANCE


@pytest.mark.cases("moe_t2v_usp_fsdp")
def test_modes_differ_from_a_wrong_answer(matrix):
    """The comparison can fail: another seed's reference is far from what the modes produce."""
    case, out_dir = matrix["moe_t2v_usp_fsdp"]
    kwargs = case.reference_kwargs()
    other = reference_frames(case.folder, **kwargs, seed=1)
    assert max_abs_error(out_dir / "frames.npy", other) > 100 * TOLERANCE


@pytest.mark.parametrize("name, groups", [
    ("moe_t2v_expert_split", [("dit", [0], (1, 1, 1)), ("dit_2", [1], (1, 1, 1))]),
    ("moe_t2v_expert_split_ulysses_high", [("dit", [0, 1], (1, 1, 2)), ("dit_2", [2], (1, 1, 1))]),
    ("moe_i2v_expert_split_stage_split", [("dit", [1], (1, 1, 1)), ("dit_2", [2], (1, 1, 1))]),
    ("moe_t2v_expert_split_cfg", [("dit", [0, 1], (2, 1, 1)), ("dit_2", [2, 3], (2, 1, 1))]),
])
def test_expert_split_ranks_hold_only_their_expert(matrix, name, groups):
    """run.json: the groups as planned, and each DiT rank loaded only its group's expert (beside rank 0's
    encoders and VAE), as many bytes as the plan predicted, released after the last video."""
    _, out_dir = matrix[name]
    report = json.loads((out_dir / "run.json").read_text())
    assert [(g["expert"], g["ranks"], (g["cfg"], g["ring"], g["ulysses"])) for g in report["mesh"]["expert_groups"]] \
        == groups
    for expert, ranks, _ in groups:
        for rank in ranks:
            memory = report["memory"][rank]
            assert set(memory["loaded_parameter_bytes"]) - {"text_encoder", "vae"} == {expert}, (rank, memory)
            assert memory["loaded_parameter_bytes"][expert] == report["plan"]["components"][expert]["weight_bytes"]
            assert expert not in memory["held_parameter_bytes_at_end"]
