"""model.dit_offload=block on CUDA: the DiT's blocks in pinned CPU memory, streamed in one block ahead on a
side stream (diffusers' group offloading). The frames are the unoffloaded run's, and the device holds
fewer bytes: between forwards no DiT weight stays on it, and a forward's peak is below the replica's.
The host never drains the compute stream between blocks (record_stream) and yet runs at most a block
ahead, so the device holds three blocks however long they compute; loading for offload holds one copy
of the DiT in host memory, pinned."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from tests.dist_utils import run_on_ranks
from tests.e2e.test_offload_host_1_3b import assert_one_copy, host_load
from tests.modes import Case, run_cases
from tests.reference import max_abs_error

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
KERNELS = {"self_attention": "sdpa", "cross_attention": "sdpa", "sequence_parallel": "sdpa"}


def test_offloaded_run_gives_the_same_frames(gpu_t2v_folder, tmp_path):
    cases = [Case("plain", str(gpu_t2v_folder), dit_dtype="fp32"),
             Case("offload", str(gpu_t2v_folder), dit_dtype="fp32", dit_offload="block"),
             Case("offload_fp8", str(gpu_t2v_folder), dit_dtype="fp32", dit_offload="block",
                  dit_storage_dtype="fp8_e4m3"),
             Case("fp8", str(gpu_t2v_folder), dit_dtype="fp32", dit_storage_dtype="fp8_e4m3")]
    run_on_ranks(1, run_cases, cases, str(tmp_path), backend="nccl", timeout=600)
    import numpy as np

    frames = {case.name: np.load(tmp_path / case.name / "frames.npy") for case in cases}
    assert max_abs_error(frames["offload"], frames["plain"]) <= 1e-6
    assert max_abs_error(frames["offload_fp8"], frames["fp8"]) <= 1e-6


@pytest.fixture(scope="module")
def deep_folder(tmp_path_factory):
    """Eight blocks that outweigh the embeddings, unlike the tiny model's two: what offload saves shows."""
    from wan_dist.wan.building import build_tiny_model
    from wan_dist.config.presets import ModelSpec

    return build_tiny_model(tmp_path_factory.mktemp("deep"), ModelSpec(task="t2v", heads=2, head_dim=64, layers=8,
                                                                      ffn_dim=512))


def _inputs(config, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    return dict(hidden_states=torch.randn(1, config["in_channels"], 5, 24, 40, generator=g).to(device),
                timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=torch.randn(1, 512, config["text_dim"], generator=g).to(device),
                return_dict=False)


def _device_bytes(rank: int, world_size: int, folder: str) -> dict:
    from wan_dist.wan.loading import load_transformer, parameter_bytes
    from wan_dist.parallel.parallelize import parallelize_dit

    device = torch.device("cuda", rank)
    single = dist.new_group([rank])
    found = {}
    for offload in (False, True):
        model = load_transformer(folder, torch.float32, torch.device("cpu") if offload else device)
        handle = parallelize_dit(model, kernels=KERNELS, device=device, ulysses_group=single, ring_group=single,
                                 offload=offload)
        inputs = _inputs(model.config, device)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        with torch.no_grad():
            for _ in range(2):
                model(**inputs)
        torch.cuda.synchronize(device)
        found[offload] = {"peak": torch.cuda.max_memory_allocated(device) - base,
                          "on_device": sum(p.numel() * p.element_size() for p in model.parameters()
                                           if p.device.type == "cuda"),
                          "replica": parameter_bytes(model)}
        handle.remove()
        del model, inputs
        torch.cuda.empty_cache()
    return found


def test_offload_keeps_the_weights_off_the_device(deep_folder):
    found = run_on_ranks(1, _device_bytes, str(deep_folder), backend="nccl", timeout=300)[0]
    plain, offloaded = found[False], found[True]
    assert plain["on_device"] == plain["replica"] and offloaded["on_device"] == 0
    # The no-offload peak counts activations only (the weights were there before); the offloaded one also
    # the blocks in flight (the current one and the next) and the embeddings: well under half a replica.
    assert offloaded["peak"] < plain["peak"] + plain["replica"] / 2
    print(f"CUDA peak over a forward: offloaded {offloaded['peak']} B, resident replica {plain['replica']} B + "
          f"{plain['peak']} B")


# GPU cycles each block is made to spin for (tens of milliseconds): far longer than its copy, so a host
# held back only by the copies would run ahead of the compute.
SLOW_BLOCK_CYCLES = 50_000_000


def _lead(rank: int, world_size: int, folder: str) -> dict:
    """Offloaded blocks made slow: whether each block's predecessor had finished on the device when the
    host reached the block (a drained stream), and the forward's device peak against the blocks' bytes."""
    from functools import partial

    from wan_dist.wan.loading import load_transformer_to_host, parameter_bytes
    from wan_dist.parallel.parallelize import parallelize_dit

    device = torch.device("cuda", rank)
    single = dist.new_group([rank])
    model = load_transformer_to_host(folder, torch.float32, pinned=True)
    parallelize_dit(model, kernels=KERNELS, device=device, ulysses_group=single, ring_group=single, offload=True)
    ends, drained = {}, []

    def reached(index, module, args):
        if index - 1 in ends:
            drained.append(ends[index - 1].query())
        torch.cuda._sleep(SLOW_BLOCK_CYCLES)

    def left(index, module, args, output):
        ends[index] = torch.cuda.Event()
        ends[index].record()

    for index, block in enumerate(model.blocks):
        block.register_forward_pre_hook(partial(reached, index))
        block.register_forward_hook(partial(left, index))
    inputs = _inputs(model.config, device)
    with torch.no_grad():
        model(**inputs)  # diffusers records the execution order and starts prefetching from the second
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        ends.clear()
        drained.clear()
        model(**inputs)
    torch.cuda.synchronize(device)
    blocks = sum(parameter_bytes(block) for block in model.blocks)
    return {"drained": drained, "peak": torch.cuda.max_memory_allocated(device) - base,
            "block": parameter_bytes(model.blocks[0]), "root": parameter_bytes(model) - blocks}


def test_offload_never_drains_the_stream_and_holds_three_blocks(deep_folder):
    activations = run_on_ranks(1, _device_bytes, str(deep_folder), backend="nccl", timeout=300)[0][False]["peak"]
    found = run_on_ranks(1, _lead, str(deep_folder), backend="nccl", timeout=300)[0]
    assert len(found["drained"]) == 7 and not any(found["drained"]), found["drained"]
    # The activations, the root and three blocks, with a block to spare for the allocator's rounding; a
    # host running ahead of the slow blocks would have onloaded all eight.
    assert found["peak"] < activations + found["root"] + 4 * found["block"], (activations, found)


def test_loading_for_offload_holds_one_pinned_copy():
    from wan_dist.wan.building import ensure_tiny_model

    found = run_on_ranks(1, host_load, str(ensure_tiny_model("t2v_1_3b")), "cuda", backend="nccl", timeout=600)[0]
    assert_one_copy(found)
    assert found["pinned"] == found["parameters"]
