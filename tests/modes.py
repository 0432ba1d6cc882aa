"""Running `wan_dist.run.runner.generate` for several parallel layouts inside one spawned world, so the
process start cost is paid once per world size. Each case goes through the real plan, its degrees given
explicitly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from wan_dist.plan.checks import validate_run
from wan_dist.config.schema import LoraConfig, RunConfig
from wan_dist.run.runner import generate, plan_job
from wan_dist.parallel.session import RankEnv, Session


@dataclass(frozen=True)
class Case:
    name: str
    folder: str
    # None: filled from the world size (per expert group under expert_split)
    cfg: int | None = 1
    ring: int | None = 1
    ulysses: int | None = 1
    stage_split: bool = False
    expert_split: bool = False
    expert_ranks: tuple[int, int] | None = None
    image: str | None = None
    last_image: str | None = None
    prompt: str = "a lighthouse at dusk, waves"
    negative_prompt: str = "blurry"
    prompts_file: str | None = None
    height: int = 48
    width: int = 80
    num_frames: int = 9
    steps: int = 3
    guidance_scale: float = 5.0
    guidance_scale_2: float | None = None
    flow_shift: float | None = None  # None: left to the folder's scheduler config, as diffusers leaves it
    scheduler: str = "unipc"
    lora: tuple[tuple, ...] = field(default_factory=tuple)  # (path, scale) or (path, scale, expert)
    dit_dtype: str = "auto"
    dit_storage_dtype: str = "auto"
    dit_offload: str = "none"
    embedding_cache: str | None = None
    attention: str = "auto"
    compile: bool = False
    fsdp: bool = False
    vae_tiling: bool = False
    vae_decode: str = "rank0"
    vae_encode: str = "rank0"

    def run_config(self, out_dir: Path) -> RunConfig:
        run = RunConfig()  # the default preset: the folder alone says what it is and how it samples
        run.model.path = self.folder
        run.prompt, run.negative_prompt, run.image = self.prompt, self.negative_prompt, self.image
        run.last_image, run.guidance_scale_2 = self.last_image, self.guidance_scale_2
        run.prompts_file = self.prompts_file
        run.height, run.width, run.num_frames, run.steps = self.height, self.width, self.num_frames, self.steps
        run.guidance_scale, run.scheduler = self.guidance_scale, self.scheduler
        if self.flow_shift is not None:
            run.flow_shift = self.flow_shift
        run.lora = [LoraConfig(path=path, scale=scale, expert=expert[0] if expert else None)
                    for path, scale, *expert in self.lora]
        run.model.dit_dtype = self.dit_dtype
        run.model.dit_storage_dtype, run.model.dit_offload = self.dit_storage_dtype, self.dit_offload
        run.embedding_cache = self.embedding_cache
        run.attention, run.compile = self.attention, self.compile
        run.output.dir = str(out_dir)
        run.output.save_frames = True
        run.parallel.cfg_degree, run.parallel.ring_degree = self.cfg, self.ring
        run.parallel.ulysses_degree, run.parallel.stage_split = self.ulysses, self.stage_split
        run.parallel.fsdp = "true" if self.fsdp else "false"
        run.parallel.expert_split = self.expert_split
        run.parallel.expert_ranks = list(self.expert_ranks) if self.expert_ranks else None
        run.model.vae_tiling = self.vae_tiling
        run.parallel.vae_decode, run.parallel.vae_encode = self.vae_decode, self.vae_encode
        validate_run(run)
        return run

    def reference_kwargs(self) -> dict:
        return dict(prompt=self.prompt, negative_prompt=self.negative_prompt, image=self.image,
                    last_image=self.last_image, guidance_scale_2=self.guidance_scale_2,
                    height=self.height, width=self.width, num_frames=self.num_frames, steps=self.steps,
                    guidance_scale=self.guidance_scale, flow_shift=self.flow_shift, scheduler=self.scheduler,
                    lora=self.lora, vae_tiling=self.vae_tiling, dit_storage_dtype=self.dit_storage_dtype)


def run_cases(rank: int, world_size: int, cases: list[Case], out_root: str,
              device: torch.device | None = None) -> list[dict | None]:
    """Body of a spawned rank (the process group is already up): one session per case on that group.
    `device` defaults to GPU `rank` in an nccl world and to the CPU in a gloo one; gloo ranks that share
    one GPU pass it."""
    env = RankEnv(rank=rank, world_size=world_size, local_rank=rank, master_addr="127.0.0.1", master_port=0,
                  launcher="test")
    if device is None:
        device = torch.device("cuda", rank) if dist.get_backend() == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        # Before the mesh is built: DeviceMesh picks a GPU by rank for a process that has not chosen one.
        torch.cuda.set_device(device)
    session = Session(env=env, device=device)
    reports = []
    for case in cases:
        out_dir = Path(out_root) / case.name
        plan = plan_job(case.run_config(out_dir), session, out_dir=out_dir)
        reports.append(generate(plan, session))
    return reports
