"""Everything one GPU can tell about this project, in one call, under 8 minutes; also runs on a CPU, as
far as a CPU allows, so that CI keeps it working.

    python3 launch/gpu_check.py --out $OUT            # on the GPU machine (make gpu-check)
    python3 launch/gpu_check.py --out /tmp/check      # on a CPU: small shapes, no GPU-only steps

On a machine that lacks the project's dependencies, `--wheels .whl` (made by `make gpu-wheels`) installs
them into a folder of their own first. Each step runs within its share of the time and records its
outcome; a failed step does not stop the others. Writes <out>/gpu_check.json and prints a summary.

Steps:
- lse_merge: every block kernel and dtype, keys split into ring blocks and merged by their log-sum-exp,
  against an fp32 SDPA over the whole sequence; padded keys masked too.
- kernels (CUDA): time of each attention kernel at Wan 1.3B's 480x832x81 self-attention (12 heads, 32760
  tokens, head dim 128, bf16): cuDNN, FlashAttention-2 (or torch's flash op where flash_attn is absent),
  the masked kernel, and the flash op at head dim 136 (what masking by a widened head dim would run).
- tests_gpu (CUDA): `pytest -m gpu tests/gpu`, the one-GPU cases.
- torchrun: the real entry point under torchrun, one rank (nccl with its device on a GPU), a run with
  compile=true, and a failing run that goes through the abort path.
- two_ranks_one_gpu: two gloo ranks sharing the device against one rank (tests/two_ranks_one_gpu.py), the
  tiny model in bf16: cfg, ulysses, ring, stage split and ulysses with compile=true; point-to-point
  transfers staged through host memory (tests/gloo_cuda_shim.py). On a CPU the ring alone, host tensors
  standing in for device ones.
- bench (CUDA): launch/bench.py, the 1.3B architecture at 480x832x81 with random bf16 weights, a few
  steps, against diffusers' pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470  # the whole check, wheels included; the caller's limit is 8 minutes
STEP_BUDGET_S = {"torchrun": 150, "tests_gpu": 150, "two_ranks_one_gpu": 120, "bench": 200}


def install_wheels(wheels: Path, target: Path) -> dict[str, Any]:
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(target), *files]
    start = time.monotonic()
    result = subprocess.run(cmd, capture_output=True, text=True)
    return {"ok": result.returncode == 0, "wheels": [Path(f).name for f in files],
            "seconds": round(time.monotonic() - start, 1), "log": result.stderr[-2000:]}


def _run(cmd: list[str], env: dict[str, str], timeout_s: float, says: str = "") -> dict[str, Any]:
    """A subprocess within its time; its exit code, time, whether its output holds `says`, and the end of
    its output."""
    start = time.monotonic()
    try:
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
        code, out = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired as error:
        code, out = "timeout", (error.stdout or b"").decode(errors="replace") + (error.stderr or b"").decode(
            errors="replace")
    return {"exit": code, "seconds": round(time.monotonic() - start, 1), "says": says in out, "log": out[-3000:]}


def _merge_blocks(outs: list, lses: list):
    """The ring's merge: each block's output weighted by exp(its LSE - the total LSE), in fp32."""
    import torch

    lse = torch.stack(lses)  # (blocks, B, H, S)
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total).permute(0, 1, 3, 2).unsqueeze(-1)  # (blocks, B, S, H, 1)
    return (torch.stack([o.float() for o in outs]) * weights).sum(0)


def _block_kernels(device, installed: frozenset[str]) -> dict[str, Any]:
    """name -> fn(q, k, v, scale) -> (out, lse) for (B, S, H, D) inputs, as the ring calls them."""
    import functools

    from wan_dist.attention import _attention_with_lse

    kernels: dict[str, Any] = {}
    if device.type == "cpu":
        kernels["cpu_flash"] = functools.partial(_attention_with_lse, kernel="sdpa")
    else:
        kernels["sdpa_flash"] = functools.partial(_attention_with_lse, kernel="sdpa")
        if "cudnn" in installed:
            kernels["cudnn"] = functools.partial(_attention_with_lse, kernel="cudnn")
        if "flash_attn" in installed:
            from yunchang.kernels import AttnType, select_flash_attn_impl

            kernels["fa2"] = select_flash_attn_impl(AttnType.FA, stage="fwd-only")
        if "flash_attn_3" in installed:
            from yunchang.kernels import AttnType, select_flash_attn_impl

            kernels["fa3"] = select_flash_attn_impl(AttnType.FA3, stage="fwd-only")
    return kernels


def lse_merge(device, shape: tuple[int, int, int, int], ring: int) -> list[dict[str, Any]]:
    """Every block kernel and dtype against fp32 SDPA, keys split in `ring` blocks; masked keys too."""
    import functools

    import torch
    import torch.nn.functional as F

    from wan_dist.attention import _attention_with_lse, installed_kernel_libraries

    batch, seq, heads, head_dim = shape
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
    scale = head_dim**-0.5

    def reference(keys: int):
        qt, kt, vt = (t.transpose(1, 2).double() for t in (q, k[:, :keys], v[:, :keys]))
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2).float()

    full, real = reference(seq), reference(seq - 5)
    kernels = _block_kernels(device, installed_kernel_libraries())
    dtypes = [torch.float32, torch.bfloat16] if device.type == "cpu" else [torch.bfloat16, torch.float16]
    cases = [(name, fn, dtype, False) for name, fn in kernels.items() for dtype in dtypes]
    masked = functools.partial(_attention_with_lse, masked=True)
    cases += [("masked", masked, dtype, True) for dtype in dict.fromkeys([torch.float32, *dtypes])]
    if device.type == "cuda":
        cases.append(("efficient", functools.partial(_attention_with_lse, kernel="sdpa"), torch.float32, False))
    rows = []
    for name, fn, dtype, is_masked in cases:
        row = {"kernel": name, "dtype": str(dtype).removeprefix("torch."), "ring": ring, "shape": list(shape)}
        try:
            keys = k.clone()
            if is_masked:
                keys[:, seq - 5:] = float("nan")
            qd, kd, vd = (t.to(device, dtype) for t in (q, keys, v))
            outs, lses = [], []
            for kb, vb in zip(kd.chunk(ring, dim=1), vd.chunk(ring, dim=1), strict=True):
                out, lse = fn(qd, kb, vb, dropout_p=0.0, softmax_scale=scale, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, return_softmax=False)[:2]
                outs.append(out)
                lses.append(lse.float().reshape(batch, heads, seq))
            merged = _merge_blocks(outs, lses).cpu()
            expected = real if is_masked else full
            row.update(ok=True, max_abs_err=float((merged - expected).abs().max()),
                       rel_err=float((merged - expected).norm() / expected.norm()))
        except Exception as error:  # recorded; the other kernels still run
            row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}")
        rows.append(row)
    return rows


def _time_cuda(fn, repeats: int = 10) -> float:
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return statistics.median(times)


def kernel_times(device) -> list[dict[str, Any]]:
    """Median seconds and TFLOP/s of each kernel at the 1.3B model's 480p self-attention shape."""
    import torch

    from wan_dist.attention import installed_kernel_libraries

    batch, seq, heads, head_dim = 1, 32760, 12, 128
    kernels = _block_kernels(device, installed_kernel_libraries())
    gen = torch.Generator(device).manual_seed(0)
    rows = []

    def add(name: str, fn, dim: int, masked: bool = False) -> None:
        q, k, v = (torch.randn(batch, seq, heads, dim, generator=gen, device=device, dtype=torch.bfloat16)
                   for _ in range(3))
        if masked:
            k[:, -8:] = float("nan")
        try:
            seconds = _time_cuda(lambda: fn(q, k, v, dropout_p=0.0, softmax_scale=head_dim**-0.5, causal=False,
                                            window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                            return_softmax=False))
            flops = 4 * batch * heads * seq * seq * head_dim  # the useful work, at head dim 128
            rows.append({"kernel": name, "head_dim": dim, "ms": round(seconds * 1e3, 3),
                         "tflops": round(flops / seconds / 1e12, 1)})
        except Exception as error:
            rows.append({"kernel": name, "head_dim": dim, "error": f"{type(error).__name__}: {str(error)[:300]}"})

    import functools

    from wan_dist.attention import _attention_with_lse

    for name, fn in kernels.items():
        add(name, fn, head_dim)
    add("masked (efficient + key bias)", functools.partial(_attention_with_lse, masked=True), head_dim, masked=True)
    add("sdpa_flash, head dim widened to 136", kernels["sdpa_flash"], 136)
    return rows


def torchrun_runs(env: dict[str, str], tmp: Path, cuda: bool, budget_s: float) -> list[dict[str, Any]]:
    """The real entry point under torchrun, one rank: a plain run, a compiled one (GPU), and one that fails
    after the process group is up (an output folder that cannot be written), through the abort path."""
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
            "launch/generate.py", "height=32", "width=32", "num_frames=5", "steps=2",
            f"hydra.run.dir={tmp / 'hydra'}"]
    blocked = tmp / "blocked"
    blocked.write_text("a file where a folder is expected")
    # torchrun exits 1 whenever a rank fails; the rank's own line says why.
    runs = [("failing", [f"output.dir={blocked / 'out'}"], 1, "error: output.dir=")]
    if cuda:  # the other e2e tests run these on CPU
        runs += [("plain", [f"output.dir={tmp / 'plain'}"], 0, "wrote"),
                 ("compiled", ["compile=true", f"output.dir={tmp / 'compiled'}"], 0, "wrote")]
    results = []
    deadline = time.monotonic() + budget_s
    for name, overrides, expected, says in runs:
        result = _run(base + overrides, env, max(10.0, deadline - time.monotonic()), says)
        result.update(name=name, expected_exit=expected, ok=result["exit"] == expected and result["says"])
        if name != "failing" and result["ok"]:
            report = json.loads((tmp / name / "run.json").read_text())
            result["timings"] = report.get("timings")
        results.append(result)
    return results


def two_ranks_one_gpu(device, budget_s: float) -> dict[str, Any]:
    """The tiny T2V model on two gloo ranks sharing `device`, each layout against one rank."""
    from tests.two_ranks_one_gpu import LAYOUTS, compare_two_ranks_with_one
    from wan_dist.building import build_tiny_model
    from wan_dist.presets import ModelSpec

    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_model(Path(tmp) / "tiny", ModelSpec(task="t2v"))
        cuda = device.type == "cuda"
        # On a CPU the ring alone, within CI's time (tests/dist runs every layout there): its handoff and
        # its ring steps take every path the shim stages (isend, irecv through P2POp, recv).
        layouts = list(LAYOUTS) if cuda else ["ring"]
        return compare_two_ranks_with_one(folder, Path(tmp) / "runs", device=device, layouts=layouts, compile=cuda,
                                          budget_s=budget_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ROOT / "gpu_check_out")))
    parser.add_argument("--wheels", type=Path, default=None, help="install these wheels first (make gpu-wheels)")
    parser.add_argument("--site", type=Path, default=Path(tempfile.gettempdir()) / "wan_dist_site")
    args = parser.parse_args(argv)
    start = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {}

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    # The repository first: xfuser's wheel also installs a top-level `tests` package.
    paths = [str(ROOT)]
    if args.wheels is not None and any(args.wheels.glob("*.whl")):
        summary["wheels"] = install_wheels(args.wheels, args.site)
        paths.append(str(args.site))
    sys.path[:0] = paths
    env["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [env.get("PYTHONPATH")] if p])

    import torch

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    summary["device"] = torch.cuda.get_device_name(0) if cuda else "cpu"
    summary["torch"] = torch.__version__

    def left() -> float:
        return BUDGET_S - (time.monotonic() - start)

    def step(name: str, fn) -> None:
        began = time.monotonic()
        try:
            summary[name] = fn()
        except Exception as error:
            summary[name] = {"ok": False, "error": f"{type(error).__name__}: {str(error)[:500]}"}
        print(f"[gpu_check] {name}: {time.monotonic() - began:.1f} s", flush=True)

    step("lse_merge", lambda: lse_merge(device, (1, 4096, 4, 128) if cuda else (1, 256, 2, 64), ring=4))
    if cuda:
        step("kernels", lambda: kernel_times(device))
    with tempfile.TemporaryDirectory() as tmp:
        step("torchrun", lambda: torchrun_runs(env, Path(tmp), cuda, min(STEP_BUDGET_S["torchrun"], left())))
    if cuda:
        step("tests_gpu", lambda: _run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/gpu", "-p",
                                        "no:cacheprovider"], env, min(STEP_BUDGET_S["tests_gpu"], left() - 60)))
    step("two_ranks_one_gpu",
         lambda: two_ranks_one_gpu(device, min(STEP_BUDGET_S["two_ranks_one_gpu"], left() - 30)))
    if cuda:
        bench_out = Path(tempfile.mkdtemp())
        step("bench", lambda: _run([sys.executable, "launch/bench.py", "--model", "t2v_1_3b", "--nproc", "1",
                                    "--layouts", "single", "--out", str(bench_out), "--", "steps=4"], env,
                                   max(30.0, left() - 10)))
    summary["seconds"] = round(time.monotonic() - start, 1)
    path = args.out / "gpu_check.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    print(render(summary))
    print(f"[gpu_check] wrote {path}")
    return 0


def render(summary: dict[str, Any]) -> str:
    """The short table printed last: each step's outcome in a line or a few."""
    lines = [f"device {summary['device']}, torch {summary['torch']}, {summary['seconds']} s"]
    for row in summary.get("lse_merge", []) if isinstance(summary.get("lse_merge"), list) else []:
        lines.append(f"lse {row['kernel']:>12} {row['dtype']:>8}: " +
                     (f"max {row['max_abs_err']:.2e} rel {row['rel_err']:.2e}" if row["ok"] else row["error"]))
    for row in summary.get("kernels", []) if isinstance(summary.get("kernels"), list) else []:
        lines.append(f"kernel {row['kernel']} d={row['head_dim']}: " +
                     (f"{row['ms']} ms, {row['tflops']} TFLOP/s" if "ms" in row else row["error"]))
    for run in summary.get("torchrun", []) if isinstance(summary.get("torchrun"), list) else []:
        lines.append(f"torchrun {run['name']}: {'ok' if run['ok'] else 'FAILED'}, exit {run['exit']} (expected "
                     f"{run['expected_exit']}), {run['seconds']} s")
    two_ranks = summary.get("two_ranks_one_gpu", {})
    for row in two_ranks.get("cases", []):
        staged = [c["sent"] + c["received"] for c in row["staged"]]
        lines.append(f"two ranks {row['layout']:>16}: max {row['max_abs_err']:.2e} (tolerance "
                     f"{two_ranks['tolerance']}), staged per rank {staged}: {'ok' if row['ok'] else 'FAILED'}")
    if "error" in two_ranks:
        lines.append(f"two ranks: {two_ranks['error']}")
    for name in ("tests_gpu", "bench"):
        if isinstance(summary.get(name), dict):
            tail = summary[name].get("log", summary[name].get("error", "")).strip().splitlines()[-1:]
            lines.append(f"{name}: exit {summary[name].get('exit')}: {' '.join(tail)}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
