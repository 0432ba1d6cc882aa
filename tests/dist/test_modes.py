"""Every parallel mode reproduces diffusers' single-process pipeline (fp32 tiny models, gloo ranks).

Shapes are awkward on purpose: 48x80 pixels give 45 DiT tokens (divisible by neither 2 nor 4) and the
tiny DiT has 3 heads (divisible by neither 2 nor 4)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.dist_utils import run_on_ranks
from tests.modes import Case, run_cases
from tests.reference import TOLERANCE, max_abs_error, reference_frames


def _layouts(world: int) -> list[dict]:
    return {
        1: [dict(name="single")],
        2: [dict(name="stage_split", stage_split=True), dict(name="cfg", cfg=2), dict(name="ulysses", ulysses=2),
            dict(name="ring", ring=2)],
        3: [dict(name="ulysses3", ulysses=3), dict(name="stage_split_cfg", stage_split=True, cfg=2),
            dict(name="ring3", ring=3)],
        4: [dict(name="usp", ulysses=2, ring=2), dict(name="cfg_usp", cfg=2, ulysses=2),
            dict(name="cfg_ring", cfg=2, ring=2), dict(name="stage_split_ulysses3", stage_split=True, ulysses=3)],
    }[world]


@pytest.fixture(scope="module")
def world_results(t2v_folder, i2v_folder, image_path, tmp_path_factory):
    """Run every layout for T2V and I2V, one spawned world per size; returns {(task, name): out_dir}."""
    root = tmp_path_factory.mktemp("modes")
    results = {}
    for world in (1, 2, 3, 4):
        cases = []
        for task, folder, image in (("t2v", t2v_folder, None), ("i2v", i2v_folder, str(image_path))):
            for layout in _layouts(world):
                layout = dict(layout, name=f"{task}_{layout['name']}")
                cases.append(Case(folder=str(folder), image=image, **layout))
        run_on_ranks(world, run_cases, cases, str(root), timeout=600)
        for case in cases:
            results[case.name] = (case, root / case.name)
    return results


ALL_CASES = [f"{task}_{layout['name']}" for world in (1, 2, 3, 4) for layout in _layouts(world)
             for task in ("t2v", "i2v")]


@pytest.mark.parametrize("name", ALL_CASES)
def test_mode_matches_diffusers(world_results, name):
    case, out_dir = world_results[name]
    reference = reference_frames(case.folder, **case.reference_kwargs())
    error = max_abs_error(out_dir / "frames.npy", reference)
    assert error <= TOLERANCE, f"{name}: max abs error {error:.3g} > {TOLERANCE}"
    assert (out_dir / "video.mp4").stat().st_size > 0
    assert (out_dir / "run.json").is_file()


def test_modes_differ_from_a_wrong_answer(world_results):
    """The comparison can fail: another seed's reference is far from what the modes produce."""
    case, out_dir = world_results["t2v_usp"]
    kwargs = case.reference_kwargs()
    other = reference_frames(case.folder, **kwargs, seed=1)
    assert max_abs_error(out_dir / "frames.npy", other) > 100 * TOLERANCE
