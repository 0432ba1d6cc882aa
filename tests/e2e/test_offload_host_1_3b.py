"""Block offload's host memory while loading, for the 1.3B architecture (random bf16 weights): the DiT is
read straight into the memory group offloading streams it from, so loading and applying the offload hold
one copy of the DiT, not from_pretrained's plus the pinned copy diffusers would make of it (README,
Memory). On a CPU nothing is pinned (no CUDA) and the hooks run without a stream: what shows is the
loader's own peak. tests/gpu/test_offload_cuda.py runs the same with pinned memory and streams."""

from __future__ import annotations

import resource

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_on_ranks

KERNELS = {"self_attention": "sdpa", "cross_attention": "sdpa", "sequence_parallel": "sdpa"}
# Of the DiT's bytes: what loading may hold beyond the weights (one tensor read at a time, chunk ends).
HOST_LOAD_LIMIT = 1.3


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize()


def host_load(rank: int, world_size: int, folder: str, device_type: str) -> dict:
    """In a fresh rank process: the resident bytes before loading the DiT for offload and the peak through
    the load and the offload step, the DiT's bytes, and how many of its weights are pinned."""
    from wan_dist.wan.loading import load_transformer_to_host, parameter_bytes
    from wan_dist.parallel.parallelize import parallelize_dit

    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    single = dist.new_group([rank])
    before = _resident_bytes()
    model = load_transformer_to_host(folder, torch.bfloat16, pinned=device.type == "cuda")
    parallelize_dit(model, kernels=KERNELS, device=device, ulysses_group=single, ring_group=single, offload=True)
    return {"before": before, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "dit": parameter_bytes(model), "pinned": sum(p.is_pinned() for p in model.parameters()),
            "parameters": len(list(model.parameters()))}


def assert_one_copy(found: dict) -> None:
    added = found["peak"] - found["before"]
    print(f"host memory while loading for offload: DiT {found['dit'] / 2**30:.2f} GiB, peak - before "
          f"{added / 2**30:.2f} GiB ({added / found['dit']:.2f}x)")
    assert found["dit"] > 2.5e9  # the 1.3B's 1.4 billion bf16 parameters
    assert added < HOST_LOAD_LIMIT * found["dit"], found


@pytest.mark.slow
def test_loading_for_offload_holds_one_copy_of_the_dit():
    from wan_dist.wan.building import ensure_tiny_model

    found = run_on_ranks(1, host_load, str(ensure_tiny_model("t2v_1_3b")), "cpu", timeout=600)[0]
    assert_one_copy(found)
