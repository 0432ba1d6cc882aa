"""The two roles of a run, each a small unit that loads what the plan gives its rank and runs it.

`EncoderStage` (rank 0): the text encoder (background thread), the I2V image encoder and the VAE; it
encodes each video's inputs, hands them over, takes the latents back, decodes and writes. `DitStage` (the
DiT ranks): the DiT, parallelized as the plan says; it takes each video's inputs, denoises and hands the
latents back. They talk only through the `Handoff`.

Each stage's `run()` is a generator that yields where the other stage of the same rank may go on: rank 0
without a stage split holds both and `run_stages` alternates them (encode and hand over video i, denoise
it, decode it); a rank with one stage just runs it to the end.
"""

from __future__ import annotations

import gc
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..parallel.cfg import GuidedNoise
from .decode import decode_latents
from ..wan.loading import (
    apply_loras, build_transformer_on_meta, load_image_encoder, load_scheduler, load_text_encoder, load_tokenizer, load_transformer,
    load_transformer_sharded, load_transformer_to_host, load_vae, parameter_bytes,
)
from .metrics import RankMetrics
from ..parallel.parallelize import DitHandle, parallelize_dit
from ..wan.pipeline import ChannelCondition, DenoiseResult, Experts, TextOnly, TokenTimesteps, denoise, initial_noise
from ..parallel.dims import INPUTS, LATENTS, STATE
from ..plan.job import BAND, EXPERT_COMPONENTS, ComponentPlan, JobPlan
from ..config.presets import WAN22_TI2V
from ..parallel.session import Session
from ..parallel.handoff import DitInputs, DitOutputs, Handoff
from .text_encoding import (
    BackgroundEncoder, PromptJob, TextEncoder, encode_image_condition, encode_image_embeds, encoder_thread_count,
)
from .video import write_frames, write_video
from ..parallel.world import World

log = logging.getLogger(__name__)


def _component_device(plan: JobPlan, name: str, session: Session) -> torch.device:
    return session.device if plan.components[name].device == session.device.type else torch.device("cpu")


class VaeWork:
    """The VAE on a rank that holds it (rank 0; every rank when the plan splits the decode or the I2V
    encode into bands, which are collectives over `group`: all its ranks call together)."""

    def __init__(self, plan: JobPlan, session: Session, metrics: RankMetrics, group=None) -> None:
        self.plan, self.session, self.metrics, self.group = plan, session, metrics, group
        self.work = plan.ranks[session.rank]
        vae = plan.components["vae"]
        with metrics.timed("load_s"):
            self.vae = load_vae(plan.folder, vae.dtype, session.device, allow_pickle=plan.allow_pickle)
        if vae.tiling:
            self.vae.enable_tiling()  # diffusers' tiles (256 px, stride 192), blended as diffusers blends them
        metrics.hold("vae", parameter_bytes(self.vae))

    def image_condition(self) -> torch.Tensor | None:
        """The image-to-video condition (on rank 0; None elsewhere), the image's rows in bands with
        vae_encode=patch."""
        from diffusers.utils import load_image

        sampling = self.plan.sampling
        image, *last = [load_image(path) for path in self.plan.images]
        with self.metrics.timed("encode_s"):
            return encode_image_condition(
                image, self.vae, height=sampling.height, width=sampling.width,
                num_frames=sampling.num_frames, last_image=last[0] if last else None,
                first_frame_only=self.plan.family == WAN22_TI2V,
                group=self.group if self.work.condition == BAND else None)

    def decode(self, latents: torch.Tensor) -> np.ndarray | None:
        """The frames on rank 0 (None elsewhere), decoded in bands with vae_decode=patch; its time and the
        peak of what it allocated go to run.json."""
        device = self.session.device
        in_bands = self.work.decode == BAND
        if in_bands:
            # Rank 0 may come late (it awaits the next prompt's encoding first): the bands' exchanges
            # should wait for its transfers only, not for that.
            self.session.follow_rank_zero("decode")
        with self.metrics.timed("decode_s", device), self.metrics.peak("decode", device):
            return decode_latents(latents, self.vae, self.group if in_bands else None)


class EncoderStage:
    """Rank 0's side: encode, hand over, take the latents back, decode, write."""

    def __init__(self, plan: JobPlan, session: Session, handoff: Handoff, metrics: RankMetrics, vae: VaeWork,
                 condition: torch.Tensor | None = None) -> None:
        self.plan, self.session, self.handoff, self.metrics, self.vae = plan, session, handoff, metrics, vae
        folder, allow_pickle = plan.folder, plan.allow_pickle
        self.videos: list[dict] = []
        self._encode_s: dict[int, float] = {}  # per video: its prompts' encoding seconds

        text = plan.components["text_encoder"]
        text_device = _component_device(plan, "text_encoder", session)

        def load_model():
            with metrics.timed("load_s"):
                model = load_text_encoder(folder, text.dtype, text_device, allow_pickle=allow_pickle)
            metrics.hold("text_encoder", parameter_bytes(model))
            return model

        # Beside a GPU DiT the CPU encoder gets the node's cores while it encodes (torchrun gives each rank
        # one thread); on a CPU-only run the ranks keep the cores they were given.
        threads = encoder_thread_count(len(os.sched_getaffinity(0)), session.env.local_world_size) \
            if session.device.type == "cuda" and text_device.type == "cpu" else None
        encoder = TextEncoder(load_tokenizer(folder), load_model=load_model, dtype=text.dtype,
                              cache_dir=plan.embedding_cache, threads=threads,
                              cache_key=_weights_fingerprint(folder / text.subfolder))
        self._jobs = [PromptJob(v.index, v.prompt, plan.negative_prompt) for v in plan.videos]
        texts = {t for job in self._jobs for t in (job.prompt, job.negative_prompt) if t is not None}
        # Load here, on the main thread, unless the cache holds every text: model loading patches
        # module construction process-wide and must not overlap the DiT/VAE loads from a thread.
        if not all(encoder.is_cached(t) for t in texts):
            encoder.model = load_model()
        self._encoder = encoder
        self._image_inputs: dict[str, torch.Tensor] = {"condition": condition} if plan.image_task else {}
        if "image_encoder" in plan.ranks[session.rank].weight_bytes:
            self._image_inputs["image_embeds"] = self._embed_image(text_device, allow_pickle)
        self._background: BackgroundEncoder | None = None
        self._results: Iterator | None = None

    def _embed_image(self, device: torch.device, allow_pickle: bool) -> torch.Tensor:
        """The image's CLIP embeddings (FLF2V: the first and the last image's), once for the whole queue."""
        from diffusers.utils import load_image

        with self.metrics.timed("load_s"):
            image_encoder, processor = load_image_encoder(
                self.plan.folder, self.plan.components["image_encoder"].dtype, device, allow_pickle=allow_pickle)
        self.metrics.hold("image_encoder", parameter_bytes(image_encoder))
        images = [load_image(path) for path in self.plan.images]
        with self.metrics.timed("encode_s"):
            embeds = encode_image_embeds(images if len(images) > 1 else images[0], image_encoder, processor)
        del image_encoder
        self.metrics.release("image_encoder")
        return embeds

    def start(self) -> None:
        """Start encoding in the background. Only once every model of this rank is loaded: diffusers'
        and transformers' loaders patch tensor and module construction process-wide while they run."""
        self._background = BackgroundEncoder(self._encoder, self._jobs)
        self._results = iter(self._background)
        self._encoder = None  # the thread holds the only reference; it is freed when the queue is done

    def _hand_over_through(self, index: int) -> None:
        while self.handoff.handed_over <= min(index, len(self.plan.videos) - 1):
            job, tensors, seconds = next(self._results)
            self.metrics.timings["encode_s"] = self.metrics.timings.get("encode_s", 0.0) + seconds
            self._encode_s[job.index] = seconds
            self.handoff.send(INPUTS, DitInputs(
                prompt_embeds=tensors["prompt_embeds"],
                negative_prompt_embeds=tensors.get("negative_prompt_embeds"),
                image_embeds=self._image_inputs.get("image_embeds"),
                condition=self._image_inputs.get("condition"),
            ))
            log.info("video %d/%d: inputs handed over", job.index + 1, len(self.plan.videos))
            if self.handoff.handed_over == len(self.plan.videos):
                self.close()

    def run(self) -> Iterator[None]:
        plan, device = self.plan, self.session.device
        for video in plan.videos:
            self._hand_over_through(video.index + self.handoff.ahead - 1)
            yield  # a DiT stage on this rank denoises the video now
            latents = self.handoff.receive(LATENTS).latents
            # The ordering rule: the next video is handed over before this one is decoded.
            self._hand_over_through(video.index + self.handoff.ahead)
            log.info("video %d/%d: decoding", video.index + 1, len(plan.videos))
            frames = self.vae.decode(latents)
            with self.metrics.timed("write_s"):
                write_video(frames, plan.out_dir / video.video, plan.sampling.frame_rate, overwrite=plan.overwrite)
                if video.frames:
                    write_frames(frames, plan.out_dir / video.frames, overwrite=plan.overwrite)
            self.videos.append({"index": video.index, "prompt": video.prompt, "video": video.video,
                                "frames": video.frames, "shape": list(frames.shape),
                                "encode_s": self._encode_s.get(video.index)})
            log.info("wrote %s", plan.out_dir / video.video)
            self.metrics.video_done(device)

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


class DitStage:
    """A DiT rank's side: take the inputs, denoise its group's steps, hand the state on or the latents back."""

    def __init__(self, plan: JobPlan, session: Session, handoff: Handoff, metrics: RankMetrics, world: World,
                 vae: VaeWork | None = None) -> None:
        """`vae`: on a DiT rank other than rank 0 with the decode in bands, the VAE it decodes its band
        with, right after each video, together with rank 0."""
        self.plan, self.session, self.handoff, self.metrics, self.vae = plan, session, handoff, metrics, vae
        self.work = plan.ranks[session.rank].dit
        self.dtype = plan.components["dit"].dtype
        # Each expert this rank holds (both of a two-expert model, or its group's one under an expert
        # split) is loaded and parallelized alike, with its own context cache.
        self.experts = self.work.experts
        self.transformers: list[torch.nn.Module] = []
        self.handles: list[DitHandle] = []
        with metrics.timed("load_s", session.device):
            for name in self.experts:
                transformer, handle = self._load(plan.components[name], world)
                self.transformers.append(transformer)
                self.handles.append(handle)
                metrics.hold(name, parameter_bytes(transformer))
            self.scheduler = load_scheduler(plan.folder, plan.sampling.scheduler, plan.sampling.flow_shift,
                                            seed=plan.seed)
        self.cfg_group = world.axis_group("cfg")
        # A rank that also encodes records its memory after each decode instead.
        self._records_videos = not plan.ranks[session.rank].encodes

    def _load(self, dit: ComponentPlan, world: World) -> tuple[torch.nn.Module, DitHandle]:
        plan, device, shard = self.plan, self.session.device, self.work.shard
        options = dict(kernels=plan.kernels, device=device, ulysses_group=world.axis_group("ulysses"),
                       ring_group=world.axis_group("ring"), context_cache=dit.context_cache,
                       storage_dtype=dit.storage_dtype, compute_dtype=dit.dtype, offload=dit.offload,
                       compile_blocks=dit.compile)
        if shard is not None:
            # Parallelized on the meta device, then each rank reads only its own rows of the weights.
            transformer = build_transformer_on_meta(plan.folder, dit.dtype, dit.subfolder)
            handle = parallelize_dit(transformer, shard_mesh=world.shard_mesh, **options)
            load_transformer_sharded(transformer, plan.folder, dit.dtype, device, subfolder=dit.subfolder,
                                     shard_rank=shard[0], shard_count=shard[1])
            return transformer, handle
        if dit.offload:
            # The DiT never goes to the device whole: it is read into the host memory it streams from, and
            # the offload step places its parts. fp8 storage replaces each stored weight by a cast copy,
            # which group offloading then pins itself: pinned, the loaded weights would only stay behind
            # in torch's cache of pinned memory.
            transformer = load_transformer_to_host(plan.folder, dit.dtype,
                                                   pinned=device.type == "cuda" and dit.storage_dtype is None,
                                                   allow_pickle=plan.allow_pickle, subfolder=dit.subfolder)
        else:
            transformer = load_transformer(plan.folder, dit.dtype, device, allow_pickle=plan.allow_pickle,
                                           subfolder=dit.subfolder)
        apply_loras(transformer, list(dit.loras))
        return transformer, parallelize_dit(transformer, **options)

    def run(self) -> Iterator[None]:
        plan, device = self.plan, self.session.device
        for video in plan.videos:
            while not self.handoff.ready(INPUTS):
                yield  # this rank's encoder stage hands the video over first
            inputs = self.handoff.receive(INPUTS)
            result = self._denoise(inputs, description=f"video {video.index + 1}/{len(plan.videos)}")
            for handle in self.handles:
                if handle.context_cache is not None:
                    handle.context_cache.clear()  # this video's prompts are done: free their keys and values
            if video.index == len(plan.videos) - 1:
                self._release()
            # The next group takes the video from here, or rank 0 its latents (the hop's source sends).
            if self.work.stop is not None:
                self.handoff.send(STATE, result.state)
            else:
                self.handoff.send(LATENTS, DitOutputs(result.latents))
            if self.vae is not None:
                self.vae.decode(result.latents)  # this rank's band; the frames are gathered to rank 0
            if self._records_videos:
                self.metrics.video_done(device)

    def _denoise(self, inputs: DitInputs, description: str) -> DenoiseResult:
        device, dtype, plan, work = self.session.device, self.dtype, self.plan, self.work

        def to_dit(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        # Whether there is an unconditional branch is the high-noise guidance's call (diffusers'
        # do_classifier_free_guidance); the low-noise expert combines the branches with its own scale.
        sampling = plan.sampling
        predictors = {name: GuidedNoise(
            transformer, prompt_embeds=to_dit(inputs.prompt_embeds),
            negative_prompt_embeds=to_dit(inputs.negative_prompt_embeds), image_embeds=to_dit(inputs.image_embeds),
            guidance_scale=sampling.expert_guidance[EXPERT_COMPONENTS.index(name)], guided=plan.guided,
            cfg_group=self.cfg_group,
        ) for name, transformer in zip(self.experts, self.transformers)}
        boundary = None if plan.boundary_ratio is None \
            else plan.boundary_ratio * self.scheduler.config.num_train_timesteps
        # A resuming group waits here for the previous group's state, outside its denoise time.
        start = self.handoff.receive(STATE) if work.resumes else initial_noise(plan.latent, plan.seed, device)
        with self.metrics.timed("denoise_s", device):
            result = denoise(
                latents=start, scheduler=self.scheduler, steps=sampling.steps,
                experts=Experts(*(predictors.get(name) for name in EXPERT_COMPONENTS), boundary_timestep=boundary),
                model_dtype=dtype, conditioning=self._conditioning(inputs.condition),
                show_progress=work.leader, description=description, stop=work.stop,
            )
        self.metrics.step_seconds.append(result.step_seconds)
        return result

    def _conditioning(self, condition: torch.Tensor | None) -> TextOnly:
        plan, device = self.plan, self.session.device
        if plan.family == WAN22_TI2V:
            return TokenTimesteps.of(plan.latent, plan.patch[1:], condition, device)
        return TextOnly() if condition is None else ChannelCondition(condition.to(device))

    def _release(self) -> None:
        """After the last video: the DiT's memory goes back before rank 0 (maybe this rank) decodes."""
        for handle in self.handles:
            handle.remove()
        self.transformers, self.handles = [], []
        for name in self.experts:
            self.metrics.release(name)
        gc.collect()


def run_stages(stages: list[EncoderStage | DitStage]) -> None:
    """Alternate the stages of this rank, each up to its next yield, until all are done."""
    running = [stage.run() for stage in stages]
    while running:
        for generator in list(running):
            try:
                next(generator)
            except StopIteration:
                running.remove(generator)
