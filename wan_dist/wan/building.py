"""Random-weight Wan models built locally as diffusers-format folders: the tiny test models, the CPU bench
model and the official architectures (model.random_weights=true). They are written as such a folder on
first use and then read by exactly the same loading code as real weights, so the loading path is always
the one under test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch

from ..config.schema import ModelConfig
from .loading import DTYPES_BY_NAME, SAFETENSORS_DTYPES, read_component_config
from ..config.presets import DIT_SUBFOLDERS, EXPERTS, IMAGE_TASKS, MODEL_PRESETS, WAN22_EXPERTS, WAN22_TI2V, ModelSpec
from ..config.presets import TEXT_MAX_TOKENS

log = logging.getLogger(__name__)

# Bumped when what a built or shapes-only folder holds changes (2: shapes-only folders hold the scheduler).
TINY_FORMAT_VERSION = 2


def _tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    # Character-level, so every prompt maps to distinct ids without a trained vocabulary.
    specials = ["<pad>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
        model_max_length=TEXT_MAX_TOKENS,
    )
    fast.save_pretrained(folder / "tokenizer")


def pipeline_index(spec: ModelSpec) -> tuple[str, dict[str, Any]]:
    """The diffusers pipeline class a folder of `spec` is saved as, and the pipeline config keys that tell
    its family apart (what checks.read_folder_facts reads back)."""
    name = "WanImageToVideoPipeline" if spec.task in IMAGE_TASKS else "WanPipeline"
    if spec.family == WAN22_EXPERTS:
        return name, {"boundary_ratio": spec.boundary_ratio}
    if spec.family == WAN22_TI2V:
        return name, {"expand_timesteps": True}
    return name, {}


def build_tiny_model(folder: str | Path, spec: ModelSpec = ModelSpec()) -> Path:
    """Write a deterministic random-weight Wan diffusers folder of `spec`'s family and task to `folder`."""
    import diffusers

    folder = Path(folder)
    torch.manual_seed(spec.seed)
    with _default_dtype(DTYPES_BY_NAME[spec.save_dtype]):
        components = _random_components(spec)
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_tokenizer(Path(tmp))
        from transformers import AutoTokenizer
        components["tokenizer"] = AutoTokenizer.from_pretrained(Path(tmp) / "tokenizer")
    class_name, pipeline_config = pipeline_index(spec)
    getattr(diffusers, class_name)(**components, **pipeline_config).save_pretrained(folder, safe_serialization=True)
    (folder / "wan_dist_tiny.json").write_text(json.dumps({"version": TINY_FORMAT_VERSION, **asdict(spec)}))
    return folder


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    # Building a 14B model in fp32 first would need 56 GB of memory; bf16 from the start halves it.
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def _latent_channels(spec: ModelSpec) -> int:
    return 48 if spec.family == WAN22_TI2V else 16


def _clip_tokens(spec: ModelSpec) -> int:
    return (spec.clip_image_size // spec.clip_patch_size) ** 2 + 1


def build_transformer(spec: ModelSpec, layers: int | None = None):
    """The spec's WanTransformer3DModel (an expert of `layers` blocks), randomly initialised (on the
    current default device)."""
    from diffusers import WanTransformer3DModel

    channels = _latent_channels(spec)
    # Wan2.1's and Wan2.2 A14B's I2V DiTs take the condition's 4 mask and 16 latent channels beside the noise.
    in_channels = channels + 20 if spec.task in IMAGE_TASKS and spec.family != WAN22_TI2V else channels
    clip = spec.has_image_encoder
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
        in_channels=in_channels, out_channels=channels, text_dim=spec.text_dim, freq_dim=spec.freq_dim,
        ffn_dim=spec.ffn_dim, num_layers=layers or spec.layers, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=spec.rope_max_seq_len,
        image_dim=spec.clip_dim if clip else None, added_kv_proj_dim=spec.heads * spec.head_dim if clip else None,
        # FLF2V embeds the first and the last image's CLIP tokens side by side, with learned positions.
        pos_embed_seq_len=2 * _clip_tokens(spec) if spec.task == "flf2v" else None,
    )


def wan_scheduler(flow_shift: float):
    """Wan's sampler as its diffusers-format folders configure it: UniPC on flow-matching sigmas."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                                   flow_shift=flow_shift)


def preset_expert_steps(name: str) -> tuple[int, int]:
    """The steps each expert of a two-expert preset runs at its own defaults (steps, shift, boundary)."""
    from .pipeline import expert_step_counts

    preset = MODEL_PRESETS[name]
    scheduler = wan_scheduler(preset.sampling.flow_shift)
    scheduler.set_timesteps(preset.sampling.steps)
    return expert_step_counts(scheduler.timesteps, preset.spec.boundary_ratio * scheduler.config.num_train_timesteps)


def _random_components(spec: ModelSpec) -> dict[str, Any]:
    from transformers import CLIPImageProcessor

    components = _random_models(spec)
    with torch.no_grad():
        # At random init the attention outputs are a small part of each block's update; strengthen them
        # so a mistake in how tokens or prompts are mixed shows clearly in the frames.
        self_gain, cross_gain = spec.attn_out_gain
        for expert in DIT_SUBFOLDERS:
            for block in components[expert].blocks if expert in components else ():
                block.attn1.to_out[0].weight.mul_(self_gain)
                block.attn2.to_out[0].weight.mul_(cross_gain)
    components["scheduler"] = wan_scheduler(spec.flow_shift)
    if spec.has_image_encoder:
        components["image_processor"] = CLIPImageProcessor(
            crop_size={"height": spec.clip_image_size, "width": spec.clip_image_size},
            size={"shortest_edge": spec.clip_image_size},
        )
    return components


def _random_models(spec: ModelSpec) -> dict[str, torch.nn.Module]:
    """The spec's models with random weights (on the current default device: `meta` gives shapes only)."""
    from diffusers import AutoencoderKLWan
    from transformers import CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel

    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=128, d_model=spec.text_dim, d_kv=8, d_ff=spec.text_dim * 2, num_layers=spec.text_layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim, z_dim=_latent_channels(spec), dim_mult=list(spec.vae_dim_mult),
        num_res_blocks=spec.vae_res_blocks, temperal_downsample=[False, True, True], **_wan22_vae(spec),
    ).eval()
    models = dict(text_encoder=text_encoder, vae=vae, transformer=build_transformer(spec).eval())
    if spec.expert_layers:
        models[EXPERTS[1].subfolder] = build_transformer(spec, spec.expert_layers).eval()
    if spec.has_image_encoder:
        models["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=spec.clip_dim, intermediate_size=spec.clip_dim * 2, num_hidden_layers=2,
            num_attention_heads=4, image_size=spec.clip_image_size, patch_size=spec.clip_patch_size,
        )).eval()
    return models


def _wan22_vae(spec: ModelSpec) -> dict[str, Any]:
    """Wan2.2's 48-channel VAE (TI2V): residual down/up blocks, 2x2 pixel patches in and out (16x spatial
    compression in all), a wider decoder, and its own latent statistics (here: fixed, unequal per channel,
    so a channel mix-up shows)."""
    if spec.family != WAN22_TI2V:
        return {}
    channels = _latent_channels(spec)
    return dict(decoder_base_dim=spec.vae_base_dim * 8 // 5, is_residual=True, in_channels=12, out_channels=12,
                patch_size=2, scale_factor_spatial=16,
                latents_mean=[round(0.05 * ((i * 7) % 11 - 5), 4) for i in range(channels)],
                latents_std=[round(0.6 + 0.05 * ((i * 5) % 13), 4) for i in range(channels)])


def cache_root() -> Path:
    return Path(os.environ.get("WAN_DIST_CACHE", Path.home() / ".cache" / "wan_dist"))


def _tiny_folder(preset: str) -> Path:
    # A real preset's architecture with random weights must never be taken for its real weights.
    suffix = "" if preset in ("tiny", "tiny_i2v") else "-random"
    return cache_root() / "models" / f"{preset}{suffix}-v{TINY_FORMAT_VERSION}"


def _build_once(folder: Path, write: Callable[[Path], None]) -> Path:
    """`folder`, written by `write` into a temp folder beside it and renamed into place on first use:
    concurrent builders race harmlessly (the rename is atomic; a loser finds the winner's folder)."""
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def ensure_tiny_model(preset: str) -> Path:
    """A preset's folder with random weights of its architecture (presets.MODEL_PRESETS), built once."""
    folder = _tiny_folder(preset)

    def write(tmp: Path) -> None:
        log.info("building the %s model into %s (first use)", preset, folder)
        build_tiny_model(tmp, MODEL_PRESETS[preset].spec)

    return _build_once(folder, write)


def model_folder(model: ModelConfig) -> Path:
    return Path(model.path) if model.path else ensure_tiny_model(model.preset)


def tiny_model_folder_if_built(model: ModelConfig) -> Path | None:
    if model.path:
        return Path(model.path)
    folder = _tiny_folder(model.preset)
    return folder if (folder / "model_index.json").is_file() else None


def dit_num_heads(model: ModelConfig) -> int:
    """The DiT head count, for choosing the split; from config.json only (no weights)."""
    folder = tiny_model_folder_if_built(model)
    if folder is None:
        return MODEL_PRESETS[model.preset].spec.heads
    return int(read_component_config(folder, "transformer")["num_attention_heads"])


# safetensors' names of the dtypes, for a shapes-only folder's headers.
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def _write_shapes_only(module: torch.nn.Module, folder: Path) -> None:
    """`module`'s config and a safetensors file whose header is the real one (names, dtypes, shapes,
    offsets) and whose data is a hole in a sparse file: what the plan reads, at no disk cost."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(module, "save_config"):
        module.save_config(folder)
    else:
        module.config.save_pretrained(folder)
    header, offset = {}, 0
    for name, param in module.named_parameters():
        size = param.numel() * param.element_size()
        header[name] = {"dtype": _SAFETENSORS_NAMES[param.dtype], "shape": list(param.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path = folder / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little") + text)
    os.truncate(path, 8 + len(text) + offset)


def ensure_shapes_folder(preset: str) -> Path:
    """A preset's architecture as a diffusers-format folder of configs and shapes-only weights (sparse
    files): enough for the plan's weight bytes and memory model (launch/plan.py) without building, let
    alone downloading, a 14B model. Not loadable: it holds no weights."""
    spec = MODEL_PRESETS[preset].spec

    def write(tmp: Path) -> None:
        with torch.device("meta"), _default_dtype(DTYPES_BY_NAME[spec.save_dtype]):
            models = _random_models(spec)
        class_name, pipeline_config = pipeline_index(spec)
        index = {"_class_name": class_name, **pipeline_config}
        for name, model in models.items():
            _write_shapes_only(model, tmp / name)
            index[name] = [type(model).__module__.split(".")[0], type(model).__name__]
        # A two-expert model's plan counts each expert's steps from the folder's scheduler.
        scheduler = wan_scheduler(spec.flow_shift)
        scheduler.save_config(tmp / "scheduler")
        index["scheduler"] = ["diffusers", type(scheduler).__name__]
        (tmp / "model_index.json").write_text(json.dumps(index))

    return _build_once(cache_root() / "models" / f"{preset}-shapes-v{TINY_FORMAT_VERSION}", write)
