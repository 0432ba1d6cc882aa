"""Prompt and image encoding on the encoder rank: UMT5 (CPU by default), the CLIP image encoder and the
VAE-encoded first frame for I2V. Text is encoded in a background thread, ahead of the DiT, and the
embeddings can be cached on disk by (model, prompt)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config.presets import TEXT_MAX_TOKENS
from ..plan.outputs import atomic_write
from .decode import normalize_latents

log = logging.getLogger(__name__)

def encoder_thread_count(cpus: int, ranks_on_node: int) -> int:
    """Threads for the encoding rank's text encoder while the DiT runs on GPUs: the cores it may use, less
    one for each rank's main thread on the node (they launch GPU work and drive the collectives)."""
    return max(1, cpus - ranks_on_node)


@contextlib.contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """torch's intra-op threads for work started from the calling thread while inside; None changes
    nothing. torchrun sets OMP_NUM_THREADS=1 for every rank, right for ranks sharing a CPU node, but
    the encoding rank on a GPU node has the cores to itself while it encodes. OpenMP keeps the count
    per thread, so the rank's other threads keep theirs."""
    if count is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class PromptJob:
    index: int
    prompt: str
    negative_prompt: str | None  # None when guidance is off: no unconditional branch to encode


class TextEncoder:
    """UMT5 embeddings exactly as diffusers' Wan pipelines make them: cleaned text, 512 tokens, the
    embeddings past each prompt's length zeroed."""

    def __init__(
        self, tokenizer, model=None, *, load_model: Callable[[], Any] | None = None,
        dtype: torch.dtype | None = None, cache_dir: str | None = None, cache_key: str = "",
        threads: int | None = None,
    ) -> None:
        """`model`, or `load_model` to load it on the first prompt the disk cache does not hold: with a
        warm cache the 11 GB UMT5 is never read. `threads`: torch's threads while a CPU model encodes
        (`cpu_threads`); None keeps the caller's."""
        if model is None and load_model is None:
            raise ValueError("TextEncoder needs a model or a way to load one")
        self.tokenizer = tokenizer
        self.model = model
        self._load_model = load_model
        self.dtype = dtype or model.dtype
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.cache_key = cache_key
        self.threads = threads

    def _cache_path(self, prompt: str) -> Path | None:
        if self.cache_dir is None:
            return None
        digest = hashlib.sha256(f"{self.cache_key}\0{self.dtype}\0{prompt}".encode()).hexdigest()
        return self.cache_dir / f"{digest}.pt"

    def is_cached(self, prompt: str) -> bool:
        path = self._cache_path(prompt)
        return path is not None and path.is_file()

    @torch.no_grad()
    def encode(self, prompt: str) -> torch.Tensor:
        """(1, 512, text_dim) on the CPU, in the encoder's dtype."""
        path = self._cache_path(prompt)
        if path is not None and path.is_file():
            return torch.load(path, map_location="cpu", weights_only=True)
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        if self.model is None:
            self.model = self._load_model()

        inputs = self.tokenizer(
            [prompt_clean(prompt)], padding="max_length", max_length=TEXT_MAX_TOKENS, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        device = next(self.model.parameters()).device
        mask = inputs.attention_mask
        with cpu_threads(self.threads if device.type == "cpu" else None):
            hidden = self.model(inputs.input_ids.to(device), mask.to(device)).last_hidden_state.cpu()
        length = int(mask.gt(0).sum())
        embeds = torch.zeros_like(hidden)
        embeds[:, :length] = hidden[:, :length]
        if path is not None:
            # Another process sharing the cache may write the same entry: each writes its own temp file.
            atomic_write(path, lambda tmp: torch.save(embeds, tmp))
        return embeds

    def encode_job(self, job: PromptJob) -> dict[str, torch.Tensor]:
        out = {"prompt_embeds": self.encode(job.prompt)}
        if job.negative_prompt is not None:
            out["negative_prompt_embeds"] = self.encode(job.negative_prompt)
        return out


class BackgroundEncoder:
    """Encodes a queue of prompts in a thread, at most `ahead` results waiting, so the encoder (often on
    CPU) works while the DiT denoises. Exceptions surface in the consumer."""

    _DONE = object()

    def __init__(self, encoder: TextEncoder, jobs: list[PromptJob], *, ahead: int = 2) -> None:
        self._encoder = encoder
        self._jobs = jobs
        self._results: queue.Queue = queue.Queue(maxsize=ahead)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="text-encoder", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for job in self._jobs:
                if self._stop.is_set():
                    return
                start = time.perf_counter()
                tensors = self._encoder.encode_job(job)
                self._put((job, tensors, time.perf_counter() - start))
        except BaseException as error:  # re-raised in the consumer's thread
            self._put(error)
        self._put(self._DONE)

    def _put(self, item) -> None:
        while not self._stop.is_set():
            try:
                self._results.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[PromptJob, dict[str, torch.Tensor], float]]:
        while True:
            item = self._results.get()
            if item is self._DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@torch.no_grad()
def encode_image_embeds(image, image_encoder, image_processor) -> torch.Tensor:
    """CLIP penultimate hidden states, as diffusers' WanImageToVideoPipeline.encode_image."""
    device = next(image_encoder.parameters()).device
    inputs = image_processor(images=image, return_tensors="pt").to(device)
    inputs["pixel_values"] = inputs["pixel_values"].to(image_encoder.dtype)
    return image_encoder(**inputs, output_hidden_states=True).hidden_states[-2].cpu()


@torch.no_grad()
def encode_image_condition(image, vae, *, height: int, width: int, num_frames: int, last_image=None,
                           first_frame_only: bool = False, group=None) -> torch.Tensor | None:
    """The image-to-video conditioning latents, as diffusers' WanImageToVideoPipeline.prepare_latents
    builds them, fp32, on the CPU:
    - Wan2.1 I2V/FLF2V and Wan2.2 I2V-A14B: the video of the first frame (and with `last_image`, FLF2V, the
      last), zeros between, VAE-encoded, behind 4 mask channels that mark the given frames:
      (1, 4 + z_dim, latent_frames, h, w);
    - Wan2.2 TI2V (`first_frame_only`): the first frame alone, VAE-encoded: (1, z_dim, 1, h, w).
    With a process `group` every rank of it encodes a band of rows (parallel/vae_bands.py, exact) and the result
    is on the group's rank 0, None on the others."""
    from diffusers.video_processor import VideoProcessor

    temporal = vae.config.scale_factor_temporal
    spatial = vae.config.scale_factor_spatial
    device = next(vae.parameters()).device
    processor = VideoProcessor(vae_scale_factor=spatial)

    def pixels_of(picture) -> torch.Tensor:
        return processor.preprocess(picture, height=height, width=width).to(device, dtype=torch.float32).unsqueeze(2)

    first = pixels_of(image)
    if first_frame_only:
        video = first
    else:
        given = [first] if last_image is None else [first, pixels_of(last_image)]
        zeros = first.new_zeros(1, first.shape[1], num_frames - len(given), height, width)
        video = torch.cat([given[0], zeros, *given[1:]], dim=2)
    if group is None:
        latent = vae.encode(video.to(vae.dtype)).latent_dist.mode()
    else:
        from ..parallel.vae_bands import encode_patch_parallel

        latent = encode_patch_parallel(video.to(vae.dtype), vae, group, dst=0)
        if latent is None:
            return None
    latent = normalize_latents(latent.float(), vae.config)
    if first_frame_only:
        return latent.cpu()

    latent_frames, lh, lw = latent.shape[2:]
    mask = torch.ones(1, 1, num_frames, lh, lw)
    mask[:, :, 1:num_frames - (last_image is not None)] = 0
    first_mask = torch.repeat_interleave(mask[:, :, 0:1], dim=2, repeats=temporal)
    mask = torch.cat([first_mask, mask[:, :, 1:]], dim=2)
    mask = mask.view(1, -1, temporal, lh, lw).transpose(1, 2)
    return torch.cat([mask.to(latent), latent], dim=1).cpu()
