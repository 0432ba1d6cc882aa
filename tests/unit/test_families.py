"""Model families told apart from the folder alone (Wan2.1 T2V/I2V/FLF2V, Wan2.2 two-expert, Wan2.2 TI2V),
the presets that name them, and the bad input each family refuses in one line before loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import write_random_lora
from tests.planning import plan_of
from wan_dist.plan.checks import read_folder_facts, validate_run
from wan_dist.config.schema import LoraConfig, RunConfig
from wan_dist.config.errors import ConfigError
from wan_dist.config.presets import MODEL_PRESETS, WAN21, WAN22_EXPERTS, WAN22_TI2V


def run_on(folder: Path, **fields) -> RunConfig:
    run = RunConfig()
    run.model.path = str(folder)
    for key, value in fields.items():
        setattr(run, key, value)
    return run


def refused(run: RunConfig, *fragments: str, plan: bool = False, tmp_path: Path | None = None) -> None:
    with pytest.raises(ConfigError) as info:
        if plan:
            plan_of(run, 1, tmp_path)
        else:
            validate_run(run)
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_families_and_tasks_read_from_the_folders(t2v_folder, i2v_folder, family_folders):
    facts = {name: read_folder_facts(folder) for name, folder in family_folders.items()}
    assert (read_folder_facts(t2v_folder).family, read_folder_facts(t2v_folder).tasks) == (WAN21, ("t2v",))
    assert read_folder_facts(i2v_folder).tasks == ("i2v",)
    assert (facts["flf2v"].family, facts["flf2v"].tasks) == (WAN21, ("flf2v",))
    assert (facts["moe_t2v"].family, facts["moe_t2v"].tasks, facts["moe_t2v"].boundary_ratio) == \
        (WAN22_EXPERTS, ("t2v",), 0.875)
    assert (facts["moe_i2v"].tasks, facts["moe_i2v"].boundary_ratio) == (("i2v",), 0.9)
    assert (facts["ti2v"].family, facts["ti2v"].tasks) == (WAN22_TI2V, ("t2v", "i2v"))


def test_ti2v_task_follows_the_image(family_folders, image_path):
    assert validate_run(run_on(family_folders["ti2v"])).task == "t2v"
    assert validate_run(run_on(family_folders["ti2v"], image=str(image_path))).task == "i2v"
    run = run_on(family_folders["ti2v"])
    run.model.task = "i2v"
    refused(run, "model.task=", "'t2v' or 'i2v'", "image=")


@pytest.mark.parametrize("index, fragment", [
    ({"transformer_2": ["diffusers", "WanTransformer3DModel"]}, "boundary_ratio=None"),
    ({"boundary_ratio": 0.5}, "transformer_2=None"),
    ({"expand_timesteps": True, "boundary_ratio": 0.5, "transformer_2": ["diffusers", "WanTransformer3DModel"]},
     "expand_timesteps=True"),
    ({"boundary_ratio": 1.5, "transformer_2": ["diffusers", "WanTransformer3DModel"]}, "between 0 and 1"),
])
def test_a_folder_of_no_one_family_is_refused(tmp_path, index, fragment):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "WanPipeline", **index}))
    refused(run_on(folder), "model.path=", fragment)


def test_a_preset_on_a_folder_of_another_family_is_refused(t2v_folder, family_folders):
    run = run_on(t2v_folder)
    run.model.preset = "t2v_a14b"
    refused(run, "model.path=", "wan2.2_moe folder for model=t2v_a14b", "this one is wan2.1")
    run = run_on(family_folders["moe_t2v"])
    run.model.preset = "t2v_14b"
    refused(run, "a wan2.1 folder for model=t2v_14b", "this one is wan2.2_moe")
    run.model.preset = "t2v_a14b"
    assert validate_run(run).family == WAN22_EXPERTS


def test_flf2v_needs_its_last_image_and_no_one_else_takes_one(family_folders, i2v_folder, image_path,
                                                              last_image_path):
    flf2v = family_folders["flf2v"]
    refused(run_on(flf2v, image=str(image_path)), "last_image=None", "first and a last frame")
    assert validate_run(run_on(flf2v, image=str(image_path), last_image=str(last_image_path))).task == "flf2v"
    refused(run_on(i2v_folder, image=str(image_path), last_image=str(last_image_path)), "last_image=",
            "only a first-last-frame model", "flf2v_14b_720p")
    refused(run_on(family_folders["ti2v"], image=str(image_path), last_image=str(last_image_path)), "last_image=")


def test_expert_keys_only_for_two_expert_models(t2v_folder, family_folders, tmp_path):
    refused(run_on(t2v_folder, guidance_scale_2=3.0), "guidance_scale_2=3.0", "only a two-expert model")
    assert validate_run(run_on(family_folders["moe_t2v"], guidance_scale_2=3.0)).experts == 2
    lora = write_random_lora(t2v_folder, tmp_path / "lora.safetensors")
    refused(run_on(t2v_folder, lora=[LoraConfig(path=str(lora), expert="low")]), "lora[0].expert='low'",
            "only a two-expert model")
    refused(run_on(family_folders["moe_t2v"], lora=[LoraConfig(path=str(lora), expert="middle")]),
            "lora[0].expert='middle'", "high, low, both")


def test_a_lora_must_fit_the_expert_it_goes_into(family_folders, tmp_path):
    """moe_t2v's high-noise expert has 2 blocks, its low-noise one 1: a LoRA for 2 blocks fits only high."""
    folder = family_folders["moe_t2v"]
    lora = str(write_random_lora(folder, tmp_path / "lora.safetensors"))
    plan_of(run_on(folder, lora=[LoraConfig(path=lora, expert="high")]), 1, tmp_path / "ok")
    refused(run_on(folder, lora=[LoraConfig(path=lora, expert="both")]), "lora[0].path=",
            "low-noise expert", "blocks.1.attn1", "has no such layer", plan=True, tmp_path=tmp_path / "out")


def test_ti2v_size_its_vae_cannot_take(family_folders, tmp_path):
    refused(run_on(family_folders["ti2v"], height=48, width=64), "height=48", "multiple of 32", "VAE x16",
            plan=True, tmp_path=tmp_path)


def test_the_plan_holds_both_experts_and_no_image_encoder_for_wan22_i2v(family_folders, image_path, tmp_path):
    plan = plan_of(run_on(family_folders["moe_i2v"], image=str(image_path)), 1, tmp_path)
    assert plan.experts == ("dit", "dit_2") and plan.boundary_ratio == 0.9
    assert "image_encoder" not in plan.components
    assert plan.components["dit_2"].subfolder == "transformer_2"
    # The experts differ in depth (2 and 3 blocks), so their bytes do too; each is read from its own headers.
    assert plan.components["dit"].weight_bytes < plan.components["dit_2"].weight_bytes
    assert set(plan.ranks[0].weight_bytes) >= {"dit", "dit_2", "vae", "text_encoder"}


def test_presets_carry_the_official_wan22_defaults():
    t2v, i2v, ti2v = (MODEL_PRESETS[name] for name in ("t2v_a14b", "i2v_a14b", "ti2v_5b"))
    assert t2v.repo == "Wan-AI/Wan2.2-T2V-A14B-Diffusers" and i2v.repo == "Wan-AI/Wan2.2-I2V-A14B-Diffusers"
    assert (t2v.sampling.steps, t2v.sampling.flow_shift, t2v.spec.boundary_ratio, t2v.sampling.guidance_scale,
            t2v.sampling.guidance_scale_2) == (40, 12.0, 0.875, 4.0, 3.0)
    assert (i2v.sampling.steps, i2v.sampling.flow_shift, i2v.spec.boundary_ratio, i2v.sampling.guidance_scale,
            i2v.sampling.guidance_scale_2) == (40, 5.0, 0.9, 3.5, 3.5)
    assert (ti2v.sampling.width, ti2v.sampling.height, ti2v.sampling.num_frames, ti2v.sampling.frame_rate,
            ti2v.sampling.steps, ti2v.sampling.guidance_scale, ti2v.sampling.flow_shift) == \
        (1280, 704, 121, 24, 50, 5.0, 5.0)
    assert MODEL_PRESETS["flf2v_14b_720p"].spec.task == "flf2v"
    assert not MODEL_PRESETS["i2v_a14b"].spec.has_image_encoder


def test_an_unpinned_folder_copy_keeps_its_family(family_folders, tmp_path):
    """What tells the families apart is in model_index.json and the configs, not in the folder's name."""
    copy = shutil.copytree(family_folders["moe_i2v"], tmp_path / "renamed")
    assert read_folder_facts(copy).family == WAN22_EXPERTS
