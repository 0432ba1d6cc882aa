"""The FLOP count against torch's own count of a real forward, the device peak table, the scaling model,
the built architectures and the attention-kernel choice."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from wan_dist.parallel.attention import available_kernels, resolve_kernel
from wan_dist.wan.building import build_transformer
from wan_dist.plan.checks import validate_run
from wan_dist.config.schema import ConfigError, RunConfig
from wan_dist.wan.loading import load_transformer, read_component_config
from wan_dist.config.presets import MODEL_PRESETS
from wan_dist.plan.cost import (
    HOST_LINK, NVLINK, PCIE, block_parameters, dit_flops, gpu_peak_tflops, measure_matmul_tflops, predict_step,
    predict_transfer, step_flops, transfer_markdown, transfer_table,
)


@pytest.mark.parametrize("task", ["t2v", "i2v"])
def test_dit_flops_match_torch_count(task, t2v_folder, i2v_folder):
    """Every matmul of a real forward (attention decomposed by the math backend) is in the count."""
    folder = t2v_folder if task == "t2v" else i2v_folder
    config = read_component_config(folder, "transformer")
    model = load_transformer(folder, torch.float32, torch.device("cpu"))
    frames, height, width = 3, 6, 10
    latents = torch.randn(1, config["in_channels"], frames, height, width)
    text = torch.randn(1, 512, config["text_dim"])
    image_tokens = 17
    image = torch.randn(1, image_tokens, config["image_dim"]) if task == "i2v" else None
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(hidden_states=latents, timestep=torch.tensor([500.0]), encoder_hidden_states=text,
              encoder_hidden_states_image=image, return_dict=False)
    tokens = frames * (height // 2) * (width // 2)
    counted = dit_flops(config, tokens, image_tokens=image_tokens if task == "i2v" else 0)
    assert counted.total == counter.get_total_flops()
    assert counted.self_attention == config["num_layers"] * 4 * tokens**2 * config["num_attention_heads"] \
        * config["attention_head_dim"]


def test_step_flops_count_both_branches(t2v_folder):
    config = read_component_config(t2v_folder, "transformer")
    assert step_flops(config, 90, guided=True) == 2 * step_flops(config, 90, guided=False)


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0),
                                             ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                                             ("NVIDIA L40S", 362.1), ("NVIDIA L40", 181.0), ("Some GPU", None)])
def test_gpu_peak_table(name, peak):
    assert gpu_peak_tflops(name) == peak


def test_cpu_matmul_peak_is_measured():
    assert 0 < measure_matmul_tflops(torch.device("cpu"), torch.float32, size=256, seconds=0.05) < 100


def _official_config(preset: str) -> dict:
    with torch.device("meta"):
        transformer = build_transformer(MODEL_PRESETS[preset].spec)
    return {"params": sum(p.numel() for p in transformer.parameters()),
            "block_params": sum(p.numel() for p in transformer.blocks[0].parameters()), **transformer.config}


@pytest.mark.parametrize(("preset", "low", "high"), [("t2v_1_3b", 1.3e9, 1.5e9), ("t2v_14b", 13.5e9, 14.5e9),
                                                     ("i2v_14b_480p", 16e9, 17e9)])
def test_official_architectures_have_their_size(preset, low, high):
    assert low < _official_config(preset)["params"] < high


def test_scaling_model():
    config = _official_config("t2v_14b")
    tokens = 21 * 45 * 80  # 720x1280, 81 frames
    single = 36.0
    for mode in ("ulysses", "ring"):
        speedups = [predict_step(config, tokens, mode=mode, gpus=g, link=NVLINK, single_step_s=single).speedup
                    for g in (2, 4, 8)]
        assert speedups == sorted(speedups) and all(s <= g for s, g in zip(speedups, (2, 4, 8), strict=True))
    nvlink = predict_step(config, tokens, mode="ulysses", gpus=8, link=NVLINK, single_step_s=single)
    pcie = predict_step(config, tokens, mode="ulysses", gpus=8, link=PCIE, single_step_s=single)
    assert pcie.communication_s > 10 * nvlink.communication_s and pcie.step_s > nvlink.step_s
    cfg = predict_step(config, tokens, mode="cfg", gpus=2, link=PCIE, single_step_s=single)
    assert cfg.speedup == pytest.approx(2.0, rel=1e-3)
    with pytest.raises(ValueError):
        predict_step(config, tokens, mode="cfg_ulysses", gpus=3, link=NVLINK, single_step_s=single)


def test_random_weights_only_for_real_presets():
    run = RunConfig()
    run.model.preset, run.model.random_weights = "t2v_1_3b", True
    assert validate_run(run).task == "t2v"
    run = RunConfig()
    run.model.random_weights = True
    with pytest.raises(ConfigError, match="model.random_weights"):
        validate_run(run)


def test_attention_kernel_choice():
    cpu = torch.device("cpu")
    assert available_kernels(cpu) == ["sdpa"] and resolve_kernel("auto", cpu) == "sdpa"
    with pytest.raises(ConfigError, match="attention='cudnn' is not allowed"):
        resolve_kernel("cudnn", cpu)
    run = RunConfig()
    run.attention = "flash"
    with pytest.raises(ConfigError, match="attention='flash'"):
        validate_run(run)


def test_scaling_model_against_the_official_14b_figures():
    """Fitted to the 1- and 2-GPU end-to-end times, it predicts 4 and 8 H800s within 1% and 8%."""
    from wan_dist.plan.cost import WAN_OFFICIAL_14B_720P_H800, fit_official, official_comparison_markdown

    fit = fit_official()
    rows = {row["gpus"]: row for row in fit["rows"]}
    for gpus in (1, 2):
        assert rows[gpus]["predicted_s"] == pytest.approx(WAN_OFFICIAL_14B_720P_H800[gpus])
    assert abs(rows[4]["error"]) < 0.01 and abs(rows[8]["error"]) < 0.08
    assert 0 < fit["fixed_s"] < 100
    assert "| 8 | 287.9 |" in official_comparison_markdown()


@pytest.mark.parametrize("preset", ["t2v_1_3b", "i2v_14b_480p"])
def test_block_parameters_are_the_models(preset):
    config = _official_config(preset)
    assert block_parameters(config) == config["block_params"]


def test_transfers_against_block_compute():
    """FSDP's all-gather brings (P-1)/P of a block over the GPUs' link; offload brings the whole block over
    the host's PCIe; either is hidden by the prefetch while it is shorter than the block's compute."""
    config = _official_config("t2v_14b")
    block = config["block_params"] * 2
    long = predict_transfer(config, 21 * 45 * 80, option="fsdp", mode="ulysses", gpus=2, link=PCIE,
                            single_step_s=36.0)
    assert long.block_bytes == block
    assert long.transfer_s == pytest.approx(block / 2 / PCIE.bytes_per_s + PCIE.latency_s)
    # 36 s a step, both branches on each GPU, half the tokens each: 36 / 2 / 2 / 40 s a block, less the
    # repeated text keys and values.
    assert long.compute_s == pytest.approx(36.0 / 2 / 2 / 40, rel=0.01)
    assert long.hidden and long.exposed_step_s == 0
    # A short video: the compute no longer covers the copy; what exceeds it repeats per block and forward.
    short = predict_transfer(config, 1560, option="offload", mode="single", gpus=1, link=NVLINK, single_step_s=0.5)
    assert short.link == f"{HOST_LINK.name} (host)" and short.transfer_s == pytest.approx(
        block / HOST_LINK.bytes_per_s + HOST_LINK.latency_s)
    assert not short.hidden
    assert short.exposed_step_s == pytest.approx((short.transfer_s - short.compute_s) * 2 * 40)
    fp8 = predict_transfer(config, 1560, option="offload", mode="single", gpus=1, link=NVLINK, single_step_s=0.5,
                           bytes_per_element=1)
    assert fp8.block_bytes == block // 2 and fp8.transfer_s < short.transfer_s
    # NVLink gathers 14x faster than PCIe 4.0; FSDP needs two GPUs.
    fast, slow = (predict_transfer(config, 21 * 45 * 80, option="fsdp", mode="ulysses", gpus=8, link=link,
                                   single_step_s=4.0) for link in (NVLINK, PCIE))
    assert fast.hidden and not slow.hidden
    with pytest.raises(ValueError):
        predict_transfer(config, 1560, option="fsdp", mode="single", gpus=1, link=NVLINK, single_step_s=0.5)
    rows = transfer_table(config, 1560, single_step_s=0.5)
    assert {(r["option"], r["gpus"]) for r in rows} >= {("fsdp", 2), ("fsdp", 8), ("offload", 1)}
    assert ("fsdp", 1) not in {(r["option"], r["gpus"]) for r in rows}
    assert "| offload | 1 | PCIe (host) | 703 |" in transfer_markdown(rows)


def test_expert_pipeline_prediction():
    """The expert pipeline takes the slower group's time per video: it cannot beat cfg's perfect halving
    on 2 guided GPUs with A14B's 26/14 steps, and it wins where nothing else splits well (unguided, equal
    steps, 2 GPUs: one step on each group against Ulysses' communication)."""
    from wan_dist.plan.cost import NVLINK, WAN_14B_CONFIG, WAN_720P_TOKENS, predict_expert_pipeline

    guided = predict_expert_pipeline(WAN_14B_CONFIG, WAN_720P_TOKENS, gpus=2, high_steps=26, low_steps=14,
                                     link=NVLINK, single_step_s=36.0)
    assert (guided.high_gpus, guided.low_gpus) == (1, 1)
    assert guided.shared_s == pytest.approx(40 * 18.0, rel=0.01)
    assert guided.split_s == pytest.approx(26 * 36.0, rel=0.01) and guided.speedup < 1
    balanced = predict_expert_pipeline(WAN_14B_CONFIG, WAN_720P_TOKENS, gpus=2, high_steps=20, low_steps=20,
                                       link=NVLINK, single_step_s=18.0, guided=False)
    assert balanced.speedup > 1
