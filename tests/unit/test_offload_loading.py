"""Block offload's side of loading and of the options it hands diffusers, on CPU: the DiT read straight into
the host memory it streams from is from_pretrained's DiT tensor for tensor, in a few buffers of a power of
two (what torch's pinned allocator would otherwise round each tensor up to); the group offloading options
on CUDA are streamed, record the stream and pre-pin (which copies nothing for weights loaded pinned), and
are names diffusers' `apply_group_offloading` takes. The pinned, streamed path is tests/gpu/test_offload_cuda.py."""

from __future__ import annotations

import inspect

import pytest
import torch

from wan_dist.wan.loading import load_transformer, load_transformer_to_host
from wan_dist.parallel.parallelize import offload_options


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_host_loaded_dit_is_from_pretrained_s(t2v_folder, dtype):
    reference = load_transformer(t2v_folder, dtype, torch.device("cpu"))
    loaded = load_transformer_to_host(t2v_folder, dtype, pinned=False)
    expected, found = reference.state_dict(), loaded.state_dict()
    assert found.keys() == expected.keys()
    for name, tensor in expected.items():
        assert found[name].dtype == tensor.dtype and torch.equal(found[name], tensor), name
    # The rotary tables are buffers outside the checkpoint: rebuilt, not left uninitialised.
    assert all(torch.equal(a, b) for a, b in zip(loaded.rope.buffers(), reference.rope.buffers()))
    assert not loaded.training
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [*loaded.parameters(), *loaded.buffers()]}
    assert len(storages) < len(list(loaded.parameters())) / 10
    assert all(size & (size - 1) == 0 for size in storages.values()), storages


def test_offload_options_stream_record_the_stream_and_pre_pin():
    from diffusers.hooks import apply_group_offloading

    cuda, cpu = offload_options(torch.device("cuda", 0)), offload_options(torch.device("cpu"))
    assert cuda["use_stream"] and cuda["record_stream"] and cuda["non_blocking"]
    assert cuda["low_cpu_mem_usage"] is False and cpu["low_cpu_mem_usage"] is False
    # diffusers refuses record_stream without a stream, and a stream on the CPU.
    assert not cpu["use_stream"] and not cpu["record_stream"]
    for options in (cuda, cpu):
        inspect.signature(apply_group_offloading).bind(torch.nn.Module(), **options)
