"""Hydra multirun sweeps: the embedding cache the jobs of a sweep share, and the summary of a finished
sweep (summary.csv, summary.md, summary.png in the sweep dir) read from each job's run.json.

The summary is written by the `SweepSummary` callback (registered in conf/generate.yaml, so it works with
any launcher) and can be rewritten by hand, e.g. for a sweep of which some jobs failed:

    python -m wan_dist.run.sweep multirun/2025-01-31/12-00-00
"""

from __future__ import annotations

import csv
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..plan.outputs import atomic_write

log = logging.getLogger(__name__)

EMBEDDINGS_DIR = "embeddings"
SUMMARY_NAMES = ("summary.csv", "summary.md", "summary.png")
# Where Hydra keeps a job's overrides in its folder: what tells a job folder from any other.
JOB_OVERRIDES = ".hydra/overrides.yaml"


def shared_embedding_cache(sweep_dir: str | Path) -> Path:
    """Where the jobs of a sweep that set no `embedding_cache` keep their text embeddings, so each prompt
    is encoded once per sweep."""
    return Path(sweep_dir) / EMBEDDINGS_DIR


@dataclass
class JobRow:
    job: str  # the job's folder, relative to the sweep dir
    overrides: list[str]
    ok: bool
    config: str = ""  # the overrides that tell this job from the others
    ranks: int | None = None
    mesh: str = ""
    step_s: float | None = None
    total_s: float | None = None
    peak_gib: list[float] = field(default_factory=list)
    peak_kind: str = ""  # what "peak" measures: CUDA max allocated, or the CPU's max RSS
    speedup: float | None = None


def record_job(job_dir: str | Path, overrides: list[str]) -> None:
    """Writes the job's overrides where its own Hydra will (the same list), before the job starts: a job
    whose process is ended before its Hydra gets that far (torchrun stops the other ranks once one fails)
    is still a row of the summary."""
    atomic_write(Path(job_dir) / JOB_OVERRIDES, lambda tmp: tmp.write_text(yaml.safe_dump(list(overrides))))


def _natural_key(text: str) -> list[Any]:
    """Job folders 0, 1, ..., 10 in numeric order."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def collect_jobs(sweep_dir: Path) -> list[JobRow]:
    """Every job folder under the sweep dir (one holding JOB_OVERRIDES), with its run.json's numbers when
    the run finished."""
    from .metrics import steady_step_seconds

    rows = []
    for overrides_file in sweep_dir.rglob(JOB_OVERRIDES):
        job_dir = overrides_file.parents[JOB_OVERRIDES.count("/")]
        overrides = [str(o) for o in (yaml.safe_load(overrides_file.read_text()) or [])]
        report_file = job_dir / "run.json"
        row = JobRow(job=str(job_dir.relative_to(sweep_dir)), overrides=overrides, ok=report_file.is_file())
        if row.ok:
            report = json.loads(report_file.read_text())
            row.ranks = report["world_size"]
            row.mesh = report["mesh"]["describe"]
            row.step_s = steady_step_seconds(report["timings"]["steps_s"])
            row.total_s = report["timings"]["total_s"]
            row.peak_gib = [m["peak_bytes"] / 2**30 for m in report["memory"]]
            row.peak_kind = report["memory"][0]["peak_kind"]
        rows.append(row)
    rows.sort(key=lambda r: _natural_key(r.job))
    _label_and_compare(rows)
    return rows


def _label_and_compare(rows: list[JobRow]) -> None:
    """Label each job by the overrides not common to all jobs; speedup per step against the one-rank job
    that differs from it only in `parallel*` keys."""
    # A lone job is labelled by all its overrides.
    common = set.intersection(*(set(r.overrides) for r in rows)) if len(rows) > 1 else set()
    for row in rows:
        row.config = " ".join(o for o in row.overrides if o not in common) or "(defaults)"

    def rest(row: JobRow) -> frozenset[str]:
        return frozenset(o for o in row.overrides if not _override_key(o).startswith("parallel"))

    singles = {rest(r): r for r in rows if r.ok and r.ranks == 1 and r.step_s}
    for row in rows:
        single = singles.get(rest(row))
        if single is not None and row.step_s:
            row.speedup = single.step_s / row.step_s


def _fmt(value: float | None, digits: int = 3) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _exact(value: float | None) -> str:
    # The CSV is for further computation: six significant digits, so tiny per-step times keep their ratios.
    return "" if value is None else f"{value:.6g}"


def write_csv(rows: list[JobRow], path: Path) -> None:
    most_ranks = max((len(r.peak_gib) for r in rows), default=0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["job", "config", "status", "ranks", "mesh", "s_per_step", "total_s", "speedup"]
                        + [f"peak_gib_rank{i}" for i in range(most_ranks)])
        for r in rows:
            writer.writerow([r.job, r.config, "ok" if r.ok else "failed", r.ranks or "", r.mesh,
                             _exact(r.step_s), _exact(r.total_s), _exact(r.speedup)]
                            + [_exact(g) for g in r.peak_gib] + [""] * (most_ranks - len(r.peak_gib)))


def write_markdown(rows: list[JobRow], path: Path) -> None:
    lines = ["| job | config | ranks | mesh | s/step | total s | speedup | peak GiB per rank |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if not r.ok:
            lines.append(f"| {r.job} | {r.config} | failed (no run.json) | | | | | |")
            continue
        speedup = f"{r.speedup:.2f}x" if r.speedup is not None else ""
        lines.append(f"| {r.job} | {r.config} | {r.ranks} | {r.mesh} | {_fmt(r.step_s)} | {_fmt(r.total_s, 2)} | "
                     f"{speedup} | {' / '.join(_fmt(g, 2) for g in r.peak_gib)} |")
    notes = "s/step: median after the first step; speedup: per step, against the one-rank job of the same config"
    path.write_text("\n".join(lines) + f"\n\n{notes}.\n")


def pyplot(purpose: str) -> Any:
    """matplotlib.pyplot drawing to files, or None (with a warning naming `purpose`) without the `plot`
    extra."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'wan_dist[plot]'): no %s", purpose)
        return None
    return plt


def write_chart(rows: list[JobRow], path: Path) -> bool:
    """Seconds per step (with the speedup) and peak memory of each rank, per job. False without
    matplotlib."""
    plt = pyplot(path.name)
    if plt is None:
        return False
    ok = [r for r in rows if r.ok]
    names = [f"{r.config}\n({r.ranks} rank{'s' if r.ranks != 1 else ''})" for r in ok]
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(8, 2.2 * len(ok)), 4.5))
    bars = left.bar(names, [r.step_s or 0.0 for r in ok], color="tab:blue")
    for bar, row in zip(bars, ok):
        if row.speedup is not None:
            left.annotate(f"{row.speedup:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                          ha="center", va="bottom", fontsize=8)
    left.set_ylabel("seconds per denoising step")
    most_ranks = max((len(r.peak_gib) for r in ok), default=0)
    width = 0.8 / max(most_ranks, 1)
    for rank in range(most_ranks):
        xs = [i - 0.4 + width * (rank + 0.5) for i, r in enumerate(ok) if rank < len(r.peak_gib)]
        right.bar(xs, [r.peak_gib[rank] for r in ok if rank < len(r.peak_gib)], width, label=f"rank {rank}")
    right.set_xticks(range(len(ok)), names)
    right.set_ylabel(f"peak GiB ({ok[0].peak_kind})" if ok else "peak GiB")
    if most_ranks:
        right.legend(fontsize=8)
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return True


def write_summary(sweep_dir: str | Path) -> list[JobRow]:
    """summary.csv, summary.md and summary.png in the sweep dir; returns the rows."""
    sweep_dir = Path(sweep_dir)
    rows = collect_jobs(sweep_dir)
    if not rows:
        log.warning("no jobs found under %s: no summary", sweep_dir)
        return rows
    write_csv(rows, sweep_dir / "summary.csv")
    write_markdown(rows, sweep_dir / "summary.md")
    write_chart(rows, sweep_dir / "summary.png")
    log.info("sweep summary (%d job%s) in %s:\n%s", len(rows), "s"[: len(rows) != 1], sweep_dir / "summary.md",
             (sweep_dir / "summary.md").read_text())
    return rows


class SweepSummary(Callback):
    """Writes the summary when a multirun ends, whatever the launcher."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from ..parallel.session import rank_env

        # A multirun inside one torchrun world runs on every rank; rank 0's sweep dir is the real one.
        if rank_env().rank == 0:
            write_summary(config.hydra.sweep.dir)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if len(sys.argv) != 2:
        sys.exit(f"usage: python -m wan_dist.run.sweep SWEEP_DIR\n{__doc__}")
    if not write_summary(sys.argv[1]):
        sys.exit(1)
