"""Time and measure each parallel layout on this machine: one torchrun per layout, numbers from run.json.

    python launch/bench.py                                  # tiny model, every 2-rank layout, CPU or GPU
    python launch/bench.py --nproc 4 -- model=t2v_1_3b model.path=/models/Wan2.1-T2V-1.3B-Diffusers steps=10

Writes bench_results/<stamp>/bench.json, bench.md (a table) and bench.png (denoise time and peak memory
per layout).
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
sys.path.insert(0, str(ROOT))

from wan_dist.metrics import steady_step_seconds  # noqa: E402
from wan_dist.sweep import pyplot  # noqa: E402

# (name, overrides) per world size; a layout is only run when it fits the world.
LAYOUTS = {
    1: [("single", ["parallel=single"])],
    2: [("cfg", ["parallel=cfg"]), ("ulysses", ["parallel=ulysses"]), ("ring", ["parallel=ring"]),
        ("stage_split", ["parallel=stage_split"])],
    3: [("ulysses3", ["parallel=ulysses"]), ("stage_split_cfg", ["parallel=stage_split"])],
    4: [("cfg_ulysses", ["parallel=cfg_usp"]), ("usp", ["parallel=usp"]), ("ulysses4", ["parallel=ulysses"]),
        ("stage_split_ulysses3", ["parallel=stage_split", "parallel.cfg_degree=1"])],
}
# Large enough on a CPU that the denoise dominates process start-up, small enough for a laptop.
CPU_DEFAULTS = ["height=128", "width=224", "num_frames=17", "steps=4"]


def run_layout(name: str, nproc: int, overrides: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "launch" / "generate.py"), f"output.dir={out}", f"hydra.run.dir={out}/hydra", *overrides]
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"name": name, "nproc": nproc, "ok": False, "error": result.stderr.strip().splitlines()[-1:]}
    report = json.loads((out / "run.json").read_text())
    return {
        "name": name, "nproc": nproc, "ok": True, "wall_s": wall, "mesh": report["mesh"]["describe"],
        "timings": {k: v for k, v in report["timings"].items() if k != "steps_s"},
        "median_step_s": steady_step_seconds(report["timings"]["steps_s"]),
        "peak_bytes": [m["peak_bytes"] for m in report["memory"]],
        "parameter_bytes": [m["peak_parameter_bytes"] for m in report["memory"]],
        "peak_kind": report["memory"][0]["peak_kind"],
    }


def write_table(results: list[dict], path: Path) -> None:
    lines = ["| layout | ranks | mesh | denoise s | median step s | total s | max peak GiB | max params GiB |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        if not r["ok"]:
            lines.append(f"| {r['name']} | {r['nproc']} | failed: {' '.join(r['error'])} | | | | | |")
            continue
        t = r["timings"]
        lines.append(f"| {r['name']} | {r['nproc']} | {r['mesh']} | {t['denoise_s']:.2f} | {r['median_step_s']:.3f}"
                     f" | {t['total_s']:.2f} | {max(r['peak_bytes']) / 2**30:.2f}"
                     f" | {max(r['parameter_bytes']) / 2**30:.3f} |")
    path.write_text("\n".join(lines) + "\n")


def write_plot(results: list[dict], path: Path) -> None:
    plt = pyplot(path.name)
    if plt is None:
        return
    ok = [r for r in results if r["ok"]]
    if not ok:
        return
    names = [f"{r['name']}\n({r['nproc']})" for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 1.6 * len(ok)), 4))
    left.bar(names, [r["timings"]["denoise_s"] for r in ok], color="tab:blue")
    left.set_ylabel("denoise seconds")
    right.bar(names, [max(r["peak_bytes"]) / 2**30 for r in ok], color="tab:orange")
    right.set_ylabel(f"max peak GiB per rank ({ok[0]['peak_kind']})")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, nargs="+", default=[1, 2], help="world sizes to run")
    parser.add_argument("--out", type=Path, default=ROOT / "bench_results")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    overrides = args.overrides
    if not any(o.startswith("model.path=") for o in overrides):
        overrides = CPU_DEFAULTS + overrides
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = args.out / stamp
    results = []
    for nproc in args.nproc:
        for name, layout in LAYOUTS.get(nproc, []):
            result = run_layout(name, nproc, layout + overrides, out / f"{nproc}_{name}")
            print(json.dumps({k: result[k] for k in ("name", "nproc", "ok")} |
                             ({"denoise_s": round(result["timings"]["denoise_s"], 3)} if result["ok"] else {})),
                  flush=True)
            results.append(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps({"overrides": overrides, "results": results}, indent=2) + "\n")
    write_table(results, out / "bench.md")
    write_plot(results, out / "bench.png")
    print((out / "bench.md").read_text())
    print(f"written to {out}")


if __name__ == "__main__":
    main()
