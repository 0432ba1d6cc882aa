"""Benchmark the parallel layouts against diffusers' own pipeline on this machine, from one run.

    python launch/bench.py                     # CPU: the bench model, 1 rank and every 2-rank layout
    python launch/bench.py --model t2v_1_3b    # GPU: the 1.3B architecture, random bf16 weights, 480x832x81
    python launch/bench.py --nproc 1 2 4 --model t2v_14b -- steps=10
    python launch/bench.py --model t2v_1_3b -- model.path=/models/Wan2.1-T2V-1.3B-Diffusers   # real weights
    python launch/bench.py --model bench_moe --layouts expert_queue   # the expert pipeline on a 4-prompt queue

The layouts (presets.LAYOUTS) run as one Hydra multirun on the torchrun launcher (`+layout=...`), each
under its own torchrun; diffusers' WanPipeline runs in one process on the same folder,
inputs and sampling settings. Each memory option (presets.MEMORY_OPTIONS: FSDP, block offload, fp8
storage) runs as a layout of its own beside the same layout without it; one this device cannot run (block
offload on a CPU) is reported as n/a with the plan's reason. Reported side by side: seconds per denoising step (median after the first,
which warms up), end-to-end seconds, peak memory per rank, speed-up over `single` and parallel efficiency,
and the DiT's achieved FLOP/s (counted from its dimensions, wan_dist/plan/cost.py) against the device's peak:
the data-sheet bf16 peak and a measured matmul peak on GPU, a measured fp32 matmul peak (one thread per
rank) on CPU. A prompt queue compares a stage split with the same queue in one process; for a two-expert
model (`--model bench_moe` on CPU, `t2v_a14b` on GPUs), the expert pipeline (`parallel.expert_split`) with
the same queue on the same ranks without it (expert_queue_pair), in videos per second. On CPU, the
machine's parallel ceiling is measured right before each multi-rank run (twice --ceiling-seconds, and
the processes' start): a virtual machine's host gives the second core a share that changes from minute to
minute.

Writes <out>/<stamp>/bench.json, bench.md and bench.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "launch")]  # wan_dist, and vae_bench beside this file

from wan_dist.config.schema import compose_run, is_guided  # noqa: E402
from wan_dist.run.metrics import steady_step_seconds  # noqa: E402
from wan_dist.run.sweep import pyplot  # noqa: E402

from wan_dist.plan.cost import (  # noqa: E402
    CEILING_FILE, CEILING_SECONDS_VAR, gpu_peak_tflops, scaling_table, step_flops, transfer_markdown, transfer_table,
)
from wan_dist.config.presets import LAYOUTS, MEMORY_OPTIONS, MODEL_PRESETS  # noqa: E402
from wan_dist.run.sweep import collect_jobs  # noqa: E402

# Per model: the sizes a benchmark uses unless overridden (config/presets.py). The real architectures are run
# with random weights unless model.path is given; 480x832x81 is the 1.3B model's native size.
MODEL_DEFAULTS = {name: list(p.bench_overrides) for name, p in MODEL_PRESETS.items() if p.bench_overrides}


def expert_queue_pair(world: int, num_heads: int, guidance_scale: float) -> tuple[str, str] | None:
    """The layouts a two-expert model's queue is compared in on `world` ranks: what parallel=auto picks
    there (parallel_dims' own rule) and the expert split on the same ranks, as named LAYOUTS; None where
    LAYOUTS names no such pair."""
    from wan_dist.config.schema import ParallelConfig
    from wan_dist.parallel.dims import resolve_parallel_dims

    dims = resolve_parallel_dims(ParallelConfig(), world_size=world, num_heads=num_heads, guidance_scale=guidance_scale)
    plain = next((layout.name for layout in LAYOUTS.values()
                  if (layout.cfg, layout.ulysses, layout.ring) == (dims.cfg, dims.ulysses, dims.ring)
                  and not (layout.expert_split or layout.stage_split or layout.compile or layout.memory)), None)
    split = next((layout.name for layout in LAYOUTS.values() if layout.expert_split and layout.world_size == world),
                 None)
    return (plain, split) if plain and split else None

QUEUE_PROMPTS = ["a red fox running through snow", "a sailing boat at sunset", "a city street in the rain",
                 "a hummingbird drinking from a flower", "waves breaking on black sand", "a paper plane in the wind"]


def run_layouts(names: list[str], overrides: list[str], sweep_dir: Path) -> dict[str, dict]:
    """The layouts (presets.LAYOUTS) as one Hydra multirun on the torchrun launcher: each job its own
    torchrun world of the layout's size, the machine's parallel ceiling recorded right before each
    multi-rank CPU job; then each job's run.json read back (wan_dist.run.sweep finds the jobs)."""
    cmd = [sys.executable, str(ROOT / "launch" / "generate.py"), "-m", f"+layout={','.join(names)}", *overrides,
           "hydra/launcher=torchrun", "hydra.launcher.nproc_per_node=auto",
           "hydra.launcher.before_job=wan_dist.plan.cost:record_parallel_ceiling", f"hydra.sweep.dir={sweep_dir}"]
    subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)  # a failed job shows as a failed row
    results = {}
    for row in collect_jobs(sweep_dir):
        name = next(o.split("=", 1)[1] for o in row.overrides if o.startswith("+layout="))
        job_dir = sweep_dir / row.job
        if not row.ok:
            log_lines = (job_dir / "job.log").read_text(errors="replace").strip().splitlines() \
                if (job_dir / "job.log").is_file() else []
            error = next((line for line in reversed(log_lines) if line.startswith("error:")), None)
            results[name] = {"name": name, "nproc": LAYOUTS[name].world_size, "ok": False,
                             "error": error or (log_lines or ["?"])[-1]}
            continue
        report = json.loads((job_dir / "run.json").read_text())
        t = report["timings"]
        result = {
            "name": name, "nproc": report["world_size"], "ok": True, "mesh": report["mesh"]["describe"],
            "dit_ranks": len(report["mesh"]["dit_ranks"]), "videos": len(report["videos"]), "step_s": row.step_s,
            "denoise_s": t["denoise_s"], "total_s": t["total_s"], "timings": {k: v for k, v in t.items() if k != "steps_s"},
            "peak_bytes": [m["peak_bytes"] for m in report["memory"]], "peak_kind": report["memory"][0]["peak_kind"],
            "loaded_bytes": [m["loaded_parameter_bytes"] for m in report["memory"]],
        }
        if (job_dir / CEILING_FILE).is_file():
            result["ceiling"] = json.loads((job_dir / CEILING_FILE).read_text())["ceiling"]
        results[name] = result
    for name in names:  # a job that never started leaves no folder
        results.setdefault(name, {"name": name, "nproc": LAYOUTS[name].world_size, "ok": False,
                                  "error": "the job did not start"})
    return results


# ------------------------------------------------------------------------------------- diffusers


def run_diffusers(spec: dict) -> dict:
    """diffusers' WanPipeline in this process, on the folder and settings a layout run resolved to: the
    text encoder on CPU (its embeddings handed in), the DiT and VAE on the device, one CPU generator."""
    import torch
    from diffusers import AutoencoderKLWan, WanPipeline, WanTransformer3DModel

    from wan_dist.wan.loading import resolve_dtype
    from wan_dist.run.metrics import peak_memory_bytes
    from wan_dist.wan.pipeline import StepClock

    start = time.perf_counter()
    device = torch.device(spec["device"])
    folder = spec["folder"]
    dit_dtype = resolve_dtype(spec["dit_dtype"], device, gpu_default=torch.bfloat16)
    transformer = WanTransformer3DModel.from_pretrained(folder, subfolder="transformer", dtype=dit_dtype).to(device)
    vae = AutoencoderKLWan.from_pretrained(folder, subfolder="vae", dtype=torch.float32).to(device)
    pipe = WanPipeline.from_pretrained(folder, transformer=transformer, vae=vae, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    guided = is_guided(spec["guidance_scale"])
    with torch.no_grad():
        embeds, negative = pipe.encode_prompt(prompt=spec["prompt"], negative_prompt=spec["negative_prompt"],
                                              do_classifier_free_guidance=guided, device=torch.device("cpu"))
    pipe.text_encoder = None  # held on CPU until now, as a stage-split or single rank holds it
    cast = {"device": device, "dtype": transformer.dtype}
    clock = StepClock(device)  # the app's own step timing, so both sides are timed alike

    def mark(*_args, **_kwargs):
        clock.mark()
        return {}

    mark()
    pipe(prompt_embeds=embeds.to(**cast), negative_prompt_embeds=negative.to(**cast) if guided else None,
         height=spec["height"], width=spec["width"], num_frames=spec["num_frames"],
         num_inference_steps=spec["steps"], guidance_scale=spec["guidance_scale"],
         generator=torch.Generator("cpu").manual_seed(spec["seed"]), output_type="np", callback_on_step_end=mark)
    steps = clock.seconds()
    return {"name": "diffusers", "nproc": 1, "ok": True, "mesh": "diffusers WanPipeline", "dit_ranks": 1,
            "videos": 1, "step_s": steady_step_seconds(steps), "denoise_s": sum(steps),
            "total_s": time.perf_counter() - start, "steps_s": steps,
            "peak_bytes": [peak_memory_bytes(device)], "peak_kind": "cuda_max_allocated" if device.type == "cuda"
            else "cpu_max_rss"}


def run_diffusers_subprocess(spec: dict, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    (out / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run([sys.executable, __file__, "--diffusers-spec", str(out / "spec.json")],
                            cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return {"name": "diffusers", "nproc": 1, "ok": False,
                "error": (result.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def _peak_subprocess(device: str, seconds: float) -> dict:
    """Measured in a fresh process with the ranks' thread count, so it is what one rank can reach."""
    code = ("import json,sys,torch; sys.path.insert(0, %r); from wan_dist.plan.cost import measure_matmul_tflops as m; "
            "d=torch.device(%r); print(json.dumps(m(d, torch.bfloat16 if d.type=='cuda' else torch.float32, "
            "seconds=%r)))" % (str(ROOT), device, seconds))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def refused_here(overrides: list[str], names: list[str]) -> dict[str, str]:
    """The layouts this device cannot run (block offload on a CPU, say), each with the plan's own
    one-line reason: planned here, before anything starts, and reported as n/a instead of run. Whether
    a layout fits the GPU's memory is left to its run (reading it here would hold a CUDA context in this
    process through every run)."""
    import tempfile

    import torch

    from wan_dist.parallel.attention import device_capability
    from wan_dist.config.errors import ConfigError
    from wan_dist.plan.inputs import DeviceFacts, prepare
    from wan_dist.plan.job import resolve

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    facts = DeviceFacts(device.type, device_capability(device))
    refused = {}
    with tempfile.TemporaryDirectory() as out_dir:
        for name in names:
            world_size = LAYOUTS[name].world_size
            try:
                run = _compose(overrides + [f"+layout={name}"])
                resolve(run, prepare(run, facts, out_dir=out_dir, world_size=world_size), world_size)
            except ConfigError as error:
                refused[name] = str(error)
    return refused


def memory_options(results: list[dict], not_applicable: dict[str, str]) -> list[dict]:
    """Each memory option's run beside its layout without it: seconds per step, peak and loaded DiT bytes
    per rank, or why this device does not run it."""
    by_name = {r["name"]: r for r in results}
    rows = []
    for name, layout in LAYOUTS.items():
        if layout.memory is None or (name not in by_name and name not in not_applicable):
            continue
        row = {"option": MEMORY_OPTIONS[layout.memory], "layout": name, "base": layout.base}
        if name in not_applicable:
            rows.append({**row, "not_applicable": not_applicable[name]})
            continue
        for side, r in (("without", by_name.get(layout.base)), ("with", by_name[name])):
            if r and r["ok"]:
                row[side] = {"step_s": r["step_s"], "peak_bytes": r["peak_bytes"],
                             "dit_bytes": [loaded.get("dit", 0) for loaded in r["loaded_bytes"]]}
        if "with" in row and "without" in row:
            row["step_ratio"] = row["with"]["step_s"] / row["without"]["step_s"]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------- report


def _best_round(rounds: list[dict]) -> dict:
    ok = [r for r in rounds if r["ok"]]
    if len(ok) < len(rounds):
        return next(r for r in rounds if not r["ok"])
    key = "total_s" if ok[0]["videos"] > 1 else "step_s"
    best = dict(min(ok, key=lambda r: r[key]))
    best["rounds"] = [{"step_s": r["step_s"], "total_s": r["total_s"], "ceiling": r.get("ceiling")} for r in ok]
    return best


def add_derived(results: list[dict], flops_per_step: float, peak_tflops: float) -> None:
    single = next((r for r in results if r["ok"] and r["name"] == "single"), None)
    for r in results:
        if not r["ok"]:
            continue
        achieved = flops_per_step / r["step_s"] / 1e12
        r["dit_tflops"] = achieved
        r["dit_tflops_per_rank"] = achieved / r["dit_ranks"]
        r["fraction_of_peak"] = r["dit_tflops_per_rank"] / peak_tflops
        if single is not None and r["videos"] == 1:
            r["speedup"] = single["step_s"] / r["step_s"]
            r["efficiency"] = r["speedup"] / r["nproc"]


def throughput(result: dict) -> float:
    """Videos per second once every model is loaded: what a long queue approaches."""
    return result["videos"] / (result["total_s"] - result["timings"]["load_s"])


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def write_tables(report: dict, path: Path) -> None:
    peak = report["peak"]
    lines = [f"# wan_dist bench: {report['model']}, {report['size']}, {report['steps']} steps, {report['device']}"
             + (f", best of {report['repeat']} rounds" if report["repeat"] > 1 else ""),
             "", f"DiT work per step: {report['flops_per_step'] / 1e12:.2f} TFLOP; peak used for the fraction: "
             f"{peak['used_tflops']:.3f} TFLOP/s per rank ({peak['source']}).", "",
             *(["Machine ceiling: how many times one single-thread process's matmul rate as many processes "
                "reached together, measured just before that layout's run (its best round's); no layout can "
                "beat it.", ""] if any(r.get("ceiling") for r in report["results"]) else []),
             "| layout | ranks | mesh | s/step | vs diffusers | speedup | efficiency | machine ceiling | end-to-end s "
             "| DiT TFLOP/s/rank | of peak | peak GiB per rank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    diffusers = next((r for r in report["results"] if r["ok"] and r["name"] == "diffusers"), None)
    for r in report["results"]:
        if not r["ok"]:
            lines.append(f"| {r['name']} | {r['nproc']} | failed: {r['error']} | | | | | | | | | |")
            continue
        if r["videos"] != 1:
            continue
        vs = diffusers["step_s"] / r["step_s"] if diffusers else None
        peaks = " / ".join(f"{b / 2**30:.2f}" for b in r["peak_bytes"])
        lines.append(f"| {r['name']} | {r['nproc']} | {r['mesh']} | {r['step_s']:.3f} | {_fmt(vs, '.3f')}x "
                     f"| {_fmt(r.get('speedup'), '.2f')} | {_fmt(r.get('efficiency'), '.0%')} "
                     f"| {_fmt(r.get('ceiling'), '.2f')} | {r['total_s']:.1f} "
                     f"| {r['dit_tflops_per_rank']:.3f} | {r['fraction_of_peak']:.0%} | {peaks} |")
    queue = [r for r in report["results"] if r["ok"] and r["videos"] > 1]
    if queue:
        lines += ["", f"Prompt queue of {queue[0]['videos']} videos, end to end (throughput: videos per second "
                  "once the models are loaded; the expert rows are against the first expert row):", "",
                  "| layout | ranks | mesh | total s | s per video | videos/s after load | speedup |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in queue:
            expert = r["name"].startswith("expert_queue_")
            base = next(q for q in queue if q["name"].startswith("expert_queue_") == expert
                        and (not expert or q["nproc"] == r["nproc"]))
            lines.append(f"| {r['name']} | {r['nproc']} | {r['mesh']} | {r['total_s']:.1f} "
                         f"| {r['total_s'] / r['videos']:.1f} | {throughput(r):.4f} "
                         f"| {throughput(r) / throughput(base):.2f} |")
    if report.get("memory_options"):
        lines += ["", "Memory options, each beside the same layout without it (GiB per rank, rank 0 first):", "",
                  "| option | layout | s/step without | s/step with | with / without | peak GiB without | peak GiB with "
                  "| DiT MiB loaded without | DiT MiB loaded with |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

        def gib(values: list[int]) -> str:
            return " / ".join(f"{v / 2**30:.2f}" for v in values)

        def mib(values: list[int]) -> str:
            return " / ".join(f"{v / 2**20:.1f}" for v in values)

        for m in report["memory_options"]:
            if "not_applicable" in m:
                lines.append(f"| {m['option']} | {m['base']} | n/a: {m['not_applicable']} | | | | | | |")
                continue
            without, with_ = m.get("without"), m.get("with")
            cells = [f"{side['step_s']:.3f}" if side else "failed" for side in (without, with_)]
            lines.append(f"| {m['option']} | {m['base']} | {cells[0]} | {cells[1]} | {_fmt(m.get('step_ratio'), '.2f')} "
                         f"| {gib(without['peak_bytes']) if without else ''} | {gib(with_['peak_bytes']) if with_ else ''} "
                         f"| {mib(without['dit_bytes']) if without else ''} | {mib(with_['dit_bytes']) if with_ else ''} |")
    if report.get("transfers"):
        lines += ["", "FSDP's all-gather and block offload's copy per block against the block's compute, predicted "
                  "from this run's single s/step (wan_dist/plan/cost.py):", "", transfer_markdown(report["transfers"])]
    if report.get("scaling"):
        lines += ["", "Predicted step time on more GPUs (wan_dist/plan/cost.py's model, from this run's single s/step):",
                  "", "| mode | GPUs | link | compute s | communication s | step s | speedup |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for p in report["scaling"]:
            lines.append(f"| {p['mode']} | {p['gpus']} | {p['link']} | {p['compute_s']:.3f} | "
                         f"{p['communication_s']:.3f} | {p['step_s']:.3f} | {p['speedup']:.2f} |")
    if report.get("vae_decode"):
        from vae_bench import markdown

        lines += ["", markdown(report["vae_decode"])]
    path.write_text("\n".join(lines) + "\n")


def write_plot(report: dict, path: Path) -> None:
    plt = pyplot(path.name)
    if plt is None:
        return
    ok = [r for r in report["results"] if r["ok"] and r["videos"] == 1]
    if not ok:
        return
    names = [f"{r['name']}\n({r['nproc']})" for r in ok]
    fig, axes = plt.subplots(1, 3, figsize=(max(12, 2.2 * len(ok)), 4))
    colors = ["tab:gray" if r["name"] == "diffusers" else "tab:blue" for r in ok]
    axes[0].bar(names, [r["step_s"] for r in ok], color=colors)
    axes[0].set_ylabel("seconds per step (median)")
    axes[1].bar(names, [100 * r["fraction_of_peak"] for r in ok], color=colors)
    axes[1].set_ylabel("DiT FLOP/s per rank, % of peak")
    axes[2].bar(names, [max(r["peak_bytes"]) / 2**30 for r in ok], color="tab:orange")
    axes[2].set_ylabel(f"max peak GiB per rank ({ok[0]['peak_kind']})")
    for axis in axes:
        axis.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"{report['model']} {report['size']}, {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ main


def _compose(overrides: list[str]):
    return compose_run([o for o in overrides if not o.startswith(("hydra.", "compile="))])


def resolve_run(overrides: list[str]) -> dict:
    """The folder, sizes and dtypes the runs will use, resolved by the app's own config code (and the
    model built if it is a built preset), so that diffusers gets exactly the same."""
    import torch

    from wan_dist.wan.building import model_folder
    from wan_dist.plan.checks import validate_run
    from wan_dist.wan.loading import read_component_config
    from wan_dist.wan.pipeline import latent_shape

    run = _compose(overrides)
    facts = validate_run(run)
    folder = model_folder(run.model)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dit_config = read_component_config(folder, "transformer")
    shape = latent_shape(read_component_config(folder, "vae"), height=run.height, width=run.width,
                         num_frames=run.num_frames)
    return {
        "folder": str(folder), "device": str(device), "dit_config": dit_config,
        "tokens": shape.num_tokens(tuple(dit_config["patch_size"])), "height": run.height, "width": run.width,
        "num_frames": run.num_frames, "steps": run.steps, "guidance_scale": run.guidance_scale,
        "seed": run.seed if run.seed >= 0 else 0, "prompt": run.prompt, "negative_prompt": run.negative_prompt,
        "dit_dtype": run.model.dit_dtype,  # resolved for the device by the diffusers run, as the app does
        "experts": facts.experts > 1,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"one of {', '.join(MODEL_DEFAULTS)} (default: bench on "
                        "CPU, t2v_1_3b on GPU); real architectures get random weights unless model.path is given")
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--layouts", nargs="+", default=None, help="only these layouts (names as in the table)")
    parser.add_argument("--queue", type=int, default=4, help="prompt-queue length for the stage-split "
                        "comparison (0: skip)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' pipeline")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all layouts; each reports its best "
                        "(on a shared or virtual machine, 3 rounds steady the ratios)")
    parser.add_argument("--ceiling-seconds", type=float, default=2.0, help="length of each of the two windows "
                        "of the parallel ceiling measured before each multi-rank CPU run")
    parser.add_argument("--peak-seconds", type=float, default=1.0, help="length of each of the three rounds "
                        "of the peak matmul measurement")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    parser.add_argument("--diffusers-spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    for option in ("ceiling_seconds", "peak_seconds"):
        if getattr(args, option) <= 0:
            parser.error(f"--{option.replace('_', '-')}={getattr(args, option)} is not allowed: a positive number")
    os.environ[CEILING_SECONDS_VAR] = str(args.ceiling_seconds)
    if args.diffusers_spec:
        print(json.dumps(run_diffusers(json.loads(args.diffusers_spec.read_text()))))
        return

    import torch

    on_gpu = torch.cuda.is_available()
    # One thread per rank unless asked otherwise: the ranks share the cores, and a speed-up over one
    # rank must not come from giving the parallel run more threads.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if on_gpu and max(args.nproc) > torch.cuda.device_count():
        print(f"this machine has {torch.cuda.device_count()} GPU(s): world sizes above that are skipped", flush=True)
        args.nproc = [n for n in args.nproc if n <= torch.cuda.device_count()]
    model = args.model or ("t2v_1_3b" if on_gpu else "bench")
    if model not in MODEL_DEFAULTS:
        parser.error(f"--model={model} is not allowed: one of {', '.join(MODEL_DEFAULTS)}")
    user = args.overrides
    base = [f"model={model}", *MODEL_DEFAULTS[model]]
    if not MODEL_PRESETS[model].built and not any(o.startswith("model.path=") for o in user):
        base.append("model.random_weights=true")
    overrides = base + user
    spec = resolve_run(overrides)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp

    names = [name for name, layout in LAYOUTS.items() if layout.world_size in args.nproc
             and (args.layouts is None or name in args.layouts)
             # inductor's CPU code adds minutes of compilation to a CPU bench; ask for it by name
             and not (name == "compiled" and not on_gpu and args.layouts is None)
             and not layout.expert_split]  # a queue's layout (below): one video has nothing to pipeline
    # A memory option is measured beside its layout without it.
    names += [base for name in names if (base := LAYOUTS[name].base) and base not in names]
    not_applicable = refused_here(overrides, names)
    names = [name for name in names if name not in not_applicable]
    with_diffusers = not args.no_diffusers and (args.layouts is None or "diffusers" in args.layouts)
    queue = bool(args.queue) and 2 in args.nproc and (args.layouts is None or "queue" in args.layouts)
    # The VAE decode alone, one rank against two (the Wan2.1 VAE architecture, random weights).
    vae_decode = 2 in args.nproc and (args.layouts is None or "vae_decode" in args.layouts)
    pairs = {n: pair for n in args.nproc
             if (pair := expert_queue_pair(n, spec["dit_config"]["num_attention_heads"], spec["guidance_scale"]))}
    expert_worlds = list(pairs) \
        if args.queue and spec["experts"] and (args.layouts is None or "expert_queue" in args.layouts) else []
    if queue or expert_worlds:
        out.mkdir(parents=True, exist_ok=True)
        prompts = out / "queue_prompts.txt"
        prompts.write_text("\n".join((QUEUE_PROMPTS * args.queue)[: args.queue]) + "\n")

    # Round after round over all runs, so that a slow spell of a shared machine hits every layout alike;
    # each layout reports its best round (the one least disturbed), every round is kept in bench.json.
    rounds: dict[str, list[dict]] = {}
    for round_index in range(args.repeat):
        where = out / f"round{round_index}"
        results = {"diffusers": run_diffusers_subprocess(spec, where / "diffusers")} if with_diffusers else {}
        if names:
            results.update(run_layouts(names, overrides, where / "layouts"))
        if queue:
            queued = run_layouts(["single", "stage_split"], overrides + [f"prompts_file={prompts}"], where / "queue")
            results.update({f"queue_{name}": {**r, "name": f"queue_{name}"} for name, r in queued.items()})
        for world in expert_worlds:
            queued = run_layouts(list(pairs[world]), overrides + [f"prompts_file={prompts}"],
                                 where / f"expert_queue{world}")
            results.update({f"expert_queue_{name}": {**r, "name": f"expert_queue_{name}"} for name, r in queued.items()})
        for name, result in results.items():
            brief = {k: result.get(k) for k in ("name", "nproc", "ok", "step_s", "total_s", "ceiling", "error")
                     if k in result}
            print(json.dumps({"round": round_index, **brief}), flush=True)
            rounds.setdefault(name, []).append(result)
    results = [_best_round(rounds[name]) for name in rounds]
    decode_report = None
    if vae_decode:
        from vae_bench import run_vae_bench

        decode_report = run_vae_bench(ranks=(1, 2))
        print(json.dumps({"vae_decode": [{k: r[k] for k in ("ranks", "seconds", "speedup")}
                                         for r in decode_report["results"]]}), flush=True)

    if on_gpu:
        device_name = torch.cuda.get_device_name(0)
        measured = _peak_subprocess("cuda", args.peak_seconds)
        table = gpu_peak_tflops(device_name)
        peak = {"measured_matmul_tflops": measured, "datasheet_bf16_tflops": table, "used_tflops": measured,
                "source": "measured bf16 matmul"}
    else:
        import platform

        device_name = f"CPU ({platform.processor() or platform.machine()}), {os.environ['OMP_NUM_THREADS']} thread(s) per rank"
        measured = _peak_subprocess("cpu", args.peak_seconds)
        peak = {"measured_matmul_tflops": measured, "used_tflops": measured, "source": "measured fp32 matmul"}
    guided = is_guided(spec["guidance_scale"])
    flops = step_flops(spec["dit_config"], spec["tokens"], guided=guided)
    add_derived(results, flops, peak["used_tflops"])
    single = next((r for r in results if r["ok"] and r["name"] == "single"), None)
    scaling = scaling_table(spec["dit_config"], spec["tokens"], single_step_s=single["step_s"], guided=guided) \
        if single and on_gpu else []
    transfers = transfer_table(spec["dit_config"], spec["tokens"], single_step_s=single["step_s"], guided=guided) \
        if single and on_gpu else []
    report = {
        "model": model, "size": f"{spec['height']}x{spec['width']}x{spec['num_frames']}", "steps": spec["steps"],
        "tokens": spec["tokens"], "device": device_name, "overrides": overrides, "repeat": args.repeat,
        "flops_per_step": flops,
        "peak": peak, "results": results, "scaling": scaling, "vae_decode": decode_report,
        "memory_options": memory_options(results, not_applicable), "transfers": transfers,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    write_tables(report, out / "bench.md")
    write_plot(report, out / "bench.png")
    print((out / "bench.md").read_text())
    print(f"written to {out}")
    if not all(r["ok"] for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
