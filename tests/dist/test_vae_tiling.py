"""model.vae_tiling=true: diffusers' tiled VAE decode (and I2V condition encode), compared with diffusers
running the same tiling: it is lossy, so it is held to diffusers' own tiled frames, not the untiled ones.
288x320 px is above diffusers' 256 px tile, so the frames really are decoded in blended tiles."""

from __future__ import annotations

import pytest

from tests.matrix import group, params
from tests.reference import TOLERANCE, max_abs_error, reference_frames


@pytest.mark.parametrize("name", params(group("tiling")))
def test_tiled_decode_matches_diffusers_tiled(matrix, name):
    case, out_dir = matrix[name]
    tiled = reference_frames(case.folder, **case.reference_kwargs())
    assert max_abs_error(out_dir / "frames.npy", tiled) <= TOLERANCE
    untiled = reference_frames(case.folder, **dict(case.reference_kwargs(), vae_tiling=False))
    # The tiles are real: their blending shows against an untiled decode.
    assert max_abs_error(out_dir / "frames.npy", untiled) > TOLERANCE
