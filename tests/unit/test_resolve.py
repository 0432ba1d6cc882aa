"""`resolve` (and the planner above it) is pure: everything it needs is in the Inputs `prepare` made, so it
gives equal plans each time, reads no file (the model folder is gone and opening any file raises) and makes
no collective (no process group exists, so any would raise)."""

from __future__ import annotations

import builtins
import dataclasses
import io
import pathlib
import shutil
from contextlib import contextmanager

import pytest
import torch.distributed as dist

from tests.conftest import write_random_lora
from wan_dist.config.schema import LoraConfig, RunConfig
from wan_dist.config.errors import ConfigError
from wan_dist.plan.inputs import DeviceFacts, Inputs, prepare
from wan_dist.plan.job import resolve
from wan_dist.plan.planner import fit

GPU_80 = DeviceFacts("cuda", (9, 0), 80 * 2**30)


def _refuse(*_args, **_kwargs):
    raise AssertionError("resolve opened a file")


@contextmanager
def no_files():
    with pytest.MonkeyPatch.context() as patch:
        for owner, name in ((builtins, "open"), (io, "open"), (pathlib.Path, "open"), (pathlib.Path, "read_text"),
                            (pathlib.Path, "read_bytes"), (pathlib.Path, "iterdir"), (pathlib.Path, "glob")):
            patch.setattr(owner, name, _refuse)
        yield


def prepared(folder, tmp_path, run: RunConfig, device: DeviceFacts = DeviceFacts("cpu")) -> Inputs:
    """Inputs prepared from a copy of `folder`, which is then deleted."""
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    run.model.path = str(copy)
    inputs = prepare(run, device, out_dir=tmp_path / "out")
    shutil.rmtree(copy)
    return inputs


def test_resolve_is_pure(tmp_path, t2v_folder):
    run = RunConfig()
    run.height, run.width, run.parallel.preset = 48, 80, "ulysses"
    run.lora = [LoraConfig(path=str(write_random_lora(t2v_folder, tmp_path / "lora.safetensors")))]
    inputs = prepared(t2v_folder, tmp_path, run)
    assert not dist.is_initialized()
    with no_files():
        plans = [resolve(run, inputs, 2) for _ in range(2)]
        # Another world from the same Inputs, as the planner's refusal asks of larger ones.
        wider = resolve(run, inputs, 4)
    assert plans[0] == plans[1] and plans[0].to_json() == plans[1].to_json()
    assert plans[0].dims.ulysses == 2 and wider.dims.ulysses == 4
    assert plans[0].components["dit"].loras == tuple(run.lora)
    assert not dist.is_initialized()


def test_an_expert_split_counts_its_steps_without_the_folder(tmp_path, family_folders):
    run = RunConfig()
    run.height, run.width, run.num_frames, run.steps, run.guidance_scale_2 = 48, 80, 9, 3, 2.0
    run.parallel.expert_split = True
    inputs = prepared(family_folders["moe_t2v"], tmp_path, run)
    with no_files():
        plans = [resolve(run, inputs, 3) for _ in range(2)]
    assert plans[0] == plans[1] and plans[0].expert_steps == (1, 2)


def test_the_planner_is_pure_too(tmp_path, t2v_folder):
    """On a GPU the plan only imagines: the planner's steps, fp8 storage included (named when nothing fits),
    all from the same Inputs."""
    run = RunConfig()
    run.height, run.width = 48, 80
    inputs = prepared(t2v_folder, tmp_path, run, GPU_80)
    tiny_gpu = dataclasses.replace(inputs, device=dataclasses.replace(inputs.device, memory_bytes=2**10))
    with no_files():
        plans = [fit(run, inputs, 2) for _ in range(2)]
        refusals = []
        for _ in range(2):
            with pytest.raises(ConfigError) as error:
                fit(run, tiny_gpu, 2)
            refusals.append(str(error.value))
    assert plans[0] == plans[1] and plans[0].added == ()
    assert refusals[0] == refusals[1] and "does not fit 2 GPU(s)" in refusals[0]
    assert not dist.is_initialized()

