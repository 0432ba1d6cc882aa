"""Every check of a run made before any weight is read: the values a type cannot express (validate_run,
right after composing), and the limits that come from the model folder's configs (read by the plan).
Each refusal is one line naming the key, the value and what is allowed; nothing here mutates the run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from typing import Any

from ..config.schema import (
    ATTENTION_KERNELS, DEVICES, DTYPES, LORA_EXPERTS, lora_experts, OFFLOADS, SCHEDULERS, STORAGE_DTYPES, SWITCHES, TASKS,
    VAE_SPLITS, RunConfig,
)
from ..config.errors import ConfigError, fail
from ..wan.loading import PICKLE_SUFFIXES, read_component_config, read_lora_state_dict, read_safetensors_header
from ..parallel.dims import check_degrees
from ..config.presets import DIT_SUBFOLDERS, EXPERTS, IMAGE_TASKS, MODEL_PRESETS, WAN21, WAN22_EXPERTS, WAN22_TI2V, ModelPreset
from .outputs import output_names

# diffusers' Wan pipelines read the folder's pipeline class to tell the task apart.
PIPELINE_TASKS = {"WanPipeline": "t2v", "WanImageToVideoPipeline": "i2v"}
# The components of a Wan folder that hold weights.
WEIGHT_COMPONENTS = (*DIT_SUBFOLDERS, "vae", "text_encoder", "image_encoder")


@dataclass(frozen=True)
class FolderFacts:
    """What a diffusers-format Wan folder is, from its model_index.json and DiT config (no weights)."""

    family: str
    tasks: tuple[str, ...]  # one, or TI2V's two (t2v and i2v, by whether an image is given)
    boundary_ratio: float | None = None  # two-expert models: where the low-noise expert takes over


def _present(value: Any) -> bool:
    return value not in (None, False, [None, None])


def read_folder_facts(path: str | Path) -> FolderFacts:
    """The family and tasks of a diffusers-format Wan folder, as diffusers' pipelines would run it: a
    `transformer_2` with a `boundary_ratio` is Wan2.2's two-expert model, `expand_timesteps` its TI2V
    model, anything else Wan2.1; an image pipeline whose DiT embeds two images' CLIP tokens is FLF2V."""
    index_path = Path(path) / "model_index.json"
    if not index_path.is_file():
        fail("model.path", path, "a diffusers-format folder with a model_index.json")
    try:
        index = json.loads(index_path.read_text())
        class_name = index.get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ConfigError(f"model.path={str(path)!r} is not allowed: its model_index.json is not valid JSON "
                          f"({error})") from None
    if class_name not in PIPELINE_TASKS:
        fail("model.path", path, f"a Wan folder whose pipeline is one of {sorted(PIPELINE_TASKS)}, not {class_name!r}")
    experts, boundary = _present(index.get(EXPERTS[1].subfolder)), index.get("boundary_ratio")
    ti2v = _present(index.get("expand_timesteps"))
    if experts != (boundary is not None) or (ti2v and experts):
        fail("model.path", path, "a Wan folder diffusers runs one way: Wan2.1 (one transformer), Wan2.2 two-expert "
             "(transformer_2 and boundary_ratio) or Wan2.2 TI2V (expand_timesteps); this one has "
             f"transformer_2={index.get('transformer_2')}, boundary_ratio={boundary}, expand_timesteps={ti2v}")
    if experts and not (isinstance(boundary, (int, float)) and 0 < boundary < 1):
        fail("model.path", path, f"a two-expert folder whose boundary_ratio is between 0 and 1, not {boundary!r}")
    task = PIPELINE_TASKS[class_name]
    if ti2v:
        return FolderFacts(WAN22_TI2V, ("t2v", "i2v"))
    if experts:
        return FolderFacts(WAN22_EXPERTS, (task,), float(boundary))
    if task == "i2v":
        try:
            two_images = read_component_config(path, "transformer").get("pos_embed_seq_len") is not None
        except (OSError, ValueError):
            two_images = False  # check_model_folder names what is wrong with the folder
        task = "flf2v" if two_images else task
    return FolderFacts(WAN21, (task,))


def preset_facts(preset: ModelPreset) -> FolderFacts:
    """The family and tasks of a preset's architecture, as its folder will say (building.pipeline_index)."""
    spec = preset.spec
    return FolderFacts(spec.family, spec.tasks, spec.boundary_ratio)


def check_model_folder(path: str, allow_pickle: bool) -> None:
    """Every component the folder's model_index.json names is there with a readable config, and its
    weights are safetensors with a readable header (pickle files only with model.allow_pickle=true).
    Reads headers and JSON only, never the weights."""
    index = json.loads((Path(path) / "model_index.json").read_text())
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        sub = Path(path) / name
        if not sub.is_dir():
            fail("model.path", path, f"a complete model folder (model_index.json names {name}/, which is missing)")
        if name not in WEIGHT_COMPONENTS:
            continue
        try:
            json.loads((sub / "config.json").read_text())
        except (OSError, ValueError) as error:
            fail("model.path", path, f"a complete model folder with a readable {name}/config.json ({error})")
        safetensors = sorted(sub.glob("*.safetensors"))
        pickles = sorted(p for p in sub.iterdir() if p.suffix in PICKLE_SUFFIXES)
        for weights in safetensors:
            try:
                read_safetensors_header(weights)
            except ValueError as error:
                fail("model.path", path, f"readable safetensors weights ({name}/{weights.name}: {error})")
        if not safetensors and pickles and not allow_pickle:
            fail("model.path", path, f"weights in .safetensors files ({name}/ has only pickle files such as "
                  f"{pickles[0].name}, which can run code when read; model.allow_pickle=true reads them with "
                  "torch.load(weights_only=True))")
        if not safetensors and not pickles:
            fail("model.path", path, f"a complete model folder ({name}/ holds no weights)")


def read_prompts(run: RunConfig) -> list[str]:
    if run.prompts_file:
        lines = Path(run.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts = [line.strip() for line in lines if line.strip()]
        if not prompts:
            fail("prompts_file", run.prompts_file, "a file with at least one non-empty line")
        return prompts
    return [run.prompt]


def _check_lora_keys(key: str, path: str) -> None:
    """Key names only (the header), so a wrong file is refused before any weight is read."""
    try:
        names = list(read_safetensors_header(path))
    except ValueError as error:
        fail(key, path, f"a readable safetensors file ({error})")
    markers = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up", ".diff")
    if not any(marker in name for name in names for marker in markers):
        fail(key, path, "a LoRA file (lora_A/lora_B or lora_down/lora_up weights); this one has none")


def check_model_limits(run: RunConfig, vae_config: dict, dit_config: dict) -> None:
    """Limits that come from the model folder's configs (read once the folder exists, before weights)."""
    spatial = vae_config.get("scale_factor_spatial", 8)
    _, patch_h, patch_w = dit_config.get("patch_size", (1, 2, 2))
    for key, value, patch in (("height", run.height, patch_h), ("width", run.width, patch_w)):
        if value % (spatial * patch):
            fail(key, value, f"a multiple of {spatial * patch} for this model (VAE x{spatial}, patch {patch})")
    temporal = vae_config.get("scale_factor_temporal", 4)
    rope = dit_config.get("rope_max_seq_len", 1024)
    sizes = {"num_frames": (run.num_frames - 1) // temporal + 1, "height": run.height // spatial // patch_h,
             "width": run.width // spatial // patch_w}
    for key, size in sizes.items():
        if size > rope:
            fail(key, getattr(run, key), f"at most {rope} positions after patching for this model's rotary "
                  f"embeddings (it gives {size})")


# A LoRA as the plan checks it: the shape of each of its transformer tensors (diffusers' key names), or why
# diffusers cannot read it.
LoraLayers = dict[str, tuple[int, ...]] | str


def read_lora_layers(run: RunConfig) -> tuple[LoraLayers, ...]:
    """Each of the run's LoRAs read once (small files), for check_loras."""
    layers: list[LoraLayers] = []
    for lora in run.lora:
        try:
            state_dict = read_lora_state_dict(lora.path)
        except Exception as error:  # the converters raise assorted errors on foreign layouts
            layers.append(f"a Wan LoRA diffusers can read ({type(error).__name__}: {error})".split("\n")[0])
            continue
        layers.append({name: tuple(t.shape) for name, t in state_dict.items() if name.startswith("transformer.")})
    return tuple(layers)


def check_loras(run: RunConfig, dit_configs: list[dict], layers: tuple[LoraLayers, ...] | None = None) -> None:
    """Each LoRA fits the DiT (or each expert, `dit_configs` in expert order) it goes into: every layer it
    adapts exists with matching sizes. `layers`: the LoRAs as read_lora_layers read them (read here when
    not given); the DiTs are built on the meta device, so no model weight is read."""
    if not run.lora:
        return
    import torch
    from diffusers import WanTransformer3DModel

    layers = read_lora_layers(run) if layers is None else layers
    with torch.device("meta"):
        expert_modules = [dict(WanTransformer3DModel.from_config(config).named_modules()) for config in dit_configs]
    for i, lora in enumerate(run.lora):
        for expert in lora_experts(lora.expert):
            what = "this model" if len(dit_configs) == 1 else f"this model's {EXPERTS[expert].noise}-noise expert"
            _check_lora_fits(i, lora.path, layers[i], expert_modules[expert], what)


def _check_lora_fits(i: int, path: str, layers: LoraLayers, modules: dict[str, Any], what: str) -> None:
    key = f"lora[{i}].path"
    if isinstance(layers, str):
        fail(key, path, layers)
    if not layers:
        fail(key, path, "a LoRA with Wan transformer weights (formats: diffusers, original Wan, musubi)")
    for name, shape in layers.items():
        layer, _, kind = name[len("transformer."):].rpartition(".lora_")
        module = modules.get(layer)
        if kind not in ("A.weight", "B.weight"):
            continue
        expected = getattr(module, "in_features" if kind == "A.weight" else "out_features", None)
        size = shape[1] if kind == "A.weight" else shape[0]
        if module is None or expected != size:
            fail(key, path, f"a LoRA for {what}: it adapts {layer} with size {size}, the model "
                 f"{'has no such layer' if module is None else f'has {expected}'}")


@dataclass(frozen=True)
class RunFacts:
    """What checking a run learns about it without reading weights (the plan builds on these)."""

    task: str
    family: str
    boundary_ratio: float | None = None

    @property
    def experts(self) -> int:
        return 2 if self.family == WAN22_EXPERTS else 1


def validate_run(run: RunConfig) -> RunFacts:
    """Every rule a type cannot express. Reads no weights: only small JSON files of the model folder.
    Returns the task (and family) the run turned out to have; the run itself is left as it is."""
    m = run.model
    if m.preset not in MODEL_PRESETS:
        fail("model", m.preset, f"one of {', '.join(MODEL_PRESETS)}")
    preset = MODEL_PRESETS[m.preset]
    real = [name for name, p in MODEL_PRESETS.items() if not p.built]
    if m.random_weights and (m.path or preset.built):
        fail("model.random_weights", True, f"false, or true with model=<{'|'.join(real)}> and no "
             f"model.path (it builds that architecture with random weights)")
    if not preset.built and not m.path and not m.random_weights:
        raise ConfigError(
            f"model={m.preset} needs its weights: model.path is not set. Download the diffusers-format repo "
            f"{preset.repo} (e.g. `huggingface-cli download {preset.repo} --local-dir "
            f"/models/{m.preset}`) and pass model.path=/models/{m.preset}"
        )
    if m.path:
        if not Path(m.path).is_dir():
            fail("model.path", m.path, "an existing local folder")
        folder = read_folder_facts(m.path)
        check_model_folder(m.path, m.allow_pickle)
        source = f"the folder's ({m.path}/model_index.json)"
        if not preset.built and folder.family != preset.spec.family:
            fail("model.path", m.path, f"a {preset.spec.family} folder for model={m.preset} (this one is "
                 f"{folder.family}; pick its preset or leave model= at its default)")
    else:
        folder = preset_facts(preset)
        source = f"model={m.preset}'s"
    # TI2V does both: image-to-video when an image is given.
    task = folder.tasks[0] if len(folder.tasks) == 1 else ("i2v" if run.image else "t2v")
    if m.task is not None and m.task not in TASKS:
        fail("model.task", m.task, f"one of {TASKS}")
    if m.task is not None and m.task != task:
        fail("model.task", m.task, f"unset or {source} task, {' or '.join(map(repr, folder.tasks))}"
             + (" (with image= for i2v)" if len(folder.tasks) > 1 else ""))
    for key in ("dit_dtype", "vae_dtype", "text_encoder_dtype"):
        if getattr(m, key) not in DTYPES:
            fail(f"model.{key}", getattr(m, key), f"one of {', '.join(DTYPES)}")
    if m.dit_storage_dtype not in STORAGE_DTYPES:
        fail("model.dit_storage_dtype", m.dit_storage_dtype, f"one of {', '.join(STORAGE_DTYPES)}")
    if m.dit_offload not in OFFLOADS:
        fail("model.dit_offload", m.dit_offload, f"one of {', '.join(OFFLOADS)}")
    if m.text_encoder_device not in DEVICES:
        fail("model.text_encoder_device", m.text_encoder_device, f"one of {', '.join(DEVICES)}")

    check_parallel(run, folder.family)

    if run.height <= 0 or run.height % 16:
        fail("height", run.height, "a positive multiple of 16")
    if run.width <= 0 or run.width % 16:
        fail("width", run.width, "a positive multiple of 16")
    if run.num_frames < 1 or (run.num_frames - 1) % 4:
        fail("num_frames", run.num_frames, "of the form 4k+1 (1, 5, 9, ..., 81)")
    if run.frame_rate <= 0:
        fail("frame_rate", run.frame_rate, "a positive number of frames per second")
    if run.steps <= 0:
        fail("steps", run.steps, "a positive number of denoising steps")
    if run.guidance_scale < 0:
        fail("guidance_scale", run.guidance_scale, "a number >= 0 (guidance is used when > 1)")
    if run.flow_shift <= 0:
        fail("flow_shift", run.flow_shift, "a positive number (3.0 at 480p, 5.0 at 720p)")
    if run.seed < -1 or run.seed >= 2**63:
        fail("seed", run.seed, "a non-negative integer, or -1 for a random seed (recorded in run.json)")
    if run.scheduler not in SCHEDULERS:
        fail("scheduler", run.scheduler, f"one of {', '.join(SCHEDULERS)}")

    if task in IMAGE_TASKS:
        _check_image("image", run.image, "the model is image-to-video" if task == "i2v" else
                     "the model makes a video from a first and a last frame")
    elif run.image:
        fail("image", run.image, "unset: the model is text-to-video (pass an image only to an i2v model)")
    if task == "flf2v":
        _check_image("last_image", run.last_image, "the model's DiT embeds a first and a last frame (FLF2V)")
    elif run.last_image:
        fail("last_image", run.last_image, "unset: only a first-last-frame model (FLF2V, e.g. model=flf2v_14b_720p) "
             f"takes a last frame; this one is {folder.family} {task}")
    if folder.family != WAN22_EXPERTS:
        if run.guidance_scale_2 is not None:
            fail("guidance_scale_2", run.guidance_scale_2, f"unset: only a two-expert model (Wan2.2 A14B) has a "
                 f"low-noise expert to guide; this one is {folder.family}")
        for i, lora in enumerate(run.lora):
            if lora.expert is not None:
                fail(f"lora[{i}].expert", lora.expert, f"unset: only a two-expert model (Wan2.2 A14B) has experts "
                     f"to choose from; this one is {folder.family}")
    elif run.guidance_scale_2 is not None and run.guidance_scale_2 < 0:
        fail("guidance_scale_2", run.guidance_scale_2, "a number >= 0, or unset for guidance_scale's value")

    if run.prompts_file:
        if not Path(run.prompts_file).is_file():
            fail("prompts_file", run.prompts_file, "a path to an existing text file, one prompt a line")
        read_prompts(run)
    elif not run.prompt.strip():
        fail("prompt", run.prompt, "a non-empty text (or prompts_file)")

    for i, lora in enumerate(run.lora):
        if not Path(lora.path).is_file():
            fail(f"lora[{i}].path", lora.path, "an existing local .safetensors file")
        if not str(lora.path).endswith(".safetensors"):
            fail(f"lora[{i}].path", lora.path, "a .safetensors file")
        _check_lora_keys(f"lora[{i}].path", lora.path)
        if lora.expert is not None and lora.expert not in LORA_EXPERTS:
            fail(f"lora[{i}].expert", lora.expert, f"one of {', '.join(LORA_EXPERTS)} (unset: high, as diffusers)")
    if run.output.dir is not None and Path(run.output.dir).exists() and not Path(run.output.dir).is_dir():
        fail("output.dir", run.output.dir, "a folder (it exists as a file)")
    if run.output.dir is not None and not run.output.overwrite:
        queued = run.prompts_file is not None
        for index in range(len(read_prompts(run))):
            video = Path(run.output.dir) / output_names(index, queued)[0]
            if video.exists():
                fail("output.dir", run.output.dir, f"a folder without {video.name} (a finished video is kept; "
                      "output.overwrite=true replaces it)")
    if run.attention not in ATTENTION_KERNELS:
        fail("attention", run.attention, f"one of {', '.join(ATTENTION_KERNELS)}")
    if run.embedding_cache and Path(run.embedding_cache).exists() and not os.path.isdir(run.embedding_cache):
        fail("embedding_cache", run.embedding_cache, "a folder")
    return RunFacts(task=task, family=folder.family, boundary_ratio=folder.boundary_ratio)


def check_parallel(run: RunConfig, family: str) -> None:
    """The parallel keys' rules that need no file: checked with the rest of the run, and again on each
    layout the planner tries (plan/planner.py), which edits only such keys."""
    p = run.parallel
    # The degree rules are the layout's own (parallel/dims.py), checked here already so that a bad degree is
    # refused before the process group starts.
    check_degrees(p, guidance_scale=run.guidance_scale)
    if p.fsdp_setting not in SWITCHES:
        fail("parallel.fsdp", p.fsdp, f"one of {', '.join(SWITCHES)}")
    for key in ("vae_decode", "vae_encode"):
        if getattr(p, key) not in VAE_SPLITS:
            fail(f"parallel.{key}", getattr(p, key), f"one of {', '.join(VAE_SPLITS)}")
        if getattr(p, key) == "patch" and run.model.vae_tiling:
            fail(f"parallel.{key}", "patch", "rank0 with model.vae_tiling=true (tiles blend their overlaps; the "
                 "bands are exact and already bound each rank's memory: use one or the other)")
    if p.expert_split:
        if family != WAN22_EXPERTS:
            fail("parallel.expert_split", True, "false: only a two-expert model (Wan2.2 A14B) has experts to split the "
                 f"DiT ranks between; this one is {family}")
        if p.fsdp_setting == "true":
            fail("parallel.fsdp", p.fsdp, "false or auto with parallel.expert_split=true: each group holds its own "
                 "expert whole, with no sharding traffic")
        if p.vae_decode == "patch":
            fail("parallel.vae_decode", "patch", "rank0 with parallel.expert_split=true (the groups are busy with "
                 "different videos while rank 0 decodes)")
    elif p.expert_ranks is not None:
        fail("parallel.expert_ranks", list(p.expert_ranks), "unset without parallel.expert_split=true")
    if p.timeout_s <= 0:
        fail("parallel.timeout_s", p.timeout_s, "a positive number of seconds")


def _check_image(key: str, path: str | None, why: str) -> None:
    if not path:
        fail(key, path, f"a path to an existing image file: {why}")
    if not Path(path).is_file():
        fail(key, path, "a path to an existing image file")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError) as error:
        fail(key, path, f"an image file PIL can read ({error})")
