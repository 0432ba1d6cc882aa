"""diffusers' own single-process pipelines: the reference every mode is compared with."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

TOLERANCE = 1e-4


@lru_cache(maxsize=32)
def reference_frames(
    folder: str, *, prompt: str, negative_prompt: str = "", image: str | None = None,
    last_image: str | None = None, height: int = 48, width: int = 80, num_frames: int = 9, steps: int = 3,
    guidance_scale: float = 5.0, guidance_scale_2: float | None = None, flow_shift: float | None = None,
    seed: int = 0, scheduler: str = "unipc", lora: tuple[tuple, ...] = (), vae_tiling: bool = False,
    dit_storage_dtype: str = "auto",
) -> np.ndarray:
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanImageToVideoPipeline
    from diffusers import WanPipeline

    cls = WanImageToVideoPipeline if image else WanPipeline
    # A TI2V folder is saved as a WanPipeline; diffusers runs its image-to-video with the I2V class.
    pipe = cls.from_pretrained(folder, dtype=torch.float32)
    if flow_shift is None:  # the folder's own, as diffusers' pipeline samples it
        flow_shift = pipe.scheduler.config.flow_shift
    if scheduler == "euler":
        pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=flow_shift)
    elif scheduler in ("euler_distill", "lcm_distill"):
        from wan_dist.wan.schedulers import DistilledEulerScheduler

        pipe.scheduler = DistilledEulerScheduler.from_config(pipe.scheduler.config, shift=flow_shift,
                                                             stochastic_sampling=scheduler == "lcm_distill")
        pipe.scheduler.noise_seed = seed
    else:
        pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=flow_shift)
    if lora:
        from wan_dist.config.schema import lora_experts

        # (path, scale) or (path, scale, expert): into the experts diffusers' load_into_transformer_2 picks.
        adapters: dict[int, tuple[list[str], list[float]]] = {}
        for i, (path, scale, *expert) in enumerate(lora):
            for index in lora_experts(expert[0] if expert else None):
                pipe.load_lora_weights(path, adapter_name=f"ref_{i}", load_into_transformer_2=index == 1)
                adapters.setdefault(index, ([], []))[0].append(f"ref_{i}")
                adapters[index][1].append(scale)
        for index, (names, scales) in adapters.items():
            (pipe.transformer, pipe.transformer_2)[index].set_adapters(names, scales)
    pipe.set_progress_bar_config(disable=True)
    if vae_tiling:
        pipe.vae.enable_tiling()
    if dit_storage_dtype != "auto":
        from wan_dist.wan.loading import STORAGE_DTYPES_BY_NAME

        pipe.transformer.enable_layerwise_casting(storage_dtype=STORAGE_DTYPES_BY_NAME[dit_storage_dtype],
                                                  compute_dtype=torch.float32)
    kwargs = dict(
        prompt=prompt, negative_prompt=negative_prompt, height=height, width=width, num_frames=num_frames,
        num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np",
        generator=torch.Generator("cpu").manual_seed(seed),
    )
    if guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = guidance_scale_2
    if image:
        from diffusers.utils import load_image

        kwargs["image"] = load_image(image)
        if last_image:
            kwargs["last_image"] = load_image(last_image)
    with torch.no_grad():
        return pipe(**kwargs).frames[0].astype(np.float32)


def max_abs_error(ours: np.ndarray | str | Path, reference: np.ndarray) -> float:
    if not isinstance(ours, np.ndarray):
        ours = np.load(ours)
    assert ours.shape == reference.shape, (ours.shape, reference.shape)
    return float(np.abs(ours - reference).max())
