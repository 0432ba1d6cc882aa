"""Which layout fits a GPU: the planner's steps, tried in order on the plan's memory model, each only if
the previous one does not fit. `plan_run` runs it for a CUDA device with the ranks' least free memory,
launch/plan.py for GPUs it imagines.

The steps, each applied only where the user left its keys open: the layout as given (`parallel=auto`:
cfg when guided, then the sequence axes), unsharded; the DiT sharded over the DiT ranks (FSDP2); also the
VAE decode in bands over every rank; all ranks on the sequence axes (usp) instead of a cfg axis, sharded,
with the bands; a stage split (the VAE alone on rank 0) with the DiT sharded; usp with the DiT's blocks
streamed from host memory (block offload, slower but lossless). fp8 storage is lossy, so never a step: it
is only named when nothing else would fit.

Every candidate is `resolve`d from the same Inputs: no file is read and no rank is asked again.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, replace

from ..config.schema import RunConfig
from ..config.errors import ConfigError
from .inputs import Inputs
from .job import JobPlan, resolve
from .sampling import named_keys

# Of the memory a GPU has free when the run starts; the rest for the allocator's fragmentation and the
# kernels' workspaces.
USABLE = 0.9
# How many times the world size a refusal looks for more GPUs that would fit.
MORE_GPUS = (2, 4, 8)


@dataclass(frozen=True)
class Step:
    """One edit the planner may make to a run: the values it sets (None: left as the run has it), and
    `keys`, the keys that, when the user set any of them, rule the step out (a preset also stands for the
    degrees it would fill)."""

    keys: tuple[str, ...] = ()
    parallel: str | None = None  # a parallel preset
    fsdp: str | None = None
    dit_offload: str | None = None
    vae_decode: str | None = None
    dit_storage_dtype: str | None = None

    def _set(self) -> list[tuple[str, str, str]]:
        """(config section, field, value) of each value the step sets, in the order its overrides read."""
        return [(section, name, getattr(self, attr)) for attr, section, name in _STEP_FIELDS
                if getattr(self, attr) is not None]

    def apply(self, run: RunConfig) -> RunConfig:
        """A copy of `run` with this step's values (`parallel`: the preset only, the degrees as they were)."""
        edits: dict[str, dict[str, str]] = {"parallel": {}, "model": {}}
        for section, name, value in self._set():
            edits[section][name] = value
        return replace(run, **{section: replace(getattr(run, section), **values) for section, values in edits.items()})

    @property
    def overrides(self) -> tuple[str, ...]:
        """The step as the overrides a user would type for it (the plan table, plan.json, refusals)."""
        return tuple(f"{section if name == 'preset' else f'{section}.{name}'}={value}"
                     for section, name, value in self._set())


# Each Step field: the config section and field it sets (`parallel.preset` is typed `parallel=`).
_STEP_FIELDS = (("dit_storage_dtype", "model", "dit_storage_dtype"), ("parallel", "parallel", "preset"),
                ("fsdp", "parallel", "fsdp"), ("dit_offload", "model", "dit_offload"),
                ("vae_decode", "parallel", "vae_decode"))


# What the planner may add, in order, when the user left the keys open.
STEPS: tuple[Step, ...] = (
    Step(),
    Step(("parallel.fsdp",), fsdp="true"),
    Step(("parallel.fsdp", "parallel.vae_decode"), fsdp="true", vae_decode="patch"),
    # Every rank on the sequence instead of a cfg axis: each holds 1/W of the tokens' activations.
    Step(("parallel", "parallel.cfg_degree", "parallel.fsdp", "parallel.vae_decode"),
         parallel="usp", fsdp="true", vae_decode="patch"),
    Step(("parallel", "parallel.stage_split", "parallel.fsdp"), parallel="stage_split", fsdp="true"),
    # Last: the DiT's blocks streamed from host memory (slower, still lossless).
    Step(("parallel", "parallel.cfg_degree", "model.dit_offload", "parallel.vae_decode"),
         parallel="usp", dit_offload="block", vae_decode="patch"),
)
# Named only when no lossless step fits.
FP8 = Step(("model.dit_storage_dtype",), dit_storage_dtype="fp8_e4m3")


@dataclass(frozen=True)
class Choice:
    """The planner's pick: the overrides it added, the plan they give (the last tried when none fits,
    None when no step applied) and whether it fits."""

    added: tuple[str, ...]
    plan: JobPlan | None
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
    keys = {key for step in (*STEPS, FP8) for key in step.keys}
    return frozenset(named | {key for key in keys if _value(run, key) != _value(default, key)})


def fits(plan: JobPlan, memory_bytes: int) -> bool:
    return max(memory.peak for memory in plan.memory) <= USABLE * memory_bytes


def choose(run: RunConfig, inputs: Inputs, *, given: Collection[str], world_size: int,
           memory_bytes: int) -> Choice:
    """The first step that fits on `world_size` GPUs of `memory_bytes` each. The run as given must plan
    (its ConfigError is the user's); a later step whose plan is refused (sharding with one DiT rank, more
    bands than latent rows) does not apply here."""
    tried = Choice((), None, False)
    for step in STEPS:
        if any(key in given for key in step.keys):
            continue
        try:
            plan = resolve(step.apply(run), inputs, world_size)
        except ConfigError:
            if step == Step():
                raise
            continue
        tried = Choice(step.overrides, plan, fits(plan, memory_bytes))
        if tried.fits:
            break
    return tried


def fit(run: RunConfig, inputs: Inputs, world_size: int, given: Collection[str] | None = None) -> JobPlan:
    """The plan of the first step that fits the device's free memory (inputs.device: the least of any
    rank's), with what it added; or a ConfigError naming the smallest change that would fit. `given`: the
    planner's keys the user set (given_keys of the overrides prepare was given, unless stated)."""
    keys = given_keys(run, inputs.overrides) if given is None else frozenset(given)
    memory = inputs.device.memory_bytes
    choice = choose(run, inputs, given=keys, world_size=world_size, memory_bytes=memory)
    if not choice.fits:
        raise ConfigError(refusal(run, inputs, choice, given=keys, world_size=world_size, memory_bytes=memory))
    return replace(choice.plan, added=choice.added)


def plan_run(run: RunConfig, inputs: Inputs, world_size: int, given: Collection[str] | None = None) -> JobPlan:
    """The plan a run gets: on a GPU the planner fills what the user left open (`parallel=auto` and every
    key not given) to fit the free memory; elsewhere the run as it is (the planner never shards or
    offloads on a CPU)."""
    if inputs.device.type == "cuda":
        return fit(run, inputs, world_size, given)
    return resolve(run, inputs, world_size)


def refusal(run: RunConfig, inputs: Inputs, choice: Choice, *, given: Collection[str], world_size: int,
            memory_bytes: int) -> str:
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
            found = choose(candidate, inputs, given=keys, world_size=size, memory_bytes=memory_bytes)
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
    fp8 = fitting(FP8.apply(run), given, world_size) if not set(FP8.keys) & set(given) else None
    if fp8:
        options.append(f"with {' '.join((*FP8.overrides, *fp8.added))} (lossy: changes the output)")
    remedy = f"it would fit {' or '.join(options)}" if options else \
        "no layout, GPU count or storage dtype the planner knows fits: a GPU with more memory"
    return f"{setting} does not fit {where}: {said}; {remedy}"
