"""Two gloo ranks sharing one GPU: gloo's all-gather, all-to-all and broadcast take the device tensors
themselves, its send and recv go through tests/gloo_cuda_shim.py. The exchange is tests/dist's."""

from __future__ import annotations

import pytest
import torch

from tests.dist.test_gloo_cuda_shim import check_exchange, exchange
from tests.dist_utils import run_on_ranks

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_two_gloo_ranks_on_one_gpu():
    device = torch.device("cuda", 0)
    check_exchange(run_on_ranks(2, exchange, device, False, timeout=120), device, staged=True)
