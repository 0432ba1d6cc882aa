"""The sampling settings of a run, each resolved from one source, with the source recorded.

The rule: a key the user sets (on the command line, or in a config file such as an experiment) wins; else
the model preset the user chose explicitly (`model=<name>`); else the model folder, as diffusers' own
pipeline reads it (the scheduler config's class and flow shift); else the library default. A run given
only `model.path=` so samples as diffusers' pipeline samples that folder, not as the default preset would.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..config.schema import ModelConfig, RunConfig
from ..config.presets import MODEL_PRESETS, Sampling

# What the folder's scheduler config names, as our `scheduler=` choices, and where each keeps Wan's shift.
SCHEDULER_CLASSES = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler"}
SHIFT_KEYS = {"unipc": "flow_shift", "euler": "shift"}
SCHEDULER_CONFIG = "scheduler/scheduler_config.json"
DEFAULT_SCHEDULER = RunConfig.scheduler
# Every key resolved here: the preset's sampling fields, and the scheduler.
SAMPLING_KEYS = (*(f.name for f in fields(Sampling)), "scheduler")
USER, DEFAULT, DRAWN = "user", "default", "drawn"


@dataclass
class SamplingPlan(Sampling):
    """The resolved sampling settings, the seed, and per key where its value came from (a plan's part: not
    changed once resolved)."""

    scheduler: str = DEFAULT_SCHEDULER
    seed: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def expert_guidance(self) -> tuple[float, float]:
        """Each expert's guidance scale, the high-noise expert's first: the low-noise one takes
        guidance_scale_2 where set (a one-expert model uses the first)."""
        return self.guidance_scale, self.guidance_scale if self.guidance_scale_2 is None else self.guidance_scale_2

    def describe(self) -> str:
        """One line for the plan table: what is not the library default says where it came from."""
        def said(key: str, text: str) -> str:
            source = self.sources[key]
            return text if source == DEFAULT else f"{text} ({source})"

        guidance = said("guidance_scale", f"guidance {self.guidance_scale:g}") + (
            "" if self.guidance_scale_2 is None else said("guidance_scale_2", f" / {self.guidance_scale_2:g}"))
        return ", ".join([
            said("height", f"{self.height}x{self.width}x{self.num_frames}"), said("steps", f"{self.steps} steps"),
            said("scheduler", self.scheduler), said("flow_shift", f"shift {self.flow_shift:g}"), guidance,
            said("seed", f"seed {self.seed}")])

    def to_json(self) -> dict[str, Any]:
        values = {k: v for k, v in asdict(self).items() if k != "sources"}
        return {key: {"value": value, "source": self.sources[key]} for key, value in values.items()}


def read_scheduler_config(folder: Path) -> dict[str, Any] | None:
    """The folder's scheduler config, or None for a folder without one (such as a shapes-only planning
    folder)."""
    path = folder / SCHEDULER_CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def folder_sampling(scheduler_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """What a diffusers-format folder says of its own sampling, from its scheduler config: the scheduler
    it names, and that scheduler's flow shift."""
    config = scheduler_config or {}
    kind = SCHEDULER_CLASSES.get(config.get("_class_name", ""))
    if kind is None:
        return {}
    said: dict[str, Any] = {"scheduler": kind}
    if config.get(SHIFT_KEYS[kind]) is not None:
        said["flow_shift"] = float(config[SHIFT_KEYS[kind]])
    return said


def named_keys(overrides: Collection[str]) -> frozenset[str]:
    """The keys of Hydra overrides (`key=value`, `+key=value`, `~key`), even those set to a default value."""
    return frozenset(o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o)


def resolve_sampling(run: RunConfig, *, preset: str, given: Collection[str],
                     scheduler_config: Mapping[str, Any] | None, seed: int, drawn: bool = False) -> SamplingPlan:
    """`run`'s sampling keys resolved by the rule above. `preset`: the run's model preset; `given`: the
    Hydra overrides the user typed (a key not named there counts as set when it differs from what the
    preset puts there, so a config file set it); `scheduler_config`: the folder's (read_scheduler_config);
    `seed`: the agreed seed, `drawn` when the user asked for a random one."""
    named = named_keys(given)
    chosen = preset if {"model", "model.preset"} & named or preset != ModelConfig.preset else None
    baseline = {**asdict(MODEL_PRESETS[preset].sampling), "scheduler": DEFAULT_SCHEDULER}
    from_folder = folder_sampling(scheduler_config)
    values, sources = {}, {}
    for key in SAMPLING_KEYS:
        value = getattr(run, key)
        if key in named or value != baseline[key]:
            source = USER
        elif chosen is not None:
            source = f"preset {chosen}"
        elif key in from_folder:
            value, source = from_folder[key], f"folder {SCHEDULER_CONFIG}"
        else:
            source = DEFAULT
        values[key], sources[key] = value, source
    sources["seed"] = DRAWN if drawn else USER if "seed" in named or run.seed != RunConfig.seed else DEFAULT
    return SamplingPlan(**values, seed=seed, sources=sources)
