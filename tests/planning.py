"""A run's plan in one process, as launch/generate.py makes it on one rank: prepare, then resolve (or the
planner, on a GPU the test imagines)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from wan_dist.config.schema import RunConfig
from wan_dist.plan.inputs import DeviceFacts, prepare
from wan_dist.plan.job import JobPlan
from wan_dist.plan.planner import plan_run

CPU = DeviceFacts("cpu")


def plan_of(run: RunConfig, world_size: int, out_dir: str | Path, *, device: DeviceFacts = CPU,
            given: Collection[str] = ()) -> JobPlan:
    inputs = prepare(run, device, given=given, out_dir=out_dir, world_size=world_size)
    return plan_run(run, inputs, world_size)
