"""Which layout fits a GPU: the planner's steps, tried in order on the plan's memory model, each only if
the previous one does not fit. `build_plan` runs it for a CUDA device with the ranks' least free memory
(parallel=auto and every key left open), launch/plan.py for GPUs it imagines.

The steps, each applied only where the user left its keys open: the layout as given (`parallel=auto`:
cfg when guided, then the sequence axes), unsharded; the DiT sharded over the DiT ranks (FSDP2); also the
VAE decode in bands over every rank; all ranks on the sequence axes (usp) instead of a cfg axis, sharded,
with the bands; a stage split (the VAE alone on rank 0) with the DiT sharded; usp with the DiT's blocks
streamed from host memory (block offload, slower but lossless). fp8 storage is lossy, so never a step: it
is only named when nothing else would fit.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import RunConfig
from .errors import ConfigError
from .sampling import named_keys

if TYPE_CHECKING:
    from .plan import JobPlan

# Of the memory a GPU has free when the run starts; the rest for the allocator's fragmentation and the
# kernels' workspaces.
USABLE = 0.9
# What the planner may add, in order, when the user left the keys open: (keys it sets, overrides).
STEPS: tuple[tuple[tuple[str, ...], tuple[str, ...]], ...] = (
    ((), ()),
    (("parallel.fsdp",), ("parallel.fsdp=true",)),
    (("parallel.fsdp", "parallel.vae_decode"), ("parallel.fsdp=true", "parallel.vae_decode=patch")),
    # Every rank on the sequence instead of a cfg axis: each holds 1/W of the tokens' activations.
    (("parallel", "parallel.cfg_degree", "parallel.fsdp", "parallel.vae_decode"),
     ("parallel=usp", "parallel.fsdp=true", "parallel.vae_decode=patch")),
    (("parallel", "parallel.stage_split", "parallel.fsdp"), ("parallel=stage_split", "parallel.fsdp=true")),
    # Last: the DiT's blocks streamed from host memory (slower, still lossless).
    (("parallel", "parallel.cfg_degree", "model.dit_offload", "parallel.vae_decode"),
     ("parallel=usp", "model.dit_offload=block", "parallel.vae_decode=patch")),
)
# Named only when no lossless step fits.
FP8 = "model.dit_storage_dtype=fp8_e4m3"
# How many times the world size a refusal looks for more GPUs that would fit.
MORE_GPUS = (2, 4, 8)

Build = Callable[[RunConfig, int], "JobPlan"]


@dataclass(frozen=True)
class Choice:
    """The planner's pick: the overrides it added, the plan they give (the last tried when none fits,
    None when no step applied) and whether it fits."""

    added: tuple[str, ...]
    plan: "JobPlan | None"
    fits: bool


def _value(run: RunConfig, key: str) -> object:
    node: object = run
    for part in key.split("."):
        node = getattr(node, part)
    return node.preset if key == "parallel" else node  # type: ignore[attr-defined]


def given_keys(run: RunConfig, overrides: Collection[str] = ()) -> frozenset[str]:
    """The planner's keys the user set: named in `overrides` (Hydra's `key=value`, even to a default
    value) or holding something other than the schema's default (a config file set it)."""
    named = named_keys(overrides)
    default = RunConfig()
    keys = {key for step_keys, _ in STEPS for key in step_keys} | {FP8.split("=")[0]}
    return frozenset(named | {key for key in keys if _value(run, key) != _value(default, key)})


def apply(run: RunConfig, overrides: Collection[str]) -> RunConfig:
    """A copy of `run` with the planner's overrides set (`parallel=<preset>` picks a parallel preset)."""
    run = copy.deepcopy(run)
    for override in overrides:
        key, value = override.split("=", 1)
        *path, name = ("parallel.preset" if key == "parallel" else key).split(".")
        node: object = run
        for part in path:
            node = getattr(node, part)
        setattr(node, name, value)
    return run


def fits(plan: "JobPlan", memory_bytes: int) -> bool:
    return max(memory.peak for memory in plan.memory) <= USABLE * memory_bytes


def choose(run: RunConfig, *, given: Collection[str], world_size: int, memory_bytes: int, build: Build) -> Choice:
    """The first step that fits on `world_size` GPUs of `memory_bytes` each. The run as given must plan
    (its ConfigError is the user's); a later step whose plan is refused (sharding with one DiT rank, more
    bands than latent rows) does not apply here."""
    tried = Choice((), None, False)
    for keys, extra in STEPS:
        if any(key in given for key in keys):
            continue
        try:
            plan = build(apply(run, extra), world_size)
        except ConfigError:
            if not extra:
                raise
            continue
        tried = Choice(extra, plan, fits(plan, memory_bytes))
        if tried.fits:
            break
    return tried


def refusal(run: RunConfig, choice: Choice, *, given: Collection[str], world_size: int, memory_bytes: int,
            build: Build) -> str:
    """One line: what was tried and its peak, then the smallest change that would fit: a lossless key the
    user pinned, left to the planner; more GPUs; fp8 storage (lossy)."""
    gib = 2**30
    setting = f"model={run.model.preset} at {run.height}x{run.width}x{run.num_frames}, parallel={run.parallel.preset}"
    where = f"{world_size} GPU(s) with {memory_bytes / gib:.2f} GiB free"
    if choice.plan is None:
        said = "no layout applies"
    else:
        peaks = [m.peak for m in choice.plan.memory]
        worst = max(range(len(peaks)), key=peaks.__getitem__)
        said = (f"the last layout tried ({choice.plan.dims.describe()}{', ' if choice.added else ''}"
                f"{' '.join(choice.added)}) peaks at {peaks[worst] / gib:.2f} GiB on rank {worst}, above "
                f"{USABLE * memory_bytes / gib:.2f} GiB ({USABLE:.0%} of the free memory)")

    def fitting(candidate: RunConfig, keys: Collection[str], size: int) -> Choice | None:
        try:
            found = choose(candidate, given=keys, world_size=size, memory_bytes=memory_bytes, build=build)
        except ConfigError:  # e.g. a degree the larger world does not divide
            return None
        return found if found.fits else None

    options = []
    for key in ("parallel.fsdp", "model.dit_offload", "parallel.vae_decode", "parallel"):
        freed = fitting(run, set(given) - {key}, world_size) if key in given else None
        if freed:
            options.append(f"with {' '.join(freed.added)}")
            break
    if not options:
        more = next((world_size * times for times in MORE_GPUS if fitting(run, given, world_size * times)), None)
        if more:
            options.append(f"on {more} such GPUs")
    fp8 = fitting(apply(run, [FP8]), given, world_size) if FP8.split("=")[0] not in given else None
    if fp8:
        options.append(f"with {' '.join((FP8, *fp8.added))} (lossy: changes the output)")
    remedy = f"it would fit {' or '.join(options)}" if options else \
        "no layout, GPU count or storage dtype the planner knows fits: a GPU with more memory"
    return f"{setting} does not fit {where}: {said}; {remedy}"
