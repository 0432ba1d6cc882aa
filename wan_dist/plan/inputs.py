"""What a run's plan is made from, found out once before anything is planned: `prepare` is the only place
with collectives and file reads before loading.

It agrees the seed and the output dir over the ranks, finds out on rank 0 whether the outputs can be
written, finds (or on first use builds) the model folder, reads every fact of the model the plan needs
(each component's config and safetensors header table, the layers layerwise casting would store in fp8,
the scheduler config), takes the device facts with the least free memory of any rank, and validates the
run. What it returns, `Inputs`, is a value: `resolve` (plan/job.py) and the planner (plan/planner.py) plan from it
alone, as often as they like, without a file or a collective.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from ..parallel.attention import device_capability, installed_kernel_libraries
from ..wan.building import dit_num_heads, model_folder
from .checks import LoraLayers, RunFacts, read_lora_layers, read_prompts, validate_run
from ..config.schema import RunConfig
from ..config.errors import ConfigError
from ..wan.loading import WeightTable, cpu_flags, layerwise_cast_names, read_component_config, read_weight_table
from ..parallel.dims import check_expert_split, resolve_parallel_dims
from ..config.presets import EXPERTS, IMAGE_TASKS
from .sampling import read_scheduler_config

# Where each component's weights live in a diffusers-format folder.
SUBFOLDERS = {**{expert.component: expert.subfolder for expert in EXPERTS}, "vae": "vae",
              "text_encoder": "text_encoder", "image_encoder": "image_encoder"}
# The DiT components: the one DiT, or a two-expert model's high-noise and low-noise experts.
EXPERT_COMPONENTS = tuple(expert.component for expert in EXPERTS)


@dataclass(frozen=True)
class DeviceFacts:
    """What the plan needs to know of the device: its kind, its compute capability (CUDA) and the memory
    free for the run. Read from the device a run has; stated for a device a planner only imagines
    (launch/plan.py)."""

    type: str
    capability: tuple[int, int] | None = None
    memory_bytes: int | None = None

    @staticmethod
    def of(device: torch.device) -> "DeviceFacts":
        if device.type != "cuda":
            return DeviceFacts(device.type)
        return DeviceFacts("cuda", device_capability(device), torch.cuda.mem_get_info(device)[0])


def _call(find: Callable[[], Any]) -> Any:
    return find()


def _identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Agreement:
    """How the ranks come to one value. `first(find)`: `find` runs on rank 0 only (what only rank 0 can
    find out: the output dir it will write, the model it builds on first use) and its result comes back on
    every rank (the session's broadcast, which also makes the others wait for it); `least(value)`: the
    smallest of the ranks' values (the session's all-reduce). The default is one process's: it calls
    `find` and keeps its own value."""

    first: Callable[[Callable[[], Any]], Any] = _call
    least: Callable[[int], int] = _identity


def agreed_device_facts(own: DeviceFacts, *, agree: Callable[[Any], Any],
                        least: Callable[[int], int]) -> DeviceFacts:
    """The facts every rank plans with, from each rank's `own`: rank 0's device kind and capability, and
    the least free memory of any rank (`least`: the minimum over the ranks), since one layout is planned
    for all of them and it must fit the rank with the least room (another process may hold memory on
    one GPU only)."""
    agreed = agree(own)
    if agreed.memory_bytes is None:
        return agreed
    return replace(agreed, memory_bytes=least(own.memory_bytes))


@dataclass(frozen=True)
class ModelFacts:
    """Everything the plan reads of a model folder, read once (configs and safetensors headers, never a
    tensor). Never mutated."""

    folder: Path
    family: str
    task: str  # the run's: TI2V's is i2v or t2v by whether an image is given
    boundary_ratio: float | None  # two-expert models: where the low-noise expert takes over
    # "vae" and each expert ("dit", "dit_2": SUBFOLDERS' names) -> its config.json.
    configs: Mapping[str, dict[str, Any]]
    # Each component the run holds -> its safetensors header table (block and root bytes come from it).
    weights: Mapping[str, WeightTable]
    # Each expert -> the parameters layerwise casting stores in fp8 (model.dit_storage_dtype).
    cast_names: Mapping[str, frozenset[str]]
    scheduler_config: Mapping[str, Any] | None  # None: the folder has none

    @property
    def experts(self) -> tuple[str, ...]:
        return tuple(name for name in EXPERT_COMPONENTS if name in self.configs)


@dataclass(frozen=True)
class Inputs:
    """A run's facts, agreed over the ranks: the model's, the device's (the least free memory of any
    rank), this host's kernel libraries and CPU flags, the seed, the output dir, the prompts and LoRAs
    as read, and the Hydra overrides the user typed (sampling and the planner keep what the user set)."""

    model: ModelFacts
    device: DeviceFacts
    out_dir: Path
    seed: int
    overrides: tuple[str, ...]
    prompts: tuple[str, ...]
    loras: tuple[LoraLayers, ...]
    kernel_libraries: frozenset[str]
    cpu_flags: frozenset[str]


def prepare(run: RunConfig, device: DeviceFacts, agreement: Agreement = Agreement(), *,
            given: Collection[str] = (), out_dir: str | Path | None = None, world_size: int | None = None) -> Inputs:
    """`run`'s Inputs. Called on every rank with the same arguments; raises ConfigError on every rank
    alike. `device`: this rank's own facts (agreed here); `given`: the Hydra overrides the user typed;
    `out_dir`: the output dir where `output.dir` is unset (Hydra's run dir), rank 0's being the one;
    `world_size`: the world the run starts in, so that a layout it cannot take is refused before a built
    preset is built (unset where several worlds are planned, launch/plan.py)."""
    # seed=-1 draws one; every rank must draw the same noise, so rank 0's draw is used.
    seed = agreement.first(lambda: run.seed if run.seed >= 0 else secrets.randbelow(2**31))
    chosen = agreement.first(lambda: run.output.dir or out_dir)
    if chosen is None:
        raise ValueError("prepare needs an output dir: output.dir, or out_dir")
    out = Path(chosen)
    agreed = agreed_device_facts(device, agree=lambda own: agreement.first(lambda: own), least=agreement.least)
    facts = validate_run(run)
    # The layout first: a bad one is refused before a built preset is built (its head count is known from
    # the preset table until then). An expert split sizes its groups by the steps each expert runs, known
    # once the folder is: until then only what the world size decides is checked.
    if world_size is not None and run.parallel.expert_split:
        check_expert_split(run.parallel, world_size)
    elif world_size is not None:
        resolve_parallel_dims(run.parallel, world_size=world_size, num_heads=dit_num_heads(run.model),
                              guidance_scale=run.guidance_scale)
    # Rank 0 finds out whether it can write the outputs, and only then builds a built preset, once, before
    # the other ranks read it.
    problem = agreement.first(lambda: _output_problem(out) or _build_model(run))
    if problem:
        raise ConfigError(problem)
    return Inputs(model=read_model_facts(model_folder(run.model), facts), device=agreed, out_dir=out, seed=seed,
                  overrides=tuple(given), prompts=tuple(read_prompts(run)), loras=read_lora_layers(run),
                  kernel_libraries=installed_kernel_libraries(), cpu_flags=cpu_flags())


def read_model_facts(folder: Path, facts: RunFacts) -> ModelFacts:
    """Every fact of `folder` the plan needs, for a run whose checks found `facts`."""
    experts = EXPERT_COMPONENTS[:facts.experts]
    configs = {"vae": read_component_config(folder, "vae"),
               **{name: read_component_config(folder, SUBFOLDERS[name]) for name in experts}}
    held = ["text_encoder", "vae", *experts]
    # Only Wan2.1's image DiTs take CLIP image embeddings (Wan2.2 has no image encoder).
    if facts.task in IMAGE_TASKS and configs["dit"].get("image_dim") is not None:
        held.append("image_encoder")
    return ModelFacts(
        folder=folder, family=facts.family, task=facts.task, boundary_ratio=facts.boundary_ratio, configs=configs,
        weights={name: read_weight_table(folder, SUBFOLDERS[name]) for name in held},
        cast_names={name: layerwise_cast_names(configs[name]) for name in experts},
        scheduler_config=read_scheduler_config(folder))


def _build_model(run: RunConfig) -> None:
    model_folder(run.model)


def _output_problem(out_dir: Path) -> str | None:
    """Rank 0 writes the outputs: find out now, not after the denoise."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe-"):
            pass
    except OSError as error:
        return f"output.dir={str(out_dir)!r} is not allowed: a folder this user can write ({error})"
    return None
