"""The planner (wan_dist/plan/planner.py) as `parallel=auto` runs it on a GPU, here one the plan imagines (this
machine has none): the 1.3B architecture from its shapes-only folder, at a small size so that its 2.8 GB
of bf16 weights are most of a rank's memory."""

from __future__ import annotations

import pytest

from tests.planning import plan_of
from wan_dist.wan.building import ensure_shapes_folder
from wan_dist.config.schema import RunConfig
from wan_dist.config.errors import ConfigError
from wan_dist.plan.inputs import Agreement, DeviceFacts, prepare
from wan_dist.plan.job import JobPlan, resolve
from wan_dist.plan.planner import FP8, STEPS, USABLE, Step, given_keys, plan_run


@pytest.fixture(scope="module")
def run() -> RunConfig:
    run = RunConfig()
    run.model.preset, run.model.path = "t2v_1_3b", str(ensure_shapes_folder("t2v_1_3b"))
    run.height, run.width, run.num_frames, run.guidance_scale = 128, 224, 9, 5.0
    return run


def gpu(gib: float) -> DeviceFacts:
    return DeviceFacts("cuda", (9, 0), int(gib * 2**30))


def plan(run: RunConfig, tmp_path, *, world_size: int, gib: float, given: list[str] = ()) -> JobPlan:
    return plan_of(run, world_size, tmp_path, device=gpu(gib), given=given)


def room(peak: float) -> float:
    """GiB of a GPU whose usable share just holds `peak` GiB (a KiB more: the byte counts are whole)."""
    return peak / USABLE + 2**-20


def peak_gib(plan_: JobPlan) -> float:
    return max(m.peak for m in plan_.memory) / 2**30


def step_peak(run: RunConfig, tmp_path, step: Step, world_size: int) -> float:
    """The peak of `step`'s layout as it is, the planner not asked."""
    edited = step.apply(run)
    return peak_gib(resolve(edited, prepare(edited, gpu(1e4), out_dir=tmp_path), world_size))


def test_auto_takes_the_first_step_that_fits(run, tmp_path):
    replica, sharded = (step_peak(run, tmp_path, STEPS[i], 2) for i in (0, 1))
    assert sharded < replica
    roomy = plan(run, tmp_path, world_size=2, gib=room(replica))
    assert roomy.added == () and not roomy.fsdp and roomy.dims.cfg == 2
    tight = plan(run, tmp_path, world_size=2, gib=room(sharded))
    assert tight.added == ("parallel.fsdp=true",) and tight.fsdp
    # The dry run shows what was added, and plan.json carries it.
    assert "added to fit the device: parallel.fsdp=true" in tight.table()
    assert tight.to_json()["layout"]["added"] == ["parallel.fsdp=true"]


def test_settings_given_are_kept(run, tmp_path):
    sharded = step_peak(run, tmp_path, STEPS[1], 2)
    pinned = plan(run, tmp_path, world_size=2, gib=room(sharded), given=["parallel.fsdp=false"])
    # Every sharding step skipped: the blocks streamed from host memory instead.
    assert pinned.added == STEPS[-1].overrides and not pinned.fsdp and pinned.components["dit"].offload
    # A value that differs from the schema's default counts as given, wherever it was set.
    offload_off = Step(dit_offload="none", vae_decode="patch").apply(run)
    assert given_keys(offload_off) == {"parallel.vae_decode"}
    assert given_keys(offload_off, ["model.dit_offload=none"]) == {"parallel.vae_decode", "model.dit_offload"}


def test_nothing_fits_names_the_change_that_would(run, tmp_path):
    sharded = step_peak(run, tmp_path, STEPS[1], 2)
    with pytest.raises(ConfigError) as error:
        plan(run, tmp_path, world_size=2, gib=room(sharded), given=["parallel.fsdp=false", "model.dit_offload=none"])
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("model=t2v_1_3b at 128x224x9, parallel=auto does not fit 2 GPU(s) with ")
    assert "it would fit with parallel.fsdp=true" in message


def test_more_gpus_or_fp8_named_when_no_layout_fits(run, tmp_path):
    offload_2 = step_peak(run, tmp_path, STEPS[-1], 2)
    offload_1 = step_peak(run, tmp_path, STEPS[-1], 1)
    fp8_offload_1 = step_peak(FP8.apply(run), tmp_path, STEPS[-1], 1)
    assert offload_2 < fp8_offload_1 < offload_1
    with pytest.raises(ConfigError) as error:
        plan(run, tmp_path, world_size=1, gib=room(fp8_offload_1))
    message = str(error.value)
    assert "it would fit on 2 such GPUs or with model.dit_storage_dtype=fp8_e4m3 parallel=usp " \
        "model.dit_offload=block parallel.vae_decode=patch (lossy: changes the output)" in message, message


def test_every_rank_plans_for_the_least_free_memory(run, tmp_path):
    """Rank 0 has room for a replica, rank 1 only for a shard: both plan the sharded layout, which rank 0's
    memory alone would not have chosen."""
    replica, sharded = (step_peak(run, tmp_path, STEPS[i], 2) for i in (0, 1))
    free = [int(room(replica) * 2**30), int(room(sharded) * 2**30)]

    def plan_on(rank: int) -> JobPlan:
        own = DeviceFacts("cuda", (9, 0), free[rank])
        agreement = Agreement(least=lambda value: min(value, *(f for r, f in enumerate(free) if r != rank)))
        return plan_run(run, prepare(run, own, agreement, out_dir=tmp_path, world_size=2), 2)

    plans = [plan_on(rank) for rank in (0, 1)]
    assert all(p.added == ("parallel.fsdp=true",) and p.fsdp for p in plans)
    assert plans[0].to_json() == plans[1].to_json()
    assert not plan(run, tmp_path, world_size=2, gib=free[0] / 2**30).fsdp
