"""The plan's memory model against measurement: one DiT block's live set predicted from its sizes and
measured by torch's profiler on the CPU, and the refusals of sharding where it cannot apply."""

from __future__ import annotations

import pytest
import torch

from tests.planning import plan_of
from wan_dist.config.schema import RunConfig
from wan_dist.config.errors import ConfigError
from wan_dist.plan.memory import block_activation_bytes, measure_peak_bytes


@pytest.mark.parametrize("heads, head_dim, ffn", [(8, 64, 2048), (8, 64, 512), (12, 64, 4480)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_activations_within_a_quarter_of_the_measured(heads, head_dim, ffn, dtype):
    """FFN-bound (wide FFN) and attention-bound (narrow FFN) blocks, fp32 and bf16."""
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    dim, tokens = heads * head_dim, 900
    block = WanTransformerBlock(dim, ffn, heads, qk_norm="rms_norm_across_heads", cross_attn_norm=True,
                                eps=1e-6).eval().to(dtype)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, tokens, dim, generator=g).to(dtype)
    context = torch.randn(1, 512, dim, generator=g).to(dtype)
    temb = torch.randn(1, 6, dim, generator=g)
    rotary = (torch.randn(1, tokens, 1, head_dim, generator=g), torch.randn(1, tokens, 1, head_dim, generator=g))
    with torch.no_grad():
        measured = measure_peak_bytes(lambda: block(x, context, temb, rotary))
    predicted = block_activation_bytes({"num_attention_heads": heads, "attention_head_dim": head_dim, "ffn_dim": ffn},
                                       tokens, x.element_size())
    assert 0.75 * measured <= predicted <= 1.25 * measured, (predicted, measured)


def test_measure_peak_counts_what_is_alive_at_once():
    def work():
        a = torch.empty(1000, 1000)  # 4 MB
        b = torch.empty(2000, 1000)  # 8 MB, both alive
        del a
        c = torch.empty(1000, 1000)  # 4 MB: 12 MB again, not 16
        del b, c

    assert measure_peak_bytes(work) == 12_000_000


def test_sharding_needs_two_dit_ranks(tmp_path, t2v_folder):
    run = RunConfig()
    run.model.path, run.parallel.fsdp = str(t2v_folder), "true"
    with pytest.raises(ConfigError, match="parallel.fsdp=True is not allowed.*two DiT ranks"):
        plan_of(run, 1, tmp_path)
    run.parallel.preset = "stage_split"
    with pytest.raises(ConfigError, match="parallel.fsdp"):
        plan_of(run, 2, tmp_path)


def test_auto_never_shards_on_cpu(tmp_path, t2v_folder):
    run = RunConfig()
    run.model.path = str(t2v_folder)
    plan = plan_of(run, 2, tmp_path)
    assert plan.fsdp is False
    assert all(m.gather_buffers == 0 for m in plan.memory)
