"""Build or load the Wan components from a local diffusers-format folder.

The tiny models are written as such a folder on first use and then read by exactly the same code as real
weights, so the loading path is always the one under test.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig, ModelConfig

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TEXT_MAX_TOKENS = 512  # Wan's text context; the I2V attention relies on exactly 512 text tokens.
TINY_FORMAT_VERSION = 1


def resolve_dtype(name: str, device: torch.device, *, gpu_default: torch.dtype) -> torch.dtype:
    """`auto` is the GPU default on CUDA and fp32 on CPU, where bf16 matmuls are slow and inexact."""
    if name == "auto":
        return gpu_default if device.type == "cuda" else torch.float32
    return _DTYPES[name]


def read_component_config(folder: str | Path, subfolder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / subfolder / "config.json").read_text())


# ----------------------------------------------------------------------------------------------- tiny


@dataclass(frozen=True)
class TinySpec:
    """Sizes of a random-weight Wan model built locally. The default is the tiny model: small enough that a
    CPU run takes seconds, with a head count (3) that divides by no parallel degree but 3, so uneven heads
    are the normal case. `BUILT_SPECS` has the other sizes: a compute-bound CPU bench model and the
    official architectures (for benchmarks without a download)."""

    task: str = "t2v"
    heads: int = 3
    head_dim: int = 12
    layers: int = 2
    ffn_dim: int = 48
    freq_dim: int = 32
    rope_max_seq_len: int = 32
    text_dim: int = 32
    text_layers: int = 2
    clip_dim: int = 32
    clip_image_size: int = 32
    clip_patch_size: int = 8
    vae_base_dim: int = 8
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    vae_res_blocks: int = 1
    # Scale of the attention outputs at init (see build_tiny_model); 1 keeps diffusers' own init.
    attn_out_gain: tuple[float, float] = (4.0, 8.0)
    # dtype the weights are stored in: the real sizes are written in bf16 to halve the disk they take.
    save_dtype: str = "fp32"
    seed: int = 0


def _official(task: str, heads: int, layers: int, ffn_dim: int) -> TinySpec:
    """Wan2.1's published DiT and VAE dimensions; the text and image encoders are one-layer stand-ins of
    the official widths (UMT5-XXL's 4096, CLIP ViT-H's 1280 at 224 px), which benchmarks keep on CPU."""
    return TinySpec(
        task=task, heads=heads, head_dim=128, layers=layers, ffn_dim=ffn_dim, freq_dim=256,
        rope_max_seq_len=1024, text_dim=4096, text_layers=1, clip_dim=1280, clip_image_size=224,
        clip_patch_size=14, vae_base_dim=96, vae_dim_mult=(1, 2, 4, 4), vae_res_blocks=2,
        attn_out_gain=(1.0, 1.0), save_dtype="bf16",
    )


# Presets built locally with random weights (model=<name>, or model.random_weights=true for the real ones).
BUILT_SPECS: dict[str, TinySpec] = {
    "tiny": TinySpec(task="t2v"),
    "tiny_i2v": TinySpec(task="i2v"),
    # Compute-bound on one CPU core (a 512-wide DiT, about 90% of a step in its matmuls and attention at
    # the bench's 192x320x17), yet built in seconds: what `make bench` measures parallel speed-ups on.
    "bench": TinySpec(task="t2v", heads=8, head_dim=64, layers=4, ffn_dim=2048, freq_dim=256,
                      text_dim=256, text_layers=1),
    "t2v_1_3b": _official("t2v", heads=12, layers=30, ffn_dim=8960),
    "t2v_14b": _official("t2v", heads=40, layers=40, ffn_dim=13824),
    "i2v_14b_480p": _official("i2v", heads=40, layers=40, ffn_dim=13824),
    "i2v_14b_720p": _official("i2v", heads=40, layers=40, ffn_dim=13824),
}


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


def build_tiny_model(folder: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write a deterministic random-weight Wan2.1 diffusers folder (T2V or I2V) to `folder`."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    folder = Path(folder)
    torch.manual_seed(spec.seed)
    with _default_dtype(_DTYPES[spec.save_dtype]):
        components = _random_components(spec)
    with tempfile.TemporaryDirectory() as tmp:
        _tiny_tokenizer(Path(tmp))
        from transformers import AutoTokenizer
        components["tokenizer"] = AutoTokenizer.from_pretrained(Path(tmp) / "tokenizer")
    pipeline_class = WanImageToVideoPipeline if spec.task == "i2v" else WanPipeline
    pipeline_class(**components).save_pretrained(folder, safe_serialization=True)
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


def build_transformer(spec: TinySpec):
    """The spec's WanTransformer3DModel, randomly initialised (on the current default device)."""
    from diffusers import WanTransformer3DModel

    i2v = spec.task == "i2v"
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=spec.heads, attention_head_dim=spec.head_dim,
        in_channels=36 if i2v else 16, out_channels=16, text_dim=spec.text_dim, freq_dim=spec.freq_dim,
        ffn_dim=spec.ffn_dim, num_layers=spec.layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=spec.rope_max_seq_len, image_dim=spec.clip_dim if i2v else None,
        added_kv_proj_dim=spec.heads * spec.head_dim if i2v else None,
    )


def _random_components(spec: TinySpec) -> dict[str, Any]:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import (
        CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel,
    )

    text_encoder = UMT5EncoderModel(UMT5Config(
        vocab_size=128, d_model=spec.text_dim, d_kv=8, d_ff=spec.text_dim * 2, num_layers=spec.text_layers,
        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32, pad_token_id=0,
        eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    vae = AutoencoderKLWan(
        base_dim=spec.vae_base_dim, z_dim=16, dim_mult=list(spec.vae_dim_mult), num_res_blocks=spec.vae_res_blocks,
        temperal_downsample=[False, True, True],
    ).eval()
    i2v = spec.task == "i2v"
    transformer = build_transformer(spec).eval()
    self_gain, cross_gain = spec.attn_out_gain
    with torch.no_grad():
        # At random init the attention outputs are a small part of each block's update; strengthen them
        # so a mistake in how tokens or prompts are mixed shows clearly in the frames.
        for block in transformer.blocks:
            block.attn1.to_out[0].weight.mul_(self_gain)
            block.attn2.to_out[0].weight.mul_(cross_gain)
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0,
    )
    components: dict[str, Any] = dict(text_encoder=text_encoder, vae=vae, scheduler=scheduler,
                                      transformer=transformer)
    if i2v:
        components["image_encoder"] = CLIPVisionModel(CLIPVisionConfig(
            hidden_size=spec.clip_dim, intermediate_size=spec.clip_dim * 2, num_hidden_layers=2,
            num_attention_heads=4, image_size=spec.clip_image_size, patch_size=spec.clip_patch_size,
        )).eval()
        components["image_processor"] = CLIPImageProcessor(
            crop_size={"height": spec.clip_image_size, "width": spec.clip_image_size},
            size={"shortest_edge": spec.clip_image_size},
        )
    return components


def cache_root() -> Path:
    return Path(os.environ.get("WAN_DIST_CACHE", Path.home() / ".cache" / "wan_dist"))


def _tiny_folder(preset: str) -> Path:
    suffix = "" if preset in ("tiny", "tiny_i2v") else "-random"
    return cache_root() / "models" / f"{preset}{suffix}-v{TINY_FORMAT_VERSION}"


def ensure_tiny_model(preset: str) -> Path:
    """A built preset's folder (`BUILT_SPECS`), built once; concurrent builders race harmlessly (atomic
    rename)."""
    spec = BUILT_SPECS[preset]
    folder = _tiny_folder(preset)
    if (folder / "model_index.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{preset}-", dir=folder.parent))
    try:
        log.info("building the %s model into %s (first use)", preset, folder)
        build_tiny_model(tmp, spec)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


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
        return BUILT_SPECS[model.preset].heads
    return int(read_component_config(folder, "transformer")["num_attention_heads"])


# ----------------------------------------------------------------------------------------- components


# Every model is read by its own class (never an Auto* class that could pick code named in the folder;
# the tokenizer's has remote code off), from safetensors unless pickle files are explicitly allowed;
# pickle is then read by torch.load(weights_only=True), which diffusers and transformers use by default.
def _weights(allow_pickle: bool) -> dict[str, Any]:
    return {"use_safetensors": None if allow_pickle else True}


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "tokenizer", trust_remote_code=False)


def load_text_encoder(folder: Path, dtype: torch.dtype, device: torch.device, *, allow_pickle: bool = False):
    from transformers import UMT5EncoderModel

    model = UMT5EncoderModel.from_pretrained(folder / "text_encoder", dtype=dtype, weights_only=True,
                                             **_weights(allow_pickle))
    return model.to(device).eval()


def load_image_encoder(folder: Path, dtype: torch.dtype, device: torch.device, *, allow_pickle: bool = False):
    from transformers import CLIPImageProcessor, CLIPVisionModel

    processor = CLIPImageProcessor.from_pretrained(folder / "image_processor")
    model = CLIPVisionModel.from_pretrained(folder / "image_encoder", dtype=dtype, weights_only=True,
                                            **_weights(allow_pickle))
    return model.to(device).eval(), processor


def load_transformer(folder: Path, dtype: torch.dtype, device: torch.device, *, allow_pickle: bool = False):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", dtype=dtype,
                                                  **_weights(allow_pickle))
    return model.to(device).eval()


def load_vae(folder: Path, dtype: torch.dtype, device: torch.device, *, allow_pickle: bool = False):
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=dtype, **_weights(allow_pickle))
    return model.to(device).eval()


def load_scheduler(folder: Path, kind: str, flow_shift: float):
    """The folder's scheduler config with Wan's flow shift; UniPC by default, flow-match Euler on request."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=flow_shift)
    return UniPCMultistepScheduler.from_config(config, flow_shift=flow_shift)


def apply_loras(transformer, loras: list[LoraConfig]) -> None:
    """Load LoRAs through diffusers' Wan LoRA reader (all formats it converts), then fuse them into the
    weights so inference runs on plain linears, at no per-step cost."""
    if not loras:
        return
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    names, scales = [], []
    for i, lora in enumerate(loras):
        state_dict = WanLoraLoaderMixin.lora_state_dict(lora.path)
        if isinstance(state_dict, tuple):
            state_dict = state_dict[0]
        name = f"lora_{i}"
        transformer.load_lora_adapter(state_dict, adapter_name=name, prefix="transformer")
        names.append(name)
        scales.append(lora.scale)
    transformer.set_adapters(names, scales)
    transformer.fuse_lora(adapter_names=names)
    transformer.unload_lora()


def parameter_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())
