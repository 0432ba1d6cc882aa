"""Load the Wan components from a local diffusers-format folder, and what can be known of them without
reading a weight (configs, safetensors headers). The random-weight builders are in building.py.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from pathlib import Path
from typing import Any

import torch

from .config import LoraConfig

log = logging.getLogger(__name__)

# Checkpoint files that unpickle (and so can run code when read).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPES_BY_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# safetensors' dtype names, as its headers state them, and the bytes per element of each.
_SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                            "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def resolve_dtype(name: str, device: torch.device, *, gpu_default: torch.dtype) -> torch.dtype:
    """`auto` is the GPU default on CUDA and fp32 on CPU, where bf16 matmuls are slow and inexact."""
    if name == "auto":
        return gpu_default if device.type == "cuda" else torch.float32
    return DTYPES_BY_NAME[name]


def read_component_config(folder: str | Path, subfolder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / subfolder / "config.json").read_text())


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


def read_lora_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A LoRA file through diffusers' Wan LoRA reader, which converts the formats it knows (diffusers,
    original Wan, musubi, LightX2V/CausVid) to diffusers' key names."""
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin

    state_dict = WanLoraLoaderMixin.lora_state_dict(path)
    return state_dict[0] if isinstance(state_dict, tuple) else state_dict


def apply_loras(transformer, loras: list[LoraConfig]) -> None:
    """Load LoRAs through diffusers' Wan LoRA reader (all formats it converts), then fuse them into the
    weights so inference runs on plain linears, at no per-step cost."""
    if not loras:
        return
    names, scales = [], []
    for i, lora in enumerate(loras):
        name = f"lora_{i}"
        transformer.load_lora_adapter(read_lora_state_dict(lora.path), adapter_name=name, prefix="transformer")
        names.append(name)
        scales.append(lora.scale)
    transformer.set_adapters(names, scales)
    transformer.fuse_lora(adapter_names=names)
    transformer.unload_lora()


def parameter_bytes(*modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


# The classes each weight component is read with, and the parameters each keeps in fp32 whatever dtype it
# is loaded in (diffusers keeps `_keep_in_fp32_modules` for every dtype; transformers only for fp16).
def _keeps_fp32(component: str, dtype: torch.dtype) -> tuple[str, ...]:
    if component == "transformer":
        from diffusers import WanTransformer3DModel

        return tuple(WanTransformer3DModel._keep_in_fp32_modules or ())
    if component == "text_encoder" and dtype == torch.float16:
        from transformers import UMT5EncoderModel

        return tuple(UMT5EncoderModel._keep_in_fp32_modules or ())
    return ()


def read_safetensors_header(path: str | Path) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets) from its header alone: the
    first 8 bytes give the header's length, the JSON header follows; no tensor byte is read. Raises
    ValueError for a file that is not a well-formed safetensors file (the offsets must fit the file)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError("too short for a safetensors header")
        length = struct.unpack("<Q", prefix)[0]
        if length > min(size - 8, _MAX_HEADER_BYTES):
            raise ValueError(f"header length {length} does not fit the file ({size} bytes)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"header is not valid JSON ({error})") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - length
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            ok = info["dtype"] in _SAFETENSORS_DTYPE_BYTES and 0 <= begin <= end <= data_bytes
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"tensor {name!r} has a malformed entry or lies outside the file")
    return header


def component_weight_bytes(folder: str | Path, component: str, dtype: torch.dtype) -> int:
    """The bytes a component's parameters take once loaded in `dtype`, from its safetensors headers alone
    (no tensor is read): floating tensors in `dtype` unless the model class keeps them in fp32, the others
    as stored. Pickle-only components are sized from their files."""
    keep = _keeps_fp32(component, dtype)
    files = sorted((Path(folder) / component).glob("*.safetensors"))
    if not files:
        return sum(p.stat().st_size for p in (Path(folder) / component).iterdir() if p.is_file()
                   and p.suffix in PICKLE_SUFFIXES)
    total = 0
    for path in files:
        for name, info in read_safetensors_header(path).items():
            numel = math.prod(info["shape"])
            if info["dtype"].startswith(("F", "BF")):
                element = 4 if any(k in name.split(".") for k in keep) else dtype.itemsize
            else:
                element = _SAFETENSORS_DTYPE_BYTES[info["dtype"]]
            total += numel * element
    return total
