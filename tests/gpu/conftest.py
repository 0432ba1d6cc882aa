"""The GPU tests' tiny models: the shared tiny architecture with a head dim cuDNN's fused attention
takes (a multiple of 8: 16), so that every kernel the plan can choose runs; the shared folders' head dim
of 12 has cuDNN refuse with "No available kernel"."""

from __future__ import annotations

from pathlib import Path

import pytest

from wan_dist.wan.building import build_tiny_model
from wan_dist.config.presets import ModelSpec

GPU_HEAD_DIM = 16


@pytest.fixture(scope="session")
def gpu_t2v_folder(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gpu_t2v"), ModelSpec(task="t2v", head_dim=GPU_HEAD_DIM))


@pytest.fixture(scope="session")
def gpu_i2v_folder(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("gpu_i2v"), ModelSpec(task="i2v", head_dim=GPU_HEAD_DIM))
