"""Shared fixtures: tiny random-weight Wan folders built with diffusers/transformers classes and saved in
diffusers format, so every test loads them through the project's real loading code."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from wan_dist.wan.building import build_tiny_model  # noqa: E402
from wan_dist.config.presets import ModelSpec  # noqa: E402

from tests.matrix import FOLDER_SPECS  # noqa: E402

# The families beyond Wan2.1's T2V and I2V (tests/matrix.py says why each is as it is).
FAMILY_SPECS = {name: spec for name, spec in FOLDER_SPECS.items() if name not in ("t2v", "i2v")}


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _diffusers_attention_backend():
    """diffusers' `set_attention_backend` also sets a process-wide active backend, which
    `reset_attention_backend` leaves as it is: restored after each test, so that no test runs on the
    kernel an earlier one chose."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    saved = _AttentionBackendRegistry._active_backend
    yield
    _AttentionBackendRegistry.set_active_backend(saved)


@pytest.fixture(scope="session")
def t2v_folder(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_t2v"), ModelSpec(task="t2v"))


@pytest.fixture(scope="session")
def i2v_folder(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_i2v"), ModelSpec(task="i2v"))


@pytest.fixture(scope="session")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    """FAMILY_SPECS' folders, by name."""
    root = tmp_path_factory.mktemp("families")
    return {name: build_tiny_model(root / name, spec) for name, spec in FAMILY_SPECS.items()}


def _random_image(tmp_path_factory, name: str, seed: int) -> Path:
    from PIL import Image

    pixels = (np.random.RandomState(seed).rand(50, 70, 3) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("image") / name
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="session")
def image_path(tmp_path_factory) -> Path:
    return _random_image(tmp_path_factory, "input.png", 0)


@pytest.fixture(scope="session")
def last_image_path(tmp_path_factory) -> Path:
    """FLF2V's last frame."""
    return _random_image(tmp_path_factory, "last.png", 1)


@pytest.fixture(scope="session")
def lora_path(tmp_path_factory, t2v_folder) -> Path:
    """A random diffusers-format LoRA (rank 4) on the DiT's attention projections."""
    return write_random_lora(t2v_folder, tmp_path_factory.mktemp("lora") / "lora.safetensors")


def write_random_lora(folder: Path, path: Path, rank: int = 4, seed: int = 1, subfolder: str = "transformer") -> Path:
    """A random LoRA for the DiT in `subfolder` (`transformer_2`: a two-expert model's low-noise expert)."""
    from safetensors.torch import save_file

    from wan_dist.wan.loading import read_component_config

    config = read_component_config(folder, subfolder)
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for block in range(config["num_layers"]):
        for attn in ("attn1", "attn2"):
            for proj in ("to_q", "to_k", "to_v", "to_out.0"):
                prefix = f"transformer.blocks.{block}.{attn}.{proj}"
                tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, inner, generator=generator) * 0.3
                tensors[f"{prefix}.lora_B.weight"] = torch.randn(inner, rank, generator=generator) * 0.3
    save_file(tensors, str(path))
    return path


def write_lightx2v_lora(folder: Path, path: Path, rank: int = 4, alpha: float = 2.0, seed: int = 2) -> Path:
    """A random LoRA in the original-Wan key format LightX2V's and CausVid's distilled LoRAs ship in
    (`diffusion_model.<Wan module>.lora_down/lora_up.weight`, bias deltas `.diff_b`, weight deltas `.diff`
    on the norms and `diff_m` on the modulation, `.alpha` in the blocks, the only place diffusers' converter
    reads one), over every layer kind they adapt: attention, feed-forward, the text and time embeddings, the
    time projection and the head. diffusers' Wan LoRA loader converts it; the norm and modulation deltas it
    drops (zeros in the published files)."""
    from safetensors.torch import save_file

    from wan_dist.wan.loading import read_component_config

    config = read_component_config(folder, "transformer")
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    head_out = config["out_channels"] * math.prod(config["patch_size"])
    generator = torch.Generator().manual_seed(seed)
    tensors = {}

    def adapt(name: str, fan_in: int, fan_out: int, gain: float, with_alpha: bool = False) -> None:
        prefix = f"diffusion_model.{name}"
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, fan_in, generator=generator) * gain
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(fan_out, rank, generator=generator) * gain
        if with_alpha:
            tensors[f"{prefix}.alpha"] = torch.tensor(alpha)
        tensors[f"{prefix}.diff_b"] = torch.randn(fan_out, generator=generator) * gain * 0.1

    for block in range(config["num_layers"]):
        for attn in ("self_attn", "cross_attn"):
            for proj in ("q", "k", "v", "o"):
                adapt(f"blocks.{block}.{attn}.{proj}", inner, inner, 0.3, with_alpha=True)
            for norm in ("norm_q", "norm_k"):
                tensors[f"diffusion_model.blocks.{block}.{attn}.{norm}.diff"] = torch.zeros(inner)
        adapt(f"blocks.{block}.ffn.0", inner, config["ffn_dim"], 0.2, with_alpha=True)
        adapt(f"blocks.{block}.ffn.2", config["ffn_dim"], inner, 0.2, with_alpha=True)
        tensors[f"diffusion_model.blocks.{block}.norm3.diff"] = torch.zeros(inner)
        tensors[f"diffusion_model.blocks.{block}.norm3.diff_b"] = torch.zeros(inner)
        tensors[f"diffusion_model.blocks.{block}.diff_m"] = torch.zeros(1, 6, inner)
    adapt("text_embedding.0", config["text_dim"], inner, 0.1)
    adapt("text_embedding.2", inner, inner, 0.1)
    adapt("time_embedding.0", config["freq_dim"], inner, 0.1)
    adapt("time_embedding.2", inner, inner, 0.1)
    adapt("time_projection.1", inner, 6 * inner, 0.1)
    adapt("head.head", inner, head_out, 0.1)
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="session")
def matrix_paths(t2v_folder, i2v_folder, family_folders, image_path, last_image_path, lora_path,
                 tmp_path_factory) -> tuple[dict[str, str], dict[str, str]]:
    """The case table's folders and input files (tests/matrix.py `bind`): (folders, inputs)."""
    from tests.matrix import QUEUE

    root = tmp_path_factory.mktemp("matrix_inputs")
    queue = root / "prompts.txt"
    queue.write_text("\n".join(QUEUE[:1] + [""] + QUEUE[1:]) + "\n")  # blank lines are skipped
    moe = family_folders["moe_t2v"]
    inputs = {"@image": str(image_path), "@last_image": str(last_image_path), "@lora": str(lora_path),
              "@high_lora": str(write_random_lora(moe, root / "high.safetensors", seed=2)),
              "@low_lora": str(write_random_lora(moe, root / "low.safetensors", seed=3, subfolder="transformer_2")),
              "@lightx2v_lora": str(write_lightx2v_lora(t2v_folder, root / "lightx2v_4step.safetensors")),
              "@queue": str(queue), "@embeddings": str(root / "embeddings")}
    folders = {"t2v": str(t2v_folder), "i2v": str(i2v_folder), **{k: str(v) for k, v in family_folders.items()}}
    return folders, inputs


@pytest.fixture(scope="session")
def matrix(request, matrix_paths, tmp_path_factory) -> dict:
    """Every case of tests/matrix.py that this session's selected tests name (a `name` parameter or a
    `cases(...)` mark), run in one spawned world per world size; {name: (case, out_dir)}."""
    from tests.dist_utils import run_on_ranks
    from tests.matrix import BY_NAME, TABLE, bind
    from tests.modes import run_cases

    wanted = set()
    for item in request.session.items:
        if "matrix" not in getattr(item, "fixturenames", ()):
            continue
        callspec = getattr(item, "callspec", None)
        wanted |= {v for v in (callspec.params.values() if callspec else ()) if isinstance(v, str) and v in BY_NAME}
        for mark in item.iter_markers("cases"):
            wanted |= set(mark.args)
    root = tmp_path_factory.mktemp("matrix")
    results = {}
    for world in sorted({entry.world for entry in TABLE}):
        cases = [bind(entry.case, *matrix_paths) for entry in TABLE if entry.world == world and entry.name in wanted]
        if cases:
            run_on_ranks(world, run_cases, cases, str(root), timeout=1200)
            results.update({case.name: (case, root / case.name) for case in cases})
    return results
