"""`validate_run`: every rule a type cannot express, refused with a ConfigError naming the key and value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from wan_dist.plan.checks import read_prompts, validate_run
from wan_dist.config.schema import ConfigError, LoraConfig, RunConfig, compose_run



# ------------------------------------------------------------------------------------------- helpers


def t2v_run(**fields) -> RunConfig:
    """The default run as the `model=tiny` preset fills it (task t2v)."""
    run = RunConfig()
    run.model.task = "t2v"
    for key, value in fields.items():
        setattr(run, key, value)
    return run


@pytest.fixture
def png(tmp_path) -> Path:
    path = tmp_path / "first_frame.png"
    Image.new("RGB", (20, 12), (10, 200, 30)).save(path)
    return path


def i2v_run(image: Path | str | None, **fields) -> RunConfig:
    run = RunConfig()
    run.model.preset = "tiny_i2v"
    run.model.task = "i2v"
    run.image = None if image is None else str(image)
    for key, value in fields.items():
        setattr(run, key, value)
    return run


def write_index(folder: Path, class_name: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = {"_diffusers_version": "0.42.1"}
    if class_name is not None:
        data["_class_name"] = class_name
    (folder / "model_index.json").write_text(json.dumps(data))
    return folder


def refused(run: RunConfig, *fragments: str) -> str:
    """validate_run raises a ConfigError whose one-line message holds every fragment."""
    with pytest.raises(ConfigError) as info:
        validate_run(run)
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ------------------------------------------------------------------------------------------ valid runs


def test_default_t2v_run_is_valid():
    run = t2v_run()
    assert validate_run(run).task == "t2v"


def test_hydra_composed_default_is_valid():
    """What `python launch/generate.py` with no overrides validates."""
    run = compose_run()
    assert isinstance(run, RunConfig)
    assert (run.model.preset, validate_run(run).task, run.parallel.preset) == ("tiny", "t2v", "auto")


def test_bare_schema_default_is_valid():
    run = RunConfig()
    assert validate_run(run).task == "t2v"


def test_valid_i2v_run(png):
    run = i2v_run(png)
    assert validate_run(run).task == "i2v"


def test_valid_edge_values():
    validate_run(t2v_run(height=16, width=16, num_frames=1, steps=1, guidance_scale=0.0, flow_shift=0.1,
                         scheduler="euler"))
    validate_run(t2v_run(num_frames=81, guidance_scale=1.0))


# ---------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("key", ["height", "width"])
@pytest.mark.parametrize("value", [50, 8, 65, 0, -16])
def test_spatial_size_must_be_positive_multiple_of_16(key, value):
    message = refused(t2v_run(**{key: value}), f"{key}={value}", "multiple of 16")
    assert "positive" in message


@pytest.mark.parametrize("value", [10, 2, 8, 0, -3])
def test_num_frames_must_be_4k_plus_1(value):
    refused(t2v_run(num_frames=value), f"num_frames={value}", "4k+1")


@pytest.mark.parametrize("value", [0, -1])
def test_steps_must_be_positive(value):
    refused(t2v_run(steps=value), f"steps={value}")


def test_guidance_must_not_be_negative():
    refused(t2v_run(guidance_scale=-0.5), "guidance_scale=-0.5", ">= 0")


@pytest.mark.parametrize("value", [0.0, -3.0])
def test_flow_shift_must_be_positive(value):
    refused(t2v_run(flow_shift=value), f"flow_shift={value}", "positive")


def test_frame_rate_must_be_positive():
    refused(t2v_run(frame_rate=0), "frame_rate=0")


def test_unknown_scheduler():
    refused(t2v_run(scheduler="ddim"), "scheduler='ddim'", "unipc", "euler")


# ------------------------------------------------------------------------------------------------ model


def test_unknown_model_preset():
    run = t2v_run()
    run.model.preset = "t2v_2b"
    refused(run, "model='t2v_2b'", "tiny", "t2v_14b", "i2v_14b_720p")


def test_real_preset_without_path_names_repo_and_key():
    run = RunConfig()
    run.model.preset = "t2v_14b"
    refused(run, "model=t2v_14b", "model.path", "Wan-AI/Wan2.1-T2V-14B-Diffusers")


@pytest.mark.parametrize("preset, repo", [
    ("t2v_1_3b", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"),
    ("i2v_14b_480p", "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers"),
    ("i2v_14b_720p", "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers"),
])
def test_every_real_preset_names_its_repo(preset, repo):
    run = RunConfig()
    run.model.preset = preset
    refused(run, f"model={preset}", "model.path", repo)


def test_model_path_that_does_not_exist(tmp_path):
    run = t2v_run()
    run.model.path = str(tmp_path / "nope")
    refused(run, "model.path=", str(tmp_path / "nope"), "folder")


def test_model_path_that_is_a_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"x")
    run = t2v_run()
    run.model.path = str(path)
    refused(run, "model.path=", str(path), "folder")


def test_model_folder_without_model_index(tmp_path):
    run = t2v_run()
    run.model.path = str(tmp_path)
    refused(run, "model.path=", str(tmp_path), "model_index.json")


@pytest.mark.parametrize("class_name", ["StableDiffusionPipeline", "WanVACEPipeline", None])
def test_model_folder_with_wrong_pipeline_class(tmp_path, class_name):
    folder = write_index(tmp_path / "model", class_name)
    run = RunConfig()
    run.model.preset = "t2v_14b"
    run.model.path = str(folder)
    refused(run, "model.path=", str(folder), repr(class_name), "WanPipeline", "WanImageToVideoPipeline")


def test_model_folder_with_malformed_model_index(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text("{not json")
    run = RunConfig()
    run.model.preset = "t2v_14b"
    run.model.path = str(folder)
    refused(run, "model.path=")


def test_task_is_read_from_the_folder_i2v(tmp_path, png):
    folder = write_index(tmp_path / "model", "WanImageToVideoPipeline")
    run = RunConfig()
    run.model.preset = "i2v_14b_480p"
    run.model.path = str(folder)
    run.image = str(png)
    assert run.model.task is None
    assert validate_run(run).task == "i2v"


def test_task_is_read_from_the_folder_t2v(tmp_path):
    folder = write_index(tmp_path / "model", "WanPipeline")
    run = RunConfig()
    run.model.preset = "t2v_14b"
    run.model.path = str(folder)
    assert validate_run(run).task == "t2v"


def test_folder_task_read_before_image_rules(tmp_path):
    """An i2v folder with no image is refused for the image, i.e. the task came from the folder."""
    folder = write_index(tmp_path / "model", "WanImageToVideoPipeline")
    run = RunConfig()
    run.model.preset = "i2v_14b_720p"
    run.model.path = str(folder)
    refused(run, "image=None", "image-to-video")


def test_explicit_task_contradicting_the_folder(tmp_path):
    folder = write_index(tmp_path / "model", "WanPipeline")
    run = RunConfig()
    run.model.preset = "t2v_14b"
    run.model.path = str(folder)
    run.model.task = "i2v"
    refused(run, "model.task='i2v'", "'t2v'", "model_index.json")


def test_cli_default_preset_with_i2v_folder_reads_task(tmp_path, png):
    folder = write_index(tmp_path / "model", "WanImageToVideoPipeline")
    run = compose_run([f"model.path={folder}", f"image={png}"])
    assert validate_run(run).task == "i2v"


def test_tiny_preset_task_contradiction_is_refused(png):
    run = RunConfig()
    run.model.preset = "tiny"
    run.model.task = "i2v"
    run.image = str(png)
    refused(run, "model.task")


def test_unknown_task():
    run = RunConfig()
    run.model.task = "v2v"
    refused(run, "model.task='v2v'", "t2v")


def test_task_is_derived_when_unset():
    run = RunConfig()
    assert run.model.task is None
    assert validate_run(run).task == "t2v"


@pytest.mark.parametrize("key", ["dit_dtype", "vae_dtype", "text_encoder_dtype"])
@pytest.mark.parametrize("value", ["float32", "int8", "BF16"])
def test_bad_dtypes(key, value):
    run = t2v_run()
    setattr(run.model, key, value)
    refused(run, f"model.{key}={value!r}", "auto", "bf16", "fp16", "fp32")


@pytest.mark.parametrize("key", ["dit_dtype", "vae_dtype", "text_encoder_dtype"])
@pytest.mark.parametrize("value", ["auto", "bf16", "fp16", "fp32"])
def test_good_dtypes(key, value):
    run = t2v_run()
    setattr(run.model, key, value)
    validate_run(run)


@pytest.mark.parametrize("value", ["cuda", "tpu", "GPU"])
def test_bad_text_encoder_device(value):
    run = t2v_run()
    run.model.text_encoder_device = value
    refused(run, f"model.text_encoder_device={value!r}", "cpu", "gpu")


# ---------------------------------------------------------------------------------------------- inputs


def test_i2v_without_image():
    refused(i2v_run(None), "image=None", "image-to-video")


def test_i2v_with_empty_image():
    refused(i2v_run(""), "image=''")


def test_image_given_to_t2v(png):
    refused(t2v_run(image=str(png)), "image=", str(png), "text-to-video")


def test_image_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "missing.png"
    refused(i2v_run(missing), "image=", str(missing), "existing image file")


def test_image_path_that_is_a_folder(tmp_path):
    refused(i2v_run(tmp_path), "image=", str(tmp_path))


def test_prompts_file_missing(tmp_path):
    missing = tmp_path / "prompts.txt"
    refused(t2v_run(prompts_file=str(missing)), "prompts_file=", str(missing))


@pytest.mark.parametrize("text", ["", "\n\n", "   \n\t\n  "])
def test_prompts_file_empty(tmp_path, text):
    path = tmp_path / "prompts.txt"
    path.write_text(text)
    refused(t2v_run(prompts_file=str(path)), "prompts_file=", str(path), "non-empty line")


def test_prompts_file_is_used_instead_of_prompt(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a cat\n")
    validate_run(t2v_run(prompts_file=str(path), prompt=""))


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t"])
def test_empty_prompt(prompt):
    refused(t2v_run(prompt=prompt), "prompt=", repr(prompt))


def test_lora_path_missing(tmp_path):
    missing = tmp_path / "style.safetensors"
    refused(t2v_run(lora=[LoraConfig(path=str(missing))]), "lora[0].path=", str(missing))


def write_lora(path: Path, keys: tuple[str, ...] = ("transformer.blocks.0.attn1.to_q.lora_A.weight",)) -> Path:
    import torch
    from safetensors.torch import save_file

    save_file({key: torch.zeros(2, 2) for key in keys}, str(path))
    return path


def test_lora_not_safetensors(tmp_path):
    good = write_lora(tmp_path / "a.safetensors")
    bad = tmp_path / "b.bin"
    bad.write_bytes(b"x")
    run = t2v_run(lora=[LoraConfig(path=str(good), scale=0.5), LoraConfig(path=str(bad))])
    refused(run, "lora[1].path=", str(bad), ".safetensors")


def test_lora_safetensors_passes(tmp_path):
    good = write_lora(tmp_path / "a.safetensors")
    validate_run(t2v_run(lora=[LoraConfig(path=str(good), scale=0.5)]))


def test_lora_corrupt_file(tmp_path):
    bad = tmp_path / "a.safetensors"
    bad.write_bytes(b"x")
    refused(t2v_run(lora=[LoraConfig(path=str(bad))]), "lora[0].path=", "readable safetensors")


def test_lora_without_lora_weights(tmp_path):
    plain = write_lora(tmp_path / "plain.safetensors", keys=("blocks.0.attn1.to_q.weight",))
    refused(t2v_run(lora=[LoraConfig(path=str(plain))]), "lora[0].path=", "LoRA file")


def test_image_that_is_not_an_image(tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_text("not an image")
    refused(i2v_run(fake), "image=", "PIL can read")


@pytest.mark.parametrize("seed", [-2, 2**63])
def test_seed_out_of_range(seed):
    refused(t2v_run(seed=seed), f"seed={seed}")


def test_model_limits_from_the_folder_configs():
    from wan_dist.plan.checks import check_model_limits

    vae = {"scale_factor_spatial": 16, "scale_factor_temporal": 4}
    dit = {"patch_size": [1, 2, 2], "rope_max_seq_len": 32}
    with pytest.raises(ConfigError, match=r"height=48 is not allowed: a multiple of 32"):
        check_model_limits(t2v_run(height=48, width=64), vae, dit)
    with pytest.raises(ConfigError, match=r"width=1088 is not allowed: at most 32 positions"):
        check_model_limits(t2v_run(height=64, width=1088), {"scale_factor_spatial": 16}, dit)
    check_model_limits(t2v_run(height=64, width=1024), vae, dit)


def test_output_dir_that_is_a_file(tmp_path):
    path = tmp_path / "out"
    path.write_text("")
    run = t2v_run()
    run.output.dir = str(path)
    refused(run, "output.dir=", str(path))


def test_embedding_cache_that_is_a_file(tmp_path):
    path = tmp_path / "cache"
    path.write_text("")
    refused(t2v_run(embedding_cache=str(path)), "embedding_cache=", str(path))


# -------------------------------------------------------------------------------------------- parallel


def test_cfg_degree_3():
    run = t2v_run()
    run.parallel.cfg_degree = 3
    refused(run, "parallel.cfg_degree=3", "1 or 2")


@pytest.mark.parametrize("guidance", [1.0, 0.5, 0.0])
def test_cfg_degree_2_without_guidance(guidance):
    run = t2v_run(guidance_scale=guidance)
    run.parallel.cfg_degree = 2
    refused(run, "parallel.cfg_degree=2", f"guidance_scale={guidance}")


def test_cfg_degree_2_with_guidance_passes():
    run = t2v_run(guidance_scale=5.0)
    run.parallel.cfg_degree = 2
    validate_run(run)


@pytest.mark.parametrize("key", ["cfg_degree", "ulysses_degree", "ring_degree"])
@pytest.mark.parametrize("value", [0, -2])
def test_non_positive_degree(key, value):
    run = t2v_run()
    setattr(run.parallel, key, value)
    refused(run, f"parallel.{key}={value}", "positive")


def test_bad_parallel_preset():
    run = t2v_run()
    run.parallel.preset = "bogus"
    refused(run, "parallel='bogus'", "auto", "usp", "cfg_usp", "stage_split")


def test_non_positive_timeout():
    run = t2v_run()
    run.parallel.timeout_s = 0
    refused(run, "parallel.timeout_s=0")


# ---------------------------------------------------------------------------------------- read_prompts


def test_read_prompts_skips_blank_lines_and_strips(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("  a cat on a mat  \n\n\t\nsecond prompt\r\n   \nthird\t\n", encoding="utf-8")
    assert read_prompts(t2v_run(prompts_file=str(path))) == ["a cat on a mat", "second prompt", "third"]


def test_read_prompts_without_file_is_the_prompt():
    assert read_prompts(t2v_run(prompt="only one")) == ["only one"]


def test_read_prompts_keeps_unicode(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("un café à Paris\n熊猫\n", encoding="utf-8")
    assert read_prompts(t2v_run(prompts_file=str(path))) == ["un café à Paris", "熊猫"]
