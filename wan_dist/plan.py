"""The job plan: every decision of a run, made once on every rank before any weight is read.

`build_plan` resolves the run config against the world (its size, the device) and the model folder (its
configs and safetensors headers, never a tensor): the family and task, the layout, which rank holds which
component in which dtype on which device and how many bytes that is, the attention kernel of each use, the
latent shape, the prompts and output names. The checks that need the folder or the world run here, so a
bad run stops before loading, on every rank alike. The stages only execute the plan; `dry_run=true` prints
it and stops.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .attention import choose_kernel, device_capability, installed_kernel_libraries
from .building import dit_num_heads, model_folder
from .checks import check_loras, check_model_limits, read_prompts, validate_run
from .config import LoraConfig, RunConfig, is_guided, lora_experts
from .errors import ConfigError, fail
from .loading import (
    STORAGE_DTYPES_BY_NAME, component_weight_bytes, layerwise_cast_parameters, load_scheduler, read_component_config,
    resolve_dtype,
)
from .memory import (
    RankMemory, block_activation_bytes, context_cache_bytes, dtype_bytes, outside_block_bytes, vae_decode_bytes,
)
from .parallel_dims import ParallelDims, check_expert_split, check_sequence_length, resolve_parallel_dims
from .pipeline import LatentShape, expert_step_counts, latent_shape
from .presets import IMAGE_TASKS
from .sampling import SAMPLING_KEYS, SamplingPlan, resolve_sampling
from .text_encoding import cpu_encoder_dtype, cpu_flags
from .video import output_names, write_json

# Rank 0's role and the DiT ranks' role, as run.json and the plan table name them.
ENCODER_ROLE = "encoders+vae"
DIT_ROLE = "dit"
# Where each component's weights live in a diffusers-format folder.
SUBFOLDERS = {"dit": "transformer", "dit_2": "transformer_2", "vae": "vae", "text_encoder": "text_encoder",
              "image_encoder": "image_encoder"}
# The DiT, or a two-expert model's high-noise and low-noise experts, in the order the steps use them.
EXPERTS = ("dit", "dit_2")
# The attention uses whose kernel is chosen: self-attention over all tokens of one rank, the text/image
# cross-attention, and the self-attention of a sequence-split DiT (xDiT's USP block kernel).
ATTENTION_USES = ("self_attention", "cross_attention", "sequence_parallel")


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
class ComponentPlan:
    """One model component: its compute dtype, the device kind it runs on and the ranks that hold it."""

    name: str
    dtype: torch.dtype
    device: str
    ranks: tuple[int, ...]
    weight_bytes: int  # the whole component in `dtype`, from its safetensors headers
    # The DiT's: fp8 for the layers layerwise casting stores so (the bytes above count them so); None: all
    # in `dtype`. `offload`: its blocks in CPU memory, streamed to the device.
    storage_dtype: torch.dtype | None = None
    offload: bool = False
    loras: tuple[LoraConfig, ...] = ()  # a DiT's (an expert's): fused into its weights after loading

    @property
    def subfolder(self) -> str:
        return SUBFOLDERS[self.name]


@dataclass(frozen=True)
class RankPlan:
    rank: int
    role: str
    weight_bytes: dict[str, int]  # per component this rank holds

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.weight_bytes)


@dataclass(frozen=True)
class VideoPlan:
    index: int
    prompt: str
    video: str  # file names inside the output dir
    frames: str | None  # None unless output.save_frames


@dataclass(frozen=True)
class JobPlan:
    # As validated, with its sampling keys resolved (`sampling` says where each came from); never mutated.
    config: RunConfig
    folder: Path
    family: str
    task: str
    world_size: int
    device_type: str
    dims: ParallelDims
    components: dict[str, ComponentPlan]
    kernels: dict[str, str]  # attention use -> kernel name
    fsdp: bool  # the DiT's weights sharded over the DiT ranks (FSDP2)
    vae_decode: str  # "rank0", or "patch": every rank decodes a band of rows
    vae_encode: str  # the same for the I2V condition encode
    latent: LatentShape
    patch: tuple[int, int, int]  # the DiT's (frames, rows, columns) per token
    num_tokens: int
    boundary_ratio: float | None  # two-expert models: the low-noise expert runs below this share of timesteps
    expert_steps: tuple[int, int] | None  # two-expert models: the steps the high- and the low-noise expert run
    negative_prompt: str | None  # None without guidance: there is no unconditional branch
    videos: tuple[VideoPlan, ...]
    out_dir: Path
    seed: int
    sampling: SamplingPlan
    ranks: tuple[RankPlan, ...] = field(default=())
    # Each rank's predicted memory on its device (memory.py), in rank order.
    memory: tuple[RankMemory, ...] = ()
    added: tuple[str, ...] = ()  # what the planner (planner.py) added to fit the device, as overrides

    @property
    def guided(self) -> bool:
        return self.negative_prompt is not None

    @property
    def experts(self) -> tuple[str, ...]:
        """The DiT components: "dit", and "dit_2" for a two-expert model."""
        return tuple(name for name in EXPERTS if name in self.components)

    @property
    def image_task(self) -> bool:
        return self.task in IMAGE_TASKS

    def holds(self, rank: int, component: str) -> bool:
        return component in self.components and rank in self.components[component].ranks

    def role(self, rank: int) -> str:
        return self.ranks[rank].role

    def resolved_config(self) -> dict[str, Any]:
        """The run config as it ran: with the seed, output dir and task the plan resolved."""
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.structured(self.config), resolve=True)
        config["seed"] = self.seed
        config["output"]["dir"] = str(self.out_dir)
        config["model"]["task"] = self.task
        return config

    def to_json(self) -> dict[str, Any]:
        return {
            "model": {"folder": str(self.folder), "family": self.family, "task": self.task},
            "sampling": self.sampling.to_json(),
            "world_size": self.world_size, "device": self.device_type,
            "layout": {"cfg": self.dims.cfg, "ring": self.dims.ring, "ulysses": self.dims.ulysses,
                       "stage_split": self.dims.stage_split, "dit_ranks": self.dims.dit_ranks,
                       "describe": self.dims.describe(), "added": list(self.added),
                       **expert_groups_json(self.dims)},
            "components": {name: {"dtype": str(c.dtype).removeprefix("torch."), "device": c.device,
                                  "ranks": list(c.ranks), "weight_bytes": c.weight_bytes,
                                  "storage_dtype": str(c.storage_dtype or c.dtype).removeprefix("torch."),
                                  "offload": c.offload}
                           for name, c in self.components.items()},
            "kernels": dict(self.kernels), "fsdp": self.fsdp, "vae_decode": self.vae_decode,
            "vae_encode": self.vae_encode,
            "latent_shape": list(self.latent.shape), "num_tokens": self.num_tokens,
            "boundary_ratio": self.boundary_ratio, "expert_steps": list(self.expert_steps or []) or None,
            "seed": self.seed, "out_dir": str(self.out_dir),
            "videos": [{"index": v.index, "prompt": v.prompt, "video": v.video, "frames": v.frames}
                       for v in self.videos],
            "ranks": [{"rank": r.rank, "role": r.role, "components": list(r.components),
                       "weight_bytes": dict(r.weight_bytes), "memory": memory.to_json()}
                      for r, memory in zip(self.ranks, self.memory)],
        }

    def table(self) -> str:
        """The plan for a person: the layout, then one row per rank."""
        gib = 2**30
        memory = self.memory
        lines = [f"{self.family} {self.task}, {self.folder}",
                 f"{self.world_size} rank(s) on {self.device_type}: {self.dims.describe()}; "
                 f"latents {tuple(self.latent.shape)} = {self.num_tokens} DiT tokens; "
                 f"kernels {', '.join(f'{use}={k}' for use, k in self.kernels.items())}"
                 + ("; DiT sharded over the DiT ranks (FSDP2)" if self.fsdp else "")
                 + (f"; added to fit the device: {' '.join(self.added)}" if self.added else ""),
                 f"sampling: {self.sampling.describe()}",
                 f"{len(self.videos)} video(s) into {self.out_dir}", "",
                 f"{'rank':>4}  {'role':<17} {'components':<42} {'weights GiB':>11} {'peak GiB':>9}"]
        for r in self.ranks:
            held = ", ".join(f"{name} ({self.components[name].dtype}".replace("torch.", "") + ")"
                             for name in r.components)
            lines.append(f"{r.rank:>4}  {r.role:<17} {held:<42} {sum(r.weight_bytes.values()) / gib:>11.3f} "
                         f"{memory[r.rank].peak / gib:>9.3f}")
        return "\n".join(lines)


def _predict_memory(plan: JobPlan, dit_configs: dict[str, dict], vae_config: dict,
                    stored: dict[str, Collection[str] | None]) -> tuple[RankMemory, ...]:
    """Each rank's predicted memory on its device (memory.py): the weights it holds, the DiT's block
    live set and what outlives blocks, the FSDP gather buffers, the context cache, the VAE decode
    (measured by running the decode on meta tensors, vae_patch.decode_peak_bytes)."""
    from .vae_patch import decode_peak_bytes

    dit_config = dit_configs["dit"]
    dit = plan.components["dit"]
    b = dtype_bytes(dit.dtype)
    image = plan.components.get("image_encoder") is not None

    def activations(group) -> int:
        local_tokens = -(-plan.num_tokens // group.sp)
        return block_activation_bytes(dit_config, local_tokens, b, ulysses=group.ulysses, ring=group.ring) \
            + outside_block_bytes(dit_config, local_tokens, plan.num_tokens, b, image=image)

    def cache(group, experts_held: int) -> int:
        # Every expert keeps its own cache (its own cross-attention weights).
        if not plan.config.context_cache or plan.config.compile:
            return 0
        return experts_held * context_cache_bytes(
            dit_config, b, contexts=2 if plan.guided and group.cfg == 1 else 1, image=image)
    # One block's and the root's weights of each expert as stored (fp8 where layerwise casting stores
    # them); the experts share their widths, not always their depths.
    block_and_root = {}
    for name in plan.experts:
        expert = plan.components[name]
        block = component_weight_bytes(plan.folder, expert.subfolder, expert.dtype, stored=stored[name],
                                       prefix="blocks.0.")
        layers = dit_configs[name]["num_layers"]
        block_and_root[name] = (block, expert.weight_bytes - layers * block)
    # FSDP: the running expert's block, the prefetched one and its root, gathered whole; one expert
    # runs at a time.
    gather = max(2 * block + root for block, root in block_and_root.values()) if plan.fsdp else 0
    decoders = plan.components["vae"].ranks
    frames_h_w = (plan.latent.frames, plan.latent.height, plan.latent.width)
    if plan.config.model.vae_tiling:
        decode = [vae_decode_bytes(vae_config, height=plan.config.height, width=plan.config.width,
                                   num_frames=plan.config.num_frames, tiled=True)]
    else:
        decode = decode_peak_bytes(vae_config, frames_h_w, len(decoders) if plan.vae_decode == "patch" else 1,
                                   dtype=plan.components["vae"].dtype)
    out = []
    for r in plan.ranks:
        on_device = sum(b_ for name, b_ in r.weight_bytes.items()
                        if plan.components[name].device == plan.device_type)
        held = [name for name in plan.experts if name in r.weight_bytes]
        if dit.offload and held:
            # Block offload: the blocks live in host memory; the device holds each expert's root, and
            # three blocks: the one finishing, the one launched and the one on its way
            # (parallelize._OffloadLead).
            on_device += max(3 * block_and_root[name][0] for name in held) \
                + sum(block_and_root[name][1] - r.weight_bytes[name] for name in held)
        is_dit = plan.dims.is_dit_rank(r.rank)
        group = plan.dims.group_of(r.rank)
        decodes = r.rank in decoders and (r.rank == 0 or plan.vae_decode == "patch")
        out.append(RankMemory(
            weights=on_device, activations=activations(group) if is_dit else 0,
            gather_buffers=gather if is_dit else 0, context_cache=cache(group, len(held)) if is_dit else 0,
            decode=decode[min(decoders.index(r.rank), len(decode) - 1)] if decodes else 0))
    return tuple(out)


def expert_groups_json(dims: ParallelDims) -> dict[str, Any]:
    """`expert_groups` for run.json and plan.json under an expert split: per group its expert and ranks."""
    if not dims.expert_split:
        return {}
    return {"expert_groups": [{"expert": name, "ranks": g.ranks, "cfg": g.cfg, "ring": g.ring, "ulysses": g.ulysses}
                              for name, g in zip(EXPERTS, dims.groups)]}


def _identity(value: Any) -> Any:
    return value


def build_plan(
    run: RunConfig, *, world_size: int, rank: int, device: torch.device, out_dir: str | Path, seed: int,
    agree: Callable[[Any], Any] = _identity, least: Callable[[int], int] = _identity,
    own_facts: DeviceFacts | None = None, facts_of_device: DeviceFacts | None = None,
    given: Collection[str] = (), choose: bool = True,
) -> JobPlan:
    """Resolve `run` for this world. Called on every rank with the same arguments; `agree(value)` returns
    rank 0's `value` on every rank (the session's broadcast), used where only rank 0 can find out (the
    output dir it will write, the model it builds on first use, its GPU's kind); `least(value)` the
    smallest of the ranks' values (the session's all-reduce), used for the free memory. Raises ConfigError
    on every rank alike. `own_facts` stands in for what this rank reads of `device`; `facts_of_device` for
    the facts agreed over the ranks (a planner's imagined GPU: no agreement).

    On a GPU the planner (planner.py) fills what the user left open (`given`: the keys named on the
    command line) with the first of its steps that fits the free memory, or stops here, before any weight
    is read, naming the smallest change that would fit. `choose=False`: the plan of `run` as it is."""
    device_facts = facts_of_device or agreed_device_facts(own_facts or DeviceFacts.of(device), agree=agree,
                                                          least=least)
    if choose and device_facts.type == "cuda":
        from . import planner

        def build(candidate: RunConfig, size: int) -> JobPlan:
            return build_plan(candidate, world_size=size, rank=rank, device=device, out_dir=out_dir, seed=seed,
                              agree=agree, facts_of_device=device_facts, given=given, choose=False)

        keys = planner.given_keys(run, given)
        memory = device_facts.memory_bytes
        choice = planner.choose(run, given=keys, world_size=world_size, memory_bytes=memory, build=build)
        if not choice.fits:
            raise ConfigError(planner.refusal(run, choice, given=keys, world_size=world_size,
                                              memory_bytes=memory, build=build))
        return replace(choice.plan, added=choice.added)
    facts = validate_run(run)
    out_dir = Path(out_dir)
    run = copy.deepcopy(run)
    # The layout first: a bad one is refused before a built preset is built (its head count is known
    # from the preset table until then).
    # An expert split sizes its groups by the steps each expert runs, known once the folder is: until then
    # only what the world size decides is checked.
    split = run.parallel.expert_split
    if split:
        check_expert_split(run.parallel, world_size)
    dims = None if split else resolve_parallel_dims(
        run.parallel, world_size=world_size, num_heads=dit_num_heads(run.model), guidance_scale=run.guidance_scale)
    # Rank 0 finds out whether it can write the outputs, and only then builds a built preset, once, before
    # the other ranks read it; the agreement is also what makes them wait for it.
    problem = agree(_output_problem(out_dir) or _build_model(run) if rank == 0 else None)
    if problem:
        raise ConfigError(problem)
    folder = model_folder(run.model)
    sampling = resolve_sampling(run, preset=run.model.preset, given=given, folder=folder, seed=seed,
                                drawn=run.seed < 0)
    for key in SAMPLING_KEYS:
        setattr(run, key, getattr(sampling, key))
    experts = EXPERTS[:facts.experts]
    vae_config = read_component_config(folder, "vae")
    dit_configs = {name: read_component_config(folder, SUBFOLDERS[name]) for name in experts}
    dit_config = dit_configs["dit"]
    expert_steps = _expert_steps(run, folder, facts.boundary_ratio) if facts.boundary_ratio is not None else None
    if split:
        dims = resolve_parallel_dims(run.parallel, world_size=world_size, num_heads=dit_config["num_attention_heads"],
                                     guidance_scale=run.guidance_scale, expert_steps=expert_steps)
    shape = latent_shape(vae_config, height=run.height, width=run.width, num_frames=run.num_frames)
    patch = tuple(dit_config["patch_size"])
    num_tokens = shape.num_tokens(patch)
    check_model_limits(run, vae_config, dit_config)
    check_loras(run, list(dit_configs.values()))
    check_sequence_length(dims, num_tokens)

    encoder_device = device if run.model.text_encoder_device == "gpu" else torch.device("cpu")
    # A CPU encoder beside a GPU DiT runs in bf16 where the CPU has native bf16 (text_encoding.py).
    encoder_dtype = (cpu_encoder_dtype(run.model.text_encoder_dtype, dit_on_gpu=device.type == "cuda",
                                       flags=cpu_flags()) if encoder_device.type == "cpu" else None) \
        or resolve_dtype(run.model.text_encoder_dtype, encoder_device, gpu_default=torch.bfloat16)
    dit_dtype = resolve_dtype(run.model.dit_dtype, device, gpu_default=torch.bfloat16)
    wanted = {
        "text_encoder": (encoder_dtype, encoder_device, (0,)),
        # With a banded decode or encode every rank holds the VAE (fp32 at full size: about 0.5 GB).
        "vae": (resolve_dtype(run.model.vae_dtype, device, gpu_default=torch.float32), device,
                _vae_ranks(run, world_size, dims, vae_config, shape, facts.task in IMAGE_TASKS)),
        # Under an expert split each group holds only its expert (high noise first).
        **{name: (dit_dtype, device, tuple(dims.groups[i].ranks if dims.expert_split else dims.dit_ranks))
           for i, name in enumerate(experts)},
    }
    # Only Wan2.1's image DiTs take CLIP image embeddings (Wan2.2 has no image encoder).
    if facts.task in IMAGE_TASKS and dit_config.get("image_dim") is not None:
        wanted["image_encoder"] = (encoder_dtype, encoder_device, (0,))
    storage_dtype, offload = _dit_storage(run, device)
    stored = {name: layerwise_cast_parameters(folder, storage_dtype, SUBFOLDERS[name]) if storage_dtype else None
              for name in experts}
    components = {
        name: ComponentPlan(name=name, dtype=dtype, device=where.type, ranks=ranks,
                            weight_bytes=component_weight_bytes(folder, SUBFOLDERS[name], dtype,
                                                                stored=stored.get(name)))
        for name, (dtype, where, ranks) in wanted.items()
    }
    for index, name in enumerate(experts):
        components[name] = replace(components[name], storage_dtype=storage_dtype, offload=offload,
                                   loras=tuple(lora for lora in run.lora if index in lora_experts(lora.expert)))
    # One kernel for the whole model (diffusers' backend: self-attention on one rank, cross-attention),
    # and the USP block kernel; fp32 or an odd head dim takes SDPA. With padded tokens the USP layer swaps
    # in its masked kernel (attention.py).
    kernel = choose_kernel(run.attention, capability=device_facts.capability, dtype=dit_dtype,
                           head_dim=int(dit_config["attention_head_dim"]), installed=installed_kernel_libraries())
    prompts = read_prompts(run)
    queued = run.prompts_file is not None
    videos = []
    for index, prompt in enumerate(prompts):
        video_name, frames_name = output_names(index, queued)
        videos.append(VideoPlan(index, prompt, video_name, frames_name if run.output.save_frames else None))
    fsdp = not offload and _resolve_fsdp(run.parallel.fsdp_setting, dims)
    if fsdp and run.lora:
        fail("lora", [lora.path for lora in run.lora], "empty with parallel.fsdp=true: LoRAs are fused into "
             "whole weights before the run, and sharded weights are never whole on one rank")
    ranks = []
    for r in range(world_size):
        role = "+".join(name for name, on in ((ENCODER_ROLE, r == 0), (DIT_ROLE, dims.is_dit_rank(r))) if on)
        held = {name: c.weight_bytes for name, c in components.items() if r in c.ranks}
        for name in experts if fsdp and "dit" in held else ():
            held[name] = component_weight_bytes(folder, SUBFOLDERS[name], dit_dtype, stored=stored[name],
                                                shard=(dims.dit_ranks.index(r), len(dims.dit_ranks)))
        ranks.append(RankPlan(rank=r, role=role, weight_bytes=held))
    plan = JobPlan(
        config=run, folder=folder, family=facts.family, task=facts.task, world_size=world_size,
        device_type=device.type, dims=dims, components=components,
        kernels={use: kernel for use in ATTENTION_USES}, fsdp=fsdp, vae_decode=run.parallel.vae_decode,
        vae_encode=run.parallel.vae_encode if facts.task in IMAGE_TASKS else "rank0", latent=shape, patch=patch,
        num_tokens=num_tokens, boundary_ratio=facts.boundary_ratio, expert_steps=expert_steps,
        negative_prompt=run.negative_prompt if is_guided(run.guidance_scale) else None, videos=tuple(videos),
        out_dir=out_dir, seed=seed, sampling=sampling, ranks=tuple(ranks),
    )
    return replace(plan, memory=_predict_memory(plan, dit_configs, vae_config, stored))


def _expert_steps(run: RunConfig, folder: Path, boundary_ratio: float) -> tuple[int, int]:
    """The steps each expert of a two-expert model runs, from the scheduler's timesteps for this run's
    steps and shift (its config only); an expert split needs both to run."""
    scheduler = load_scheduler(folder, run.scheduler, run.flow_shift)
    scheduler.set_timesteps(run.steps)
    steps = expert_step_counts(scheduler.timesteps, boundary_ratio * scheduler.config.num_train_timesteps)
    if run.parallel.expert_split and 0 in steps:
        idle = "low" if steps[1] == 0 else "high"
        fail("parallel.expert_split", True, f"false here: with steps={run.steps} and flow_shift={run.flow_shift} "
             f"the {idle}-noise expert runs no step (boundary_ratio {boundary_ratio}), so its group would idle")
    return steps


def _dit_storage(run: RunConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """fp8 storage runs wherever torch casts fp8 (CPU and CUDA alike). Block offload streams to a CUDA
    device; FSDP2 already splits the weights, and its own CPU offload is not wired to the sharded load."""
    model = run.model
    if model.dit_offload == "block" and device.type != "cuda":
        fail("model.dit_offload", model.dit_offload, f"none on {device.type}: block offload streams the DiT's "
             "blocks from CPU memory to a CUDA device, and here the DiT already runs from CPU memory")
    if model.dit_offload == "block" and run.parallel.fsdp_setting == "true":
        fail("model.dit_offload", model.dit_offload, "none with parallel.fsdp=true: each rank holds only its "
             "shard already; use one or the other")
    if model.dit_offload == "block" and run.compile:
        # diffusers' group offloading moves a block's weights in and out inside the block's forward
        # (`param.data` swapped in methods torch.compile is told to skip, a side stream synchronised from the
        # hook), so a compiled block would break its graph there and guard on weights whose device differs
        # from one call to the next; and block offload runs only on CUDA, where nothing here shows it right.
        # fp8 storage and FSDP2 under compile are compared with their eager forward (tests/dist/test_compile.py).
        fail("compile", run.compile, "false with model.dit_offload=block: group offloading moves each block's "
             "weights inside its forward, which torch.compile does not trace; or model.dit_offload=none")
    return STORAGE_DTYPES_BY_NAME.get(model.dit_storage_dtype), model.dit_offload == "block"


def _vae_ranks(run: RunConfig, world_size: int, dims: ParallelDims, vae_config: dict, shape: LatentShape,
               i2v: bool) -> tuple[int, ...]:
    """Rank 0, or every rank when the decode (or the I2V encode) is split into bands; the band rules
    checked here, before anything is loaded."""
    from .vae_patch import check_bands, encode_bands

    p = run.parallel
    decode, encode = p.vae_decode == "patch", p.vae_encode == "patch" and i2v
    if not (decode or encode) or world_size == 1:
        return (0,)
    if decode and dims.stage_split and run.prompts_file is not None:
        # The DiT ranks denoise video i+1 while rank 0 decodes video i: taking them for the decode would
        # stall the pipeline that the stage split is for.
        fail("parallel.vae_decode", "patch", "rank0 with a stage split and a prompt queue (the DiT ranks are "
             "busy with the next video while rank 0 decodes; without the queue, or without the stage split, "
             "every rank decodes a band)")
    try:
        if decode:
            check_bands(shape.height, world_size)
        if encode:
            encode_bands(run.height, world_size, vae_config)
    except ValueError as error:
        fail(f"parallel.vae_{'decode' if decode else 'encode'}", "patch", f"rank0, or fewer ranks or a taller "
             f"video ({error})")
    return tuple(range(world_size))


def _resolve_fsdp(setting: str, dims: ParallelDims) -> bool:
    """`true` needs two DiT ranks to shard over; `auto` is left to the planner (planner.py), which sets
    `true` on a GPU the run does not fit unsharded, and never on a CPU. (checks.py refused other values.)"""
    if dims.expert_split:
        return False  # each group holds its own expert whole (checks.py refuses `true`)
    shardable = len(dims.dit_ranks) > 1
    if setting == "true" and not shardable:
        fail("parallel.fsdp", True, f"false or auto with one DiT rank ({dims.describe()}): sharding needs at "
             "least two DiT ranks to split the weights over")
    return setting == "true"


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


def write_plan(plan: JobPlan, path: Path) -> None:
    write_json(plan.to_json(), path)
