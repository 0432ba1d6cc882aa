"""The expert split's plan: which ranks hold which expert, the groups' axes and sizes, and the refusals,
all before any weight is read."""

from __future__ import annotations

import pytest

from tests.planning import plan_of
from wan_dist.plan.checks import validate_run
from wan_dist.config.schema import RunConfig
from wan_dist.config.errors import ConfigError


def split_run(folder, **parallel) -> RunConfig:
    run = RunConfig()
    run.model.path = str(folder)
    run.height, run.width, run.num_frames, run.steps, run.guidance_scale_2 = 48, 80, 9, 3, 2.0
    run.parallel.expert_split = True
    for key, value in parallel.items():
        setattr(run.parallel, key, value)
    return run


def plan_for(run: RunConfig, world_size: int, tmp_path):
    return plan_of(run, world_size, tmp_path)


def test_each_group_holds_only_its_expert(tmp_path, family_folders):
    """3 steps at shift 3: the high-noise expert runs 1, the low-noise one 2, so 3 DiT ranks split 1 + 2
    by default; each rank's weight bytes are its one expert's."""
    plan = plan_for(split_run(family_folders["moe_t2v"]), 3, tmp_path)
    assert plan.expert_steps == (1, 2)
    high, low = plan.dims.groups
    assert (high.ranks, low.ranks) == ([0], [1, 2])
    assert plan.components["dit"].ranks == (0,) and plan.components["dit_2"].ranks == (1, 2)
    assert plan.ranks[0].components == ("text_encoder", "vae", "dit")
    assert [plan.ranks[r].components for r in (1, 2)] == [("dit_2",), ("dit_2",)]
    # Open degrees are filled per group: cfg in the even group (guided), nothing to split in the other.
    assert (low.cfg, low.ulysses, high.cfg) == (2, 1, 1)
    assert plan.dims.dit_leader == 1 and not plan.fsdp
    assert plan.to_json()["layout"]["expert_groups"][1] == {"expert": "dit_2", "ranks": [1, 2], "cfg": 2,
                                                            "ring": 1, "ulysses": 1}
    # The memory model counts one expert per rank, and the low-noise group's cfg axis halves its contexts.
    weights = [m.weights for m in plan.memory]
    assert weights[1] == plan.components["dit_2"].weight_bytes
    assert plan.memory[1].context_cache < plan.memory[0].context_cache


def test_expert_ranks_and_degrees_within_a_group(tmp_path, family_folders):
    run = split_run(family_folders["moe_t2v"], expert_ranks=[2, 1], stage_split=True, preset="ulysses")
    plan = plan_for(run, 4, tmp_path)
    high, low = plan.dims.groups
    assert (high.ranks, high.ulysses, low.ranks, low.ulysses) == ([1, 2], 2, [3], 1)
    assert plan.ranks[0].components == ("text_encoder", "vae")


@pytest.mark.parametrize("world, parallel, fragments", [
    (1, {}, ("parallel.expert_split=True", "at least 2 DiT ranks")),
    (2, {"stage_split": True}, ("parallel.expert_split=True", "at least 2 DiT ranks")),
    (3, {"expert_ranks": [2, 2]}, ("parallel.expert_ranks=[2, 2]", "sum to the 3 DiT ranks")),
    (3, {"expert_ranks": [3, 0]}, ("parallel.expert_ranks=[3, 0]", "two positive rank counts")),
    (3, {"expert_ranks": [1, 2], "cfg_degree": 2}, ("parallel.cfg_degree=2", "high-noise expert's group of 1")),
])
def test_bad_splits_refused_in_one_line(tmp_path, family_folders, world, parallel, fragments):
    with pytest.raises(ConfigError) as info:
        plan_for(split_run(family_folders["moe_t2v"], **parallel), world, tmp_path)
    message = str(info.value)
    assert "\n" not in message and all(f in message for f in fragments), message


def test_one_expert_model_refused(t2v_folder):
    run = split_run(t2v_folder)
    run.guidance_scale_2 = None
    with pytest.raises(ConfigError, match=r"parallel\.expert_split=True is not allowed: false: only a two-expert"):
        validate_run(run)


@pytest.mark.parametrize("parallel, fragment", [
    ({"fsdp": "true"}, "parallel.fsdp='true' is not allowed"),
    ({"vae_decode": "patch"}, "parallel.vae_decode='patch' is not allowed"),
    ({"expert_split": False, "expert_ranks": [1, 1]}, "parallel.expert_ranks=[1, 1] is not allowed: unset without"),
])
def test_options_that_do_not_go_with_the_split(family_folders, parallel, fragment):
    with pytest.raises(ConfigError) as info:
        validate_run(split_run(family_folders["moe_t2v"], **parallel))
    assert fragment in str(info.value)


def test_a_split_where_one_expert_runs_no_step(tmp_path, family_folders):
    run = split_run(family_folders["moe_t2v"])
    run.steps = 1  # one step, at timestep 999: the high-noise expert's
    with pytest.raises(ConfigError, match="the low-noise expert runs no step"):
        plan_for(run, 2, tmp_path)


@pytest.mark.parametrize("name", ["expert_split", "expert_split_cfg"])
def test_expert_layouts_pin_two_equal_groups(name):
    """`+layout=expert_split...` pins the degrees, so each group is their product and the launcher knows
    the world size before the model's steps are counted."""
    from wan_dist.config.schema import ParallelConfig
    from wan_dist.parallel.dims import pinned_world_size, resolve_parallel_dims
    from wan_dist.config.presets import LAYOUTS

    layout = LAYOUTS[name]
    p = ParallelConfig(**layout.hydra_node()["parallel"])
    assert pinned_world_size(p) == layout.world_size
    dims = resolve_parallel_dims(p, world_size=layout.world_size, num_heads=8, guidance_scale=5.0,
                                 expert_steps=(3, 1))
    assert [g.size for g in dims.groups] == [layout.world_size // 2] * 2
