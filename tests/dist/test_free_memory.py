"""Two gloo ranks with different free memory agree on the smallest, through the session's one
collective, before planning."""

from __future__ import annotations

import torch

from tests.dist_utils import run_on_ranks
from wan_dist.plan.inputs import DeviceFacts, agreed_device_facts
from wan_dist.parallel.session import RankEnv, Session

FREE = (80 * 2**30, 23 * 2**30 + 17)  # rank 1 has less: another process holds memory on its GPU


def _agree(rank: int, world_size: int, free: tuple[int, ...]) -> tuple[DeviceFacts, int]:
    env = RankEnv(rank=rank, world_size=world_size, local_rank=rank, master_addr="127.0.0.1", master_port=0,
                  launcher="python")
    session = Session(env=env, device=torch.device("cpu"))
    own = DeviceFacts("cuda", (9, 0) if rank == 0 else (8, 9), free[rank])
    return agreed_device_facts(own, agree=session.agree, least=session.least), session.least(-rank)


def test_ranks_agree_on_the_least_free_memory():
    results = run_on_ranks(2, _agree, FREE, timeout=120)
    for facts, smallest in results:
        assert facts == DeviceFacts("cuda", (9, 0), min(FREE))  # rank 0's kind and capability
        assert smallest == -1
