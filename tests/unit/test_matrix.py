"""The case table covers what the library offers: each check below fails when a layout, parallel preset,
model family, memory option, VAE mode or sampler is run by no `make test` case (tests/matrix.py)."""

from __future__ import annotations

import pytest

from tests.matrix import FAMILIES, FOLDER_SPECS, TABLE
from wan_dist.config.schema import SCHEDULERS, STORAGE_DTYPES, VAE_SPLITS
from wan_dist.config.presets import CUDA_ONLY_OPTIONS, LAYOUTS, MEMORY_OPTIONS, MODEL_PRESETS, PARALLEL_PRESETS

MAKE_TEST = [entry for entry in TABLE if not entry.full]
COVERED = frozenset().union(*(entry.covers for entry in MAKE_TEST))


def _axes_of_layout(layout) -> frozenset[str]:
    axes = {axis for axis in ("cfg", "ulysses", "ring") if getattr(layout, axis) > 1}
    return frozenset(axes | {flag for flag in ("stage_split", "expert_split") if getattr(layout, flag)})


def _option_tags(layout) -> frozenset[str]:
    tags = {f"memory:{layout.memory}"} if layout.memory else set()
    return frozenset(tags | ({"compile"} if layout.compile else set()))


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_every_named_layout_has_a_case_of_its_shape(name):
    """A named layout's axes run in make test (one beyond 4 ranks by its shape: the same axes on fewer
    ranks), and its option in a layout that splits at least as much. Block offload needs CUDA: on a CPU its
    plan refuses it, and its CPU side is tests/dist/test_dit_offload.py."""
    layout = LAYOUTS[name]
    axes = _axes_of_layout(layout)
    options = _option_tags(layout) - {f"memory:{option}" for option in CUDA_ONLY_OPTIONS}
    assert any(entry.axes == axes for entry in MAKE_TEST), (name, sorted(axes))
    assert any(axes <= entry.axes and options <= entry.covers for entry in MAKE_TEST), (name, options)


@pytest.mark.parametrize("name", sorted(PARALLEL_PRESETS))
def test_every_parallel_preset_has_a_case(name):
    """A case whose degrees are what the preset pins, splitting over an axis the preset leaves open
    (`single`: nothing split)."""
    preset = PARALLEL_PRESETS[name]
    pinned = {axis: getattr(preset, axis) for axis in ("cfg", "ulysses", "ring") if getattr(preset, axis) is not None}
    open_axes = {"cfg", "ulysses", "ring"} - set(pinned)

    def matches(entry) -> bool:
        if preset.stage_split is not None and preset.stage_split != entry.case.stage_split:
            return False
        if any(entry.degree(axis) != degree for axis, degree in pinned.items()):
            return False
        if preset.both_sequence_axes and entry.degree("cfg") == 1 and not {"ulysses", "ring"} <= entry.axes:
            return False
        return not open_axes or bool(open_axes & entry.axes) or bool(preset.stage_split)

    assert any(matches(entry) for entry in MAKE_TEST), name


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_every_model_preset_has_a_case_of_its_family_and_task(name):
    spec = MODEL_PRESETS[name].spec
    families = {family for family, (folder, task) in FAMILIES.items()
                if FOLDER_SPECS[folder].family == spec.family and task == spec.task}
    assert {f"family:{family}" for family in families} & COVERED, name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_and_task_has_a_case(family):
    assert f"family:{family}" in COVERED


@pytest.mark.parametrize("option", sorted(set(MEMORY_OPTIONS) - CUDA_ONLY_OPTIONS))
def test_every_memory_option_has_a_case(option):
    assert f"memory:{option}" in COVERED


@pytest.mark.parametrize("dtype", [dtype for dtype in STORAGE_DTYPES if dtype != "auto"])
def test_every_storage_dtype_has_a_case(dtype):
    assert f"storage:{dtype}" in COVERED


@pytest.mark.parametrize("tag", [f"vae_decode:{split}" for split in VAE_SPLITS]
                         + [f"vae_encode:{split}" for split in VAE_SPLITS] + ["vae:tiling"])
def test_every_vae_mode_has_a_case(tag):
    assert tag in COVERED


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_sampler_has_a_case(scheduler):
    assert f"sampler:{scheduler}" in COVERED


@pytest.mark.parametrize("tag", ["lora", "queue", "embedding_cache", "unguided", "compile",
                                 *(f"world:{world}" for world in (1, 2, 3, 4))])
def test_every_feature_has_a_case(tag):
    assert tag in COVERED


def test_the_check_can_fail():
    """Without the fp8 cases no case stores the DiT in E5M2: the storage check would fail."""
    without = frozenset().union(*(entry.covers for entry in MAKE_TEST if entry.group != "fp8"))
    assert "storage:fp8_e5m2" not in without
