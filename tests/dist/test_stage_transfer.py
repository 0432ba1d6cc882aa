"""send_message / recv_message between the encoder rank and the DiT ranks, on 3 gloo ranks: the typed
messages arrive whole (every field, dtype and shape; absent fields stay absent), in order, also between
two ranks of a warmed-up group of three.

Process start-up is the cost, so one spawned world runs every scenario and the tests check its results.
"""

from __future__ import annotations

from dataclasses import fields

import pytest
import torch

from tests.dist_utils import run_on_ranks
from wan_dist.session import new_group_with_timeout
from wan_dist.stage_split import DitInputs, DitOutputs, recv_message, send_message

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


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(WORLD, _transfers, 3, timeout=120)


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
