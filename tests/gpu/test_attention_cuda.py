"""SequenceParallelAttention's CUDA path (xfuser + flash_attn, or torch's flash / efficient op) against
SDPA, on one and two GPUs with nccl. The cases and the per-rank check are the gloo tests'."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.dist.test_attention import Case, run_cases
from tests.dist_utils import run_on_ranks

pytestmark = pytest.mark.gpu

# Tolerances against an fp32 SDPA on the fp32 inputs.
TOLERANCE = {"bfloat16": 2e-2, "float32": 1e-4}


def _needs_gpus(count: int) -> pytest.MarkDecorator:
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(available < count, reason=f"needs {count} CUDA device(s)")


# Wan's head_dim is 128 (12 heads in T2V-1.3B); fp32 takes the memory-efficient kernel.
CASES_1 = [
    Case(1, 1, 1, 1024, 12, 128, pad=False, dtype="bfloat16"),
    Case(1, 1, 2, 1000, 12, 128, pad=True, dtype="bfloat16", extra_pad=24),
    Case(1, 1, 1, 300, 5, 12, pad=True, dtype="bfloat16", extra_pad=5),
    Case(1, 1, 1, 256, 4, 64, pad=True, dtype="float32", extra_pad=3),
]
CASES_2 = [
    case
    for ring, uly in [(1, 2), (2, 1)]
    for case in (
        Case(ring, uly, 1, 1024, 12, 128, pad=False, dtype="bfloat16"),
        Case(ring, uly, 1, 1001, 3, 128, pad=True, dtype="bfloat16"),
        Case(ring, uly, 1, 501, 3, 64, pad=True, dtype="float32", extra_pad=2),
    )
]


def _expected_layer(case: Case) -> str:
    """The kernel choose_kernel gives for the case (its head dim padded to a multiple of 8 first), or the
    masked kernel where the tokens are padded."""
    from wan_dist.parallel.attention import choose_kernel, device_capability, installed_kernel_libraries

    if case.pad:
        return "masked"
    return choose_kernel(case.kernel, capability=device_capability(torch.device("cuda")),
                         dtype=getattr(torch, case.dtype), head_dim=-(-case.head_dim // 8) * 8,
                         installed=installed_kernel_libraries())


def _check(per_rank: list[dict[str, dict]], cases: list[Case]) -> None:
    failures = []
    for case in cases:
        stats = [r[case.id] for r in per_rank]
        err = max(s["err"] for s in stats)
        ok = all(s["finite"] and s["shape_dtype_ok"] and s["globals_restored"] for s in stats)
        if not ok or err > TOLERANCE[case.dtype]:
            failures.append(f"{case.id}: err {err:.3g}, {stats}")
        if any(s["layers"] != [_expected_layer(case)] for s in stats):
            failures.append(f"{case.id}: ran {[s['layers'] for s in stats]}, the plan's choice is "
                            f"{_expected_layer(case)}")
    assert not failures, "\n".join(failures)


def _kernels() -> list[str]:
    from wan_dist.parallel.attention import available_kernels

    return available_kernels(torch.device("cuda")) if torch.cuda.is_available() else ["sdpa"]


@_needs_gpus(1)
@pytest.mark.parametrize("kernel", _kernels())
def test_cuda_single_gpu_matches_sdpa(kernel: str) -> None:
    cases = [dataclasses.replace(case, kernel=kernel) for case in CASES_1]
    _check(run_on_ranks(1, run_cases, "cuda", cases, backend="nccl"), cases)


@_needs_gpus(2)
@pytest.mark.parametrize("kernel", _kernels())
def test_cuda_two_gpus_matches_sdpa(kernel: str) -> None:
    cases = [dataclasses.replace(case, kernel=kernel) for case in CASES_2]
    _check(run_on_ranks(2, run_cases, "cuda", cases, backend="nccl"), cases)
