"""Load the Wan components from a local diffusers-format folder, and what can be known of them without
reading a weight (configs, safetensors headers). The random-weight builders are in wan/building.py.
"""

from __future__ import annotations

import json
import logging
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config.schema import LoraConfig

log = logging.getLogger(__name__)

# Checkpoint files that unpickle (and so can run code when read).
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
DTYPES_BY_NAME = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORAGE_DTYPES_BY_NAME = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
# safetensors' dtype names, as its headers state them.
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def resolve_dtype(name: str, device: torch.device, *, gpu_default: torch.dtype) -> torch.dtype:
    """`auto` is the GPU default on CUDA and fp32 on CPU, where bf16 matmuls are slow and inexact."""
    if name == "auto":
        return gpu_default if device.type == "cuda" else torch.float32
    return DTYPES_BY_NAME[name]


# CPU features with which oneDNN runs bf16 matmuls natively (x86: AVX512-BF16, AMX; Arm: the BF16
# extension); without them torch converts bf16 to fp32 around each matmul, slower than fp32 itself.
_FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The CPU's feature flags as the kernel lists them (x86 `flags`, Arm `Features`); empty if unknown."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_encoder_dtype(setting: str, *, dit_on_gpu: bool, flags: frozenset[str]) -> torch.dtype | None:
    """The text encoder's dtype on the CPU for `model.text_encoder_dtype=auto`, or None to keep the
    default resolution (fp32 on CPU). bf16 where the DiT runs on a GPU (in bf16 there anyway; Wan's own
    code runs UMT5 in bf16) and the CPU has native bf16 matmuls: half the weight bytes per token, on the
    bf16 units. Where everything runs on the CPU, fp32 stays: that run is the one compared with
    diffusers' fp32 pipeline to 1e-4. Without native bf16 it would only be slower."""
    if setting != "auto" or not dit_on_gpu or not flags & _FAST_BF16_FLAGS:
        return None
    return torch.bfloat16


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


def load_transformer(folder: Path, dtype: torch.dtype, device: torch.device, *, allow_pickle: bool = False,
                     subfolder: str = "transformer"):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(folder, subfolder=subfolder, dtype=dtype,
                                                  **_weights(allow_pickle))
    return model.to(device).eval()


def load_vae(folder: Path, dtype: torch.dtype, device: torch.device, *, allow_pickle: bool = False):
    from diffusers import AutoencoderKLWan

    model = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=dtype, **_weights(allow_pickle))
    return model.to(device).eval()


def load_scheduler(folder: Path, kind: str, flow_shift: float, seed: int | None = None):
    """The folder's scheduler (scheduler_from_config on its scheduler config)."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return scheduler_from_config(config, kind, flow_shift, seed)


def scheduler_from_config(config: dict[str, Any], kind: str, flow_shift: float, seed: int | None = None):
    """A scheduler config with Wan's flow shift; UniPC by default, flow-match Euler (on diffusers'
    spacing, or on the distilled LoRAs' training timesteps with Euler or fresh-noise steps) on request;
    `seed` (the run's) seeds the fresh noise of `lcm_distill`. Reads no file, so the plan can count an
    expert's steps from the config it read once."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from .schedulers import DistilledEulerScheduler

    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler.from_config(config, shift=flow_shift)
    if kind in ("euler_distill", "lcm_distill"):
        scheduler = DistilledEulerScheduler.from_config(config, shift=flow_shift,
                                                        stochastic_sampling=kind == "lcm_distill")
        scheduler.noise_seed = seed
        return scheduler
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
    """The parameter bytes this process holds: of a sharded (DTensor) parameter, its local shard."""
    return sum(_local(p).numel() * p.element_size() for m in modules if m is not None for p in m.parameters())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def shard_rows(rows: int, rank: int, ranks: int) -> tuple[int, int]:
    """The rows [start, end) of a dim of `rows` that FSDP2 gives `rank` of `ranks`: torch.chunk's split,
    ceil(rows / ranks) each, the last ranks with fewer or none."""
    size = -(-rows // ranks)
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def load_transformer_sharded(model: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device,
                             *, shard_rank: int, shard_count: int, subfolder: str = "transformer") -> None:
    """Fill a DiT that was built on the meta device and sharded with FSDP2 (dim 0 of every parameter over
    `shard_count` ranks): each parameter's local shard is read straight from its rows of the safetensors
    files, so no rank ever holds more than its shard and one slice."""
    model.to_empty(device=device)
    _fill_from_files(model, folder, dtype, device, shard_rank=shard_rank, shard_count=shard_count,
                     subfolder=subfolder)


def load_transformer_to_host(folder: Path, dtype: torch.dtype, *, pinned: bool, allow_pickle: bool = False,
                             subfolder: str = "transformer") -> torch.nn.Module:
    """The DiT for block offload, read straight into the host memory it is streamed from: pinned when
    `pinned` (CUDA). Group offloading pins each weight it is given; a weight that is pinned already it
    takes as it is (`Tensor.pin_memory` returns a pinned tensor itself), so the host holds one copy,
    where from_pretrained's weights would be copied whole into pinned memory beside the originals."""
    if not any((Path(folder) / subfolder).glob("*.safetensors")):  # pickle only: no headers to read rows by
        return load_transformer(folder, dtype, torch.device("cpu"), allow_pickle=allow_pickle, subfolder=subfolder)
    model = build_transformer_on_meta(folder, dtype, subfolder)
    _place_in_host_memory(model, pinned=pinned)
    _fill_from_files(model, folder, dtype, torch.device("cpu"), shard_rank=0, shard_count=1, subfolder=subfolder)
    return model


# torch's pinned memory comes from its caching host allocator, which rounds every request up to a power
# of two: one request per tensor would waste up to half (a 1.3B attention weight, 4.7 MB, takes 8 MiB).
# The tensors are packed into chunks of a power of two instead, each several times the largest tensor,
# so what is lost is a chunk's unfilled end.
_TENSORS_PER_CHUNK = 8
_ALIGNMENT = 64


def _place_in_host_memory(model: torch.nn.Module, *, pinned: bool) -> None:
    """Give every parameter and buffer of a model built on the meta device storage (uninitialised) in
    host memory, packed in order into a few large buffers, pinned when `pinned`."""
    slots = [(module, kind, name, tensor) for module in model.modules() for kind in ("_parameters", "_buffers")
             for name, tensor in getattr(module, kind).items() if tensor is not None]
    sizes = [-(-tensor.numel() * tensor.element_size() // _ALIGNMENT) * _ALIGNMENT for *_, tensor in slots]
    chunk_bytes = 1 << (_TENSORS_PER_CHUNK * max(sizes, default=1) - 1).bit_length()
    left, chunk, used = sum(sizes), torch.empty(0, dtype=torch.uint8), 0
    placed: dict[int, torch.Tensor] = {}  # a tensor two modules share keeps one storage
    for (module, kind, name, tensor), size in zip(slots, sizes):
        if id(tensor) not in placed:
            if used + size > chunk.numel():
                # The last chunk only as large as what is left (a power of two, as the allocator rounds).
                chunk = torch.empty(min(chunk_bytes, 1 << (left - 1).bit_length()), dtype=torch.uint8,
                                    pin_memory=pinned)
                used = 0
            nbytes = tensor.numel() * tensor.element_size()
            placed[id(tensor)] = chunk[used:used + nbytes].view(tensor.dtype).view(tensor.shape)
            used, left = used + size, left - size
        view = placed[id(tensor)]
        getattr(module, kind)[name] = (torch.nn.Parameter(view, requires_grad=tensor.requires_grad)
                                       if kind == "_parameters" else view)


def _fill_from_files(model: torch.nn.Module, folder: Path, dtype: torch.dtype, device: torch.device, *,
                     shard_rank: int, shard_count: int, subfolder: str) -> None:
    """Copy the safetensors files' weights into a model whose storage is in place: each parameter's rows
    of `shard_rank` of `shard_count` (all of them for 1), one tensor's rows at a time. Read, not
    memory-mapped: the pages of a mapping stay in the process's resident set while the file is open, and
    would add the file to what the model holds. Buffers the checkpoint does not hold (the rotary tables)
    are computed by their module's constructor."""
    keep = _keeps_fp32("transformer", dtype)
    params = dict(model.named_parameters())
    filled = set()
    with torch.no_grad():
        for path in sorted((Path(folder) / subfolder).glob("*.safetensors")):
            header = read_safetensors_header(path)
            with open(path, "rb") as handle:
                data_start = 8 + struct.unpack("<Q", handle.read(8))[0]
                for name, info in header.items():
                    local = _local(params[name])
                    start, end = shard_rows(params[name].shape[0], shard_rank, shard_count)
                    if end > start:
                        target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
                        if local.dtype == target == SAFETENSORS_DTYPES[info["dtype"]] and local.is_contiguous():
                            # Stored as it is kept: read into place, with no copy in between.
                            _read_rows(handle, data_start, info, start, end, into=local)
                        else:
                            local.copy_(_read_rows(handle, data_start, info, start, end).to(target))
                    filled.add(name)
        missing = sorted(set(params) - filled)
        if missing:
            raise ValueError(f"{folder}/{subfolder} holds no weights for {', '.join(missing[:3])}")
        _rebuild_rotary_tables(model, device)
    model.eval()


def _read_rows(handle, data_start: int, info: dict[str, Any], start: int, end: int,
               into: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `start:end` of one tensor of an open safetensors file (its header entry `info`), read into
    `into` (contiguous, in the stored dtype, of those rows' shape) when given."""
    dtype, shape = SAFETENSORS_DTYPES[info["dtype"]], info["shape"]
    rows = torch.empty((end - start, *shape[1:]), dtype=dtype) if into is None else into
    handle.seek(data_start + info["data_offsets"][0] + start * math.prod(shape[1:]) * dtype.itemsize)
    if handle.readinto(rows.reshape(-1).view(torch.uint8).numpy()) != rows.numel() * dtype.itemsize:
        raise ValueError(f"{handle.name} ends inside its tensor rows")
    return rows


def _rebuild_rotary_tables(model: torch.nn.Module, device: torch.device) -> None:
    from diffusers.models.transformers.transformer_wan import WanRotaryPosEmbed

    config = model.config
    with torch.device(device):
        fresh = WanRotaryPosEmbed(config.attention_head_dim, config.patch_size, config.rope_max_seq_len)
    for name, buffer in fresh.named_buffers():
        model.rope.get_buffer(name).copy_(buffer)


def build_transformer_on_meta(folder: Path, dtype: torch.dtype, subfolder: str = "transformer") -> torch.nn.Module:
    """The folder's DiT architecture (`subfolder`: the DiT or one expert) on the meta device (no memory),
    in `dtype` with the parameters the class keeps in fp32 kept so, as from_pretrained would load them."""
    return transformer_on_meta(read_component_config(folder, subfolder), dtype)


def transformer_on_meta(config: dict[str, Any], dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel.from_config(config)
    keep = _keeps_fp32("transformer", dtype)
    with torch.no_grad():
        for module_name, module in model.named_modules():
            for kind in (module._parameters, module._buffers):
                for name, tensor in kind.items():
                    if tensor is not None and tensor.is_floating_point():
                        full = f"{module_name}.{name}".split(".")
                        tensor.data = tensor.data.to(torch.float32 if any(k in full for k in keep) else dtype)
    return model


def layerwise_cast_parameters(folder: Path, storage_dtype: torch.dtype,
                              subfolder: str = "transformer") -> dict[str, torch.dtype]:
    """The DiT parameters diffusers' layerwise casting stores in `storage_dtype` (the leaf layers outside
    the model's skip patterns)."""
    names = layerwise_cast_names(read_component_config(folder, subfolder))
    return dict.fromkeys(names, storage_dtype)


def layerwise_cast_names(config: dict[str, Any]) -> frozenset[str]:
    """The names of the parameters layerwise casting stores in a narrower dtype, found by applying it to
    the architecture of `config` on the meta device: its own rule, never restated here. Which layers it
    casts does not depend on the storage dtype, so one set serves fp8_e4m3 and fp8_e5m2."""
    storage = torch.float8_e4m3fn
    model = transformer_on_meta(config, torch.float32)
    model.enable_layerwise_casting(storage_dtype=storage, compute_dtype=torch.float32)
    return frozenset(name for name, p in model.named_parameters() if p.dtype == storage)


# The classes each weight component is read with, and the parameters each keeps in fp32 whatever dtype it
# is loaded in (diffusers keeps `_keep_in_fp32_modules` for every dtype; transformers only for fp16).
def _keeps_fp32(component: str, dtype: torch.dtype) -> tuple[str, ...]:
    if component.startswith("transformer"):  # the DiT and a two-expert model's second expert
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
            ok = info["dtype"] in SAFETENSORS_DTYPES and 0 <= begin <= end <= data_bytes \
                and end - begin == math.prod(info["shape"]) * SAFETENSORS_DTYPES[info["dtype"]].itemsize
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"tensor {name!r} has a malformed entry or lies outside the file")
    return header


@dataclass(frozen=True)
class WeightTable:
    """A component's tensors as its safetensors headers state them, in file and header order: (name,
    safetensors dtype name, shape). A pickle-only component has no headers: `pickle_bytes` is its
    files' size."""

    tensors: tuple[tuple[str, str, tuple[int, ...]], ...] = ()
    pickle_bytes: int | None = None


def read_weight_table(folder: str | Path, component: str) -> WeightTable:
    """`component`'s weight table, from its headers alone (no tensor is read)."""
    files = sorted((Path(folder) / component).glob("*.safetensors"))
    if not files:
        return WeightTable(pickle_bytes=sum(p.stat().st_size for p in (Path(folder) / component).iterdir()
                                            if p.is_file() and p.suffix in PICKLE_SUFFIXES))
    return WeightTable(tuple((name, info["dtype"], tuple(info["shape"]))
                             for path in files for name, info in read_safetensors_header(path).items()))


def component_weight_bytes(folder: str | Path, component: str, dtype: torch.dtype,
                           shard: tuple[int, int] | None = None, stored: dict[str, torch.dtype] | None = None,
                           prefix: str = "") -> int:
    """weight_bytes of the component's headers in `folder`."""
    return weight_bytes(read_weight_table(folder, component), component, dtype, shard=shard, stored=stored,
                        prefix=prefix)


def weight_bytes(table: WeightTable, component: str, dtype: torch.dtype, *, shard: tuple[int, int] | None = None,
                 stored: dict[str, torch.dtype] | None = None, prefix: str = "") -> int:
    """The bytes a component's parameters take once loaded in `dtype`: floating tensors in `dtype` unless
    the model class keeps them in fp32 or `stored` names another dtype for them (layerwise casting), the
    others as stored; with `shard=(rank, ranks)`, only the rows FSDP2 gives that rank; with `prefix`, only
    the tensors whose names start with it. Pickle-only components are sized from their files."""
    if table.pickle_bytes is not None:
        return table.pickle_bytes
    keep = _keeps_fp32(component, dtype)
    total = 0
    for name, kind, stated in table.tensors:
        if not name.startswith(prefix):
            continue
        shape = list(stated)
        if shard is not None and shape:
            start, end = shard_rows(shape[0], *shard)
            shape[0] = end - start
        numel = math.prod(shape)
        if stored and name in stored:
            element = stored[name].itemsize
        elif kind.startswith(("F", "BF")):
            element = 4 if any(k in name.split(".") for k in keep) else dtype.itemsize
        else:
            element = SAFETENSORS_DTYPES[kind].itemsize
        total += numel * element
    return total
