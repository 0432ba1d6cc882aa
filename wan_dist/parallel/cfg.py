"""Classifier-free guidance: both branches in one process, or one branch per half of the cfg axis."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..config.schema import is_guided


class GuidedNoise:
    """The guided noise for one step, combined exactly as diffusers combines it:
    `uncond + scale * (cond - uncond)` in the DiT's dtype.

    With a cfg group of two ranks, rank 0 of the group runs the conditional branch and rank 1 the
    unconditional one; an all-gather gives both ranks both predictions, so both step identically.
    """

    def __init__(
        self,
        transformer: torch.nn.Module,
        *,
        prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        image_embeds: torch.Tensor | None,
        guidance_scale: float,
        cfg_group: dist.ProcessGroup | None,
        guided: bool | None = None,
    ) -> None:
        """`guided`: whether to run the unconditional branch at all (default: guidance_scale > 1); a
        two-expert model's low-noise expert follows the high-noise one's choice."""
        self.transformer = transformer
        self.guided = is_guided(guidance_scale) if guided is None else guided
        if self.guided and negative_prompt_embeds is None:
            raise ValueError("guidance needs the negative prompt's embeddings")
        self.guidance_scale = guidance_scale
        self.branches = [prompt_embeds] + ([negative_prompt_embeds] if self.guided else [])
        self.image_embeds = image_embeds
        self.cfg_group = cfg_group if cfg_group is not None and dist.get_world_size(cfg_group) > 1 else None
        if self.cfg_group is not None and len(self.branches) != dist.get_world_size(self.cfg_group):
            raise ValueError("a cfg axis of 2 needs guidance_scale > 1 (two branches)")

    def _run(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        return self.transformer(
            hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
            encoder_hidden_states_image=self.image_embeds, return_dict=False,
        )[0]

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        if self.cfg_group is None:
            outputs = [self._run(latents, timestep, embeds) for embeds in self.branches]
        else:
            mine = self._run(latents, timestep, self.branches[dist.get_rank(self.cfg_group)])
            outputs = [torch.empty_like(mine) for _ in self.branches]
            dist.all_gather(outputs, mine.contiguous(), group=self.cfg_group)
        if not self.guided:
            return outputs[0]
        cond, uncond = outputs
        return uncond + self.guidance_scale * (cond - uncond)
