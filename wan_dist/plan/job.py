"""The job plan: every decision of a run, made once on every rank before any weight is read.

`resolve` resolves the run config against the world size and the run's Inputs (inputs.py: the model
folder's configs and safetensors headers, the device, the seed and output dir, all found out once by
`prepare`): the family and task, the layout, which rank holds which component in which dtype on which
device and how many bytes that is, the attention kernel of each use, the latent shape, the prompts and
output names, each rank's predicted memory. It is pure (no file, no collective), so a bad run stops
before loading on every rank alike, and the planner (planner.py) can resolve as many candidate layouts
as it likes. The stages only execute the plan; `dry_run=true` prints it and stops.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..parallel.attention import choose_kernel
from .checks import check_loras, check_model_limits, check_parallel
from ..config.schema import LoraConfig, RunConfig, is_guided, lora_experts
from ..config.errors import fail
from .inputs import EXPERT_COMPONENTS, SUBFOLDERS, Inputs, ModelFacts
from ..wan.loading import STORAGE_DTYPES_BY_NAME, cpu_encoder_dtype, resolve_dtype, scheduler_from_config, weight_bytes
from .memory import (
    RankMemory, block_activation_bytes, context_cache_bytes, dtype_bytes, outside_block_bytes, vae_decode_bytes,
)
from ..parallel.dims import ParallelDims, check_expert_split, check_sequence_length, resolve_parallel_dims
from ..wan.pipeline import LatentShape, expert_step_counts, latent_shape
from ..config.presets import EXPERTS, IMAGE_TASKS
from .sampling import SAMPLING_KEYS, SamplingPlan, resolve_sampling
from .outputs import output_names, write_json

# Rank 0's role and the DiT ranks' role, as run.json and the plan table name them.
ENCODER_ROLE = "encoders+vae"
DIT_ROLE = "dit"
# How a rank takes part in a VAE pass: the whole of it, or one band of rows (parallel/vae_bands.py).
WHOLE, BAND = "whole", "band"
# The attention uses whose kernel is chosen: self-attention over all tokens of one rank, the text/image
# cross-attention, and the self-attention of a sequence-split DiT (xDiT's USP block kernel).
ATTENTION_USES = ("self_attention", "cross_attention", "sequence_parallel")


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
    # A DiT's: cross-attention keys and values kept per prompt (not with compile, whose traced blocks
    # would bypass it); its blocks compiled one by one.
    context_cache: bool = False
    compile: bool = False
    tiling: bool = False  # the VAE's: diffusers' tiled decode

    @property
    def subfolder(self) -> str:
        return SUBFOLDERS[self.name]


@dataclass(frozen=True)
class DitWork:
    """What a DiT rank runs: its group's experts, on its share of the weights, over its group's steps."""

    group: int  # its group's index in plan.dims.groups
    experts: tuple[str, ...]  # the DiT components it loads (under an expert split, its group's one)
    shard: tuple[int, int] | None  # FSDP2: (its index, the shard count) over the DiT ranks; None: whole
    resumes: bool  # takes each video's sampler state from the previous group (the STATE hop), not noise
    stop: int | None  # the step it stops before and hands the state on (STATE); None: to the end (LATENTS)
    leader: bool  # shows the progress bar, times the steps, and sends on the group's outgoing hop


@dataclass(frozen=True)
class RankPlan:
    """What one rank does, field by field; `role` is their name for run.json and the plan table."""

    rank: int
    weight_bytes: dict[str, int]  # per component this rank holds
    # Encodes the prompts (and the I2V image embeddings), hands each video over, takes the latents back,
    # writes the outputs: rank 0.
    encodes: bool = False
    condition: str | None = None  # the I2V condition encode: WHOLE (rank 0), BAND (a band of rows), None
    decode: str | None = None  # the VAE decode: WHOLE, BAND (every rank; rank 0 gathers), None
    dit: DitWork | None = None
    hops: tuple[str, ...] = ()  # the handoff hops it sends or receives on (parallel/dims.py's Hop)

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.weight_bytes)

    @property
    def role(self) -> str:
        return "+".join(name for name, on in ((ENCODER_ROLE, self.encodes), (DIT_ROLE, self.dit is not None)) if on)


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
    images: tuple[str, ...]  # I2V's image (FLF2V: and its last image), as paths
    allow_pickle: bool  # components may load from pickled checkpoints
    embedding_cache: str | None  # where prompt embeddings are kept between runs
    overwrite: bool  # outputs may replace files already there
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
        return tuple(name for name in EXPERT_COMPONENTS if name in self.components)

    @property
    def image_task(self) -> bool:
        return self.task in IMAGE_TASKS

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
                       "hops": [{"name": h.name, "src": h.src, "dsts": list(h.dsts)} for h in self.dims.hops],
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
                       "weight_bytes": dict(r.weight_bytes), "condition": r.condition, "decode": r.decode,
                       "dit": None if r.dit is None else asdict(r.dit), "hops": list(r.hops),
                       "memory": memory.to_json()}
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


def _predict_memory(plan: JobPlan, facts: ModelFacts,
                    stored: dict[str, dict[str, torch.dtype] | None]) -> tuple[RankMemory, ...]:
    """Each rank's predicted memory on its device (memory.py): the weights it holds, the DiT's block
    live set and what outlives blocks, the FSDP gather buffers, the context cache, the VAE decode
    (measured by running the decode on meta tensors, vae_bands.decode_peak_bytes)."""
    from ..parallel.vae_bands import decode_peak_bytes

    dit_config, vae_config = facts.configs["dit"], facts.configs["vae"]
    dit = plan.components["dit"]
    b = dtype_bytes(dit.dtype)
    image = plan.components.get("image_encoder") is not None

    def activations(group) -> int:
        local_tokens = -(-plan.num_tokens // group.sp)
        return block_activation_bytes(dit_config, local_tokens, b, ulysses=group.ulysses, ring=group.ring) \
            + outside_block_bytes(dit_config, local_tokens, plan.num_tokens, b, image=image)

    def cache(group, experts_held: int) -> int:
        # Every expert keeps its own cache (its own cross-attention weights).
        if not dit.context_cache:
            return 0
        return experts_held * context_cache_bytes(
            dit_config, b, contexts=2 if plan.guided and group.cfg == 1 else 1, image=image)
    # One block's and the root's weights of each expert as stored (fp8 where layerwise casting stores
    # them); the experts share their widths, not always their depths.
    block_and_root = {}
    for name in plan.experts:
        expert = plan.components[name]
        block = weight_bytes(facts.weights[name], expert.subfolder, expert.dtype, stored=stored[name],
                             prefix="blocks.0.")
        layers = facts.configs[name]["num_layers"]
        block_and_root[name] = (block, expert.weight_bytes - layers * block)
    # FSDP: the running expert's block, the prefetched one and its root, gathered whole; one expert
    # runs at a time.
    gather = max(2 * block + root for block, root in block_and_root.values()) if plan.fsdp else 0
    decoders = plan.components["vae"].ranks
    frames_h_w = (plan.latent.frames, plan.latent.height, plan.latent.width)
    if plan.components["vae"].tiling:
        decode = [vae_decode_bytes(vae_config, height=plan.sampling.height, width=plan.sampling.width,
                                   num_frames=plan.sampling.num_frames, tiled=True)]
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
        decodes = r.decode is not None
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
                              for name, g in zip(EXPERT_COMPONENTS, dims.groups)]}


def resolve(run: RunConfig, inputs: Inputs, world_size: int) -> JobPlan:
    """`run` planned for `world_size` ranks from `inputs` (prepare's, for this run or a layout the planner
    edited from it) alone: pure, so any rank, any number of times, comes to the same plan. Raises
    ConfigError for a run this world or this model cannot take."""
    facts, device_type = inputs.model, inputs.device.type
    # The planner edits the parallel keys: their rules again, on the layout it tries.
    check_parallel(run, facts.family)
    run = copy.deepcopy(run)
    split = run.parallel.expert_split
    if split:
        check_expert_split(run.parallel, world_size)
    dit_config, vae_config = facts.configs["dit"], facts.configs["vae"]
    dims = None if split else resolve_parallel_dims(
        run.parallel, world_size=world_size, num_heads=dit_config["num_attention_heads"],
        guidance_scale=run.guidance_scale)
    sampling = resolve_sampling(run, preset=run.model.preset, given=inputs.overrides,
                                scheduler_config=facts.scheduler_config, seed=inputs.seed, drawn=run.seed < 0)
    for key in SAMPLING_KEYS:
        setattr(run, key, getattr(sampling, key))
    experts = facts.experts
    expert_steps = _expert_steps(run, facts) if facts.boundary_ratio is not None else None
    if split:
        dims = resolve_parallel_dims(run.parallel, world_size=world_size, num_heads=dit_config["num_attention_heads"],
                                     guidance_scale=run.guidance_scale, expert_steps=expert_steps)
    shape = latent_shape(vae_config, height=run.height, width=run.width, num_frames=run.num_frames)
    patch = tuple(dit_config["patch_size"])
    num_tokens = shape.num_tokens(patch)
    check_model_limits(run, vae_config, dit_config)
    check_loras(run, [facts.configs[name] for name in experts], inputs.loras)
    check_sequence_length(dims, num_tokens)

    encoder_device = device_type if run.model.text_encoder_device == "gpu" else "cpu"
    # A CPU encoder beside a GPU DiT runs in bf16 where the CPU has native bf16 (wan/loading.py's cpu_encoder_dtype).
    encoder_dtype = (cpu_encoder_dtype(run.model.text_encoder_dtype, dit_on_gpu=device_type == "cuda",
                                       flags=inputs.cpu_flags) if encoder_device == "cpu" else None) \
        or resolve_dtype(run.model.text_encoder_dtype, torch.device(encoder_device), gpu_default=torch.bfloat16)
    device = torch.device(device_type)
    dit_dtype = resolve_dtype(run.model.dit_dtype, device, gpu_default=torch.bfloat16)
    wanted = {
        "text_encoder": (encoder_dtype, encoder_device, (0,)),
        # With a banded decode or encode every rank holds the VAE (fp32 at full size: about 0.5 GB).
        "vae": (resolve_dtype(run.model.vae_dtype, device, gpu_default=torch.float32), device_type,
                _vae_ranks(run, world_size, dims, vae_config, shape, facts.task in IMAGE_TASKS)),
        # Under an expert split each group holds only its expert (high noise first).
        **{name: (dit_dtype, device_type, tuple(dims.groups[i].ranks if dims.expert_split else dims.dit_ranks))
           for i, name in enumerate(experts)},
    }
    # prepare read an image encoder only where the DiT takes CLIP image embeddings (Wan2.1's image DiTs).
    if "image_encoder" in facts.weights:
        wanted["image_encoder"] = (encoder_dtype, encoder_device, (0,))
    storage_dtype, offload = _dit_storage(run, device_type)
    stored = {name: dict.fromkeys(facts.cast_names[name], storage_dtype) if storage_dtype else None
              for name in experts}
    components = {
        name: ComponentPlan(name=name, dtype=dtype, device=where, ranks=ranks,
                            weight_bytes=weight_bytes(facts.weights[name], SUBFOLDERS[name], dtype,
                                                      stored=stored.get(name)))
        for name, (dtype, where, ranks) in wanted.items()
    }
    for index, name in enumerate(experts):
        components[name] = replace(components[name], storage_dtype=storage_dtype, offload=offload,
                                   loras=tuple(lora for lora in run.lora if index in lora_experts(lora.expert)),
                                   context_cache=run.context_cache and not run.compile, compile=run.compile)
    components["vae"] = replace(components["vae"], tiling=run.model.vae_tiling)
    # One kernel for the whole model (diffusers' backend: self-attention on one rank, cross-attention),
    # and the USP block kernel; fp32 or an odd head dim takes SDPA. With padded tokens the USP layer swaps
    # in its masked kernel (parallel/attention.py).
    kernel = choose_kernel(run.attention, capability=inputs.device.capability, dtype=dit_dtype,
                           head_dim=int(dit_config["attention_head_dim"]), installed=inputs.kernel_libraries)
    queued = run.prompts_file is not None
    videos = []
    for index, prompt in enumerate(inputs.prompts):
        video_name, frames_name = output_names(index, queued)
        videos.append(VideoPlan(index, prompt, video_name, frames_name if run.output.save_frames else None))
    fsdp = not offload and _resolve_fsdp(run.parallel.fsdp_setting, dims)
    if fsdp and run.lora:
        fail("lora", [lora.path for lora in run.lora], "empty with parallel.fsdp=true: LoRAs are fused into "
             "whole weights before the run, and sharded weights are never whole on one rank")
    vae_encode = run.parallel.vae_encode if facts.task in IMAGE_TASKS else "rank0"
    ranks = []
    for r in range(world_size):
        held = {name: c.weight_bytes for name, c in components.items() if r in c.ranks}
        shard = (dims.dit_ranks.index(r), len(dims.dit_ranks)) if fsdp and dims.is_dit_rank(r) else None
        for name in experts if shard else ():
            held[name] = weight_bytes(facts.weights[name], SUBFOLDERS[name], dit_dtype, stored=stored[name],
                                      shard=shard)
        ranks.append(_rank_plan(r, held, dims, expert_steps, shard=shard,
                                vae_decode=run.parallel.vae_decode, vae_encode=vae_encode,
                                vae_bands=len(components["vae"].ranks) > 1, image_task=facts.task in IMAGE_TASKS))
    plan = JobPlan(
        config=run, folder=facts.folder, family=facts.family, task=facts.task, world_size=world_size,
        device_type=device_type, dims=dims, components=components,
        kernels={use: kernel for use in ATTENTION_USES}, fsdp=fsdp, vae_decode=run.parallel.vae_decode,
        vae_encode=vae_encode, latent=shape, patch=patch,
        num_tokens=num_tokens, boundary_ratio=facts.boundary_ratio, expert_steps=expert_steps,
        negative_prompt=run.negative_prompt if is_guided(run.guidance_scale) else None, videos=tuple(videos),
        out_dir=inputs.out_dir, seed=inputs.seed, sampling=sampling,
        images=tuple(path for path in (run.image, run.last_image) if path) if facts.task in IMAGE_TASKS else (),
        allow_pickle=run.model.allow_pickle, embedding_cache=run.embedding_cache, overwrite=run.output.overwrite,
        ranks=tuple(ranks),
    )
    return replace(plan, memory=_predict_memory(plan, facts, stored))


def _rank_plan(rank: int, held: dict[str, int], dims: ParallelDims, expert_steps: tuple[int, int] | None, *,
               shard: tuple[int, int] | None, vae_decode: str, vae_encode: str, vae_bands: bool,
               image_task: bool) -> RankPlan:
    """What `rank` does: rank 0 encodes and writes; a VAE rank decodes or encodes the whole or a band; a
    DiT rank runs its group's experts over its group's steps."""
    def vae_part(mode: str) -> str | None:
        # Every rank holds the VAE when a pass runs in bands (_vae_ranks); on one rank a band is the whole.
        if mode == "patch" and vae_bands:
            return BAND
        return WHOLE if rank == 0 else None

    dit = None
    if dims.is_dit_rank(rank):
        group = dims.group_of(rank)
        index = dims.groups.index(group)
        split = dims.expert_split
        dit = DitWork(group=index, experts=tuple(name for name in held if name in EXPERT_COMPONENTS),
                      shard=shard, resumes=split and index > 0,
                      stop=expert_steps[0] if split and index == 0 else None, leader=rank == group.leader)
    hops = tuple(hop.name for hop in dims.hops if rank in hop.ranks)
    return RankPlan(rank=rank, weight_bytes=held, encodes=rank == 0,
                    condition=vae_part(vae_encode) if image_task else None, decode=vae_part(vae_decode), dit=dit,
                    hops=hops)


def _expert_steps(run: RunConfig, facts: ModelFacts) -> tuple[int, int]:
    """The steps each expert of a two-expert model runs, from the scheduler's timesteps for this run's
    steps and shift (built from the folder's scheduler config); an expert split needs both to run."""
    boundary_ratio = facts.boundary_ratio
    scheduler = scheduler_from_config(facts.scheduler_config, run.scheduler, run.flow_shift)
    scheduler.set_timesteps(run.steps)
    steps = expert_step_counts(scheduler.timesteps, boundary_ratio * scheduler.config.num_train_timesteps)
    if run.parallel.expert_split and 0 in steps:
        idle = EXPERTS[1 if steps[1] == 0 else 0].noise
        fail("parallel.expert_split", True, f"false here: with steps={run.steps} and flow_shift={run.flow_shift} "
             f"the {idle}-noise expert runs no step (boundary_ratio {boundary_ratio}), so its group would idle")
    return steps


def _dit_storage(run: RunConfig, device_type: str) -> tuple[torch.dtype | None, bool]:
    """fp8 storage runs wherever torch casts fp8 (CPU and CUDA alike). Block offload streams to a CUDA
    device; FSDP2 already splits the weights, and its own CPU offload is not wired to the sharded load."""
    model = run.model
    if model.dit_offload == "block" and device_type != "cuda":
        fail("model.dit_offload", model.dit_offload, f"none on {device_type}: block offload streams the DiT's "
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
    from ..parallel.vae_bands import check_bands, encode_bands

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


def write_plan(plan: JobPlan, path: Path) -> None:
    write_json(plan.to_json(), path)
