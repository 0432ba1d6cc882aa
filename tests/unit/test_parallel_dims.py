"""`resolve_parallel_dims` / `ParallelDims`: presets, explicit degrees, auto filling, refusals."""

from __future__ import annotations

import dataclasses

import pytest

from wan_dist.config.schema import ConfigError, ParallelConfig
from wan_dist.parallel.dims import ParallelDims, check_sequence_length, pinned_world_size, resolve_parallel_dims


def resolve(preset: str = "auto", *, world: int, heads: int = 12, guidance: float = 5.0, **degrees) -> ParallelDims:
    return resolve_parallel_dims(ParallelConfig(preset=preset, **degrees), world_size=world, num_heads=heads,
                                 guidance_scale=guidance)


def layout(dims: ParallelDims) -> tuple[int, int, int, bool]:
    return dims.cfg, dims.ulysses, dims.ring, dims.stage_split


def refused(match: tuple[str, ...], preset: str = "auto", **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        resolve(preset, **kwargs)
    message = str(info.value)
    for fragment in match:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# ------------------------------------------------------------------------------------------------- auto


def expected_auto(world: int, heads: int, guidance: float) -> tuple[int, int, int]:
    """The rule, written independently: cfg 2 when guided and the world is even; then the largest
    ulysses degree that divides both the remaining ranks and the head count; the ring takes the rest."""
    cfg = 2 if guidance > 1 and world % 2 == 0 else 1
    rest = world // cfg
    ulysses = max(d for d in range(1, rest + 1) if rest % d == 0 and heads % d == 0)
    return cfg, ulysses, rest // ulysses


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("guidance", [5.0, 1.0])
@pytest.mark.parametrize("heads", [12, 40, 3])
def test_auto(world, guidance, heads):
    dims = resolve(world=world, heads=heads, guidance=guidance)
    assert (dims.cfg, dims.ulysses, dims.ring) == expected_auto(world, heads, guidance)
    assert dims.stage_split is False
    assert dims.world_size == world
    assert dims.cfg * dims.ulysses * dims.ring == world == dims.dit_world_size
    assert dims.sp == dims.ulysses * dims.ring
    assert dims.dit_ranks == list(range(world))
    assert dims.dit_leader == 0
    assert heads % dims.ulysses == 0
    if guidance <= 1:
        assert dims.cfg == 1


@pytest.mark.parametrize("world, heads, guidance, expected", [
    (1, 12, 5.0, (1, 1, 1)),
    (2, 12, 5.0, (2, 1, 1)),   # cfg first
    (2, 12, 1.0, (1, 2, 1)),   # no guidance: ulysses
    (4, 12, 5.0, (2, 2, 1)),
    (8, 12, 5.0, (2, 4, 1)),
    (8, 12, 1.0, (1, 4, 2)),   # 8 does not divide 12: ulysses 4, ring 2
    (8, 40, 1.0, (1, 8, 1)),
    (4, 3, 5.0, (2, 1, 2)),    # 3 heads: no ulysses of 2, ring
    (6, 3, 5.0, (2, 3, 1)),
    (6, 40, 5.0, (2, 1, 3)),
    (5, 40, 5.0, (1, 5, 1)),   # odd world: no cfg
    (7, 12, 5.0, (1, 1, 7)),
])
def test_auto_examples(world, heads, guidance, expected):
    assert (lambda d: (d.cfg, d.ulysses, d.ring))(resolve(world=world, heads=heads, guidance=guidance)) == expected


# ---------------------------------------------------------------------------------------------- presets


@pytest.mark.parametrize("world", [1, 2, 4])
def test_single_needs_one_rank(world):
    if world == 1:
        assert layout(resolve("single", world=1)) == (1, 1, 1, False)
    else:
        refused(("world size is", str(world)), "single", world=world)


def test_cfg_preset():
    assert layout(resolve("cfg", world=2)) == (2, 1, 1, False)


def test_cfg_preset_on_more_ranks_refused():
    refused(("cfg=2", "ring=1", "ulysses=1", "world size is 4"), "cfg", world=4)


@pytest.mark.parametrize("world", [1, 3])
def test_cfg_preset_on_odd_world_refused(world):
    refused(("parallel.cfg_degree=2",), "cfg", world=world)


@pytest.mark.parametrize("world, heads", [(2, 12), (4, 12), (4, 3), (8, 40)])
def test_ulysses_preset(world, heads):
    assert layout(resolve("ulysses", world=world, heads=heads)) == (1, world, 1, False)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_ring_preset(world):
    assert layout(resolve("ring", world=world)) == (1, 1, world, False)


@pytest.mark.parametrize("world, heads, expected", [
    (4, 12, (1, 2, 2, False)),
    (8, 12, (1, 4, 2, False)),
    (8, 40, (1, 4, 2, False)),
    (1, 12, (1, 1, 1, False)),
])
def test_usp_preset(world, heads, expected):
    dims = resolve("usp", world=world, heads=heads)
    assert layout(dims) == expected
    if world > 1:
        assert dims.ring > 1, "usp keeps a ring axis"


@pytest.mark.parametrize("world, expected", [(4, (2, 2, 1)), (8, (2, 2, 2))])
def test_cfg_usp_preset(world, expected):
    """cfg 2 x the sequence ranks; 2 sequence ranks (a prime) cannot have two axes, so they go to ulysses."""
    dims = resolve("cfg_usp", world=world, heads=12)
    assert (dims.cfg, dims.ulysses, dims.ring) == expected
    assert dims.sp == world // 2


def test_presets_fix_cfg_even_with_guidance():
    """Only auto (and stage_split) add a cfg axis on their own."""
    for preset in ("ulysses", "ring", "usp"):
        assert resolve(preset, world=4, guidance=5.0).cfg == 1


def test_stage_split_on_three():
    dims = resolve("stage_split", world=3, guidance=5.0)
    assert dims.stage_split is True
    assert dims.dit_world_size == 2
    assert dims.dit_ranks == [1, 2]
    assert dims.dit_leader == 1
    assert not dims.is_dit_rank(0) and dims.is_dit_rank(1) and dims.is_dit_rank(2)
    assert dims.cfg == 2  # guided, two DiT ranks: cfg first


def test_stage_split_unguided_on_three():
    dims = resolve("stage_split", world=3, guidance=1.0, heads=12)
    assert layout(dims) == (1, 2, 1, True)
    assert dims.dit_ranks == [1, 2]


def test_stage_split_on_two():
    dims = resolve("stage_split", world=2)
    assert layout(dims) == (1, 1, 1, True)
    assert dims.dit_ranks == [1] and dims.dit_leader == 1


def test_stage_split_flag_with_auto():
    dims = resolve("auto", world=5, stage_split=True, heads=12, guidance=5.0)
    assert layout(dims) == (2, 2, 1, True)
    assert dims.dit_ranks == [1, 2, 3, 4]


def test_stage_split_flag_off_overrides_preset():
    assert resolve("stage_split", world=2, stage_split=False).stage_split is False


@pytest.mark.parametrize("preset", ["stage_split", "auto"])
def test_stage_split_on_world_of_one_refused(preset):
    refused(("parallel.stage_split", "world size of 1"), preset, world=1, stage_split=True)


def test_stage_split_describe():
    text = resolve("stage_split", world=3).describe()
    assert "cfg=2" in text and "stage_split" in text


# ------------------------------------------------------------------------------------- explicit degrees


def test_explicit_ulysses_overrides_ring_preset_and_ring_is_filled():
    dims = resolve("ring", world=4, ulysses_degree=2)
    assert layout(dims) == (1, 2, 2, False)


def test_explicit_ring_filled_with_ulysses():
    assert layout(resolve("auto", world=8, guidance=1.0, ring_degree=2)) == (1, 4, 2, False)


@pytest.mark.parametrize("preset", ["auto", "usp", "ring"])
def test_explicit_ulysses_that_does_not_divide(preset):
    refused(("parallel.ulysses_degree=3", "4 ranks"), preset, world=4, guidance=1.0, ulysses_degree=3)


@pytest.mark.parametrize("preset", ["auto", "usp", "ulysses"])
def test_explicit_ring_that_does_not_divide(preset):
    refused(("parallel.ring_degree=3", "4 ranks"), preset, world=4, guidance=1.0, ring_degree=3)


def test_explicit_degree_against_a_preset_that_fixes_the_other_axis():
    # parallel=ulysses fixes ring=1, so ulysses_degree=3 fully determines the split: 3 != 4 ranks
    refused(("ulysses=3", "ring=1", "world size is 4"), "ulysses", world=4, ulysses_degree=3)
    refused(("ring=3", "ulysses=1", "world size is 4"), "ring", world=4, ring_degree=3)


def test_explicit_cfg_1_overrides_auto():
    assert layout(resolve("auto", world=4, guidance=5.0, cfg_degree=1, heads=12)) == (1, 4, 1, False)


def test_explicit_cfg_2_on_usp():
    dims = resolve("usp", world=8, cfg_degree=2, heads=12)
    assert layout(dims) == (2, 2, 2, False)


def test_explicit_degrees_leave_no_room_for_cfg():
    # ulysses 2 fixed on 2 ranks: auto does not add cfg (it would need 4)
    assert layout(resolve("auto", world=2, guidance=5.0, ulysses_degree=2)) == (1, 2, 1, False)


def test_explicit_cfg_on_odd_dit_world():
    refused(("parallel.cfg_degree=2", "3 DiT ranks"), "auto", world=3, cfg_degree=2)


def test_mismatched_product_names_degrees_and_world():
    message = refused(("cfg=1", "ring=3", "ulysses=2", "world size is 4"), "auto", world=4, cfg_degree=1,
                      ulysses_degree=2, ring_degree=3)
    assert "6" in message  # the ranks the degrees need


def test_mismatched_product_with_stage_split():
    refused(("cfg=1", "ring=2", "ulysses=2", "stage-split", "world size is 6"), "stage_split", world=6,
            cfg_degree=1, ring_degree=2, ulysses_degree=2)


@pytest.mark.parametrize("preset", ["cfg", "cfg_usp"])
def test_cfg_preset_without_guidance_refused(preset):
    refused(("cfg", "guidance_scale"), preset, world=2 if preset == "cfg" else 4, guidance=1.0)


# ------------------------------------------------------------------------------------------ ParallelDims


def test_parallel_dims_direct():
    dims = ParallelDims(cfg=2, ring=2, ulysses=2, stage_split=True, world_size=9)
    assert dims.sp == 4 and dims.dit_world_size == 8
    assert dims.dit_ranks == list(range(1, 9))
    assert dims.dit_leader == 1


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(cfg=0, ring=1, ulysses=1), "parallel.cfg_degree=0"),
    (dict(cfg=1, ring=0, ulysses=1), "parallel.ring_degree=0"),
    (dict(cfg=1, ring=1, ulysses=-1), "parallel.ulysses_degree=-1"),
    (dict(cfg=3, ring=1, ulysses=1), "parallel.cfg_degree=3"),
])
def test_parallel_dims_refuses_bad_degrees(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        ParallelDims(stage_split=False, world_size=kwargs["cfg"] * kwargs["ring"] * kwargs["ulysses"] or 1,
                     **kwargs)


def test_parallel_dims_is_frozen():
    dims = ParallelDims(cfg=1, ring=1, ulysses=1, stage_split=False, world_size=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        dims.cfg = 2  # type: ignore[misc]


# -------------------------------------------------------------------------------- check_sequence_length


def test_check_sequence_length():
    dims = ParallelDims(cfg=1, ring=2, ulysses=2, stage_split=False, world_size=4)
    check_sequence_length(dims, 4)
    check_sequence_length(dims, 5)  # uneven: padded
    with pytest.raises(ConfigError) as info:
        check_sequence_length(dims, 3)
    message = str(info.value)
    assert "3 DiT tokens" in message and "4 sequence-parallel ranks" in message


def test_check_sequence_length_ignores_cfg():
    dims = ParallelDims(cfg=2, ring=1, ulysses=1, stage_split=False, world_size=2)
    check_sequence_length(dims, 1)


# ------------------------------------------------------------------------------------ pinned world size


@pytest.mark.parametrize("preset, degrees, expected", [
    ("single", {}, 1),
    ("cfg", {}, 2),
    ("cfg", {"stage_split": True}, 3),
    ("usp", {"ulysses_degree": 2, "ring_degree": 2}, 4),
    ("auto", {"cfg_degree": 2, "ulysses_degree": 2, "ring_degree": 1}, 4),
    ("auto", {}, None),
    ("ulysses", {}, None),
    ("stage_split", {"cfg_degree": 1}, None),
    ("no_such_preset", {}, None),
])
def test_pinned_world_size(preset, degrees, expected):
    p = ParallelConfig(preset=preset, **degrees)
    assert pinned_world_size(p) == expected
    if expected is not None:  # the pinned world is one the layout actually resolves on
        assert resolve(preset, world=expected, **degrees).world_size == expected
