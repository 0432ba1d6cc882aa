"""The JobPlan: resolved from the config, the world and the folder's headers; the weight bytes it predicts
are what the loaders then hold; the config it was built from is left as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.planning import plan_of
from wan_dist.config.schema import RunConfig
from wan_dist.config.errors import ConfigError
from wan_dist.wan.loading import load_image_encoder, load_text_encoder, load_transformer, load_vae, parameter_bytes

CPU = torch.device("cpu")


def run_for(folder, **fields) -> RunConfig:
    run = RunConfig()
    run.model.path = str(folder)
    for key, value in fields.items():
        setattr(run, key, value)
    return run


def test_plan_of_a_stage_split(tmp_path, t2v_folder):
    run = run_for(t2v_folder, height=48, width=80)
    run.parallel.preset, run.seed = "stage_split", 7
    plan = plan_of(run, 3, tmp_path)
    assert (plan.family, plan.task, plan.seed) == ("wan2.1", "t2v", 7)
    assert plan.dims.stage_split and plan.dims.dit_ranks == [1, 2]
    assert [r.role for r in plan.ranks] == ["encoders+vae", "dit", "dit"]
    assert plan.ranks[0].components == ("text_encoder", "vae") and plan.ranks[2].components == ("dit",)
    assert plan.latent.shape == (1, 16, 3, 6, 10) and plan.num_tokens == 3 * 3 * 5
    assert [v.video for v in plan.videos] == ["video.mp4"]
    assert set(plan.kernels) == {"self_attention", "cross_attention", "sequence_parallel"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.seed = 1  # type: ignore[misc]
    assert run.model.task is None  # building the plan changed nothing in the config


def test_plan_refuses_before_loading(tmp_path, t2v_folder):
    run = run_for(t2v_folder, height=48, width=80)
    run.parallel.preset = "ulysses"
    with pytest.raises(ConfigError, match="DiT tokens"):
        plan_of(run, 64, tmp_path)


@pytest.mark.parametrize("dit_dtype", ["fp32", "bf16", "fp16"])
def test_predicted_weight_bytes_are_what_is_loaded(tmp_path, i2v_folder, image_path, dit_dtype):
    """From the safetensors headers alone, the bytes each component takes once loaded (fp32 parts the
    model classes keep included), for the DiT in every compute dtype."""
    run = run_for(i2v_folder, image=str(image_path), height=48, width=80)
    run.model.dit_dtype = dit_dtype
    run.model.text_encoder_dtype = "fp16" if dit_dtype == "fp16" else "fp32"
    plan = plan_of(run, 1, tmp_path)
    c = plan.components
    loaded = {
        "dit": load_transformer(i2v_folder, c["dit"].dtype, CPU),
        "vae": load_vae(i2v_folder, c["vae"].dtype, CPU),
        "text_encoder": load_text_encoder(i2v_folder, c["text_encoder"].dtype, CPU),
        "image_encoder": load_image_encoder(i2v_folder, c["image_encoder"].dtype, CPU)[0],
    }
    assert {name: parameter_bytes(model) for name, model in loaded.items()} == \
        {name: c[name].weight_bytes for name in loaded}
    assert plan.ranks[0].weight_bytes == {name: c[name].weight_bytes for name in c}
