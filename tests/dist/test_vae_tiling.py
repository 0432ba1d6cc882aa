"""model.vae_tiling=true: diffusers' tiled VAE decode (and I2V condition encode), compared with diffusers
running the same tiling: it is lossy, so it is held to diffusers' own tiled frames, not the untiled ones.
288x320 px is above diffusers' 256 px tile, so the frames really are decoded in blended tiles."""

from __future__ import annotations

import pytest

from tests.dist_utils import run_on_ranks
from tests.modes import Case, run_cases
from tests.reference import TOLERANCE, max_abs_error, reference_frames

SIZE = dict(height=288, width=320, num_frames=5, steps=2)


@pytest.fixture(scope="module")
def results(t2v_folder, i2v_folder, image_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiling")
    cases = [Case(name="t2v_cfg_tiled", folder=str(t2v_folder), cfg=2, vae_tiling=True, **SIZE),
             Case(name="i2v_cfg_tiled", folder=str(i2v_folder), image=str(image_path), cfg=2, vae_tiling=True, **SIZE)]
    run_on_ranks(2, run_cases, cases, str(root), timeout=600)
    return {case.name: (case, root / case.name) for case in cases}


@pytest.mark.parametrize("name", ["t2v_cfg_tiled", "i2v_cfg_tiled"])
def test_tiled_decode_matches_diffusers_tiled(results, name):
    case, out_dir = results[name]
    tiled = reference_frames(case.folder, **case.reference_kwargs())
    assert max_abs_error(out_dir / "frames.npy", tiled) <= TOLERANCE
    untiled = reference_frames(case.folder, **dict(case.reference_kwargs(), vae_tiling=False))
    # The tiles are real: their blending shows against an untiled decode.
    assert max_abs_error(out_dir / "frames.npy", untiled) > TOLERANCE
