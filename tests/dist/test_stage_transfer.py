"""send_tensors / recv_tensors between the encoder rank and the DiT ranks, on 3 gloo ranks.

Process start-up is the cost, so one spawned world runs every scenario and the tests check its results.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist_utils import run_on_ranks
from wan_dist.stage_split import recv_tensors, send_tensors

WORLD = 3
DIT_RANKS = [1, 2]


def payload(tag: int) -> dict[str, torch.Tensor]:
    """Several dtypes and shapes, the values depending on `tag` so that transfers can be told apart."""
    g = torch.Generator().manual_seed(tag)
    return {
        "prompt_embeds": torch.randn(1, 512, 32, generator=g),
        "negative_prompt_embeds": torch.randn(1, 512, 32, generator=g).to(torch.bfloat16),
        "latents": torch.randn(1, 16, 3, 5, 7, generator=g, dtype=torch.float64),
        "image_embeds": torch.randn(2, 9, generator=g).to(torch.float16),
        "lengths": torch.randint(0, 10_000, (3,), generator=g),
        "step": torch.tensor(tag, dtype=torch.int64),  # 0-d
        "vector": torch.arange(5, dtype=torch.float32)[::2] + tag,  # non-contiguous view
    }


def _transfers(rank: int, world_size: int, rounds: int) -> list[dict[str, torch.Tensor]] | None:
    cpu = torch.device("cpu")
    names = list(payload(0))
    if rank == 0:
        # Every round is sent before any is waited for: rank 0 hands over video i+1 while i is in flight.
        pending = [send_tensors(payload(tag), DIT_RANKS, cpu) for tag in range(rounds)]
        for send in pending:
            send.wait()
        # and the way back: the DiT leader sends latents to rank 0
        back = recv_tensors(["latents"], src=1, device=cpu)
        return [back]
    received = [recv_tensors(names, src=0, device=cpu) for _ in range(rounds)]
    if rank == 1:
        send_tensors({"latents": received[-1]["latents"] * 2}, [0], cpu).wait()
    return received


@pytest.fixture(scope="module")
def results():
    return run_on_ranks(WORLD, _transfers, 3, timeout=120)


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert got[name].shape == want[name].shape, name
        assert torch.equal(got[name], want[name]), name


@pytest.mark.parametrize("rank", DIT_RANKS)
def test_every_dit_rank_receives_the_tensors(results, rank):
    assert_same(results[rank][0], payload(0))


@pytest.mark.parametrize("rank", DIT_RANKS)
def test_consecutive_transfers_arrive_in_order(results, rank):
    assert len(results[rank]) == 3
    for tag, got in enumerate(results[rank]):
        assert_same(got, payload(tag))


def test_latents_back_to_rank_zero(results):
    (back,) = results[0]
    assert_same(back, {"latents": payload(2)["latents"] * 2})


def _count_mismatch(rank: int, world_size: int) -> str | None:
    cpu = torch.device("cpu")
    if rank == 0:
        send_tensors({"a": torch.ones(2), "b": torch.zeros(3)}, [1], cpu).wait()
        return None
    try:
        recv_tensors(["a"], src=0, device=cpu)
    except RuntimeError as error:
        # drain what is still on the wire so that teardown is clean
        dist_buffers = [torch.empty(2), torch.empty(3)]
        for buffer in dist_buffers:
            torch.distributed.recv(buffer, 0)
        return str(error)
    return None


def test_wrong_names_are_refused():
    results = run_on_ranks(2, _count_mismatch, timeout=120)
    assert results[1] is not None
    assert "sent 2 tensors, expected 1" in results[1]
