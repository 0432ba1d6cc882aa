"""One generation run on every rank: its plan (prepare over the ranks, then resolve or the planner), the
plan's stages for this rank, run to the end, then the report.

What each rank does is its RankPlan's fields (plan/job.py): rank 0 encodes, hands over and writes; a VAE rank
decodes (or encodes the I2V condition) whole or a band; a DiT rank runs its group's experts over its
group's steps, on the groups the World (parallel/world.py) built.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..config.schema import RunConfig
from ..plan.inputs import Agreement, DeviceFacts, prepare
from .metrics import RankMetrics
from ..plan.job import BAND, JobPlan, expert_groups_json
from ..plan.planner import plan_run
from ..parallel.session import Session
from ..parallel.handoff import Handoff
from .stages import DitStage, EncoderStage, VaeWork, run_stages
from ..plan.outputs import write_json
from ..parallel.world import build_world

log = logging.getLogger(__name__)


def plan_job(run: RunConfig, session: Session, *, given: Collection[str] = (),
             out_dir: str | Path | None = None) -> JobPlan:
    """`run`'s plan on every rank of `session`, alike: its Inputs agreed over the ranks (rank 0 finds out
    what only it can), then planned for the session's world. `given`: the Hydra overrides the user typed;
    `out_dir`: where the outputs go when `output.dir` is unset (rank 0's is the one)."""
    agreement = Agreement(first=lambda find: session.agree(find() if session.rank == 0 else None),
                          least=session.least)
    inputs = prepare(run, DeviceFacts.of(session.device), agreement, given=given, out_dir=out_dir,
                     world_size=session.world_size)
    return plan_run(run, inputs, session.world_size)


def generate(plan: JobPlan, session: Session) -> dict[str, Any] | None:
    """Run the whole job: build the World, run what this rank's RankPlan lists, report. Returns run.json's
    content on rank 0, None elsewhere."""
    start = time.perf_counter()
    rank, device = session.rank, session.device
    work = plan.ranks[rank]
    # Collective: every rank builds every group, also those it is not part of; they start together,
    # whatever planning took on each, so that the timeout bounds only the creation.
    session.meet("groups")
    world = build_world(plan.dims, plan.dims.hops, rank=rank, device=device, timeout_s=session.timeout_s,
                        fsdp=plan.fsdp, vae_ranks=plan.components["vae"].ranks)
    handoff = Handoff(world, device, peers=session.peers)
    metrics = RankMetrics(rank=rank, role=work.role, device=str(device))
    vae = VaeWork(plan, session, metrics, world.vae_group) if "vae" in work.weight_bytes else None
    # I2V: the condition encode, on rank 0 or in bands over every rank, before anything else runs.
    condition = vae.image_condition() if work.condition is not None else None
    encoder = EncoderStage(plan, session, handoff, metrics, vae, condition) if work.encodes else None
    band_decoder = vae if work.decode == BAND and not work.encodes else None
    dit = DitStage(plan, session, handoff, metrics, world, band_decoder) if work.dit is not None else None
    if encoder is not None:
        encoder.start()
    try:
        run_stages([stage for stage in (encoder, dit) if stage is not None])
        handoff.finish()
    finally:
        if encoder is not None:
            encoder.close()
    metrics.timings["total_s"] = time.perf_counter() - start
    snapshots = session.gather_to_zero(metrics.snapshot(device))
    if rank != 0:
        return None
    report = _report(plan, session, snapshots, encoder.videos)
    write_json(report, plan.out_dir / "run.json")
    t = report["timings"]
    peak = max(m["peak_bytes"] for m in report["memory"]) / 2**30
    log.info("done: %d video(s) in %.1f s (load %.1f, encode %.1f, denoise %.1f, decode %.1f); max peak %.2f GiB "
             "per rank; details in %s", len(encoder.videos), t["total_s"], t["load_s"], t["encode_s"],
             t["denoise_s"], t["decode_s"], peak, plan.out_dir / "run.json")
    return report


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"wan_dist": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _report(plan: JobPlan, session: Session, snapshots: list[dict], videos: list[dict]) -> dict[str, Any]:
    dims = plan.dims
    # Each DiT group's leader timed its steps; under an expert split the groups run a video's steps one
    # after the other (and different videos at once): a video's steps are both groups', and denoise_s is
    # the sum of the groups' denoising time.
    leaders = [snapshots[group.leader] for group in dims.groups]
    zero = snapshots[0]
    steps = [[s for group_steps in video for s in group_steps]
             for video in zip(*(leader["step_seconds"] for leader in leaders))]
    timings = {
        "load_s": max(s["timings"].get("load_s", 0.0) for s in snapshots),
        "encode_s": zero["timings"].get("encode_s", 0.0),
        "denoise_s": sum(leader["timings"].get("denoise_s", 0.0) for leader in leaders),
        "steps_s": steps[0] if len(steps) == 1 else steps,
        "decode_s": zero["timings"].get("decode_s", 0.0),
        "write_s": zero["timings"].get("write_s", 0.0),
        "total_s": max(s["timings"].get("total_s", 0.0) for s in snapshots),
    }
    return {
        "config": plan.resolved_config(),
        "plan": plan.to_json(),
        "world_size": session.world_size,
        "backend": session.backend,
        "mesh": {"cfg": dims.cfg, "ring": dims.ring, "ulysses": dims.ulysses, "stage_split": dims.stage_split,
                 "dit_ranks": dims.dit_ranks, "describe": dims.describe(), **expert_groups_json(dims)},
        "versions": _versions(),
        "timings": timings,
        "memory": [{k: v for k, v in s.items() if k not in ("timings", "step_seconds")} for s in snapshots],
        "rank_timings": [s["timings"] for s in snapshots],
        "videos": videos,
    }
