"""Run configuration: the schema Hydra fills, and every check made before any weight is read.

The dataclasses are registered in Hydra's ConfigStore, so unknown keys and wrong types are refused by
Hydra itself; `validate_run` adds the rules a type cannot express. Every error names the key, the value
and what is allowed, in one line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

DTYPES = ("auto", "bf16", "fp16", "fp32")
DEVICES = ("cpu", "gpu")
SCHEDULERS = ("unipc", "euler")
TASKS = ("t2v", "i2v")
ATTENTION_KERNELS = ("auto", "fa3", "fa2", "cudnn", "sdpa")
PARALLEL_PRESETS = ("auto", "single", "stage_split", "cfg", "ulysses", "ring", "usp", "cfg_usp")

# The diffusers-format repositories the real presets correspond to; named in the error a user sees when
# a real preset is chosen without a local folder.
PRESET_REPOS = {
    "t2v_1_3b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "t2v_14b": "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "i2v_14b_480p": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "i2v_14b_720p": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
}
# Built locally with random weights on first use (the real presets too, with model.random_weights=true).
TINY_PRESETS = ("tiny", "tiny_i2v", "bench")
MODEL_PRESETS = TINY_PRESETS + tuple(PRESET_REPOS)

# diffusers' Wan pipelines read the folder's pipeline class to tell the task apart.
PIPELINE_TASKS = {"WanPipeline": "t2v", "WanImageToVideoPipeline": "i2v"}


class ConfigError(ValueError):
    """A configuration value that is not allowed; the message is meant for the user as is."""


@dataclass
class ModelConfig:
    preset: str = "tiny"
    path: str | None = None
    # Derived, not chosen: read from model.path's model_index.json, or from the tiny preset's name.
    task: str | None = None
    dit_dtype: str = "auto"
    vae_dtype: str = "fp32"
    text_encoder_dtype: str = "auto"
    text_encoder_device: str = "cpu"
    # Pickle checkpoints (.bin/.pt) can run code when read; only safetensors are read unless this is set,
    # and even then through torch.load(weights_only=True).
    allow_pickle: bool = False
    # A real preset's official architecture with random weights, built locally: benchmarks without a download.
    random_weights: bool = False


@dataclass
class ParallelConfig:
    preset: str = "auto"
    cfg_degree: int | None = None
    ulysses_degree: int | None = None
    ring_degree: int | None = None
    stage_split: bool | None = None
    timeout_s: float = 1800.0
    # CPU runs under torchrun: each rank on an equal share of the node's cores when ranks x threads fit.
    pin_cpus: bool = True


@dataclass
class OutputConfig:
    dir: str | None = None
    save_frames: bool = False
    overwrite: bool = False


@dataclass
class LoraConfig:
    path: str = MISSING
    scale: float = 1.0


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    prompt: str = "A red panda rides a bicycle through a sunlit bamboo forest."
    negative_prompt: str = ""
    image: str | None = None
    prompts_file: str | None = None
    height: int = 64
    width: int = 64
    num_frames: int = 9
    frame_rate: int = 16
    steps: int = 4
    guidance_scale: float = 5.0
    flow_shift: float = 3.0
    scheduler: str = "unipc"
    seed: int = 0
    lora: list[LoraConfig] = field(default_factory=list)
    # Optional text-embedding cache folder; empty disables it.
    embedding_cache: str | None = None
    # Attention kernel: auto (the fastest available: fa3, fa2, cudnn, sdpa) or one of them by name.
    attention: str = "auto"
    # torch.compile each DiT block (the first steps are slower while it compiles).
    compile: bool = False
    # Each block's cross-attention keys and values computed once per prompt, not once per step (exact;
    # wan_dist/context_cache.py). Not with compile=true, whose blocks are traced without the cache.
    context_cache: bool = True


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# The components of a Wan2.1 folder that hold weights, and the file that describes each.
WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder", "image_encoder")


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _schema_keys(schema: Any) -> list[str]:
    from dataclasses import fields, is_dataclass

    return [f.name for f in fields(schema)] if is_dataclass(schema) else []


def _override_value(overrides: list[str], key: str) -> str:
    """What the command line gave `key` (the text after `key=`), or the key itself if it is not there."""
    for override in overrides:
        name, sep, value = override.lstrip("+~").partition("=")
        if sep and name == key:
            return value
    return key


_TYPE_WORDS = {"Integer": "an integer", "Float": "a number", "valid bool": "true or false", "string": "a text"}


def composition_error_line(error: Exception, overrides: list[str]) -> str:
    """Hydra's and OmegaConf's composition errors (a misspelt key, an unknown preset, a value of the wrong
    type, an override that does not parse) in the one-line form of every other bad value."""
    import difflib

    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    cause = error if isinstance(error, (ConfigKeyError, ConfigAttributeError, ValidationError)) else error.__cause__
    first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, _, name = error.missing_cfg_file.rpartition("/")
        return f"{group}={name!r} is not allowed: one of {', '.join(error.options or [])}"
    if isinstance(error, OverrideParseException):
        bad = next((o for o in overrides if o in str(error)), None)
        return (f"{bad or ' '.join(overrides)} is not allowed: not a valid override ({first_line}); quote "
                "values that hold spaces or special characters, e.g. 'prompt=\"a cat, running\"'")
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        # Nested in a list (lora=[{...}]) the key is relative; the override names the top-level key.
        top = first_line.split("'")[1] if first_line.startswith("Could not override '") else cause.full_key
        unknown = str(cause.key) if cause.key is not None else top
        allowed = _schema_keys(getattr(cause, "object_type", None))
        close = difflib.get_close_matches(unknown, allowed, n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        return (f"{top}={_override_value(overrides, top)!r} is not allowed: {unknown!r} is not a configuration "
                f"key ({hint}keys here: {', '.join(allowed) or 'none'})")
    if isinstance(cause, ValidationError):
        message = str(cause).splitlines()[0]
        allowed = next((word for token, word in _TYPE_WORDS.items() if token in message), message)
        return f"{cause.full_key}={_override_value(overrides, cause.full_key)!r} is not allowed: {allowed}"
    return first_line


def check_schema_keys(cfg: Any) -> None:
    """Keys added with `+key=value` pass Hydra's struct check; refuse any the schema does not know."""
    from omegaconf import OmegaConf

    OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.to_container(cfg))


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def read_task_from_folder(path: str) -> str:
    """The task of a diffusers-format Wan folder, from its model_index.json (no weights are read)."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        _fail("model.path", path, "a diffusers-format folder with a model_index.json")
    try:
        class_name = json.loads(index.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ConfigError(f"model.path={path!r} is not allowed: its model_index.json is not valid JSON "
                          f"({error})") from None
    if class_name not in PIPELINE_TASKS:
        _fail("model.path", path, f"a Wan2.1 folder whose pipeline is one of {sorted(PIPELINE_TASKS)}, "
              f"not {class_name!r}")
    index_data = json.loads(index.read_text())
    # Wan2.2's two-expert (transformer_2 / boundary_ratio) and TI2V (expand_timesteps) folders share the
    # pipeline classes but sample differently; running them as Wan2.1 would be silently wrong.
    wan22 = [key for key in ("transformer_2", "boundary_ratio", "expand_timesteps")
             if index_data.get(key) not in (None, False, [None, None])]
    if wan22:
        _fail("model.path", path, f"a Wan2.1 folder (this one has Wan2.2's {', '.join(wan22)})")
    return PIPELINE_TASKS[class_name]


def check_model_folder(path: str, allow_pickle: bool) -> None:
    """Every component the folder's model_index.json names is there with a readable config, and its
    weights are safetensors with a readable header (pickle files only with model.allow_pickle=true).
    Reads headers and JSON only, never the weights."""
    from safetensors import safe_open

    index = json.loads((Path(path) / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = Path(path) / name
        if not sub.is_dir():
            _fail("model.path", path, f"a complete model folder (model_index.json names {name}/, which is missing)")
        if name not in WEIGHT_COMPONENTS:
            continue
        try:
            json.loads((sub / "config.json").read_text())
        except (OSError, ValueError) as error:
            _fail("model.path", path, f"a complete model folder with a readable {name}/config.json ({error})")
        safetensors = sorted(sub.glob("*.safetensors"))
        pickles = sorted(p for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES)
        for weights in safetensors:
            try:
                with safe_open(str(weights), framework="pt") as handle:
                    handle.keys()
            except Exception as error:  # safetensors raises its own error types for a corrupt header
                _fail("model.path", path, f"readable safetensors weights ({name}/{weights.name}: {error})")
        if not safetensors and pickles and not allow_pickle:
            _fail("model.path", path, f"weights in .safetensors files ({name}/ has only pickle files such as "
                  f"{pickles[0].name}, which can run code when read; model.allow_pickle=true reads them with "
                  "torch.load(weights_only=True))")
        if not safetensors and not pickles:
            _fail("model.path", path, f"a complete model folder ({name}/ holds no weights)")


def output_names(index: int, queued: bool) -> tuple[str, str]:
    """The video and frames file names of video `index` (a prompt queue numbers them)."""
    return (f"video_{index}.mp4", f"frames_{index}.npy") if queued else ("video.mp4", "frames.npy")


def read_prompts(run: RunConfig) -> list[str]:
    if run.prompts_file:
        lines = Path(run.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            _fail("prompts_file", run.prompts_file, "a file with at least one non-empty line")
        return prompts
    return [run.prompt]


def _check_lora_keys(key: str, path: str) -> None:
    """Key names only (the header), so a wrong file is refused before any weight is read."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            names = list(handle.keys())
    except Exception as error:  # safetensors raises its own error types for a corrupt header
        _fail(key, path, f"a readable safetensors file ({error})")
    markers = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", ".diff")
    if not any(marker in name for name in names for marker in markers):
        _fail(key, path, "a LoRA file (lora_A/lora_B or lora_down/lora_up weights); this one has none")


def check_model_limits(run: RunConfig, vae_config: dict, dit_config: dict) -> None:
    """Limits that come from the model folder's configs (read once the folder exists, before weights)."""
    spatial = vae_config.get("scale_factor_spatial", 8)
    _, patch_h, patch_w = dit_config.get("patch_size", (1, 2, 2))
    for key, value, patch in (("height", run.height, patch_h), ("width", run.width, patch_w)):
        if value % (spatial * patch):
            _fail(key, value, f"a multiple of {spatial * patch} for this model (VAE x{spatial}, patch {patch})")
    temporal = vae_config.get("scale_factor_temporal", 4)
    rope = dit_config.get("rope_max_seq_len", 1024)
    sizes = {"num_frames": (run.num_frames - 1) // temporal + 1, "height": run.height // spatial // patch_h,
             "width": run.width // spatial // patch_w}
    for key, size in sizes.items():
        if size > rope:
            _fail(key, getattr(run, key), f"at most {rope} positions after patching for this model's rotary "
                  f"embeddings (it gives {size})")


def check_loras(run: RunConfig, dit_config: dict) -> None:
    """Each LoRA fits this model's DiT: every layer it adapts exists with matching sizes. Reads the LoRA
    files (small) and builds the DiT on the meta device, so no model weight is read."""
    if not run.lora:
        return
    import torch
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    with torch.device("meta"):
        modules = dict(WanTransformer3DModel.from_config(dit_config).named_modules())
    for i, lora in enumerate(run.lora):
        key = f"lora[{i}].path"
        try:
            state_dict = WanLoraLoaderMixin.lora_state_dict(lora.path)
        except Exception as error:  # the converters raise assorted errors on foreign layouts
            _fail(key, lora.path, f"a Wan LoRA diffusers can read ({type(error).__name__}: {error})".split("\n")[0])
        if isinstance(state_dict, tuple):
            state_dict = state_dict[0]
        names = [name for name in state_dict if name.startswith("transformer.")]
        if not names:
            _fail(key, lora.path, "a LoRA with Wan transformer weights (formats: diffusers, original Wan, musubi)")
        for name in names:
            layer, _, kind = name[len("transformer."):].rpartition(".lora_")
            module, shape = modules.get(layer), tuple(state_dict[name].shape)
            if kind not in ("A.weight", "B.weight"):
                continue
            expected = getattr(module, "in_features" if kind == "A.weight" else "out_features", None)
            size = shape[1] if kind == "A.weight" else shape[0]
            if module is None or expected != size:
                _fail(key, lora.path, f"a LoRA for this model: it adapts {layer} with size {size}, the model "
                      f"{'has no such layer' if module is None else f'has {expected}'}")


def validate_run(run: RunConfig) -> None:
    """Every rule a type cannot express. Reads no weights: only small JSON files of the model folder."""
    m = run.model
    if m.preset not in MODEL_PRESETS:
        _fail("model", m.preset, f"one of {', '.join(MODEL_PRESETS)}")
    if m.random_weights and (m.path or m.preset not in PRESET_REPOS):
        _fail("model.random_weights", True, f"false, or true with model=<{'|'.join(PRESET_REPOS)}> and no "
              f"model.path (it builds that architecture with random weights)")
    if m.preset in PRESET_REPOS and not m.path and not m.random_weights:
        raise ConfigError(
            f"model={m.preset} needs its weights: model.path is not set. Download the diffusers-format repo "
            f"{PRESET_REPOS[m.preset]} (e.g. `huggingface-cli download {PRESET_REPOS[m.preset]} --local-dir "
            f"/models/{m.preset}`) and pass model.path=/models/{m.preset}"
        )
    if m.path:
        if not Path(m.path).is_dir():
            _fail("model.path", m.path, "an existing local folder")
        task = read_task_from_folder(m.path)
        check_model_folder(m.path, m.allow_pickle)
        source = f"the folder's task, {task!r} (read from {m.path}/model_index.json)"
    else:
        task = "i2v" if "i2v" in m.preset else "t2v"
        source = f"{task!r}, the task of model={m.preset}"
    if m.task is not None and m.task != task:
        _fail("model.task", m.task, f"unset or {source}")
    m.task = task
    if m.task not in TASKS:
        _fail("model.task", m.task, f"one of {TASKS}")
    for key in ("dit_dtype", "vae_dtype", "text_encoder_dtype"):
        if getattr(m, key) not in DTYPES:
            _fail(f"model.{key}", getattr(m, key), f"one of {', '.join(DTYPES)}")
    if m.text_encoder_device not in DEVICES:
        _fail("model.text_encoder_device", m.text_encoder_device, f"one of {', '.join(DEVICES)}")

    p = run.parallel
    if p.preset not in PARALLEL_PRESETS:
        _fail("parallel", p.preset, f"one of {', '.join(PARALLEL_PRESETS)}")
    for key in ("cfg_degree", "ulysses_degree", "ring_degree"):
        value = getattr(p, key)
        if value is not None and value < 1:
            _fail(f"parallel.{key}", value, "a positive integer (or null to fill from the world size)")
    if p.cfg_degree not in (None, 1, 2):
        _fail("parallel.cfg_degree", p.cfg_degree, "1 or 2 (the conditional and unconditional branches)")
    if p.timeout_s <= 0:
        _fail("parallel.timeout_s", p.timeout_s, "a positive number of seconds")

    if run.height <= 0 or run.height % 16:
        _fail("height", run.height, "a positive multiple of 16")
    if run.width <= 0 or run.width % 16:
        _fail("width", run.width, "a positive multiple of 16")
    if run.num_frames < 1 or (run.num_frames - 1) % 4:
        _fail("num_frames", run.num_frames, "of the form 4k+1 (1, 5, 9, ..., 81)")
    if run.frame_rate <= 0:
        _fail("frame_rate", run.frame_rate, "a positive number of frames per second")
    if run.steps <= 0:
        _fail("steps", run.steps, "a positive number of denoising steps")
    if run.guidance_scale < 0:
        _fail("guidance_scale", run.guidance_scale, "a number >= 0 (guidance is used when > 1)")
    if run.flow_shift <= 0:
        _fail("flow_shift", run.flow_shift, "a positive number (3.0 at 480p, 5.0 at 720p)")
    if run.seed < -1 or run.seed >= 2**63:
        _fail("seed", run.seed, "a non-negative integer, or -1 for a random seed (recorded in run.json)")
    if run.scheduler not in SCHEDULERS:
        _fail("scheduler", run.scheduler, f"one of {', '.join(SCHEDULERS)}")
    if (p.cfg_degree == 2 or (p.cfg_degree is None and p.preset in ("cfg", "cfg_usp"))) \
            and run.guidance_scale <= 1:
        key, value = ("parallel", p.preset) if p.cfg_degree is None else ("parallel.cfg_degree", 2)
        _fail(key, value, f"a split without a cfg axis when guidance_scale={run.guidance_scale} (no guidance, "
              "so no unconditional branch to put on a second rank)")

    if m.task == "i2v":
        if not run.image:
            _fail("image", run.image, "a path to an existing image file: the model is image-to-video")
        if not Path(run.image).is_file():
            _fail("image", run.image, "a path to an existing image file")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(run.image) as image:
                image.verify()
        except (UnidentifiedImageError, OSError) as error:
            _fail("image", run.image, f"an image file PIL can read ({error})")
    elif run.image:
        _fail("image", run.image, "unset: the model is text-to-video (pass an image only to an i2v model)")

    if run.prompts_file:
        if not Path(run.prompts_file).is_file():
            _fail("prompts_file", run.prompts_file, "a path to an existing text file, one prompt a line")
        read_prompts(run)
    elif not run.prompt.strip():
        _fail("prompt", run.prompt, "a non-empty text (or prompts_file)")

    for i, lora in enumerate(run.lora):
        if not Path(lora.path).is_file():
            _fail(f"lora[{i}].path", lora.path, "an existing local .safetensors file")
        if not str(lora.path).endswith(".safetensors"):
            _fail(f"lora[{i}].path", lora.path, "a .safetensors file")
        _check_lora_keys(f"lora[{i}].path", lora.path)
    if run.output.dir is not None and Path(run.output.dir).exists() and not Path(run.output.dir).is_dir():
        _fail("output.dir", run.output.dir, "a folder (it exists as a file)")
    if run.output.dir is not None and not run.output.overwrite:
        queued = run.prompts_file is not None
        for index in range(len(read_prompts(run))):
            video = Path(run.output.dir) / output_names(index, queued)[0]
            if video.exists():
                _fail("output.dir", run.output.dir, f"a folder without {video.name} (a finished video is kept; "
                      "output.overwrite=true replaces it)")
    if run.attention not in ATTENTION_KERNELS:
        _fail("attention", run.attention, f"one of {', '.join(ATTENTION_KERNELS)}")
    if run.embedding_cache and Path(run.embedding_cache).exists() and not os.path.isdir(run.embedding_cache):
        _fail("embedding_cache", run.embedding_cache, "a folder")
