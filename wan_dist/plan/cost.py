"""What a denoising step costs: the DiT's FLOPs counted from its dimensions, the device's peak, and a
model of each parallel mode's step time on more GPUs than a benchmark machine has.

The FLOP count is of the work the model must do (linear layers, self-attention, cross-attention; a
multiply-add is 2 FLOPs), not of what a kernel happens to execute, so achieved FLOP/s compare across
modes and with diffusers' pipeline.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..config.presets import IMAGE_TOKENS, TEXT_MAX_TOKENS

if TYPE_CHECKING:
    from ..parallel.dims import ParallelDims

# Any guidance scale above 1 runs the unconditional branch (diffusers' do_classifier_free_guidance).
GUIDED_SCALE = 5.0

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), from the vendors' data sheets; matched against
# torch.cuda.get_device_name() by substring, most specific first.
GPU_BF16_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("H800", 989.4),
    ("H20", 148.0), ("GH200", 989.4), ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.1),
    ("L40", 181.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
)


@dataclass(frozen=True)
class DitFlops:
    """FLOPs of one DiT forward (one CFG branch) over `tokens` video tokens."""

    tokens: int
    linear: float
    self_attention: float
    cross_attention: float

    @property
    def total(self) -> float:
        return self.linear + self.self_attention + self.cross_attention


def dit_flops(dit_config: dict, tokens: int, *, text_tokens: int = TEXT_MAX_TOKENS,
              image_tokens: int | None = None) -> DitFlops:
    """Count from a WanTransformer3DModel config.json: every matmul of the blocks, the embedders, the
    patch embedding and the output projection; elementwise work and norms are left out (< 1%).
    `image_tokens` (I2V) defaults to CLIP ViT-H's 257."""
    dim = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
    ffn, layers = dit_config["ffn_dim"], dit_config["num_layers"]
    if image_tokens is None:
        image_tokens = IMAGE_TOKENS if dit_config.get("image_dim") else 0
    patch = math.prod(dit_config["patch_size"])
    n = tokens
    # Per block: q, k, v, o and the two FFN matmuls on the video tokens; cross-attention's q and o on the
    # video tokens, k and v on the text (and image) tokens.
    per_block_linear = 2 * n * dim * (4 * dim + 2 * ffn) + 2 * n * 2 * dim * dim \
        + 2 * (text_tokens + image_tokens) * 2 * dim * dim
    embed_linear = (
        2 * n * dit_config["in_channels"] * patch * dim                     # patch embedding
        + 2 * n * dim * dit_config["out_channels"] * patch                  # proj_out
        + 2 * text_tokens * (dit_config["text_dim"] * dim + dim * dim)      # text embedder (2 layers)
        + 2 * (dit_config["freq_dim"] * dim + dim * dim + dim * 6 * dim)    # time embedder and projection
    )
    if image_tokens:
        image_dim = dit_config["image_dim"]
        embed_linear += 2 * image_tokens * (image_dim * image_dim + image_dim * dim)
    return DitFlops(
        tokens=n,
        linear=float(layers * per_block_linear + embed_linear),
        # q @ k^T and p @ v: 2 matmuls of n x n x dim.
        self_attention=float(layers * 4 * n * n * dim),
        cross_attention=float(layers * 4 * n * (text_tokens + image_tokens) * dim),
    )


def step_flops(dit_config: dict, tokens: int, *, guided: bool) -> float:
    """FLOPs of one denoising step: one DiT forward per CFG branch."""
    return dit_flops(dit_config, tokens).total * (2 if guided else 1)


def gpu_peak_tflops(device_name: str) -> float | None:
    for name, peak in GPU_BF16_PEAK_TFLOPS:
        if name.lower() in device_name.lower():
            return peak
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, *, size: int = 0, seconds: float = 1.0) -> float:
    """The best sustained matmul rate of this device (and, on CPU, of the threads torch uses)."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)

    def timed(repeats: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    timed(2)
    repeats = max(1, int(seconds / max(timed(1), 1e-6)))
    best = min(timed(repeats) / repeats for _ in range(3))
    return 2 * size**3 / best / 1e12


CEILING_FILE = "ceiling.json"


# One process's single-thread matmul rate over argv[1] seconds from the moment it is told to start, once
# it has said it is ready: processes told together measure the same window, however long each took to
# import torch on a loaded machine.
_RATE_CODE = """
import sys, time, torch
torch.set_num_threads(1)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
torch.mm(a, b)
print("ready", flush=True)
sys.stdin.readline()
seconds, count, t0 = float(sys.argv[1]), 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    torch.mm(a, b)
    count += 1
print(count / (time.perf_counter() - t0), flush=True)
"""


def matmul_rates(processes: int, seconds: float) -> list[float]:
    """Each process's rate over one shared window."""
    procs = [subprocess.Popen([sys.executable, "-c", _RATE_CODE, str(seconds)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(processes)]
    try:
        if [p.stdout.readline().strip() for p in procs] != ["ready"] * processes:
            raise RuntimeError("a matmul rate process ended before it was ready")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.flush()
        return [float(p.communicate()[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


# How long each window of the ceiling lasts: launch/bench.py sets it for the sweeps it starts; read where the
# launcher calls record_parallel_ceiling (in the sweep's process).
CEILING_SECONDS_VAR = "WAN_DIST_BENCH_CEILING_S"


def record_parallel_ceiling(job_dir: Path, nproc: int) -> None:
    """The torchrun launcher's `before_job`: before a multi-rank CPU job, how many times one single-thread
    process's matmul rate `nproc` of them reach together right then, into the job's folder, where
    run_layouts reads it beside the job's run.json. On a machine of its own this is the rank count; on a
    shared or virtual one the host's other load and its placement of the virtual cores take their share,
    and no layout can beat it."""
    if nproc < 2 or torch.cuda.is_available():
        return
    seconds = float(os.environ.get(CEILING_SECONDS_VAR, "2"))
    (alone,), together = matmul_rates(1, seconds), matmul_rates(nproc, seconds)
    measured = {"processes": nproc, "ceiling": sum(together) / alone, "alone": alone, "together": together}
    (Path(job_dir) / CEILING_FILE).write_text(json.dumps(measured) + "\n")



# ------------------------------------------------------------------------------------------- scaling


@dataclass(frozen=True)
class Link:
    name: str
    bytes_per_s: float  # one direction, per GPU
    latency_s: float = 10e-6


# One direction, per GPU, as specified (measured rates are lower: NCCL reaches about 80% of them, so the
# predictions are best cases). NVLink 4 (H100/H200 SXM): 900 GB/s per GPU both ways together, NVIDIA's
# H100 data sheet. PCIe 4.0 x16, the link of the 24 GB RTX 3090/4090: 16 GT/s on 16 lanes, 128b/130b
# coded, PCI-SIG's base specification.
NVLINK = Link("NVLink", 450e9)
PCIE = Link("PCIe", 16e9 * 16 * 128 / 130 / 8)
# Host-to-device copies (block offload) cross PCIe whatever links the GPUs have between them.
HOST_LINK = PCIE


@dataclass(frozen=True)
class StepPrediction:
    mode: str
    gpus: int
    link: str
    compute_s: float
    communication_s: float
    step_s: float
    speedup: float


def predict_step(
    dit_config: dict,
    tokens: int,
    *,
    mode: str,
    gpus: int,
    link: Link,
    single_step_s: float,
    guided: bool = True,
    bytes_per_element: int = 2,
) -> StepPrediction:
    """Step time of `mode` (single, cfg, ulysses, ring, cfg_ulysses, cfg_ring) on `gpus` GPUs, from the
    measured (or assumed) one-GPU step time.

    Compute: CFG halves the step (one branch per half). Sequence parallelism divides the FLOP-weighted
    share of a step that scales with the video tokens by its degree; the rest (the text/image keys and
    values, the embedders) is repeated on every GPU. Communication, per DiT forward and GPU:
    - Ulysses: four all-to-alls per block (q, k, v in; the output back), each moving (sp-1)/sp of this
      GPU's shard of tokens/sp x dim;
    - Ring: sp-1 passes of this GPU's key and value shards per block, overlapped with the block's
      attention (only what exceeds it counts);
    - CFG: one all-gather of the noise prediction per step.
    Each message also pays the link's latency; links are assumed not shared with other traffic.
    """
    cfg = 2 if mode.startswith("cfg") else 1
    sp_mode = mode.removeprefix("cfg").removeprefix("_") or "single"
    if sp_mode not in ("single", "ulysses", "ring") or gpus % cfg or (cfg == 2 and not guided):
        raise ValueError(f"no scaling model for mode {mode!r} on {gpus} GPU(s)")
    sp = gpus // cfg if sp_mode != "single" else 1
    if sp * cfg != gpus:
        raise ValueError(f"mode {mode!r} uses {cfg * sp} GPU(s), not {gpus}")
    flops = dit_flops(dit_config, tokens)
    dim = dit_config["num_attention_heads"] * dit_config["attention_head_dim"]
    layers = dit_config["num_layers"]
    branches_per_gpu = (2 if guided else 1) // cfg
    # What does not scale with the video tokens is repeated on every sequence-parallel GPU: the text/image
    # keys and values and the embedders, i.e. the FLOPs of a forward over no video tokens.
    repeated = dit_flops(dit_config, 0).total
    repeated_share = repeated / flops.total if sp > 1 else 0.0
    compute = single_step_s / cfg * (repeated_share + (1 - repeated_share) / sp)
    comm = 0.0
    if cfg == 2:
        latent_bytes = tokens * dit_config["out_channels"] * math.prod(dit_config["patch_size"]) * 4
        comm += latent_bytes / link.bytes_per_s + link.latency_s
    if sp > 1:
        shard_bytes = tokens / sp * dim * bytes_per_element
        if sp_mode == "ulysses":
            per_block = 4 * (shard_bytes * (sp - 1) / sp / link.bytes_per_s + link.latency_s)
        else:
            kv = 2 * shard_bytes * (sp - 1) / link.bytes_per_s + (sp - 1) * link.latency_s
            attention_s = single_step_s / (2 if guided else 1) * flops.self_attention / flops.total / layers / sp
            per_block = max(0.0, kv - attention_s)
        comm += per_block * layers * branches_per_gpu
    step = compute + comm
    return StepPrediction(mode, gpus, link.name, compute, comm, step, single_step_s / step)


@dataclass(frozen=True)
class ExpertPipelinePrediction:
    """A two-expert model's seconds per video in a long queue on `gpus` GPUs: with both experts on every
    GPU (all steps over all GPUs; the switch moves nothing, each expert is already there), against the
    expert pipeline (parallel.expert_split: `high_gpus` run the high-noise steps of video i+1 while
    `low_gpus` run the low-noise steps of video i, so a video takes the slower group's time, plus the
    latents and sampler state crossing once)."""

    gpus: int
    link: str
    high_steps: int
    low_steps: int
    high_gpus: int
    low_gpus: int
    shared_s: float
    split_s: float

    @property
    def speedup(self) -> float:
        return self.shared_s / self.split_s


def mode_of(dims: "ParallelDims") -> str:
    """A layout as the scaling model names its modes; Ulysses x Ring is modelled as Ulysses over both."""
    sequence = "ulysses" if dims.ring * dims.ulysses > 1 else ""
    return "_".join(filter(None, ("cfg" if dims.cfg > 1 else "", sequence))) or "single"


def auto_mode(dit_config: dict, gpus: int, guided: bool) -> str:
    """The layout parallel=auto takes on `gpus` GPUs (its own rule, parallel/dims.py), as a mode."""
    from ..config.schema import ParallelConfig
    from ..parallel.dims import resolve_parallel_dims

    dims = resolve_parallel_dims(ParallelConfig(), world_size=gpus, num_heads=dit_config["num_attention_heads"],
                                 guidance_scale=GUIDED_SCALE if guided else 1.0)
    return mode_of(dims)


def predict_expert_pipeline(
    dit_config: dict, tokens: int, *, gpus: int, high_steps: int, low_steps: int, link: Link,
    single_step_s: float, guided: bool = True, sampler_tensors: int = 4,
) -> ExpertPipelinePrediction:
    """Both ways of running a two-expert model on `gpus` GPUs (experts of the same size, as A14B's), from
    the one-GPU step time; the groups are sized in proportion to the steps, at least one GPU each.
    `sampler_tensors`: latent-sized fp32 tensors of the sampler's state that cross with the latents
    (UniPC of order 2: the latents, its last sample and two model outputs)."""
    def step(count: int) -> float:
        return predict_step(dit_config, tokens, mode=auto_mode(dit_config, count, guided), gpus=count, link=link,
                            single_step_s=single_step_s, guided=guided).step_s

    high_gpus = min(gpus - 1, max(1, round(gpus * high_steps / (high_steps + low_steps))))
    low_gpus = gpus - high_gpus
    latent_bytes = tokens * dit_config["out_channels"] * math.prod(dit_config["patch_size"]) * 4
    handover = sampler_tensors * latent_bytes / link.bytes_per_s + link.latency_s
    shared = (high_steps + low_steps) * step(gpus)
    split = max(high_steps * step(high_gpus), low_steps * step(low_gpus)) + handover
    return ExpertPipelinePrediction(gpus, link.name, high_steps, low_steps, high_gpus, low_gpus, shared, split)


def scaling_table(
    dit_config: dict, tokens: int, *, single_step_s: float, gpu_counts: tuple[int, ...] = (1, 2, 4, 8),
    modes: tuple[str, ...] = ("ulysses", "ring"), links: tuple[Link, ...] = (NVLINK, PCIE), guided: bool = True,
) -> list[dict]:
    rows = []
    for link in links:
        for mode in modes:
            for gpus in gpu_counts:
                rows.append(asdict(predict_step(dit_config, tokens, mode=mode, gpus=gpus, link=link,
                                                single_step_s=single_step_s, guided=guided)))
    return rows


def block_parameters(dit_config: dict) -> int:
    """Parameters of one WanTransformerBlock: self- and cross-attention (q, k, v, out with biases, the q/k
    RMS norms; I2V's image keys and values), the affine cross-attention norm, the FFN and the modulation
    table."""
    dim, ffn = dit_config["num_attention_heads"] * dit_config["attention_head_dim"], dit_config["ffn_dim"]
    attention = 4 * (dim * dim + dim) + 2 * dim
    image = 2 * (dim * dim + dim) + dim if dit_config.get("image_dim") else 0
    return 2 * attention + image + 2 * dim + (2 * dim * ffn + ffn + dim) + 6 * dim


@dataclass(frozen=True)
class TransferPrediction:
    """One block's weights moved once per DiT forward, against that block's compute: FSDP's all-gather
    (each GPU receives the other GPUs' shards over `link`) or block offload's host-to-device copy (the
    whole block over PCIe). With one block prefetched the copy runs under the previous block's compute, so
    it is hidden when it is the shorter; what exceeds it is added to every block of every forward."""

    option: str  # "fsdp" or "offload"
    mode: str
    gpus: int
    link: str
    block_bytes: int
    transfer_s: float  # per block and forward
    compute_s: float  # per block and forward
    hidden: bool
    exposed_step_s: float  # what the step takes longer


def predict_transfer(
    dit_config: dict, tokens: int, *, option: str, mode: str, gpus: int, link: Link, single_step_s: float,
    guided: bool = True, bytes_per_element: int = 2,
) -> TransferPrediction:
    """`option` (fsdp: the DiT sharded over the `gpus`; offload: every GPU streams its replica from host
    memory) under `mode` on `gpus` GPUs (predict_step's modes), with weights stored in
    `bytes_per_element` (1 for fp8). A block's compute is the predicted step's compute over its forwards
    and blocks (the blocks are all but a fraction of a percent of the FLOPs)."""
    if option not in ("fsdp", "offload") or (option == "fsdp" and gpus < 2):
        raise ValueError(f"no transfer model for {option!r} on {gpus} GPU(s)")
    step = predict_step(dit_config, tokens, mode=mode, gpus=gpus, link=link, single_step_s=single_step_s,
                        guided=guided)
    forwards = (2 if guided else 1) // (2 if mode.startswith("cfg") else 1)
    layers = dit_config["num_layers"]
    compute = step.compute_s / forwards / layers
    nbytes = block_parameters(dit_config) * bytes_per_element
    if option == "fsdp":
        transfer = nbytes * (gpus - 1) / gpus / link.bytes_per_s + (gpus - 1) * link.latency_s
        over = link.name
    else:
        transfer = nbytes / HOST_LINK.bytes_per_s + HOST_LINK.latency_s
        over = f"{HOST_LINK.name} (host)"
    return TransferPrediction(option, mode, gpus, over, nbytes, transfer, compute, transfer <= compute,
                              max(0.0, transfer - compute) * forwards * layers)


def transfer_table(
    dit_config: dict, tokens: int, *, single_step_s: float, gpu_counts: tuple[int, ...] = (1, 2, 4, 8),
    guided: bool = True, bytes_per_element: int = 2,
) -> list[dict]:
    """FSDP and block offload under Ulysses on each GPU count (FSDP from two), over NVLink and PCIe."""
    rows = []
    for option in ("fsdp", "offload"):
        links = (NVLINK, PCIE) if option == "fsdp" else (HOST_LINK,)
        for link in links:
            for gpus in gpu_counts:
                if option == "fsdp" and gpus < 2:
                    continue
                rows.append(asdict(predict_transfer(
                    dit_config, tokens, option=option, mode="ulysses" if gpus > 1 else "single", gpus=gpus,
                    link=link, single_step_s=single_step_s, guided=guided, bytes_per_element=bytes_per_element)))
    return rows


def transfer_markdown(rows: list[dict]) -> str:
    lines = ["| option | GPUs | link | block MB | transfer ms | compute ms | hidden by prefetch | step s added |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['option']} | {r['gpus']} | {r['link']} | {r['block_bytes'] / 1e6:.0f} "
                     f"| {1e3 * r['transfer_s']:.2f} | {1e3 * r['compute_s']:.2f} | {'yes' if r['hidden'] else 'no'} "
                     f"| {r['exposed_step_s']:.3f} |")
    return "\n".join(lines)


# Wan2.1's published end-to-end seconds for T2V-14B at 720p (1280x720, 81 frames, 50 steps) on H800s.
WAN_OFFICIAL_14B_720P_H800 = {1: 1837.9, 2: 945.1, 4: 497.0, 8: 287.9}
WAN_14B_CONFIG = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40,
                  "patch_size": [1, 2, 2], "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256}
WAN_720P_TOKENS = 21 * 45 * 80  # 81 frames -> 21 latent frames; 720x1280 -> 90x160 latents -> 45x80 patches


def fit_official(
    measured: dict[int, float] = WAN_OFFICIAL_14B_720P_H800, *, mode: str = "ulysses", link: Link = NVLINK,
    steps: int = 50, dit_config: dict = WAN_14B_CONFIG, tokens: int = WAN_720P_TOKENS,
) -> dict:
    """Fit the two unknowns of an end-to-end time, total(P) = fixed + steps * step(P), to the 1- and 2-GPU
    figures (fixed: text encoding and VAE decode, which the parallel modes do not split), then predict
    every P from the scaling model. step(P) is linear in the one-GPU step time s1: a_P * s1 + c_P."""
    def line(gpus: int) -> tuple[float, float]:
        at_one = predict_step(dit_config, tokens, mode=mode, gpus=gpus, link=link, single_step_s=1.0)
        at_two = predict_step(dit_config, tokens, mode=mode, gpus=gpus, link=link, single_step_s=2.0)
        slope = at_two.step_s - at_one.step_s
        return slope, at_one.step_s - slope

    slope2, offset2 = line(2)
    single = ((measured[1] - measured[2]) / steps + offset2) / (1 - slope2)
    fixed = measured[1] - steps * single
    rows = []
    for gpus in sorted(measured):
        slope, offset = line(gpus)
        predicted = fixed + steps * (slope * single + offset)
        rows.append({"gpus": gpus, "official_s": measured[gpus], "predicted_s": predicted,
                     "error": predicted / measured[gpus] - 1})
    return {"mode": mode, "link": link.name, "single_step_s": single, "fixed_s": fixed, "rows": rows}


def official_comparison_markdown() -> str:
    """The fit on the official NVLink figures, and what the same GPUs would take over PCIe."""
    fit = fit_official(link=NVLINK)
    lines = ["| GPUs | official s (H800, NVLink) | predicted s, NVLink | predicted s, PCIe | predicted s/step, NVLink |",
             "| --- | --- | --- | --- | --- |"]
    for row in fit["rows"]:
        gpus = row["gpus"]
        steps = {link.name: predict_step(WAN_14B_CONFIG, WAN_720P_TOKENS, mode="ulysses", gpus=gpus, link=link,
                                         single_step_s=fit["single_step_s"]).step_s for link in (NVLINK, PCIE)}
        pcie_total = fit["fixed_s"] + 50 * steps["PCIe"]
        lines.append(f"| {gpus} | {row['official_s']:.1f} | {row['predicted_s']:.1f} ({row['error']:+.1%}) "
                     f"| {pcie_total:.1f} | {steps['NVLink']:.2f} |")
    lines += ["", f"Fitted to the 1- and 2-GPU figures: {fit['single_step_s']:.2f} s per step on one GPU (both CFG "
              f"branches), {fit['fixed_s']:.1f} s that no mode splits (text encoding, VAE decode)."]
    return "\n".join(lines)


# Seconds of the fit's unsplit part that are not the decode: one prompt pair through UMT5-XXL on a GPU.
TEXT_ENCODE_S = 1.0


def decode_seconds(single_decode_s: float, ranks: int, latent_height: int, *, link: Link = NVLINK,
                   video_bytes: int = 0) -> float:
    """The VAE decode split into `ranks` bands (parallel.vae_decode=patch): each band's share of the
    work, plus one halo row per side per convolution (2 of a band's rows more, at every resolution alike),
    plus the bands gathered to rank 0 over `link`. One rank: the whole decode."""
    if ranks == 1:
        return single_decode_s
    band_rows = latent_height / ranks
    return single_decode_s / ranks * (band_rows + 2) / band_rows + video_bytes * (ranks - 1) / ranks / link.bytes_per_s


def decode_share_markdown(steps: int = 50, link: Link = NVLINK) -> str:
    """T2V-14B at 720p x 81 frames, end to end at 1 to 8 GPUs (Ulysses), with the decode on rank 0 or in
    bands over every GPU: the decode's seconds and its share of the whole."""
    fit = fit_official(link=link)
    decode_1 = fit["fixed_s"] - TEXT_ENCODE_S
    video_bytes = 3 * 81 * 720 * 1280 * 4
    lines = ["| GPUs | denoise s | decode on rank 0: s (share) | decode in bands: s (share) | end to end, bands |",
             "| --- | --- | --- | --- | --- |"]
    for gpus in (1, 2, 4, 8):
        denoise = steps * predict_step(WAN_14B_CONFIG, WAN_720P_TOKENS, mode="ulysses", gpus=gpus, link=link,
                                       single_step_s=fit["single_step_s"]).step_s
        banded = decode_seconds(decode_1, gpus, 90, link=link, video_bytes=video_bytes)
        serial_total, banded_total = TEXT_ENCODE_S + denoise + decode_1, TEXT_ENCODE_S + denoise + banded
        lines.append(f"| {gpus} | {denoise:.1f} | {decode_1:.1f} ({decode_1 / serial_total:.1%}) "
                     f"| {banded:.1f} ({banded / banded_total:.1%}) | {banded_total:.1f} |")
    lines += ["", f"The decode's one-GPU time is the fit's unsplit part ({fit['fixed_s']:.1f} s) less "
              f"{TEXT_ENCODE_S:.0f} s of text encoding; the bands add a halo row per side and the gather."]
    return "\n".join(lines)


def fitted_efficiency() -> float:
    """The fraction of an H800's bf16 peak the fitted one-GPU step reaches (T2V-14B, 720p, both branches)."""
    flops = step_flops(WAN_14B_CONFIG, WAN_720P_TOKENS, guided=True)
    return flops / fit_official()["single_step_s"] / (gpu_peak_tflops("H800") * 1e12)


def estimated_step_s(dit_config: dict, tokens: int, *, guided: bool, device_name: str = "H100") -> float:
    """One GPU's step where none was measured (launch/plan.py): the FLOPs at the fitted efficiency of
    `device_name`'s data-sheet peak."""
    return step_flops(dit_config, tokens, guided=guided) / (fitted_efficiency() * gpu_peak_tflops(device_name) * 1e12)


def fitted_transfer_markdown() -> str:
    """T2V-14B at 720p x 81 frames (bf16 weights) on the fitted H800 step: FSDP's all-gather and block
    offload's copy per block against the block's compute."""
    fit = fit_official()
    return transfer_markdown(transfer_table(WAN_14B_CONFIG, WAN_720P_TOKENS, single_step_s=fit["single_step_s"]))


def expert_pipeline_markdown(preset: str = "t2v_a14b") -> str:
    """A two-expert preset (T2V-A14B) at 720p in a long queue, at its own steps, shift and boundary: both
    experts on every GPU against the expert pipeline, from the 14B step time fitted to the official
    figures (each expert is a 14B DiT)."""
    from ..wan.building import preset_expert_steps

    steps = preset_expert_steps(preset)
    single = fit_official(link=NVLINK)["single_step_s"]
    lines = ["| GPUs | link | groups (high + low) | s per video, both experts everywhere | s per video, expert "
             "pipeline | speed-up |", "| --- | --- | --- | --- | --- | --- |"]
    for link in (NVLINK, PCIE):
        for gpus in (2, 4, 8):
            p = predict_expert_pipeline(WAN_14B_CONFIG, WAN_720P_TOKENS, gpus=gpus, high_steps=steps[0],
                                        low_steps=steps[1], link=link, single_step_s=single)
            lines.append(f"| {gpus} | {link.name} | {p.high_gpus} + {p.low_gpus} | {p.shared_s:.0f} | {p.split_s:.0f} "
                         f"| {p.speedup:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(official_comparison_markdown())
    print()
    print(expert_pipeline_markdown())
    print()
    print(decode_share_markdown())
    print()
    print(fitted_transfer_markdown())
