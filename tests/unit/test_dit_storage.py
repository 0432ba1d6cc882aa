"""model.dit_storage_dtype and model.dit_offload before anything loads: the values refused in one line, the
plan's fp8 weight bytes from the headers equal to what diffusers' layerwise casting leaves a loaded DiT
holding (whole and sharded), and offload refused where it cannot run."""

from __future__ import annotations

import pytest
import torch

from tests.planning import plan_of
from wan_dist.plan.checks import validate_run
from wan_dist.config.schema import RunConfig
from wan_dist.config.errors import ConfigError
from wan_dist.plan.inputs import DeviceFacts
from wan_dist.wan.loading import STORAGE_DTYPES_BY_NAME, component_weight_bytes, layerwise_cast_parameters
from wan_dist.wan.loading import load_transformer, parameter_bytes

CPU = torch.device("cpu")


def run_for(folder, **model) -> RunConfig:
    run = RunConfig()
    run.model.path = str(folder)
    run.height, run.width = 48, 80
    for key, value in model.items():
        setattr(run.model, key, value)
    return run


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("dit_storage_dtype", "fp4", "one of auto, fp8_e4m3, fp8_e5m2"),
    ("dit_offload", "leaf", "one of none, block"),
])
def test_bad_values_are_refused_in_one_line(t2v_folder, key, value, allowed):
    with pytest.raises(ConfigError) as error:
        validate_run(run_for(t2v_folder, **{key: value}))
    assert str(error.value) == f"model.{key}={value!r} is not allowed: {allowed}"


@pytest.mark.parametrize("dit_dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("storage", ["fp8_e4m3", "fp8_e5m2"])
def test_planned_fp8_bytes_are_what_layerwise_casting_holds(tmp_path, i2v_folder, image_path, dit_dtype, storage):
    """The plan counts the cast layers in fp8 and the skipped ones (embeddings, norms, the fp32 parts) in
    their own dtype: exactly the bytes a loaded DiT holds after diffusers' enable_layerwise_casting."""
    run = run_for(i2v_folder, dit_dtype=dit_dtype, dit_storage_dtype=storage)
    run.image = str(image_path)
    plan = plan_of(run, 1, tmp_path)
    dit = plan.components["dit"]
    assert dit.storage_dtype == STORAGE_DTYPES_BY_NAME[storage]
    model = load_transformer(i2v_folder, dit.dtype, CPU)
    full = parameter_bytes(model)
    model.enable_layerwise_casting(storage_dtype=dit.storage_dtype, compute_dtype=dit.dtype)
    assert dit.weight_bytes == parameter_bytes(model) < full
    assert plan.ranks[0].weight_bytes["dit"] == dit.weight_bytes


def test_sharded_fp8_bytes_add_up_to_the_replica(i2v_folder):
    """Three shards (rows that do not divide) of the fp8-stored DiT: together exactly one fp8 replica."""
    stored = layerwise_cast_parameters(i2v_folder, torch.float8_e4m3fn)
    assert stored and all(".blocks." in f".{name}" for name in stored)  # embeddings and output stay whole
    replica = component_weight_bytes(i2v_folder, "transformer", torch.bfloat16, stored=stored)
    shards = [component_weight_bytes(i2v_folder, "transformer", torch.bfloat16, stored=stored, shard=(r, 3))
              for r in range(3)]
    assert sum(shards) == replica


def test_offload_is_refused_where_the_device_cannot_stream(tmp_path, t2v_folder):
    with pytest.raises(ConfigError) as error:
        plan_of(run_for(t2v_folder, dit_offload="block"), 1, tmp_path)
    assert str(error.value).startswith("model.dit_offload='block' is not allowed: none on cpu")
    assert "\n" not in str(error.value)


def test_offload_with_fsdp_is_refused(tmp_path, t2v_folder):
    run = run_for(t2v_folder, dit_offload="block")
    run.parallel.fsdp = "true"
    run.parallel.preset, run.guidance_scale = "cfg", 5.0
    with pytest.raises(ConfigError) as error:
        # A GPU the plan only imagines (this machine has none): an 80 GB Hopper.
        plan_of(run, 2, tmp_path, device=DeviceFacts("cuda", (9, 0), 80 * 2**30))
    assert str(error.value).startswith("model.dit_offload='block' is not allowed: none with parallel.fsdp=true")


def test_compile_with_offload_is_refused(tmp_path, t2v_folder):
    run = run_for(t2v_folder, dit_offload="block")
    run.compile = True
    with pytest.raises(ConfigError) as error:
        plan_of(run, 1, tmp_path, device=DeviceFacts("cuda", (9, 0), 80 * 2**30))
    message = str(error.value)
    assert message.startswith("compile=True is not allowed: false with model.dit_offload=block")
    assert "model.dit_offload=none" in message and "\n" not in message
