"""model.dit_storage_dtype=fp8_*: the DiT's weights stored in fp8 and cast per layer for compute, through
diffusers' layerwise casting. Every layout, with and without FSDP (whose shards, and so all-gathers, are
then fp8), reproduces diffusers' pipeline with the same casting; each rank holds the bytes the plan
predicted from the headers; and the casting is lossy, so the frames differ from full precision."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist_utils import run_on_ranks
from tests.matrix import group, params
from tests.reference import TOLERANCE, max_abs_error, reference_frames
from wan_dist.wan.loading import component_weight_bytes

NAMES = params(group("fp8"))


@pytest.mark.parametrize("name", NAMES)
def test_fp8_layout_matches_diffusers_with_the_same_casting(matrix, name):
    case, out_dir = matrix[name]
    error = max_abs_error(out_dir / "frames.npy", reference_frames(case.folder, **case.reference_kwargs()))
    assert error <= TOLERANCE, f"{name}: max abs error {error:.3g} > {TOLERANCE}"


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_the_planned_fp8_bytes(matrix, name):
    """run.json's loaded DiT bytes per rank (measured on the tensors) equal the plan's header count with the
    cast layers in fp8, under the full-precision replica; under FSDP they add up to one fp8 replica."""
    case, out_dir = matrix[name]
    report = json.loads((out_dir / "run.json").read_text())
    dit = report["plan"]["components"]["dit"]
    assert dit["storage_dtype"] == {"fp8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}[case.dit_storage_dtype]
    dit_ranks = report["mesh"]["dit_ranks"]
    loaded = [report["memory"][rank]["loaded_parameter_bytes"]["dit"] for rank in dit_ranks]
    predicted = [report["plan"]["ranks"][rank]["weight_bytes"]["dit"] for rank in dit_ranks]
    full = component_weight_bytes(case.folder, "transformer", torch.float32)
    assert loaded == predicted
    if case.fsdp:
        assert sum(loaded) == dit["weight_bytes"]
    else:
        assert loaded == [dit["weight_bytes"]] * len(dit_ranks)
    # The tiny model's embeddings (kept whole) are large beside its blocks: just over half of fp32 here.
    assert dit["weight_bytes"] < 0.6 * full


@pytest.mark.cases("fp8_t2v_single", "fp8_t2v_single_e5m2")
def test_fp8_is_lossy_and_its_error_is_stated(matrix):
    """Against the full-precision pipeline the fp8 frames differ by more than the layouts' tolerance
    (the casting really happened); the figure is the README's."""
    errors = {}
    for name in ("fp8_t2v_single", "fp8_t2v_single_e5m2"):
        case, out_dir = matrix[name]
        full = reference_frames(case.folder, **dict(case.reference_kwargs(), dit_storage_dtype="auto"))
        errors[case.dit_storage_dtype] = max_abs_error(out_dir / "frames.npy", full)
    print(f"fp8 storage, tiny t2v model, max abs frame error against fp32 weights: {errors}")
    assert all(error > TOLERANCE for error in errors.values()), errors


def _sharded_fp8_forward(rank: int, world_size: int, folder: str, dtype: torch.dtype) -> dict:
    """The path DitStage takes under FSDP (parallelized on meta, then each rank's rows read), beside a
    whole model with diffusers' casting; after two forwards, what FSDP's gathered weights still hold."""
    from pathlib import Path

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from tests.dist.test_parallelize import _inputs
    from wan_dist.wan.loading import build_transformer_on_meta, load_transformer, load_transformer_sharded
    from wan_dist.parallel.parallelize import parallelize_dit

    cpu, single = torch.device("cpu"), dist.new_group([rank])
    model = build_transformer_on_meta(Path(folder), dtype)
    parallelize_dit(model, kernels={use: "sdpa" for use in ("self_attention", "cross_attention", "sequence_parallel")},
                    device=cpu, ulysses_group=single, ring_group=single, shard_mesh=init_device_mesh("cpu", (world_size,)),
                    storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    load_transformer_sharded(model, Path(folder), dtype, cpu, shard_rank=rank, shard_count=world_size)
    whole = load_transformer(Path(folder), dtype, cpu)
    whole.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=dtype)
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() and k != "timestep" else v
              for k, v in _inputs(whole.config).items()}
    with torch.no_grad():
        expected = whole(**inputs)[0]
        outputs = [model(**inputs)[0] for _ in range(2)]
    gathered = sum(p._unsharded_param.untyped_storage().size() for m in model.modules()
                   if hasattr(m, "_get_fsdp_state") for g in m._get_fsdp_state()._fsdp_param_groups
                   for p in g.fsdp_params if hasattr(p, "_unsharded_param"))
    stored = {str(p.dtype) for p in model.blocks[0].attn1.to_q.parameters()}
    # fp32 matmuls over FSDP's gathered views may round apart in the last bits.
    return {"equal": all(torch.allclose(out, expected, rtol=0, atol=1e-5) for out in outputs),
            "gathered_bytes_held": gathered,
            "stored": stored}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_fp8_frees_its_gathered_weights(t2v_folder, dtype):
    """Under FSDP the fp8 shards give the whole model's output with diffusers' casting, also in bf16 (a
    block then holds fp8, bf16 and fp32 parameters), and after each block no gathered weight stays
    behind: without the hook around the casting, a full fp8 replica would."""
    for result in run_on_ranks(2, _sharded_fp8_forward, str(t2v_folder), dtype, timeout=300):
        assert result == {"equal": True, "gathered_bytes_held": 0, "stored": {"torch.float8_e4m3fn"}}
