"""The case table: every end-to-end `generate` case the layout, family and option tests draw from, each
with the world size it runs in and whether `make test` runs it or only `make test-full` (the rest of the
cross product). What a case covers is read off its fields (`covers`), so a tag cannot disagree with
the run; `tests/unit/test_matrix.py` fails when a layout, parallel preset, model family, memory option,
VAE mode or sampler the library offers is covered by no `make test` case.

One spawned world per world size runs every case the session's selected tests ask for (the `matrix`
fixture, tests/conftest.py), so a `pytest -k` run starts only what it needs.

Shapes are awkward on purpose: 48x80 pixels give 45 DiT tokens (divisible by neither 2 nor 4) and the
tiny DiT has 3 heads (divisible by neither 2 nor 4)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

import pytest

from tests.modes import Case
from wan_dist.config.schema import compose_run
from wan_dist.config.presets import WAN22_EXPERTS, WAN22_TI2V, ModelSpec


@dataclass(frozen=True)
class Entry:
    case: Case
    world: int
    family: str  # a key of FAMILIES: the folder and what it is asked to do
    full: bool = False  # only under `make test-full`
    group: str = "layouts"  # which test module reads it: layouts, fsdp, bands, fp8, tiling, features, distilled

    @property
    def name(self) -> str:
        return self.case.name

    @property
    def axes(self) -> frozenset[str]:
        """The mesh axes this case splits over (more than one rank each)."""
        case = self.case
        dit_ranks = self.world - int(case.stage_split)
        if case.expert_split:
            high = case.expert_ranks[0] if case.expert_ranks else dit_ranks // 2
            dit_ranks = high
        degrees = {"cfg": case.cfg, "ring": case.ring, "ulysses": case.ulysses}
        pinned = 1
        for degree in degrees.values():
            pinned *= degree or 1
        # A degree left open takes what the other degrees leave of the (high-noise) group.
        filled = {axis: degree if degree is not None else dit_ranks // pinned for axis, degree in degrees.items()}
        axes = {axis for axis, degree in filled.items() if degree > 1}
        axes |= {flag for flag in ("stage_split", "expert_split") if getattr(case, flag)}
        return frozenset(axes)

    def degree(self, axis: str) -> int:
        value = getattr(self.case, axis)
        return value if value is not None else (2 if axis in self.axes else 1)

    @property
    def covers(self) -> frozenset[str]:
        """Tags `kind:value` for what this case exercises."""
        case = self.case
        tags = {f"family:{self.family}", f"sampler:{case.scheduler}", f"vae_decode:{case.vae_decode}",
                f"world:{self.world}"}
        tags |= {f"axis:{axis}" for axis in self.axes}
        if case.image is not None:
            tags.add(f"vae_encode:{case.vae_encode}")
        if case.vae_tiling:
            tags.add("vae:tiling")
        if case.fsdp:
            tags.add("memory:fsdp")
        if case.dit_storage_dtype != "auto":
            tags |= {"memory:fp8", f"storage:{case.dit_storage_dtype}"}
        if case.dit_offload != "none":
            tags.add(f"memory:offload_{case.dit_offload}")
        if case.compile:
            tags.add("compile")
        if case.lora:
            tags.add("lora")
        if case.prompts_file:
            tags.add("queue")
        if case.embedding_cache:
            tags.add("embedding_cache")
        if case.guidance_scale <= 1.0:
            tags.add("unguided")
        return frozenset(tags)


# The tiny folders (tests/conftest.py builds them), awkward on purpose: experts of different depths, the
# 48-channel VAE, two images' CLIP tokens; a scheduler whose shift is not the default preset's, so runs
# given only the folder must take the folder's, as diffusers' pipeline does.
FOLDER_SPECS = {
    "t2v": ModelSpec(task="t2v"),
    "i2v": ModelSpec(task="i2v"),
    "moe_t2v": ModelSpec(task="t2v", family=WAN22_EXPERTS, expert_layers=1, boundary_ratio=0.875),
    "moe_i2v": ModelSpec(task="i2v", family=WAN22_EXPERTS, expert_layers=3, boundary_ratio=0.9, flow_shift=12.0),
    "ti2v": ModelSpec(task="t2v", family=WAN22_TI2V),
    "flf2v": ModelSpec(task="flf2v"),
}
# What a case is asked to do: (folder, task). TI2V's one folder does both.
FAMILIES = {"t2v": ("t2v", "t2v"), "i2v": ("i2v", "i2v"), "moe_t2v": ("moe_t2v", "t2v"),
            "moe_i2v": ("moe_i2v", "i2v"), "ti2v_t2v": ("ti2v", "t2v"), "ti2v_i2v": ("ti2v", "i2v"),
            "flf2v": ("flf2v", "flf2v")}
# The prompt queue (one video per line; the fixture's file has a blank line between, which is skipped).
QUEUE = ["a red kite over a beach", "snow falling on a quiet street", "a bowl of ripe oranges"]
# Inputs the fixtures write, named in the table by these tokens and bound to paths before a case runs.
INPUTS = ("@image", "@last_image", "@lora", "@high_lora", "@low_lora", "@lightx2v_lora", "@queue", "@embeddings")


def bind(case: Case, folders: dict[str, str], inputs: dict[str, str]) -> Case:
    """The case with its folder (a key of FOLDER_SPECS) and input tokens replaced by the fixtures' paths."""
    def path(value):
        return inputs[value] if isinstance(value, str) and value in INPUTS else value

    return replace(case, folder=folders[case.folder], image=path(case.image), last_image=path(case.last_image),
                   prompts_file=path(case.prompts_file), embedding_cache=path(case.embedding_cache),
                   lora=tuple((path(lora[0]), *lora[1:]) for lora in case.lora))


# The families' cases: T2V and I2V of Wan2.1 in every layout; the other families each in single and in
# layouts that cover every axis, the stage split and FSDP: two experts of different depths (the low-noise
# one at its own guidance; split between two groups of ranks too, the first of 3 steps the high-noise
# group's, UniPC's history handed to the low-noise group with the latents), TI2V's per-token timesteps split
# with the tokens (at 96x160: 45 tokens, 3 per shard of 15 plus padding for 2 and 4), FLF2V's two images.
# (world, layout name, degrees, full?)
_LAYOUTS = (
    (1, "single", {}, False),
    (2, "stage_split", dict(stage_split=True), False),
    (2, "cfg", dict(cfg=2), False),
    (2, "ulysses", dict(ulysses=2), False),
    (2, "ring", dict(ring=2), False),
    (3, "ulysses3", dict(ulysses=3), True),
    (3, "stage_split_cfg", dict(stage_split=True, cfg=2), True),
    (3, "ring3", dict(ring=3), False),
    (4, "usp", dict(ulysses=2, ring=2), True),
    (4, "cfg_usp", dict(cfg=2, ulysses=2), True),
    (4, "cfg_ring", dict(cfg=2, ring=2), True),
    (4, "stage_split_ulysses3", dict(stage_split=True, ulysses=3), True),
)
# Wan2.1's I2V in make test where the image's condition meets each kind of split; T2V everywhere it is listed.
_I2V_IN_MAKE_TEST = {"single", "cfg", "ulysses", "stage_split"}
_FAMILY_LAYOUTS = (
    (1, "moe_t2v", "single", {}, False), (1, "moe_i2v", "single", {}, False),
    (1, "ti2v_t2v", "single", {}, False), (1, "ti2v_i2v", "single", {}, False), (1, "flf2v", "single", {}, False),
    (2, "moe_t2v", "cfg", dict(cfg=2), True), (2, "moe_t2v", "ulysses", dict(ulysses=2), False),
    (2, "moe_t2v", "expert_split", dict(expert_split=True), False),
    (2, "moe_i2v", "cfg_fsdp", dict(cfg=2, fsdp=True), False), (2, "ti2v_i2v", "ulysses", dict(ulysses=2), False),
    (2, "ti2v_t2v", "ring_fsdp", dict(ring=2, fsdp=True), False),
    (2, "flf2v", "stage_split", dict(stage_split=True), False),
    (3, "moe_t2v", "ring3", dict(ring=3), True),
    # The 48-channel VAE's encode and decode in bands over the three ranks too.
    (3, "ti2v_i2v", "ring3_vae_bands", dict(ring=3, vae_decode="patch", vae_encode="patch"), False),
    (3, "ti2v_i2v", "stage_split_cfg", dict(stage_split=True, cfg=2), True),
    (3, "flf2v", "ulysses3", dict(ulysses=3), False),
    (3, "moe_i2v", "stage_split_cfg", dict(stage_split=True, cfg=2), True),
    # Ulysses over the high-noise group's 2 ranks (degrees left open are filled per group).
    (3, "moe_t2v", "expert_split_ulysses_high", dict(expert_split=True, expert_ranks=(2, 1), ulysses=None), False),
    (3, "moe_i2v", "expert_split_stage_split", dict(expert_split=True, stage_split=True), False),
    # Each expert's group its own cfg axis.
    (4, "moe_t2v", "expert_split_cfg", dict(expert_split=True, expert_ranks=(2, 2), cfg=2), False),
    (4, "moe_t2v", "usp_fsdp", dict(ulysses=2, ring=2, fsdp=True), False),
    (4, "ti2v_t2v", "cfg_usp", dict(cfg=2, ulysses=2), False),
    (4, "moe_i2v", "stage_split_ulysses3", dict(stage_split=True, ulysses=3), False),
    (4, "flf2v", "cfg_ring_fsdp", dict(cfg=2, ring=2, fsdp=True), True),
)
_SIZES = {"ti2v_t2v": dict(height=96, width=160), "ti2v_i2v": dict(height=96, width=160)}

# FSDP: T2V in every layout, I2V (image context, condition channels) in one per world size. 3 DiT ranks: no
# parameter's rows divide evenly, so some shards are short (or empty).
_FSDP = (
    (2, "t2v", "cfg", dict(cfg=2), False), (2, "t2v", "ulysses", dict(ulysses=2), True),
    (2, "t2v", "ring", dict(ring=2), True), (3, "t2v", "ulysses3", dict(ulysses=3), True),
    (3, "t2v", "stage_split_cfg", dict(stage_split=True, cfg=2), False), (4, "t2v", "usp", dict(ulysses=2, ring=2), True),
    (4, "t2v", "cfg_usp", dict(cfg=2, ulysses=2), True),
    (4, "t2v", "stage_split_ulysses3", dict(stage_split=True, ulysses=3), True),
    (2, "i2v", "cfg", dict(cfg=2), True), (3, "i2v", "stage_split_cfg", dict(stage_split=True, cfg=2), True),
    (4, "i2v", "stage_split_ulysses3", dict(stage_split=True, ulysses=3), False),
)
# The VAE in bands over every rank (decode; I2V's condition encode too); the same layouts decoded whole on
# rank 0 are the families' `t2v_cfg` / `i2v_cfg`.
_BANDS = (
    (2, "cfg", dict(cfg=2), (False, False)), (2, "ulysses", dict(ulysses=2), (True, True)),
    (2, "stage_split", dict(stage_split=True), (False, True)), (4, "usp", dict(ulysses=2, ring=2), (True, True)),
    (4, "stage_split_ulysses3", dict(stage_split=True, ulysses=3), (True, True)),
)  # (t2v full?, i2v full?)
# fp8 storage (E4M3 unless named), with and without FSDP (whose shards, and so all-gathers, are then fp8).
_FP8 = (
    (1, "t2v", "single", {}, False), (1, "t2v", "single_e5m2", dict(dit_storage_dtype="fp8_e5m2"), False),
    (2, "t2v", "cfg", dict(cfg=2), True), (2, "t2v", "ulysses", dict(ulysses=2), True),
    (2, "t2v", "cfg_fsdp", dict(cfg=2, fsdp=True), True), (2, "t2v", "ulysses_fsdp", dict(ulysses=2, fsdp=True), True),
    (2, "i2v", "ulysses_fsdp", dict(ulysses=2, fsdp=True), False),
)
# Above diffusers' 256 px tile, so the frames really are decoded in blended tiles.
TILING_SIZE = dict(height=288, width=320, num_frames=5, steps=2)


def _family_case(name: str, family: str, **fields) -> Case:
    folder, task = FAMILIES[family]
    images = {}
    if task in ("i2v", "flf2v"):
        images["image"] = "@image"
    if task == "flf2v":
        images["last_image"] = "@last_image"
    extra = dict(guidance_scale_2=2.0) if family.startswith("moe") else {}
    return Case(name=name, folder=folder, **{**images, **_SIZES.get(family, {}), **extra, **fields})


def _table() -> list[Entry]:
    entries = []
    for world, layout, degrees, full in _LAYOUTS:
        for family in ("t2v", "i2v"):
            rest = full or (family == "i2v" and layout not in _I2V_IN_MAKE_TEST)
            entries.append(Entry(_family_case(f"{family}_{layout}", family, **degrees), world, family, rest))
    for world, family, layout, degrees, full in _FAMILY_LAYOUTS:
        entries.append(Entry(_family_case(f"{family}_{layout}", family, **degrees), world, family, full))
    for world, family, layout, degrees, full in _FSDP:
        entries.append(Entry(_family_case(f"fsdp_{family}_{layout}", family, fsdp=True, **degrees),
                             world, family, full, "fsdp"))
    for world, layout, degrees, fulls in _BANDS:
        for family, full in zip(("t2v", "i2v"), fulls):
            encode = dict(vae_encode="patch") if family == "i2v" else {}
            entries.append(Entry(_family_case(f"bands_{family}_{layout}", family, vae_decode="patch",
                                              **encode, **degrees), world, family, full, "bands"))
    for world, family, layout, degrees, full in _FP8:
        fields = {"dit_storage_dtype": "fp8_e4m3", **degrees}
        entries.append(Entry(_family_case(f"fp8_{family}_{layout}", family, **fields), world, family, full, "fp8"))
    for family, full in (("t2v", False), ("i2v", True)):
        entries.append(Entry(_family_case(f"{family}_cfg_tiled", family, cfg=2, vae_tiling=True, **TILING_SIZE),
                             2, family, full, "tiling"))
    entries += [replace(entry, group="features") for entry in _feature_entries()]
    entries += [replace(entry, group="distilled") for entry in _distilled_entries()]
    names = [entry.name for entry in entries]
    assert len(names) == len(set(names)), "case names must be unique"
    return entries


def _feature_entries() -> list[Entry]:
    """LoRA, the Euler sampler, no guidance, compiled blocks, prompt queues (one process, a stage split,
    the expert pipeline) and the embedding cache."""
    t2v, moe = "t2v", "moe_t2v"
    lora = (("@lora", 0.7),)
    # Two experts of 2 and 1 blocks: a LoRA of 2 blocks into the high-noise one, one of 1 block into both.
    expert_loras = (("@high_lora", 0.7, "high"), ("@low_lora", 0.5, "both"))
    queue = "@queue"
    return [
        Entry(Case("lora", t2v, lora=lora), 1, "t2v"),
        Entry(Case("euler", t2v, scheduler="euler"), 1, "t2v"),
        Entry(Case("no_guidance", t2v, guidance_scale=1.0), 1, "t2v", full=True),
        Entry(Case("queue_single", t2v, prompts_file=queue), 1, "t2v", full=True),
        Entry(Case("cache_cold", t2v, embedding_cache="@embeddings"), 1, "t2v"),
        # After cache_cold in the same world (the table's order is the run order within a world).
        Entry(Case("cache_warm", t2v, embedding_cache="@embeddings"), 1, "t2v"),
        Entry(Case("queue_stage_split", t2v, stage_split=True, prompts_file=queue), 2, "t2v"),
        Entry(Case("lora_cfg", t2v, cfg=2, lora=lora), 2, "t2v", full=True),
        Entry(Case("no_guidance_ulysses", t2v, ulysses=2, guidance_scale=1.0), 2, "t2v"),
        # torch.compile'd blocks trace the sequence split's hooks and processor (inductor's CPU code).
        Entry(Case("compiled_ulysses", t2v, ulysses=2, compile=True), 2, "t2v"),
        Entry(Case("expert_loras_ulysses", moe, ulysses=2, lora=expert_loras, guidance_scale_2=2.0), 2,
              "moe_t2v"),
        # The expert pipeline over a queue: rank 0 encodes, runs the high-noise steps of video i+1 while
        # rank 1 runs the low-noise steps of video i, and decodes.
        Entry(Case("queue_expert_split", moe, expert_split=True, prompts_file=queue, scheduler="euler",
                   guidance_scale_2=2.0), 2, "moe_t2v"),
    ]


DISTILLED = ("+experiment=distilled_4step", "height=32", "width=48", "num_frames=5")


def _distilled_entries() -> list[Entry]:
    """The 4-step distilled experiment (its values as the experiment composes them, with a LoRA in
    LightX2V's key format) on two Ulysses ranks, its fresh-noise sampler on two Ring ranks, and that
    sampler continued by the low-noise group of an expert split (its first fresh noise is the switch
    step's draw)."""
    run = compose_run(list(DISTILLED))
    experiment = Case("experiment_ulysses", "t2v", ulysses=2, prompt=run.prompt, negative_prompt=run.negative_prompt,
                      height=run.height, width=run.width, num_frames=run.num_frames, steps=run.steps,
                      guidance_scale=run.guidance_scale, flow_shift=run.flow_shift, scheduler=run.scheduler,
                      lora=(("@lightx2v_lora", 1.0),))
    return [
        Entry(experiment, 2, "t2v"),
        Entry(replace(experiment, name="lcm_ring", ulysses=1, ring=2, scheduler="lcm_distill"), 2, "t2v"),
        Entry(Case("lcm_expert_split", "moe_t2v", expert_split=True, steps=4, guidance_scale=1.0,
                   scheduler="lcm_distill"), 2, "moe_t2v"),
    ]


def params(cases: Iterable[str | tuple[str, ...]]) -> list:
    """pytest parameters for these cases (a name, or a tuple of names for a test that compares them),
    the ones with a case outside `make test` marked `full`."""
    found = []
    for names in cases:
        names = names if isinstance(names, tuple) else (names,)
        marks = [pytest.mark.cases(*names)] + ([pytest.mark.full] if any(BY_NAME[n].full for n in names) else [])
        found.append(pytest.param(*names, marks=marks))
    return found


def group(name: str) -> list[str]:
    """The cases of one group (Entry.group), in table order."""
    return [entry.name for entry in TABLE if entry.group == name]


TABLE = _table()
BY_NAME = {entry.name: entry for entry in TABLE}
