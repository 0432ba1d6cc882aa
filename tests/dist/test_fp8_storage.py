"""model.dit_storage_dtype=fp8_*: the DiT's weights stored in fp8 and cast per layer for compute, through
diffusers' layerwise casting. Every layout, with and without FSDP (whose shards, and so all-gathers, are
then fp8), reproduces diffusers' pipeline with the same casting; each rank holds the bytes the plan
predicted from the headers; and the casting is lossy, so the frames differ from full precision."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist_utils import run_on_ranks
from tests.modes import Case, run_cases
from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.loading import component_weight_bytes

E4M3 = "fp8_e4m3"
LAYOUTS = {
    1: [dict(name="t2v_single"), dict(name="t2v_single_e5m2", dit_storage_dtype="fp8_e5m2")],
    2: [dict(name="t2v_cfg", cfg=2), dict(name="t2v_ulysses", ulysses=2),
        dict(name="t2v_cfg_fsdp", cfg=2, fsdp=True), dict(name="t2v_ulysses_fsdp", ulysses=2, fsdp=True),
        dict(name="i2v_ulysses_fsdp", ulysses=2, fsdp=True, image=True)],
}
NAMES = [layout["name"] for layouts in LAYOUTS.values() for layout in layouts]


@pytest.fixture(scope="module")
def results(t2v_folder, i2v_folder, image_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    found = {}
    for world, layouts in LAYOUTS.items():
        cases = []
        for layout in layouts:
            layout = dict(layout)
            i2v = layout.pop("image", False)
            folder, image = (i2v_folder, str(image_path)) if i2v else (t2v_folder, None)
            cases.append(Case(folder=str(folder), image=image, **{"dit_storage_dtype": E4M3, **layout}))
        run_on_ranks(world, run_cases, cases, str(root), timeout=600)
        found.update({case.name: (case, root / case.name) for case in cases})
    return found


@pytest.mark.parametrize("name", NAMES)
def test_fp8_layout_matches_diffusers_with_the_same_casting(results, name):
    case, out_dir = results[name]
    error = max_abs_error(out_dir / "frames.npy", reference_frames(case.folder, **case.reference_kwargs()))
    assert error <= TOLERANCE, f"{name}: max abs error {error:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_the_planned_fp8_bytes(results, name):
    """run.json's loaded DiT bytes per rank (measured on the tensors) equal the plan's header count with the
    cast layers in fp8, under the full-precision replica; under FSDP they add up to one fp8 replica."""
    case, out_dir = results[name]
    report = json.loads((out_dir / "run.json").read_text())
    dit = report["plan"]["components"]["dit"]
    assert dit["storage_dtype"] == {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}[case.dit_storage_dtype]
    dit_ranks = report["mesh"]["dit_ranks"]
    loaded = [report["memory"][rank]["loaded_parameter_bytes"]["dit"] for rank in dit_ranks]
    predicted = [report["plan"]["ranks"][rank]["weight_bytes"]["dit"] for rank in dit_ranks]
    full = component_weight_bytes(case.folder, "transformer", torch.float32)
    assert loaded == predicted
    if case.fsdp:
        assert sum(loaded) == dit["weight_bytes"]
    else:
        assert loaded == [dit["weight_bytes"]] * len(dit_ranks)
    # The tiny model's embeddings (kept whole) are large beside its blocks: just over half of fp32 here.
    assert dit["weight_bytes"] < 0.6 * full


def test_fp8_is_lossy_and_its_error_is_stated(results):
    """Against the full-precision pipeline the fp8 frames differ by more than the layouts' tolerance
    (the casting really happened); the figure is the README's."""
    errors = {}
    for name in ("t2v_single", "t2v_single_e5m2"):
        case, out_dir = results[name]
        full = reference_frames(case.folder, **dict(case.reference_kwargs(), dit_storage_dtype="auto"))
        errors[case.dit_storage_dtype] = max_abs_error(out_dir / "frames.npy", full)
    print(f"fp8 storage, tiny t2v model, max abs frame error against fp32 weights: {errors}")
    assert all(error > TOLERANCE for error in errors.values()), errors
