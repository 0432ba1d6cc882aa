"""send_message / recv_message between the encoder rank and the DiT ranks, on 3 gloo ranks: the typed
messages arrive whole (every field, dtype and shape; absent fields stay absent), in order, also between
two ranks of a warmed-up group of three. And the World of three layouts (stage split with FSDP, one
sequence group holding rank 0, an expert split): every group it owns has the run's timeout and spans the
ranks the layout says, and the Handoff carries one message along each of the layout's hops.

Process start-up is the cost, so one spawned world runs every scenario and the tests check its results.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

import torch.distributed as dist

from tests.dist_utils import run_on_ranks
from wan_dist.parallel.dims import INPUTS, LATENTS, STATE, ParallelDims
from wan_dist.wan.pipeline import SamplerState
from wan_dist.parallel.session import new_group_with_timeout
from wan_dist.parallel.handoff import DitInputs, DitOutputs, Handoff, recv_message, send_message
from wan_dist.parallel.world import build_world

WORLD = 3
DIT_RANKS = [1, 2]


def payload(tag: int) -> DitInputs:
    """Several dtypes and shapes, the values depending on `tag` so that transfers can be told apart; odd
    tags leave the optional fields out."""
    g = torch.Generator().manual_seed(tag)
    full = tag % 2 == 0
    return DitInputs(
        prompt_embeds=torch.randn(1, 512, 32, generator=g),
        negative_prompt_embeds=torch.randn(1, 512, 32, generator=g).to(torch.bfloat16) if full else None,
        image_embeds=torch.randn(2, 9, generator=g).to(torch.float16) if full else None,
        condition=(torch.arange(20, dtype=torch.float64)[::2] + tag) if full else None,  # non-contiguous view
    )


def latents(tag: int) -> DitOutputs:
    return DitOutputs(torch.randn(1, 16, 3, 5, 7, generator=torch.Generator().manual_seed(tag)))


def _transfers(rank: int, world_size: int, rounds: int):
    cpu = torch.device("cpu")
    # The way back runs on a group of its own, warmed up as the handoff's are; rank 2 takes no part in it.
    back = new_group_with_timeout(list(range(world_size)), 60, cpu)
    if rank == 0:
        # Every round is sent before any is waited for: rank 0 hands over video i+1 while i is in flight.
        pending = [send_message(payload(tag), DIT_RANKS, cpu) for tag in range(rounds)]
        for send in pending:
            send.wait()
        # and the way back: the DiT leader sends latents to rank 0
        return [recv_message(DitOutputs, src=1, device=cpu, group=back)]
    received = [recv_message(DitInputs, src=0, device=cpu) for _ in range(rounds)]
    if rank == 1:
        send_message(DitOutputs(received[-1].prompt_embeds[:1, :3] * 2), [0], cpu, group=back).wait()
    return received


# (name, dims, fsdp): the World's layouts on the three ranks.
LAYOUTS = (
    ("stage_split_fsdp", ParallelDims(cfg=1, ring=1, ulysses=2, stage_split=True, world_size=3), True),
    ("ulysses3", ParallelDims(cfg=1, ring=1, ulysses=3, stage_split=False, world_size=3), False),
    ("expert_split", ParallelDims(cfg=1, ring=1, ulysses=1, stage_split=False, world_size=3, low=(1, 1, 2)), False),
)
WORLD_TIMEOUT_S = 17.0


def hop_message(name: str):
    if name == INPUTS:
        return payload(0)
    if name == STATE:
        return SamplerState(latents=latents(5).latents, step_index=torch.tensor(2))
    return latents(7)


def _worlds(rank: int, world_size: int) -> dict:
    cpu, seen = torch.device("cpu"), {}
    for name, dims, fsdp in LAYOUTS:
        world = build_world(dims, dims.hops, rank=rank, device=cpu, timeout_s=WORLD_TIMEOUT_S, fsdp=fsdp,
                            vae_ranks=tuple(range(world_size)))
        groups = {group_name: (dist.get_process_group_ranks(group),
                               group._get_backend(cpu).options._timeout.total_seconds())
                  for group_name, group in world.own_groups()}
        handoff, received = Handoff(world, cpu), {}
        for hop in dims.hops:
            handoff.send(hop.name, hop_message(hop.name))
            if rank in hop.dsts:
                received[hop.name] = handoff.receive(hop.name)
        handoff.finish()
        seen[name] = {"groups": groups, "received": received}
    return seen


def _scenarios(rank: int, world_size: int, rounds: int) -> dict:
    return {"transfers": _transfers(rank, world_size, rounds), "worlds": _worlds(rank, world_size)}


@pytest.fixture(scope="module")
def scenarios():
    return run_on_ranks(WORLD, _scenarios, 3, timeout=120)


@pytest.fixture(scope="module")
def results(scenarios):
    return [rank["transfers"] for rank in scenarios]


@pytest.mark.parametrize("layout", [name for name, _, _ in LAYOUTS])
def test_world_groups_have_the_timeout_and_the_layouts_ranks(scenarios, layout):
    dims, fsdp = next((dims, fsdp) for name, dims, fsdp in LAYOUTS if name == layout)
    for rank in range(WORLD):
        groups = scenarios[rank]["worlds"][layout]["groups"]
        assert {timeout for _, timeout in groups.values()} == {WORLD_TIMEOUT_S}
        group = dims.group_of(rank)
        if dims.is_dit_rank(rank):
            # ulysses is the only axis of more than one rank in these layouts
            assert groups["ulysses"][0] == group.ranks and groups["cfg"][0] == [rank]
        else:
            assert not {"cfg", "ring", "ulysses", "shard"} & set(groups)
        assert ("shard" in groups) == (fsdp and dims.is_dit_rank(rank))
        if "shard" in groups:
            assert groups["shard"][0] == dims.dit_ranks
        for hop in dims.hops:
            member = rank in hop.ranks and bool(hop.remote_dsts)
            assert (f"hop {hop.name}" in groups) == member, hop
            if member:
                assert groups[f"hop {hop.name}"][0] == list(hop.ranks)
        assert groups["vae"][0] == list(range(WORLD))


@pytest.mark.parametrize("layout", [name for name, _, _ in LAYOUTS])
def test_handoff_carries_a_message_along_each_hop(scenarios, layout):
    dims = next(dims for name, dims, _ in LAYOUTS if name == layout)
    for rank in range(WORLD):
        received = scenarios[rank]["worlds"][layout]["received"]
        wanted = [hop.name for hop in dims.hops if rank in hop.dsts]
        assert sorted(received) == sorted(wanted)
        for name in wanted:
            assert_same(received[name], hop_message(name))


def assert_same(got, want) -> None:
    assert type(got) is type(want)
    for item in fields(want):
        a, b = getattr(got, item.name), getattr(want, item.name)
        if b is None:
            assert a is None, item.name
            continue
        assert a.dtype == b.dtype, item.name
        assert a.shape == b.shape, item.name
        assert torch.equal(a, b), item.name


@pytest.mark.parametrize("rank", DIT_RANKS)
def test_every_dit_rank_receives_the_inputs(results, rank):
    assert_same(results[rank][0], payload(0))


@pytest.mark.parametrize("rank", DIT_RANKS)
def test_consecutive_transfers_arrive_in_order(results, rank):
    assert len(results[rank]) == 3
    for tag, got in enumerate(results[rank]):
        assert_same(got, payload(tag))


def test_latents_back_to_rank_zero(results):
    (back,) = results[0]
    assert_same(back, DitOutputs(payload(2).prompt_embeds[:1, :3] * 2))


def _kind_mismatch(rank: int, world_size: int) -> str | None:
    cpu = torch.device("cpu")
    if rank == 0:
        send_message(latents(0), [1], cpu).wait()
        return None
    try:
        recv_message(DitInputs, src=0, device=cpu)
    except RuntimeError as error:
        torch.distributed.recv(torch.empty(1, 16, 3, 5, 7), 0)  # drain the wire so that teardown is clean
        return str(error)
    return None


def test_wrong_kind_is_refused():
    results = run_on_ranks(2, _kind_mismatch, timeout=120)
    assert results[1] is not None
    assert "sent a DitOutputs, expected a DitInputs" in results[1]
