"""tests/gloo_cuda_shim.py on two gloo ranks: every point-to-point entry point delivers through a host
copy (host tensors standing in for device ones here; tests/gpu runs the same exchange on a GPU), the
collectives are left alone, and torch.distributed is as it was afterwards."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from tests.dist_utils import run_on_ranks
from tests.gloo_cuda_shim import staged_point_to_point

_ENTRY_POINTS = ("isend", "irecv", "send", "recv")


def _payload(rank: int, salt: int, device: torch.device) -> torch.Tensor:
    return (torch.arange(15, dtype=torch.float32).reshape(3, 5) * (rank + 1) + salt).to(device, torch.bfloat16)


def exchange(rank: int, world_size: int, device: torch.device, also_cpu: bool) -> dict:
    """Body of each of two ranks: one transfer through each entry point the library or yunchang uses,
    and the collectives gloo runs on device tensors itself; what arrived, in host memory."""
    peer = 1 - rank
    originals = [getattr(module, name) for module in (dist, dist.distributed_c10d) for name in _ENTRY_POINTS]
    got = {}
    with staged_point_to_point(also_cpu=also_cpu) as counts:
        # The handoff's pattern: isend from rank 0, a blocking recv on rank 1, and back with send/irecv.
        if rank == 0:
            dist.isend(_payload(0, 1, device), 1).wait()
            back = torch.zeros(3, 5, dtype=torch.bfloat16, device=device)
            work = dist.irecv(back, 1)
            work.wait()
            got["irecv"] = back
        else:
            inputs = torch.zeros(3, 5, dtype=torch.bfloat16, device=device)
            got["recv_source"] = dist.recv(inputs, 0)
            got["recv"] = inputs
            dist.send(_payload(1, 2, device), 0)
        # yunchang's ring step.
        ring = torch.zeros(3, 5, dtype=torch.bfloat16, device=device)
        ops = [dist.P2POp(dist.isend, _payload(rank, 3, device), peer), dist.P2POp(dist.irecv, ring, peer)]
        for work in dist.batch_isend_irecv(ops):
            work.wait()
        got["ring"] = ring
        gathered = [torch.zeros(3, 5, dtype=torch.bfloat16, device=device) for _ in range(2)]
        dist.all_gather(gathered, _payload(rank, 4, device))
        got["all_gather"] = torch.stack(gathered)
        swapped = torch.zeros(2, 5, dtype=torch.bfloat16, device=device)
        dist.all_to_all_single(swapped, _payload(rank, 5, device)[:2].contiguous())
        got["all_to_all"] = swapped
        broadcast = _payload(rank, 6, device)
        dist.broadcast(broadcast, 0)
        got["broadcast"] = broadcast
    restored = originals == [getattr(module, name) for module in (dist, dist.distributed_c10d)
                             for name in _ENTRY_POINTS]
    host = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in got.items()}
    return {"got": host, "counts": dataclasses.asdict(counts), "restored": restored,
            "device": {k: str(v.device) for k, v in got.items() if isinstance(v, torch.Tensor)}}


def check_exchange(results: list[dict], device: torch.device, staged: bool) -> None:
    cpu = torch.device("cpu")
    zero, one = results
    assert zero["got"]["irecv"].equal(_payload(1, 2, cpu))
    assert one["got"]["recv"].equal(_payload(0, 1, cpu)) and one["got"]["recv_source"] == 0
    for rank, result in enumerate(results):
        got = result["got"]
        assert got["ring"].equal(_payload(1 - rank, 3, cpu))
        assert got["all_gather"].equal(torch.stack([_payload(r, 4, cpu) for r in (0, 1)]))
        assert got["all_to_all"].equal(torch.stack([_payload(r, 5, cpu)[rank] for r in (0, 1)]))
        assert got["broadcast"].equal(_payload(0, 6, cpu))
        # Two sends and two receives each: the handoff's pair and the ring step; collectives never.
        assert result["counts"] == ({"sent": 2, "received": 2} if staged else {"sent": 0, "received": 0})
        assert result["restored"]
        assert set(result["device"].values()) == {str(device)}


def test_host_tensors_standing_in_are_staged_and_arrive():
    device = torch.device("cpu")
    check_exchange(run_on_ranks(2, exchange, device, True, timeout=120), device, staged=True)


def test_host_tensors_pass_through_unless_asked():
    device = torch.device("cpu")
    check_exchange(run_on_ranks(2, exchange, device, False, timeout=120), device, staged=False)
