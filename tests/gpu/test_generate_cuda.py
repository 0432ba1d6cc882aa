"""The whole pipeline on CUDA with nccl: the tiny models (head dim 16, which every kernel takes:
tests/gpu/conftest.py) against diffusers' CPU fp32 reference, and the kernel each run's plan chose.

fp32 DiT: close to the CPU result (cuDNN may use TF32 in the VAE convolutions, hence 5e-3); bf16 DiT
(the GPU default): within bf16 noise. Layouts on two GPUs when there are two."""

from __future__ import annotations

import json

import pytest
import torch

from tests.dist_utils import run_on_ranks
from tests.modes import Case, run_cases
from tests.reference import max_abs_error, reference_frames

pytestmark = pytest.mark.gpu
FP32_TOLERANCE, BF16_TOLERANCE = 5e-3, 5e-2


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _planned_kernel(requested: str, dtype: torch.dtype) -> str:
    """What choose_kernel gives the tiny GPU model on this device."""
    from tests.gpu.conftest import GPU_HEAD_DIM
    from wan_dist.parallel.attention import choose_kernel, device_capability, installed_kernel_libraries

    return choose_kernel(requested, capability=device_capability(torch.device("cuda", 0)), dtype=dtype,
                         head_dim=GPU_HEAD_DIM, installed=installed_kernel_libraries())


def _check_kernels(reports: list[dict], expected: list[str]) -> None:
    """Every attention use of each run's plan took the kernel expected for it."""
    for report, kernel in zip(reports, expected, strict=True):
        assert set(report["plan"]["kernels"].values()) == {kernel}, (report["plan"]["kernels"], kernel)


def _check(cases, root, tolerance):
    for case in cases:
        reference = reference_frames(case.folder, **case.reference_kwargs())
        error = max_abs_error(root / case.name / "frames.npy", reference)
        assert error <= tolerance, f"{case.name}: {error:.3g}"


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA device")
def test_single_gpu_fp32_and_bf16(gpu_t2v_folder, gpu_i2v_folder, image_path, tmp_path):
    fp32 = [Case("t2v_fp32", str(gpu_t2v_folder), dit_dtype="fp32"),
            Case("i2v_fp32", str(gpu_i2v_folder), image=str(image_path), dit_dtype="fp32")]
    bf16 = [Case("t2v_bf16", str(gpu_t2v_folder)), Case("i2v_bf16", str(gpu_i2v_folder), image=str(image_path))]
    (reports,) = run_on_ranks(1, run_cases, fp32 + bf16, str(tmp_path), backend="nccl", timeout=600)
    # fp32 takes SDPA; bf16 (the GPU default) the fastest kernel here.
    fp32_kernel, bf16_kernel = _planned_kernel("auto", torch.float32), _planned_kernel("auto", torch.bfloat16)
    _check_kernels(reports, [fp32_kernel] * 2 + [bf16_kernel] * 2)
    assert bf16_kernel != "sdpa", "no fast kernel takes head dim 16 in bf16 here"
    _check(fp32, tmp_path, FP32_TOLERANCE)
    _check(bf16, tmp_path, BF16_TOLERANCE)


@pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA devices")
def test_two_gpu_layouts(gpu_t2v_folder, tmp_path):
    cases = [Case(name, str(gpu_t2v_folder), dit_dtype="fp32", **layout) for name, layout in
             (("cfg", dict(cfg=2)), ("ulysses", dict(ulysses=2)), ("ring", dict(ring=2)),
              ("stage_split", dict(stage_split=True)))]
    run_on_ranks(2, run_cases, cases, str(tmp_path), backend="nccl", timeout=600)
    _check(cases, tmp_path, FP32_TOLERANCE)


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA device")
def test_cli_on_one_gpu(gpu_t2v_folder, tmp_path):
    """The real entry point on CUDA: distributed_session with nccl and an eagerly bound device."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    cmd = [sys.executable, "launch/generate.py", "model=tiny", f"model.path={gpu_t2v_folder}", "model.dit_dtype=fp32",
           "height=48", "width=80", "steps=3", "prompt=a lighthouse at dusk, waves", "negative_prompt=blurry",
           f"output.dir={out}", "output.save_frames=true", f"hydra.run.dir={tmp_path / 'hydra'}"]
    result = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = reference_frames(str(gpu_t2v_folder), prompt="a lighthouse at dusk, waves", negative_prompt="blurry")
    assert max_abs_error(out / "frames.npy", reference) <= FP32_TOLERANCE
    report = json.loads((out / "run.json").read_text())
    assert report["backend"] == "nccl" and report["plan"]["device"] == "cuda", report["plan"]
    _check_kernels([report], [_planned_kernel("auto", torch.float32)])


@pytest.mark.skipif(_gpus() < 2, reason="needs two CUDA devices")
def test_stage_split_prompt_queue_two_gpus(gpu_t2v_folder, tmp_path):
    """Rank 0 hands over video i+1 while the DiT rank hands back video i: the nccl ordering case."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red kite over a beach\nsnow on a quiet street\na bowl of oranges\n")
    cases = [Case("queue", str(gpu_t2v_folder), dit_dtype="fp32", stage_split=True, prompts_file=str(prompts))]
    run_on_ranks(2, run_cases, cases, str(tmp_path), backend="nccl", timeout=600)
    for index, prompt in enumerate(prompts.read_text().splitlines()):
        reference = reference_frames(str(gpu_t2v_folder), **{**cases[0].reference_kwargs(), "prompt": prompt})
        assert max_abs_error(tmp_path / "queue" / f"frames_{index}.npy", reference) <= FP32_TOLERANCE


class _StepsOnly:
    """A scheduler whose `set_timesteps` (a host-to-device copy, before the loop) runs outside CUDA's
    sync debug mode, so that the mode checks the steps alone."""

    def __init__(self, scheduler) -> None:
        self._scheduler = scheduler

    def set_timesteps(self, *args, **kwargs) -> None:
        mode = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode("default")
        try:
            self._scheduler.set_timesteps(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(mode)

    def __getattr__(self, name: str):
        return getattr(self._scheduler, name)


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA device")
def test_step_loop_never_waits_for_the_gpu(gpu_t2v_folder):
    """CUDA's sync debug mode raises on any synchronising call inside the loop: the model, the guidance,
    the step clock. Only the steps are checked: `set_timesteps` copies the timesteps from the host before
    the loop. The Euler sampler is used because UniPC's order-2 corrector solves a 2x2 system with
    torch.linalg.solve on the device, which checks its result on the host (diffusers' code, not ours)."""
    from wan_dist.parallel.cfg import GuidedNoise
    from wan_dist.parallel.context_cache import cache_context_kv
    from wan_dist.wan.loading import load_scheduler, load_transformer, read_component_config
    from wan_dist.wan.pipeline import Experts, denoise, initial_noise, latent_shape

    device = torch.device("cuda", 0)
    transformer = load_transformer(gpu_t2v_folder, torch.bfloat16, device)
    context_cache = cache_context_kv(transformer)  # as the runner installs it
    text_dim = read_component_config(gpu_t2v_folder, "transformer")["text_dim"]
    embeds = torch.randn(1, 512, text_dim, device=device, dtype=torch.bfloat16)
    predictor = GuidedNoise(transformer, prompt_embeds=embeds, negative_prompt_embeds=embeds.flip(1),
                            image_embeds=None, guidance_scale=5.0, cfg_group=None)
    shape = latent_shape(read_component_config(gpu_t2v_folder, "vae"), height=48, width=80, num_frames=9)
    latents = initial_noise(shape, 0, device)
    scheduler = load_scheduler(gpu_t2v_folder, "euler", 3.0)
    denoise(latents=latents, scheduler=scheduler, steps=2, experts=Experts(predictor), model_dtype=torch.bfloat16,
            show_progress=False)  # warm-up: kernels chosen, caches allocated
    context_cache.cache.clear()  # so that the checked loop both fills the context cache and hits it
    checked = _StepsOnly(load_scheduler(gpu_t2v_folder, "euler", 3.0))
    torch.cuda.set_sync_debug_mode("error")
    try:
        result = denoise(latents=latents, scheduler=checked, steps=4, experts=Experts(predictor),
                         model_dtype=torch.bfloat16, show_progress=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(result.step_seconds) == 4 and all(s > 0 for s in result.step_seconds)
    assert len(context_cache.cache) == 2


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA device")
@pytest.mark.parametrize("kernel", ["cudnn", "sdpa", "fa2", "fa3"])
@pytest.mark.parametrize("backend_first", [True, False])
def test_context_cache_is_exact_with_every_kernel(gpu_t2v_folder, kernel, backend_first):
    """bf16 on the GPU, the diffusers attention backend set before or after the cache is installed: the
    cached steps equal diffusers' own processors bit for bit."""
    from wan_dist.parallel.attention import DIFFUSERS_BACKENDS, available_kernels
    from wan_dist.parallel.context_cache import cache_context_kv
    from wan_dist.wan.loading import load_transformer, read_component_config

    device = torch.device("cuda", 0)
    if kernel not in available_kernels(device):
        pytest.skip(f"{kernel} is not available here")
    model = load_transformer(gpu_t2v_folder, torch.bfloat16, device)
    config = read_component_config(gpu_t2v_folder, "transformer")
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config["in_channels"], 3, 6, 10, generator=generator).to(device, torch.bfloat16)
    texts = [torch.randn(1, 512, config["text_dim"], generator=generator).to(device, torch.bfloat16)
             for _ in range(2)]

    def steps() -> list[torch.Tensor]:
        with torch.no_grad():
            return [model(hidden_states=latents, timestep=torch.tensor([t], device=device), encoder_hidden_states=text,
                          return_dict=False)[0] for t in (900.0, 100.0) for text in texts]

    if kernel != "sdpa":
        model.set_attention_backend(DIFFUSERS_BACKENDS[kernel])
    expected = steps()
    if backend_first:
        cache_context_kv(model)
    else:
        model.reset_attention_backend()
        cache_context_kv(model)
        if kernel != "sdpa":
            model.set_attention_backend(DIFFUSERS_BACKENDS[kernel])
    got = steps()
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["cudnn", "sdpa"])
def test_attention_kernels_on_one_gpu(gpu_t2v_folder, tmp_path, attention):
    cases = [Case(f"{attention}_bf16", str(gpu_t2v_folder), attention=attention)]
    (reports,) = run_on_ranks(1, run_cases, cases, str(tmp_path), backend="nccl", timeout=600)
    _check_kernels(reports, [attention])
    _check(cases, tmp_path, BF16_TOLERANCE)


@pytest.mark.skipif(_gpus() < 1, reason="needs a CUDA device")
@pytest.mark.parametrize("attention", ["cudnn", "sdpa"])
def test_attention_kernels_compiled_on_one_gpu(gpu_t2v_folder, tmp_path, attention):
    cases = [Case(f"{attention}_compiled", str(gpu_t2v_folder), attention=attention, compile=True)]
    (reports,) = run_on_ranks(1, run_cases, cases, str(tmp_path), backend="nccl", timeout=600)
    _check_kernels(reports, [attention])
    _check(cases, tmp_path, BF16_TOLERANCE)
