"""How the ranks are split: cfg x ring x ulysses DiT ranks, plus an optional stage-split rank.

Rank 0 always holds the encoders and the VAE and writes the outputs. Without a stage split it is also a
DiT rank; with one it holds nothing else and the DiT ranks are 1..world-1.

With an expert split (Wan2.2's two experts) the DiT ranks form two groups, the high-noise expert's first,
each with a mesh of its own. The rule for their axes, stated once: a degree set by the preset or an explicit
key applies within each group and must fit each; a degree left open is filled per group from its size as
for a whole world (cfg when guided and the group's size is even, under a preset that picks cfg; then the
sequence axes).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.schema import ParallelConfig, is_guided
from ..config.errors import ConfigError, fail
from ..config.presets import EXPERTS, PARALLEL_PRESETS

MESH_AXES = ("cfg", "ring", "ulysses")


@dataclass(frozen=True)
class DitGroup:
    """DiT ranks that run the same steps together, on one mesh: consecutive ranks from `first`, split
    cfg x ring x ulysses."""

    cfg: int
    ring: int
    ulysses: int
    first: int

    @property
    def sp(self) -> int:
        return self.ring * self.ulysses

    @property
    def size(self) -> int:
        return self.cfg * self.sp

    @property
    def ranks(self) -> list[int]:
        return list(range(self.first, self.first + self.size))

    @property
    def leader(self) -> int:
        return self.first

    def describe(self) -> str:
        return f"cfg={self.cfg} x ring={self.ring} x ulysses={self.ulysses}"


@dataclass(frozen=True)
class Hop:
    """One leg of each video's way through the ranks: `src` sends one message to each of `dsts`; where
    `src` is among them, it passes the message to itself through a local queue."""

    name: str  # INPUTS, STATE or LATENTS
    src: int
    dsts: tuple[int, ...]

    @property
    def remote_dsts(self) -> list[int]:
        return [r for r in self.dsts if r != self.src]

    @property
    def ranks(self) -> tuple[int, ...]:
        return tuple(sorted({self.src, *self.dsts}))


# The hops, in the order a video takes them: rank 0's encoded inputs to every DiT rank; under an expert
# split, the sampler state from the high-noise group's leader to the low-noise group; the final latents
# from the last group's leader back to rank 0.
INPUTS, STATE, LATENTS = "inputs", "state", "latents"


@dataclass(frozen=True)
class ParallelDims:
    """cfg x ring x ulysses: the DiT ranks' axes; with an expert split (`low` set), the high-noise
    expert's group's, and `low` the (cfg, ring, ulysses) of the low-noise expert's group on the ranks
    after it."""

    cfg: int
    ring: int
    ulysses: int
    stage_split: bool
    world_size: int
    low: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        _check_degree_values({axis: getattr(self, axis) for axis in MESH_AXES})
        if self.low is not None:
            _check_degree_values(dict(zip(MESH_AXES, self.low)))
        needed = self.dit_world_size + int(self.stage_split)
        if self.low is not None and needed != self.world_size:
            raise ConfigError(
                f"parallel.expert_ranks={[g.size for g in self.groups]} is not allowed: the groups need "
                f"{needed} ranks with the stage-split rank, but the world size is {self.world_size}")
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
    def expert_split(self) -> bool:
        return self.low is not None

    @property
    def groups(self) -> tuple[DitGroup, ...]:
        """The DiT ranks' groups: one, or the high-noise and the low-noise expert's."""
        first = DitGroup(self.cfg, self.ring, self.ulysses, first=int(self.stage_split))
        if self.low is None:
            return (first,)
        return first, DitGroup(*self.low, first=first.first + first.size)

    def group_of(self, rank: int) -> DitGroup:
        """The group `rank` runs in (the first one for a rank outside every group)."""
        return next((g for g in self.groups if rank in g.ranks), self.groups[0])

    @property
    def dit_world_size(self) -> int:
        return sum(g.size for g in self.groups)

    @property
    def dit_ranks(self) -> list[int]:
        first = 1 if self.stage_split else 0
        return list(range(first, first + self.dit_world_size))

    @property
    def dit_leader(self) -> int:
        """The DiT rank that hands the final latents to rank 0 (the low-noise group's, with an expert
        split)."""
        return self.groups[-1].leader

    def is_dit_rank(self, rank: int) -> bool:
        return rank in self.dit_ranks

    @property
    def hops(self) -> tuple[Hop, ...]:
        """The handoff's hops for this layout (each video takes them in this order)."""
        inputs = Hop(INPUTS, 0, tuple(self.dit_ranks))
        latents = Hop(LATENTS, self.dit_leader, (0,))
        if self.low is None:
            return inputs, latents
        high, low = self.groups
        return inputs, Hop(STATE, high.leader, tuple(low.ranks)), latents

    def describe(self) -> str:
        split = " + stage_split(rank 0: encoders+VAE)" if self.stage_split else ""
        if self.low is None:
            return self.groups[0].describe() + split
        high, low = self.groups
        return (f"expert_split: high noise ranks {high.ranks} ({high.describe()}), low noise ranks {low.ranks} "
                f"({low.describe()}){split}")


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
    if degrees["cfg"] == 2 and not is_guided(guidance_scale):
        key = "parallel.cfg_degree" if p.cfg_degree is not None else "parallel"
        value = degrees["cfg"] if p.cfg_degree is not None else p.preset
        raise ConfigError(f"{key}={value!r} is not allowed with guidance_scale={guidance_scale}: without "
                          "guidance there is no unconditional branch for a cfg axis of 2")


def pinned_world_size(p: ParallelConfig) -> int | None:
    """The world size a layout needs when its preset and explicit degrees fix every axis
    (`parallel=single`: 1, `parallel=cfg`: 2; with an expert split, two groups of that), else None: it
    adapts to the world it is started in. An unknown preset is None too; the run itself names the error."""
    if p.preset not in PARALLEL_PRESETS:
        return None
    degrees, stage_split = _pinned(p)
    if any(degree is None for degree in degrees.values()):
        return None
    groups = 2 if p.expert_split else 1
    return degrees["cfg"] * degrees["ulysses"] * degrees["ring"] * groups + int(stage_split)


def resolve_parallel_dims(
    p: ParallelConfig, *, world_size: int, num_heads: int, guidance_scale: float,
    expert_steps: tuple[int, int] | None = None,
) -> ParallelDims:
    """Fill what the preset and the explicit degrees leave open, then check the result. With
    `parallel.expert_split`, per expert group (the module's rule); `expert_steps` (the steps each expert
    runs) sizes the groups unless parallel.expert_ranks does."""
    check_degrees(p, guidance_scale=guidance_scale)
    degrees, stage_split = _pinned(p)
    if stage_split and world_size < 2:
        raise ConfigError(
            "parallel.stage_split=true is not allowed with a world size of 1: it needs one rank for the "
            "encoders and VAE and at least one for the DiT (start with torchrun --nproc_per_node=2 or more)"
        )
    dit_world = world_size - int(stage_split)
    if p.expert_split:
        sizes = expert_group_sizes(p, dit_world, expert_steps)
        if sizes is None:
            raise ValueError("the groups' sizes follow the steps each expert runs: pass expert_steps")
        high, low = (_fill_axes(p, dict(degrees), n, num_heads, guidance_scale,
                                f"the {name}-noise expert's group of {n} (parallel.expert_ranks={list(sizes)})")
                     for name, n in zip((expert.noise for expert in EXPERTS), sizes))
        return ParallelDims(*high, stage_split=stage_split, world_size=world_size, low=low)
    cfg, ring, ulysses = _fill_axes(p, degrees, dit_world, num_heads, guidance_scale,
                                    f"{dit_world} DiT ranks", stage_split=stage_split, world_size=world_size)
    return ParallelDims(cfg=cfg, ring=ring, ulysses=ulysses, stage_split=stage_split, world_size=world_size)


def _fill_axes(p: ParallelConfig, degrees: dict[str, int | None], n: int, num_heads: int, guidance_scale: float,
               ranks: str, *, stage_split: bool = False, world_size: int | None = None) -> tuple[int, int, int]:
    """(cfg, ring, ulysses) over `n` DiT ranks (`ranks` names them in errors); `world_size` given: they
    are the whole world's, and a mismatch is told in its terms."""
    if degrees["cfg"] is None:
        fixed = (degrees["ulysses"] or 1) * (degrees["ring"] or 1)
        wants_cfg = is_guided(guidance_scale) and n % (2 * fixed) == 0
        degrees["cfg"] = 2 if wants_cfg and PARALLEL_PRESETS[p.preset].picks_cfg else 1
    if n % degrees["cfg"]:
        raise ConfigError(
            f"parallel.cfg_degree={degrees['cfg']} is not allowed with {ranks}: the DiT ranks "
            f"must divide into {degrees['cfg']} guidance branches"
        )
    rest = n // degrees["cfg"]
    u, r = degrees["ulysses"], degrees["ring"]
    if u is None and r is None:
        u, r = _fill_sequence_axes(rest, num_heads, both=PARALLEL_PRESETS[p.preset].both_sequence_axes)
    elif u is None:
        if rest % r:
            raise ConfigError(f"parallel.ring_degree={r} is not allowed: it must divide the {rest} ranks left "
                              f"after cfg_degree={degrees['cfg']} of {ranks}")
        u = rest // r
    elif r is None:
        if rest % u:
            raise ConfigError(f"parallel.ulysses_degree={u} is not allowed: it must divide the {rest} ranks "
                              f"left after cfg_degree={degrees['cfg']} of {ranks}")
        r = rest // u
    if degrees["cfg"] * u * r != n:
        named = [f"parallel.{axis}_degree={getattr(p, f'{axis}_degree')}" for axis in ("cfg", "ulysses", "ring")
                 if getattr(p, f"{axis}_degree")]
        if world_size is None:
            raise ConfigError(
                f"{', '.join(named) or f'parallel={p.preset}'} is not allowed: cfg={degrees['cfg']} x ring={r} x "
                f"ulysses={u} need {degrees['cfg'] * u * r} ranks, but {ranks} has {n} (each group takes the "
                "degrees set; set parallel.expert_ranks so that they fit, or leave the degrees open)")
        split = " + 1 stage-split rank" if stage_split else ""
        needed = degrees["cfg"] * u * r + int(stage_split)
        raise ConfigError(
            f"{', '.join(named) or f'parallel={p.preset}'} is not allowed: cfg={degrees['cfg']} x ring={r} x "
            f"ulysses={u}{split} need {needed} ranks, but the world size is {world_size} (make the product "
            f"{n} or start {needed} ranks)"
        )
    return degrees["cfg"], r, u


def check_expert_split(p: ParallelConfig, world_size: int) -> None:
    """The expert split's rules that the world size alone decides (before any model is read)."""
    _, stage_split = _pinned(p)
    expert_group_sizes(p, world_size - int(stage_split), None)


def expert_group_sizes(p: ParallelConfig, dit_world: int,
                       expert_steps: tuple[int, int] | None) -> tuple[int, int] | None:
    """The high-noise and low-noise groups' sizes: parallel.expert_ranks, or the DiT ranks shared in
    proportion to the steps each expert runs (`expert_steps`; None: only check), at least one each."""
    if dit_world < 2:
        fail("parallel.expert_split", True, f"false with {dit_world} DiT rank: each expert needs a group of its "
             "own (at least 2 DiT ranks)")
    if p.expert_ranks is not None:
        sizes = list(p.expert_ranks)
        if len(sizes) != 2 or any(not isinstance(n, int) or n < 1 for n in sizes) or sum(sizes) != dit_world:
            fail("parallel.expert_ranks", sizes, f"two positive rank counts [high, low] that sum to the {dit_world} "
                 "DiT ranks (or unset: in proportion to each expert's steps)")
        return sizes[0], sizes[1]
    if expert_steps is None:
        return None
    high, low = expert_steps
    share = min(max(round(dit_world * high / (high + low)), 1), dit_world - 1)
    return share, dit_world - share


def check_sequence_length(dims: ParallelDims, num_tokens: int) -> None:
    """Padding makes any length work, but a shard must hold at least one real token."""
    for group in dims.groups:
        if group.sp > num_tokens:
            raise ConfigError(
                f"the video has {num_tokens} DiT tokens, fewer than the {group.sp} sequence-parallel ranks "
                f"(ring={group.ring} x ulysses={group.ulysses}): use larger height/width/num_frames or fewer ranks"
            )
