"""One generation run on every rank: load what this rank's role needs, encode on rank 0, denoise on the
DiT ranks, decode and write on rank 0.

Roles: rank 0 holds the text encoder, the I2V image encoder and the VAE, and writes the outputs. The DiT
ranks (all ranks, or 1..N-1 with a stage split) hold the DiT, split among themselves by the mesh.
"""

from __future__ import annotations

import gc
import logging
import platform
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from . import __version__
from .attention import DIFFUSERS_BACKENDS, resolve_kernel
from .cfg_parallel import GuidedNoise
from .config import ConfigError, RunConfig, check_loras, check_model_limits, output_names, read_prompts
from .context_cache import ContextCacheHandle, cache_context_kv
from .decode import decode_latents
from .loading import (
    apply_loras, load_image_encoder, load_scheduler, load_text_encoder, load_tokenizer, load_transformer,
    load_vae, model_folder, parameter_bytes, read_component_config, resolve_dtype,
)
from .metrics import RankMetrics
from .parallel_dims import check_sequence_length
from .pipeline import denoise, initial_noise, latent_shape
from .sequence_parallel import parallelize_sequence
from .session import Session
from .stage_split import PendingSend, recv_tensors, send_tensors
from .text_encoding import (
    BackgroundEncoder, PromptJob, TextEncoder, encode_image_condition, encode_image_embeds,
)
from .video import write_frames, write_json, write_video

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dtypes:
    dit: torch.dtype
    vae: torch.dtype
    encoder: torch.dtype
    encoder_device: torch.device


def resolve_dtypes(run: RunConfig, device: torch.device) -> Dtypes:
    encoder_device = device if run.model.text_encoder_device == "gpu" else torch.device("cpu")
    return Dtypes(
        dit=resolve_dtype(run.model.dit_dtype, device, gpu_default=torch.bfloat16),
        vae=resolve_dtype(run.model.vae_dtype, device, gpu_default=torch.float32),
        encoder=resolve_dtype(run.model.text_encoder_dtype, encoder_device, gpu_default=torch.bfloat16),
        encoder_device=encoder_device,
    )


class _EncoderRank:
    """Rank 0's encoding side: text in a background thread, the I2V image once for the whole queue."""

    def __init__(self, run: RunConfig, folder: Path, dtypes: Dtypes, metrics: RankMetrics, vae) -> None:
        self.metrics = metrics

        def load_model():
            with metrics.timed("load_s"):
                model = load_text_encoder(folder, dtypes.encoder, dtypes.encoder_device,
                                          allow_pickle=run.model.allow_pickle)
            metrics.hold("text_encoder", parameter_bytes(model))
            return model

        encoder = TextEncoder(load_tokenizer(folder), load_model=load_model, dtype=dtypes.encoder,
                              cache_dir=run.embedding_cache,
                              cache_key=_weights_fingerprint(folder / "text_encoder"))
        guided = run.guidance_scale > 1.0
        jobs = [PromptJob(i, prompt, run.negative_prompt if guided else None)
                for i, prompt in enumerate(read_prompts(run))]
        texts = {text for job in jobs for text in (job.prompt, job.negative_prompt) if text is not None}
        # Load here, on the main thread, unless the cache holds every text: model loading patches
        # module construction process-wide and must not overlap the DiT/VAE loads from a thread.
        if not all(encoder.is_cached(text) for text in texts):
            encoder.model = load_model()
        self.image_inputs: dict[str, torch.Tensor] = {}
        if run.model.task == "i2v":
            from diffusers.utils import load_image

            with metrics.timed("load_s"):
                image_encoder, processor = load_image_encoder(folder, dtypes.encoder, dtypes.encoder_device,
                                                               allow_pickle=run.model.allow_pickle)
            metrics.hold("image_encoder", parameter_bytes(image_encoder))
            with metrics.timed("encode_s"):
                image = load_image(run.image)
                self.image_inputs = {
                    "image_embeds": encode_image_embeds(image, image_encoder, processor),
                    "condition": encode_image_condition(
                        image, vae, height=run.height, width=run.width, num_frames=run.num_frames),
                }
            del image_encoder
            metrics.release("image_encoder")
        self.remaining = len(jobs)
        self._encoder, self._jobs = encoder, jobs
        self._background = self._results = None

    def start(self) -> None:
        """Start encoding in the background. Only once every model of this rank is loaded: diffusers'
        and transformers' loaders patch tensor and module construction process-wide while they run."""
        self._background = BackgroundEncoder(self._encoder, self._jobs)
        self._results = iter(self._background)
        self._encoder = None  # the thread holds the only reference; it is freed when the queue is done

    def next_inputs(self) -> tuple[PromptJob, dict[str, torch.Tensor]]:
        job, tensors, seconds = next(self._results)
        self.metrics.timings["encode_s"] = self.metrics.timings.get("encode_s", 0.0) + seconds
        self.remaining -= 1
        if self.remaining == 0:
            self.close()
        return job, {**tensors, **self.image_inputs}

    def close(self) -> None:
        if self._background is None:
            return
        self._background.close()
        self._background = self._results = None
        self.metrics.release("text_encoder")  # no-op when a warm cache meant it was never loaded
        gc.collect()


def _weights_fingerprint(folder: Path) -> str:
    """Names, sizes and mtimes of a component's files: cached embeddings go stale when the weights
    at the same path change."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return "|".join([str(folder.resolve())] + [f"{p.name}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in files])


def input_names(run: RunConfig) -> list[str]:
    names = ["prompt_embeds"]
    if run.guidance_scale > 1.0:
        names.append("negative_prompt_embeds")
    if run.model.task == "i2v":
        names += ["image_embeds", "condition"]
    return names


def generate(run: RunConfig, session: Session, out_dir: Path) -> dict[str, Any] | None:
    """Run the whole job; returns run.json's content on rank 0, None elsewhere."""
    start = time.perf_counter()
    rank, dims, device = session.rank, session.dims, session.device
    folder = model_folder(run.model)
    dtypes = resolve_dtypes(run, device)
    prompts = read_prompts(run)
    queued = run.prompts_file is not None
    vae_config, dit_config = read_component_config(folder, "vae"), read_component_config(folder, "transformer")
    shape = latent_shape(vae_config, height=run.height, width=run.width, num_frames=run.num_frames)
    _check_writable(session, out_dir)
    check_model_limits(run, vae_config, dit_config)
    check_loras(run, dit_config)
    check_sequence_length(dims, shape.num_tokens(tuple(dit_config["patch_size"])))
    kernel = resolve_kernel(run.attention, device)

    is_dit = session.is_dit_rank
    role = "+".join(r for r, on in (("encoders+vae", rank == 0), ("dit", is_dit)) if on)
    metrics = RankMetrics(rank=rank, role=role, device=str(device))
    other_dit_ranks = [r for r in dims.dit_ranks if r != 0]

    vae = encoder_rank = None
    if rank == 0:
        with metrics.timed("load_s"):
            vae = load_vae(folder, dtypes.vae, device, allow_pickle=run.model.allow_pickle)
        metrics.hold("vae", parameter_bytes(vae))
        encoder_rank = _EncoderRank(run, folder, dtypes, metrics, vae)

    transformer = scheduler = context_cache = None
    if is_dit:
        with metrics.timed("load_s", device):
            transformer = load_transformer(folder, dtypes.dit, device, allow_pickle=run.model.allow_pickle)
            apply_loras(transformer, list(run.lora))
            scheduler = load_scheduler(folder, run.scheduler, run.flow_shift)
        metrics.hold("dit", parameter_bytes(transformer))
        context_cache = parallelize_dit(transformer, session, kernel=kernel, compile_blocks=run.compile,
                                        context_cache=run.context_cache)
    if encoder_rank is not None:
        encoder_rank.start()

    names = input_names(run)
    sent: deque[PendingSend] = deque()
    ready: deque[tuple[PromptJob, dict[str, torch.Tensor]]] = deque()

    def hand_over_next() -> None:
        if encoder_rank is None or encoder_rank.remaining == 0:
            return
        job, tensors = encoder_rank.next_inputs()
        ready.append((job, tensors))
        if other_dit_ranks:
            sent.append(send_tensors(tensors, other_dit_ranks, device, session.inputs_group))

    videos = []
    if rank == 0:
        # With a stage split, video i+1 is handed over before video i is decoded, so the DiT ranks never
        # wait for the decode.
        for _ in range(2 if dims.stage_split else 1):
            hand_over_next()
    for index in range(len(prompts)):
        latents = None
        if is_dit:
            tensors = ready[0][1] if rank == 0 else recv_tensors(names, 0, device, session.inputs_group)
            latents = _denoise_one(run, session, transformer, scheduler, tensors, shape, dtypes, metrics,
                                   description=f"video {index + 1}/{len(prompts)}")
            if context_cache is not None:
                context_cache.cache.clear()  # this video's prompts are done: free their keys and values
            if index == len(prompts) - 1:
                del transformer
                transformer = None
                metrics.release("dit")
                gc.collect()
            if rank == dims.dit_leader and rank != 0:
                send_tensors({"latents": latents}, [0], device, session.latents_group).wait()
        if rank == 0:
            job, _ = ready.popleft()
            if not is_dit:
                latents = recv_tensors(["latents"], dims.dit_leader, device, session.latents_group)["latents"]
            hand_over_next()
            video_name, frames_name = output_names(index, queued)
            with metrics.timed("decode_s", device):
                frames = decode_latents(latents, vae)
            with metrics.timed("write_s"):
                write_video(frames, out_dir / video_name, run.frame_rate, overwrite=run.output.overwrite)
                if run.output.save_frames:
                    write_frames(frames, out_dir / frames_name, overwrite=run.output.overwrite)
            videos.append({"index": index, "prompt": job.prompt, "video": video_name,
                           "frames": frames_name if run.output.save_frames else None,
                           "shape": list(frames.shape)})
            log.info("wrote %s", out_dir / video_name)
        metrics.video_done(device)
    while sent:
        sent.popleft().wait()
    if encoder_rank is not None:
        encoder_rank.close()
    metrics.timings["total_s"] = time.perf_counter() - start
    snapshots = session.gather_to_zero(metrics.snapshot(device))
    if rank != 0:
        return None
    report = _report(run, session, snapshots, videos)
    write_json(report, out_dir / "run.json")
    t = report["timings"]
    peak = max(m["peak_bytes"] for m in report["memory"]) / 2**30
    log.info("done: %d video(s) in %.1f s (load %.1f, encode %.1f, denoise %.1f, decode %.1f); max peak %.2f GiB "
             "per rank; details in %s", len(videos), t["total_s"], t["load_s"], t["encode_s"], t["denoise_s"],
             t["decode_s"], peak, out_dir / "run.json")
    return report


def parallelize_dit(transformer: torch.nn.Module, session: Session, *, kernel: str, compile_blocks: bool,
                    context_cache: bool = False) -> ContextCacheHandle | None:
    """Attention kernel, context cache, sequence split, then compilation: compiled blocks trace the hooks
    and processors the split installed. Returns the context cache's handle when one was installed."""
    if kernel != "sdpa":
        transformer.set_attention_backend(DIFFUSERS_BACKENDS[kernel])
    handle = cache_context_kv(transformer) if context_cache and not compile_blocks else None
    parallelize_sequence(transformer, ulysses_group=session.group("ulysses"), ring_group=session.group("ring"),
                         device=session.device, kernel=kernel)
    if compile_blocks:
        for block in transformer.blocks:
            block.compile()
    return handle


def _check_writable(session: Session, out_dir: Path) -> None:
    """Rank 0 writes the outputs: find out now, not after the denoise, and stop every rank alike."""
    problem = None
    if session.rank == 0:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".probe-"):
                pass
        except OSError as error:
            problem = f"output.dir={str(out_dir)!r} is not allowed: a folder this user can write ({error})"
    problem = session.agree(problem)
    if problem:
        raise ConfigError(problem)


def _denoise_one(run, session, transformer, scheduler, tensors, shape, dtypes, metrics, description):
    device, dims = session.device, session.dims
    embeds = {name: tensor.to(device) for name, tensor in tensors.items()}
    predictor = GuidedNoise(
        transformer,
        prompt_embeds=embeds["prompt_embeds"].to(dtypes.dit),
        negative_prompt_embeds=embeds["negative_prompt_embeds"].to(dtypes.dit)
        if "negative_prompt_embeds" in embeds else None,
        image_embeds=embeds["image_embeds"].to(dtypes.dit) if "image_embeds" in embeds else None,
        guidance_scale=run.guidance_scale,
        cfg_group=session.group("cfg"),
    )
    with metrics.timed("denoise_s", device):
        result = denoise(
            latents=initial_noise(shape, run.seed, device), scheduler=scheduler, steps=run.steps,
            predict_noise=predictor, model_dtype=dtypes.dit, condition=embeds.get("condition"),
            show_progress=session.rank == dims.dit_leader, description=description,
        )
    metrics.step_seconds.append(result.step_seconds)
    return result.latents


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"wan_dist": __version__, "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def _report(run: RunConfig, session: Session, snapshots: list[dict], videos: list[dict]) -> dict[str, Any]:
    dims = session.dims
    leader = snapshots[dims.dit_leader]
    zero = snapshots[0]
    steps = leader["step_seconds"]
    timings = {
        "load_s": max(s["timings"].get("load_s", 0.0) for s in snapshots),
        "encode_s": zero["timings"].get("encode_s", 0.0),
        "denoise_s": leader["timings"].get("denoise_s", 0.0),
        "steps_s": steps[0] if len(steps) == 1 else steps,
        "decode_s": zero["timings"].get("decode_s", 0.0),
        "write_s": zero["timings"].get("write_s", 0.0),
        "total_s": max(s["timings"].get("total_s", 0.0) for s in snapshots),
    }
    config = OmegaConf.to_container(OmegaConf.structured(run), resolve=True)
    return {
        "config": config,
        "world_size": session.world_size,
        "backend": session.backend,
        "mesh": {"cfg": dims.cfg, "ring": dims.ring, "ulysses": dims.ulysses, "stage_split": dims.stage_split,
                 "dit_ranks": dims.dit_ranks, "describe": dims.describe()},
        "versions": _versions(),
        "timings": timings,
        "memory": [{k: v for k, v in s.items() if k not in ("timings", "step_seconds")} for s in snapshots],
        "rank_timings": [s["timings"] for s in snapshots],
        "videos": videos,
    }
