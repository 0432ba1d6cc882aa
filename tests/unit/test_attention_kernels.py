"""The attention kernel per use as a pure function of (capability, dtype, head dim, installed libraries);
the masked block kernel against SDPA over the real keys, without widening the head dim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from wan_dist.parallel.attention import _attention_with_lse, choose_kernel, usable_kernels
from wan_dist.config.schema import ConfigError

ALL = frozenset({"flash_attn", "flash_attn_3", "cudnn"})
HOPPER, AMPERE, TURING = (9, 0), (8, 0), (7, 5)


def choose(requested="auto", capability=HOPPER, dtype=torch.bfloat16, head_dim=128, installed=ALL):
    return choose_kernel(requested, capability=capability, dtype=dtype, head_dim=head_dim, installed=installed)


def test_usable_kernels_follow_the_capability_and_the_libraries():
    assert usable_kernels(HOPPER, ALL) == ["fa3", "fa2", "cudnn", "sdpa"]
    assert usable_kernels((9, 0), frozenset({"cudnn"})) == ["cudnn", "sdpa"]
    assert usable_kernels(AMPERE, ALL) == ["fa2", "cudnn", "sdpa"]  # FA3 is built for Hopper only
    assert usable_kernels((12, 0), ALL) == ["cudnn", "sdpa"]  # nor FA2 beyond the GPUs it is built for
    assert usable_kernels(TURING, ALL) == ["sdpa"]
    assert usable_kernels(None, ALL) == ["sdpa"]


def test_auto_takes_the_fastest_kernel_that_runs_this_dtype_and_head_dim():
    assert choose() == "fa3"
    assert choose(capability=AMPERE) == "fa2"
    assert choose(installed=frozenset({"cudnn"})) == "cudnn"
    assert choose(dtype=torch.float16) == "fa3"
    # fp32 and head dims that are no multiple of 8: diffusers' native SDPA, which picks per call.
    assert choose(dtype=torch.float32) == "sdpa"
    assert choose(head_dim=12) == "sdpa"
    # cuDNN stops at 128, FlashAttention at 256.
    assert choose(head_dim=192, installed=frozenset({"cudnn"})) == "sdpa"
    assert choose(head_dim=192, capability=AMPERE) == "fa2"
    assert choose(head_dim=264) == "sdpa"
    assert choose(capability=None) == "sdpa"


def test_a_named_kernel_must_be_usable_and_falls_back_where_it_cannot_run():
    assert choose("cudnn") == "cudnn"
    assert choose("cudnn", dtype=torch.float32) == "sdpa"
    assert choose("fa2", head_dim=20) == "sdpa"
    with pytest.raises(ConfigError, match=r"attention='fa3' is not allowed: one of auto, fa2, cudnn, sdpa on this "
                                          r"device \(cuda sm80\)"):
        choose("fa3", capability=AMPERE)
    with pytest.raises(ConfigError, match=r"attention='cudnn' is not allowed: .* \(cpu\)"):
        choose("cudnn", capability=None)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_masked_block_kernel_matches_sdpa_over_the_real_keys(dtype, tolerance):
    """Keys flagged NaN are masked out; the head dim stays 128; the inputs are non-contiguous views as
    yunchang hands them over; the LSE is that of the real keys."""
    gen = torch.Generator().manual_seed(0)
    batch, seq, heads, head_dim, real = 2, 40, 3, 128, 29
    qkv = torch.randn(3, batch, heads, seq, head_dim, generator=gen).to(dtype)
    q, k, v = (t.transpose(1, 2) for t in qkv)  # (B, S, H, D) views, not contiguous
    k = k.clone()
    k[:, real:] = float("nan")
    out, lse = _attention_with_lse(q, k, v, softmax_scale=head_dim**-0.5, masked=True)
    assert out.shape == (batch, seq, heads, head_dim) and lse.shape == (batch, heads, seq)
    qf, kf, vf = (t.float() for t in qkv)
    ref = F.scaled_dot_product_attention(qf, kf[:, :, :real], vf[:, :, :real]).transpose(1, 2)
    ref_lse = torch.logsumexp(qf @ kf[:, :, :real].transpose(-1, -2) * head_dim**-0.5, dim=-1)
    assert (out.float() - ref).abs().max().item() <= tolerance
    assert (lse - ref_lse).abs().max().item() <= 1e-4


def test_a_test_that_sets_diffusers_backend():
    """With its successor: the conftest fixture restores diffusers' process-wide active backend."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    _AttentionBackendRegistry.set_active_backend("_native_math")
    assert _AttentionBackendRegistry.get_active_backend()[0] == "_native_math"


def test_the_next_test_starts_on_the_default_backend():
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
    from diffusers.utils.constants import DIFFUSERS_ATTN_BACKEND

    assert _AttentionBackendRegistry.get_active_backend()[0] == AttentionBackendName(DIFFUSERS_ATTN_BACKEND)
