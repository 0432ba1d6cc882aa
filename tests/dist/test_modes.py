"""Every parallel mode reproduces diffusers' single-process pipeline (fp32 tiny models, gloo ranks).

Shapes are awkward on purpose: 48x80 pixels give 45 DiT tokens (divisible by neither 2 nor 4) and the
tiny DiT has 3 heads (divisible by neither 2 nor 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.dist_utils import run_on_ranks
from tests.modes import Case, run_cases
from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.config import RunConfig
from wan_dist.sampling import SCHEDULER_CONFIG


def _layouts(world: int) -> list[dict]:
    return {
        1: [dict(name="single")],
        2: [dict(name="stage_split", stage_split=True), dict(name="cfg", cfg=2), dict(name="ulysses", ulysses=2),
            dict(name="ring", ring=2)],
        3: [dict(name="ulysses3", ulysses=3), dict(name="stage_split_cfg", stage_split=True, cfg=2),
            dict(name="ring3", ring=3)],
        4: [dict(name="usp", ulysses=2, ring=2), dict(name="cfg_usp", cfg=2, ulysses=2),
            dict(name="cfg_ring", cfg=2, ring=2), dict(name="stage_split_ulysses3", stage_split=True, ulysses=3)],
    }[world]


# The other families (tests/conftest.py FAMILY_SPECS), each in single and in layouts that cover every
# axis, the stage split and FSDP: two experts of different depths (the low-noise one at its own guidance;
# split between two groups of ranks too, the first of 3 steps the high-noise group's, UniPC's history
# handed to the low-noise group with the latents),
# TI2V's per-token timesteps split with the tokens (at 96x160: 45 tokens, 3 per shard of 15 plus padding
# for 2 and 4), FLF2V's two images.
_SIZES = {"ti2v_t2v": dict(height=96, width=160), "ti2v_i2v": dict(height=96, width=160)}
_FAMILY_LAYOUTS = {
    1: [("moe_t2v", "single", {}), ("moe_i2v", "single", {}), ("ti2v_t2v", "single", {}),
        ("ti2v_i2v", "single", {}), ("flf2v", "single", {})],
    2: [("moe_t2v", "cfg", dict(cfg=2)), ("moe_t2v", "ulysses", dict(ulysses=2)),
        ("moe_t2v", "expert_split", dict(expert_split=True)),
        ("moe_i2v", "cfg_fsdp", dict(cfg=2, fsdp=True)), ("ti2v_i2v", "ulysses", dict(ulysses=2)),
        ("ti2v_t2v", "ring_fsdp", dict(ring=2, fsdp=True)), ("flf2v", "stage_split", dict(stage_split=True))],
    3: [("moe_t2v", "ring3", dict(ring=3)),
        # The 48-channel VAE's encode and decode in bands over the three ranks too.
        ("ti2v_i2v", "ring3_vae_bands", dict(ring=3, vae_decode="patch", vae_encode="patch")),
        ("ti2v_i2v", "stage_split_cfg", dict(stage_split=True, cfg=2)),
        ("flf2v", "ulysses3", dict(ulysses=3)), ("moe_i2v", "stage_split_cfg", dict(stage_split=True, cfg=2)),
        # Ulysses over the high-noise group's 2 ranks (degrees left open are filled per group).
        ("moe_t2v", "expert_split_ulysses_high", dict(expert_split=True, expert_ranks=(2, 1), ulysses=None)),
        ("moe_i2v", "expert_split_stage_split", dict(expert_split=True, stage_split=True))],
    4: [("moe_t2v", "usp_fsdp", dict(ulysses=2, ring=2, fsdp=True)), ("ti2v_t2v", "cfg_usp", dict(cfg=2, ulysses=2)),
        ("moe_i2v", "stage_split_ulysses3", dict(stage_split=True, ulysses=3)),
        ("flf2v", "cfg_ring_fsdp", dict(cfg=2, ring=2, fsdp=True))],
}


def _family_case(folders: dict, image: str, last_image: str, model: str, layout: str, degrees: dict) -> Case:
    folder = folders["ti2v" if model.startswith("ti2v") else model]  # TI2V: one folder for both tasks
    images = dict(image=image) if model.endswith("i2v") else {}
    if model == "flf2v":
        images = dict(image=image, last_image=last_image)
    extra = dict(guidance_scale_2=2.0) if model.startswith("moe") else {}
    return Case(name=f"{model}_{layout}", folder=str(folder), **images, **_SIZES.get(model, {}), **extra, **degrees)


@pytest.fixture(scope="module")
def world_results(t2v_folder, i2v_folder, family_folders, image_path, last_image_path, tmp_path_factory):
    """Run every layout for T2V and I2V and the other families' layouts, one spawned world per size;
    returns {name: (case, out_dir)}."""
    root = tmp_path_factory.mktemp("modes")
    results = {}
    for world in (1, 2, 3, 4):
        cases = []
        for task, folder, image in (("t2v", t2v_folder, None), ("i2v", i2v_folder, str(image_path))):
            for layout in _layouts(world):
                layout = dict(layout, name=f"{task}_{layout['name']}")
                cases.append(Case(folder=str(folder), image=image, **layout))
        cases += [_family_case(family_folders, str(image_path), str(last_image_path), *entry)
                  for entry in _FAMILY_LAYOUTS[world]]
        run_on_ranks(world, run_cases, cases, str(root), timeout=600)
        for case in cases:
            results[case.name] = (case, root / case.name)
    return results


ALL_CASES = [f"{task}_{layout['name']}" for world in (1, 2, 3, 4) for layout in _layouts(world)
             for task in ("t2v", "i2v")] \
    + [f"{model}_{layout}" for world in (1, 2, 3, 4) for model, layout, _ in _FAMILY_LAYOUTS[world]]


@pytest.mark.parametrize("name", ALL_CASES)
def test_mode_matches_diffusers(world_results, name):
    case, out_dir = world_results[name]
    reference = reference_frames(case.folder, **case.reference_kwargs())
    error = max_abs_error(out_dir / "frames.npy", reference)
    assert error <= TOLERANCE, f"{name}: max abs error {error:.3g} > {TOLERANCE}"
    assert (out_dir / "video.mp4").stat().st_size > 0
    assert (out_dir / "run.json").is_file()


@pytest.mark.parametrize("name", ["moe_i2v_cfg_fsdp", "moe_t2v_usp_fsdp", "moe_i2v_stage_split_ulysses3",
                                  "moe_t2v_single"])
def test_every_dit_rank_holds_both_experts_as_planned(world_results, name):
    """Each DiT rank loads both experts, whole or its FSDP shard of each: run.json's loaded bytes per
    expert equal the plan's, from the headers."""
    _, out_dir = world_results[name]
    report = json.loads((out_dir / "run.json").read_text())
    for planned, measured in zip(report["plan"]["ranks"], report["memory"]):
        for expert in ("dit", "dit_2"):
            assert measured["loaded_parameter_bytes"].get(expert) == planned["weight_bytes"].get(expert)
        assert ("dit" in planned["weight_bytes"]) == ("dit" in planned["role"])
    if "fsdp" in name:
        ranks = report["plan"]["ranks"]
        whole = report["plan"]["components"]["dit_2"]["weight_bytes"]
        assert sum(r["weight_bytes"]["dit_2"] for r in ranks if "dit_2" in r["weight_bytes"]) == whole


def test_the_low_noise_expert_and_its_guidance_are_used(world_results):
    """The two-expert comparison can fail: with the low-noise expert's guidance left at guidance_scale,
    diffusers gives other frames, so the low-noise expert ran the later steps with guidance_scale_2."""
    case, out_dir = world_results["moe_t2v_ulysses"]
    kwargs = dict(case.reference_kwargs(), guidance_scale_2=None)
    assert max_abs_error(out_dir / "frames.npy", reference_frames(case.folder, **kwargs)) > 100 * TOLERANCE


def test_a_folder_given_alone_samples_as_diffusers_samples_it(world_results):
    """The two-expert I2V folder's scheduler says shift 12 and its cases leave flow_shift open: each of its
    layouts matched diffusers' pipeline on the folder as it is (above). That comparison can fail: at the
    default preset's shift the frames differ. run.json says where the shift came from."""
    case, out_dir = world_results["moe_i2v_cfg_fsdp"]
    report = json.loads((out_dir / "run.json").read_text())
    assert report["plan"]["sampling"]["flow_shift"] == {"value": 12.0, "source": f"folder {SCHEDULER_CONFIG}"}
    assert report["config"]["flow_shift"] == 12.0
    default_shift = reference_frames(case.folder, **dict(case.reference_kwargs(), flow_shift=RunConfig.flow_shift))
    assert max_abs_error(out_dir / "frames.npy", default_shift) > 100 * TOLERANCE


def test_ti2v_image_sets_the_first_frame(world_results):
    """TI2V image-to-video differs from its text-to-video at the same size and seed: the image's latent
    holds the first latent frame."""
    _, i2v_dir = world_results["ti2v_i2v_single"]
    _, t2v_dir = world_results["ti2v_t2v_single"]
    assert max_abs_error(i2v_dir / "frames.npy", np.load(t2v_dir / "frames.npy")) > 100 * TOLERANCE


def test_modes_differ_from_a_wrong_answer(world_results):
    """The comparison can fail: another seed's reference is far from what the modes produce."""
    case, out_dir = world_results["t2v_usp"]
    kwargs = case.reference_kwargs()
    other = reference_frames(case.folder, **kwargs, seed=1)
    assert max_abs_error(out_dir / "frames.npy", other) > 100 * TOLERANCE


@pytest.mark.parametrize("name, groups", [
    ("moe_t2v_expert_split", [("dit", [0], (1, 1, 1)), ("dit_2", [1], (1, 1, 1))]),
    ("moe_t2v_expert_split_ulysses_high", [("dit", [0, 1], (1, 1, 2)), ("dit_2", [2], (1, 1, 1))]),
    ("moe_i2v_expert_split_stage_split", [("dit", [1], (1, 1, 1)), ("dit_2", [2], (1, 1, 1))]),
])
def test_expert_split_ranks_hold_only_their_expert(world_results, name, groups):
    """run.json: the groups as planned, and each DiT rank loaded only its group's expert (beside rank 0's
    encoders and VAE), as many bytes as the plan predicted, released after the last video."""
    _, out_dir = world_results[name]
    report = json.loads((out_dir / "run.json").read_text())
    assert [(g["expert"], g["ranks"], (g["cfg"], g["ring"], g["ulysses"])) for g in report["mesh"]["expert_groups"]] \
        == groups
    for expert, ranks, _ in groups:
        for rank in ranks:
            memory = report["memory"][rank]
            assert set(memory["loaded_parameter_bytes"]) - {"text_encoder", "vae"} == {expert}, (rank, memory)
            assert memory["loaded_parameter_bytes"][expert] == report["plan"]["components"][expert]["weight_bytes"]
            assert expert not in memory["held_parameter_bytes_at_end"]
