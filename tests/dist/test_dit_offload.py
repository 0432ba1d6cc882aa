"""Block offload as a step of parallelize_dit, on CPU: diffusers' group offloading runs there with the CPU as
both onload and offload device (no streams), so its hooks compose with the sequence split, the context
cache and fp8 storage without moving a byte; the output (of the DiT read into host memory as the stage reads
it for offload) is the unoffloaded one bit for bit, and the handle takes the offload hooks off. The plan
refuses `model.dit_offload=block` on a CPU run (tests/unit); the streamed CUDA path is
tests/gpu/test_offload_cuda.py."""

from __future__ import annotations

import torch
import torch.distributed as dist

from tests.dist.test_parallelize import _inputs
from tests.dist_utils import run_on_ranks
from wan_dist.wan.loading import load_transformer_to_host

KERNELS = {"self_attention": "sdpa", "cross_attention": "sdpa", "sequence_parallel": "sdpa"}


def _offload_hooks(model: torch.nn.Module) -> int:
    from diffusers.hooks.group_offloading import _GROUP_OFFLOADING

    return sum(1 for m in model.modules() if hasattr(m, "_diffusers_hook")
               and m._diffusers_hook.get_hook(_GROUP_OFFLOADING) is not None)


def _outputs(rank: int, world_size: int, folder: str) -> dict:
    from wan_dist.parallel.parallelize import parallelize_dit

    group, single = dist.new_group(list(range(world_size))), dist.new_group([rank])
    found = {}
    for storage in (None, torch.float8_e4m3fn):
        for offload in (False, True):
            # Read as the stage reads a DiT it offloads (unpinned: a CPU has no pinned memory), both times:
            # from_pretrained's weights sit at other alignments, which moves the last bit of some sums.
            model = load_transformer_to_host(folder, torch.float32, pinned=False)
            handle = parallelize_dit(model, kernels=KERNELS, device=torch.device("cpu"), ulysses_group=group,
                                     ring_group=single, storage_dtype=storage, compute_dtype=torch.float32,
                                     offload=offload)
            with torch.no_grad():
                # Twice: the second forward runs with the execution order the first one recorded.
                outputs = [model(**_inputs(model.config))[0] for _ in range(2)]
            hooks = _offload_hooks(model)
            handle.remove()
            found[(str(storage), offload)] = (outputs, hooks, _offload_hooks(model))
    return found


def test_offloaded_blocks_give_the_same_output_in_a_split_layout(t2v_folder):
    for result in run_on_ranks(2, _outputs, str(t2v_folder), timeout=300):
        for storage in ("None", "torch.float8_e4m3fn"):
            plain, plain_hooks, _ = result[(storage, False)]
            offloaded, hooks, left = result[(storage, True)]
            assert plain_hooks == 0 and hooks > 0 and left == 0
            assert all(torch.equal(a, b) for a, b in zip(plain + offloaded, offloaded + plain))
        # fp8 storage changed the output: the comparison above is not between two unchanged models.
        assert not torch.equal(result[("None", False)][0][0], result[("torch.float8_e4m3fn", False)][0][0])
