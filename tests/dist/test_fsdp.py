"""parallel.fsdp=true: the DiT's weights sharded over all DiT ranks (FSDP2) in every layout, built on the
meta device and filled shard by shard. Sharding changes no number: every layout still reproduces diffusers'
pipeline; each rank holds the bytes the plan predicted, its share of one replica."""

from __future__ import annotations

import json

import pytest

from tests.matrix import group, params
from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.wan.loading import component_weight_bytes

NAMES = params(group("fsdp"))


@pytest.mark.parametrize("name", NAMES)
def test_sharded_layout_matches_diffusers(matrix, name):
    case, out_dir = matrix[name]
    error = max_abs_error(out_dir / "frames.npy", reference_frames(case.folder, **case.reference_kwargs()))
    assert error <= TOLERANCE, f"{name}: max abs error {error:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_its_shard(matrix, name):
    """run.json's loaded DiT bytes per rank equal the plan's prediction from the headers, and add up to
    one replica: no rank held more than its share."""
    case, out_dir = matrix[name]
    report = json.loads((out_dir / "run.json").read_text())
    assert report["plan"]["fsdp"] is True
    dit_ranks = report["mesh"]["dit_ranks"]
    loaded = [report["memory"][rank]["loaded_parameter_bytes"]["dit"] for rank in dit_ranks]
    predicted = [report["plan"]["ranks"][rank]["weight_bytes"]["dit"] for rank in dit_ranks]
    replica = component_weight_bytes(case.folder, "transformer", __import__("torch").float32)
    assert loaded == predicted
    assert sum(loaded) == replica
    assert max(loaded) <= replica / len(dit_ranks) * 1.1
