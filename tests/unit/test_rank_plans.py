"""What each rank does in every case of the case table (tests/matrix.py), read off its plan alone: no rank
is started. The same cases run end to end in tests/dist; here every one of them, both tiers, is planned
for its world size and each rank's share checked against the layout's rules."""

from __future__ import annotations

import pytest

from tests.matrix import TABLE, bind
from tests.planning import plan_of
from wan_dist.parallel.dims import INPUTS, LATENTS, STATE
from wan_dist.plan.job import BAND, WHOLE

ENTRIES = {entry.name: entry for entry in TABLE}


def _expected_dit_ranks(entry) -> dict[str, list[int]]:
    """The DiT ranks of each expert: every rank but rank 0 under a stage split; under an expert split the
    first group's (expert_ranks[0], or half) hold the high-noise expert only, the rest the low-noise one."""
    case = entry.case
    dit_ranks = list(range(int(case.stage_split), entry.world))
    if not case.expert_split:
        experts = ("dit", "dit_2") if entry.family.startswith("moe") else ("dit",)
        return {expert: dit_ranks for expert in experts}
    high = case.expert_ranks[0] if case.expert_ranks else len(dit_ranks) // 2
    return {"dit": dit_ranks[:high], "dit_2": dit_ranks[high:]}


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_each_rank_holds_and_does_what_its_layout_gives_it(matrix_paths, tmp_path, name):
    entry = ENTRIES[name]
    case = bind(entry.case, *matrix_paths)
    plan = plan_of(case.run_config(tmp_path), entry.world, tmp_path)
    _check_holdings(entry, case, plan)
    _check_work(entry, case, plan)


def _check_holdings(entry, case, plan) -> None:
    assert [rank.rank for rank in plan.ranks] == list(range(entry.world))
    held = {rank.rank: rank.weight_bytes for rank in plan.ranks}
    for expert, ranks in _expected_dit_ranks(entry).items():
        assert [r for r in held if expert in held[r]] == ranks, expert
        whole = plan.components[expert].weight_bytes
        shares = [held[r][expert] for r in ranks]
        if case.fsdp:
            assert sum(shares) == whole and max(shares) <= whole / len(ranks) * 1.1
        else:
            assert shares == [whole] * len(ranks)
    # The text encoder on rank 0 alone; the VAE there too, or a band of it on every rank.
    assert [r for r in held if "text_encoder" in held[r]] == [0]
    vae_ranks = list(range(entry.world)) if case.vae_decode == "patch" else [0]
    assert [r for r in held if "vae" in held[r]] == vae_ranks
    assert plan.components["vae"].ranks == tuple(vae_ranks)
    if case.dit_storage_dtype != "auto":
        assert str(plan.components["dit"].storage_dtype).startswith("torch.float8")


def _check_work(entry, case, plan) -> None:
    """The RankPlan's fields: rank 0 encodes and writes; the VAE passes whole on rank 0 or a band on every
    rank; each DiT rank's group, shard, steps and leadership; the hops each rank takes part in."""
    ranks = range(entry.world)
    assert [r.encodes for r in plan.ranks] == [r == 0 for r in ranks]
    bands = entry.world > 1

    def vae_pass(mode: str) -> list[str | None]:
        return [BAND if mode == "patch" and bands else WHOLE if r == 0 else None for r in ranks]

    assert [r.decode for r in plan.ranks] == vae_pass(case.vae_decode)
    assert [r.condition for r in plan.ranks] == (vae_pass(case.vae_encode) if plan.image_task else [None] * entry.world)
    expected = _expected_dit_ranks(entry)
    dit_ranks = sorted({r for holders in expected.values() for r in holders})
    groups = [expected["dit"], expected["dit_2"]] if case.expert_split else [dit_ranks]
    for r in ranks:
        work = plan.ranks[r].dit
        if r not in dit_ranks:
            assert work is None and plan.ranks[r].role == "encoders+vae"
            continue
        index = next(i for i, group in enumerate(groups) if r in group)
        assert work.group == index and work.leader == (r == groups[index][0])
        assert work.experts == tuple(name for name, holders in expected.items() if r in holders)
        assert work.shard == ((dit_ranks.index(r), len(dit_ranks)) if case.fsdp else None)
        assert work.resumes == (index == 1)
        assert work.stop == (plan.expert_steps[0] if case.expert_split and index == 0 else None)
        assert plan.ranks[r].role == ("encoders+vae+dit" if r == 0 else "dit")
    # The hops: inputs from rank 0 to every DiT rank, the state between the groups, the latents back.
    chain = [(INPUTS, 0, dit_ranks)] + ([(STATE, groups[0][0], groups[1])] if case.expert_split else []) \
        + [(LATENTS, groups[-1][0], [0])]
    assert [(h.name, h.src, list(h.dsts)) for h in plan.dims.hops] == chain
    for r in ranks:
        assert plan.ranks[r].hops == tuple(name for name, src, dsts in chain if r == src or r in dsts)
