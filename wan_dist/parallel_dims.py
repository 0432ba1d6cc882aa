"""How the ranks are split: cfg x ring x ulysses DiT ranks, plus an optional stage-split rank.

Rank 0 always holds the encoders and the VAE and writes the outputs. Without a stage split it is also a
DiT rank; with one it holds nothing else and the DiT ranks are 1..world-1.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .config import ParallelConfig
from .errors import ConfigError, fail
from .presets import PARALLEL_PRESETS

MESH_AXES = ("cfg", "ring", "ulysses")

@dataclass(frozen=True)
class ParallelDims:
    cfg: int
    ring: int
    ulysses: int
    stage_split: bool
    world_size: int

    def __post_init__(self) -> None:
        _check_degree_values({axis: getattr(self, axis) for axis in MESH_AXES})
        needed = self.cfg * self.ring * self.ulysses + int(self.stage_split)
        if needed != self.world_size:
            split = " + 1 stage-split rank" if self.stage_split else ""
            raise ConfigError(
                f"parallel degrees cfg={self.cfg} x ring={self.ring} x ulysses={self.ulysses}{split} need "
                f"{needed} ranks, but the world size is {self.world_size}: make the product equal "
                f"{self.world_size - int(self.stage_split)} or start {needed} ranks"
            )

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    @property
    def dit_world_size(self) -> int:
        return self.cfg * self.sp

    @property
    def dit_ranks(self) -> list[int]:
        first = 1 if self.stage_split else 0
        return list(range(first, first + self.dit_world_size))

    @property
    def dit_leader(self) -> int:
        """The DiT rank that hands the final latents to rank 0."""
        return self.dit_ranks[0]

    def is_dit_rank(self, rank: int) -> bool:
        return rank in self.dit_ranks

    def describe(self) -> str:
        parts = [f"cfg={self.cfg}", f"ring={self.ring}", f"ulysses={self.ulysses}"]
        if self.stage_split:
            parts.append("stage_split(rank 0: encoders+VAE)")
        return " x ".join(parts[:3]) + (" + " + parts[3] if self.stage_split else "")

    def build_mesh(self, device_type: str, timeout_s: float | None = None) -> DeviceMesh:
        """The DiT ranks' mesh. Every rank must call this (group creation is collective); rank 0 of a
        stage split gets a mesh it is not part of and must not use. With `timeout_s`, every axis group
        has that collective timeout; without, the backend's default (gloo 30 min, nccl 10 min)."""
        ranks = torch.tensor(self.dit_ranks).view(self.cfg, self.ring, self.ulysses)
        override = None
        if timeout_s is not None:
            # DeviceMesh passes an axis' backend options' timeout to the group it creates (new_group or
            # split_group): (backend, options) per axis, the backend the default group's; one options
            # object per axis, since group creation writes into it.
            override = tuple((None, group_options(timeout_s)) for _ in MESH_AXES)
        return DeviceMesh(device_type, ranks, mesh_dim_names=MESH_AXES, backend_override=override)

    def build_shard_mesh(self, device_type: str, timeout_s: float | None = None) -> DeviceMesh:
        """All DiT ranks on one axis, the one FSDP2 shards the DiT's weights over (whatever the layout:
        the cfg and sequence ranks run the same blocks in the same order, so their all-gathers match).
        Collective, like build_mesh."""
        override = None if timeout_s is None else ((None, group_options(timeout_s)),)
        return DeviceMesh(device_type, torch.tensor(self.dit_ranks), mesh_dim_names=("shard",),
                          backend_override=override)


def group_options(timeout_s: float) -> "torch._C._distributed_c10d.Backend.Options":
    """Backend options of the default group's backend with this collective timeout (what DeviceMesh's
    `backend_override` takes); nccl needs its own options class, gloo takes the generic one."""
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = dist.get_backend()
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options.is_high_priority_stream = False  # what new_group gives an nccl group without options
        options._timeout = timeout
        return options
    return dist.ProcessGroupGloo.Options(backend, timeout)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _fill_sequence_axes(n: int, num_heads: int, both: bool) -> tuple[int, int]:
    """(ulysses, ring) with ulysses * ring == n. Ulysses first while the head count divides (its
    all-to-all is cheaper than the ring's n-1 exchanges); `both` keeps a ring axis as well (USP)."""
    candidates = [d for d in _divisors(n) if not both or d < n or n == 1]
    if both and n > 1 and len(candidates) == 1:  # n is prime: no two-axis split exists
        candidates = [n]
    head_friendly = [d for d in candidates if num_heads % d == 0]
    ulysses = max(head_friendly or candidates)
    return ulysses, n // ulysses


def _check_degree_values(degrees: dict[str, int | None]) -> None:
    for axis, value in degrees.items():
        if value is not None and value < 1:
            fail(f"parallel.{axis}_degree", value, "a positive integer (or null to fill from the world size)")
    if degrees["cfg"] not in (None, 1, 2):
        fail("parallel.cfg_degree", degrees["cfg"], "1 or 2 (the conditional and unconditional branches)")


def _pinned(p: ParallelConfig) -> tuple[dict[str, int | None], bool]:
    """The degrees the preset and the explicit keys fix (None: left open), and whether to stage-split."""
    preset = PARALLEL_PRESETS[p.preset]
    explicit = {"cfg": p.cfg_degree, "ulysses": p.ulysses_degree, "ring": p.ring_degree}
    degrees = {axis: explicit[axis] if explicit[axis] is not None else getattr(preset, axis) for axis in explicit}
    stage_split = p.stage_split if p.stage_split is not None else bool(preset.stage_split)
    return degrees, stage_split


def check_degrees(p: ParallelConfig, *, guidance_scale: float) -> None:
    """The rules on the degrees that hold whatever the world size: a known preset, positive degrees, a cfg
    axis of 1 or 2, and 2 only with guidance (else there is no unconditional branch to give it)."""
    if p.preset not in PARALLEL_PRESETS:
        fail("parallel", p.preset, f"one of {', '.join(PARALLEL_PRESETS)}")
    _check_degree_values({"cfg": p.cfg_degree, "ulysses": p.ulysses_degree, "ring": p.ring_degree})
    degrees, _ = _pinned(p)
    if degrees["cfg"] == 2 and guidance_scale <= 1:
        key = "parallel.cfg_degree" if p.cfg_degree is not None else "parallel"
        value = degrees["cfg"] if p.cfg_degree is not None else p.preset
        raise ConfigError(f"{key}={value!r} is not allowed with guidance_scale={guidance_scale}: without "
                          "guidance there is no unconditional branch for a cfg axis of 2")


def pinned_world_size(p: ParallelConfig) -> int | None:
    """The world size a layout needs when its preset and explicit degrees fix every axis
    (`parallel=single`: 1, `parallel=cfg`: 2), else None: it adapts to the world it is started in. An
    unknown preset is None too; the run itself names the error."""
    if p.preset not in PARALLEL_PRESETS:
        return None
    degrees, stage_split = _pinned(p)
    if any(degree is None for degree in degrees.values()):
        return None
    return degrees["cfg"] * degrees["ulysses"] * degrees["ring"] + int(stage_split)


def resolve_parallel_dims(
    p: ParallelConfig, *, world_size: int, num_heads: int, guidance_scale: float
) -> ParallelDims:
    """Fill what the preset and the explicit degrees leave open, then check the result."""
    check_degrees(p, guidance_scale=guidance_scale)
    degrees, stage_split = _pinned(p)
    if stage_split and world_size < 2:
        raise ConfigError(
            "parallel.stage_split=true is not allowed with a world size of 1: it needs one rank for the "
            "encoders and VAE and at least one for the DiT (start with torchrun --nproc_per_node=2 or more)"
        )
    dit_world = world_size - int(stage_split)

    if degrees["cfg"] is None:
        fixed = (degrees["ulysses"] or 1) * (degrees["ring"] or 1)
        wants_cfg = guidance_scale > 1 and dit_world % (2 * fixed) == 0
        degrees["cfg"] = 2 if wants_cfg and PARALLEL_PRESETS[p.preset].picks_cfg else 1
    if dit_world % degrees["cfg"]:
        raise ConfigError(
            f"parallel.cfg_degree={degrees['cfg']} is not allowed with {dit_world} DiT ranks: the DiT ranks "
            f"must divide into {degrees['cfg']} guidance branches"
        )
    rest = dit_world // degrees["cfg"]
    u, r = degrees["ulysses"], degrees["ring"]
    if u is None and r is None:
        u, r = _fill_sequence_axes(rest, num_heads, both=PARALLEL_PRESETS[p.preset].both_sequence_axes)
    elif u is None:
        if rest % r:
            raise ConfigError(f"parallel.ring_degree={r} is not allowed: it must divide the {rest} ranks left "
                              f"after cfg_degree={degrees['cfg']}")
        u = rest // r
    elif r is None:
        if rest % u:
            raise ConfigError(f"parallel.ulysses_degree={u} is not allowed: it must divide the {rest} ranks "
                              f"left after cfg_degree={degrees['cfg']}")
        r = rest // u
    if degrees["cfg"] * u * r != dit_world:
        named = [f"parallel.{axis}_degree={getattr(p, f'{axis}_degree')}" for axis in ("cfg", "ulysses", "ring")
                 if getattr(p, f"{axis}_degree")]
        split = " + 1 stage-split rank" if stage_split else ""
        needed = degrees["cfg"] * u * r + int(stage_split)
        raise ConfigError(
            f"{', '.join(named) or f'parallel={p.preset}'} is not allowed: cfg={degrees['cfg']} x ring={r} x "
            f"ulysses={u}{split} need {needed} ranks, but the world size is {world_size} (make the product "
            f"{dit_world} or start {needed} ranks)"
        )
    return ParallelDims(cfg=degrees["cfg"], ring=r, ulysses=u, stage_split=stage_split, world_size=world_size)


def check_sequence_length(dims: ParallelDims, num_tokens: int) -> None:
    """Padding makes any length work, but a shard must hold at least one real token."""
    if dims.sp > num_tokens:
        raise ConfigError(
            f"the video has {num_tokens} DiT tokens, fewer than the {dims.sp} sequence-parallel ranks "
            f"(ring={dims.ring} x ulysses={dims.ulysses}): use larger height/width/num_frames or fewer ranks"
        )
