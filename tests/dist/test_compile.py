"""compile=true with fp8 storage and with FSDP2: the compiled blocks' DiT forward against the same forward
uncompiled, on CPU (inductor's C++ kernels). fp8's casting hooks break the block's graph around each
layer and run between the compiled pieces; FSDP2's all-gathers run outside the graph (dynamo skips its
hooks); the weights stay fp8, and sharded, through the compiled calls. (Block offload with compile is
refused by the plan.)"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_on_ranks
from wan_dist.wan.loading import load_transformer

KERNELS = {"self_attention": "sdpa", "cross_attention": "sdpa", "sequence_parallel": "sdpa"}
# Inductor reorders the fp32 sums; anything wrong in a traced hook would be off by the weights' size.
CLOSE = 1e-5


def _forwards(rank: int, world_size: int, folder: str, *, fp8: bool, shard: bool, compile_blocks: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from wan_dist.parallel.parallelize import parallelize_dit

    model = load_transformer(folder, torch.float32, torch.device("cpu"))
    # No sequence split: each rank its own one-rank group (every rank creates every group, in order).
    own = [dist.new_group([r]) for r in range(world_size)][rank]
    parallelize_dit(model, kernels=KERNELS, device=torch.device("cpu"), ulysses_group=own, ring_group=own,
                    context_cache=False, shard_mesh=init_device_mesh("cpu", (world_size,)) if shard else None,
                    storage_dtype=torch.float8_e4m3fn if fp8 else None, compute_dtype=torch.float32,
                    compile_blocks=compile_blocks)
    config = model.config
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, config["in_channels"], 3, 6, 10, generator=generator)
    context = torch.randn(1, 512, config["text_dim"], generator=generator)
    with torch.no_grad():
        outputs = [model(hidden_states=hidden, timestep=torch.tensor([t]), encoder_hidden_states=context,
                         return_dict=False)[0] for t in (900.0, 300.0)]
    weight = model.blocks[0].attn1.to_q.weight
    return {"outputs": outputs, "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"],
            "weight_dtype": weight.dtype,
            "local_rows": weight.to_local().shape[0] if hasattr(weight, "to_local") else weight.shape[0],
            "rows": weight.shape[0]}


def _compiled_and_eager(rank: int, world_size: int, folder: str, fp8: bool, shard: bool) -> dict:
    eager = _forwards(rank, world_size, folder, fp8=fp8, shard=False, compile_blocks=False)
    full = _forwards(rank, world_size, folder, fp8=False, shard=False, compile_blocks=False)
    compiled = _forwards(rank, world_size, folder, fp8=fp8, shard=shard, compile_blocks=True)
    return {"eager": eager, "full": full, "compiled": compiled}


def _max_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# Compiling around the casting hooks costs half a minute on a CPU; compile and fp8 each run in make test.
@pytest.mark.full
def test_compiled_fp8_storage_matches_eager(t2v_folder):
    (result,) = run_on_ranks(1, _compiled_and_eager, str(t2v_folder), True, False, timeout=300)
    compiled, eager = result["compiled"], result["eager"]
    assert compiled["graphs"] > 0  # the blocks really were compiled
    assert compiled["weight_dtype"] == torch.float8_e4m3fn  # stored in fp8 after the compiled calls
    assert _max_error(compiled["outputs"], eager["outputs"]) <= CLOSE
    # The casting happened in both: fp8 weights give other numbers than fp32 ones.
    assert _max_error(eager["outputs"], result["full"]["outputs"]) > 100 * CLOSE


def test_compiled_fsdp_matches_eager_on_two_ranks(t2v_folder):
    for result in run_on_ranks(2, _compiled_and_eager, str(t2v_folder), False, True, timeout=300):
        compiled, eager = result["compiled"], result["eager"]
        assert compiled["graphs"] > 0
        assert compiled["local_rows"] == compiled["rows"] // 2  # each rank holds its shard only
        assert _max_error(compiled["outputs"], eager["outputs"]) <= CLOSE
