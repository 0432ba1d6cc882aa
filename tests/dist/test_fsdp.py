"""parallel.fsdp=true: the DiT's weights sharded over all DiT ranks (FSDP2) in every layout, built on the
meta device and filled shard by shard. Sharding changes no number: every layout still reproduces diffusers'
pipeline; each rank holds the bytes the plan predicted, its share of one replica."""

from __future__ import annotations

import json

import pytest

from tests.dist_utils import run_on_ranks
from tests.modes import Case, run_cases
from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.loading import component_weight_bytes

LAYOUTS = {
    2: [dict(name="cfg", cfg=2), dict(name="ulysses", ulysses=2), dict(name="ring", ring=2)],
    # 3 DiT ranks: no parameter's rows divide evenly, so some shards are short (or empty).
    3: [dict(name="ulysses3", ulysses=3), dict(name="stage_split_cfg", stage_split=True, cfg=2)],
    4: [dict(name="usp", ulysses=2, ring=2), dict(name="cfg_usp", cfg=2, ulysses=2),
        dict(name="stage_split_ulysses3", stage_split=True, ulysses=3)],
}
# I2V (image context, condition channels) in one layout per world size; T2V in every one.
I2V = {"cfg", "stage_split_cfg", "stage_split_ulysses3"}
NAMES = [f"{task}_{layout['name']}" for world in LAYOUTS for layout in LAYOUTS[world] for task in ("t2v", "i2v")
         if task == "t2v" or layout["name"] in I2V]


@pytest.fixture(scope="module")
def results(t2v_folder, i2v_folder, image_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    found = {}
    for world, layouts in LAYOUTS.items():
        cases = [Case(folder=str(folder), image=image, fsdp=True, **dict(layout, name=f"{task}_{layout['name']}"))
                 for task, folder, image in (("t2v", t2v_folder, None), ("i2v", i2v_folder, str(image_path)))
                 for layout in layouts if task == "t2v" or layout["name"] in I2V]
        run_on_ranks(world, run_cases, cases, str(root), timeout=600)
        found.update({case.name: (case, root / case.name) for case in cases})
    return found


@pytest.mark.parametrize("name", NAMES)
def test_sharded_layout_matches_diffusers(results, name):
    case, out_dir = results[name]
    error = max_abs_error(out_dir / "frames.npy", reference_frames(case.folder, **case.reference_kwargs()))
    assert error <= TOLERANCE, f"{name}: max abs error {error:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_its_shard(results, name):
    """run.json's loaded DiT bytes per rank equal the plan's prediction from the headers, and add up to
    one replica: no rank held more than its share."""
    case, out_dir = results[name]
    report = json.loads((out_dir / "run.json").read_text())
    assert report["plan"]["fsdp"] is True
    dit_ranks = report["mesh"]["dit_ranks"]
    loaded = [report["memory"][rank]["loaded_parameter_bytes"]["dit"] for rank in dit_ranks]
    predicted = [report["plan"]["ranks"][rank]["weight_bytes"]["dit"] for rank in dit_ranks]
    replica = component_weight_bytes(case.folder, "transformer", __import__("torch").float32)
    assert loaded == predicted
    assert sum(loaded) == replica
    assert max(loaded) <= replica / len(dit_ranks) * 1.1
