"""Hydra multirun sweeps with the torchrun launcher: each job its own torchrun world (so one job runs on
one rank and the next on two), outputs per job, a shared embedding cache, and the summary at the end.

`make test` runs one sweep that holds what the others show: `make sweep` narrowed to three layouts with a
failing one between the two that pass, on a preset from a `--config-dir`; and a sweep whose jobs end before
their Hydra writes anything. `make test-full` adds the three sweeps the first stands for: `make sweep` with
three layouts that all pass, a sweep whose every job fails (nothing is built), and jobs composed from a
`--config-dir`."""

from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.launching import launch_env
from tests.reference import TOLERANCE, max_abs_error

ROOT = Path(__file__).resolve().parents[2]


def _env(cache: Path) -> dict[str, str]:
    return launch_env(WAN_DIST_CACHE=str(cache), OMP_NUM_THREADS="1")


def _short_preset(tmp_path: Path) -> Path:
    """A config dir whose only preset is the tiny model with 5 frames (model=tiny_short)."""
    import yaml

    from wan_dist.config.presets import MODEL_PRESETS

    extra = tmp_path / "extra_conf"
    (extra / "model").mkdir(parents=True)
    node = MODEL_PRESETS["tiny"].hydra_node()
    (extra / "model" / "tiny_short.yaml").write_text("# @package _global_\n" + yaml.safe_dump({**node, "num_frames": 5}))
    return extra


# The three layouts of both `make sweep` tests: job folder, override, ranks, (cfg, ulysses) degrees.
LAYOUTS = [("0", "parallel=single", 1, (1, 1)), ("1", "parallel=cfg", 2, (2, 1)), ("2", "parallel=ulysses", 2, (1, 2))]


def _check_layouts_sweep(sweep: Path, stdout: str, *, failed: str | None, num_frames: int, prompts: int) -> None:
    """Each job of LAYOUTS but `failed` made its video of `num_frames` frames in a world of its layout's size,
    all of them the same video, with one embedding cache for the sweep (`prompts` files) whose text encoder
    only the first job loaded; the summary holds every job, `failed` as failed."""
    import imageio.v2 as imageio
    from PIL import Image

    ran = [layout for layout in LAYOUTS if layout[0] != failed]
    reports = []
    for job, *_ in ran:
        reader = imageio.get_reader(sweep / job / "video.mp4", format="FFMPEG")
        assert len([frame for frame in reader]) == num_frames
        reader.close()
        assert (sweep / job / "job.log").stat().st_size > 0
        reports.append(json.loads((sweep / job / "run.json").read_text()))
    assert [r["config"]["num_frames"] for r in reports] == [num_frames] * len(ran)
    # Each job in a world of its own size, derived from its layout.
    assert [r["world_size"] for r in reports] == [ranks for _, _, ranks, _ in ran]
    assert [(r["mesh"]["cfg"], r["mesh"]["ulysses"]) for r in reports] == [degrees for *_, degrees in ran]
    # Every layout makes the same video.
    frames = [np.load(sweep / job / "frames.npy") for job, *_ in ran]
    assert max(max_abs_error(f, frames[0]) for f in frames[1:]) <= TOLERANCE

    # One embedding cache for the sweep: the text encoder is loaded by the first job only.
    loaded = [r["memory"][0]["loaded_parameter_bytes"] for r in reports]
    assert ["text_encoder" in components for components in loaded] == [True] + [False] * (len(ran) - 1)
    assert {r["config"]["embedding_cache"] for r in reports} == {str(sweep / "embeddings")}
    assert len(list((sweep / "embeddings").glob("*.pt"))) == prompts

    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["config"], r["status"], r["ranks"]) for r in rows] == [
        (job, layout, "failed", "") if job == failed else (job, layout, "ok", str(ranks))
        for job, layout, ranks, _ in LAYOUTS]
    ok = [r for r in rows if r["status"] == "ok"]
    for row, report in zip(ok, reports):
        assert float(row["total_s"]) == pytest.approx(report["timings"]["total_s"], abs=1e-3)
        assert float(row["s_per_step"]) > 0 and float(row["peak_gib_rank0"]) > 0
    assert float(ok[0]["speedup"]) == 1.0 and ok[0]["peak_gib_rank1"] == ""
    assert float(ok[1]["speedup"]) == pytest.approx(float(ok[0]["s_per_step"]) / float(ok[1]["s_per_step"]), rel=1e-2)
    markdown = (sweep / "summary.md").read_text()
    assert markdown.count("\n| ") == 4 and "| parallel=ulysses | 2 |" in markdown  # header + 3 jobs
    assert failed is None or f"| {LAYOUTS[int(failed)][1]} | failed" in markdown
    assert "sweep summary (3 jobs)" in stdout

    with Image.open(sweep / "summary.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 400 and chart.size[1] > 200


def _make_sweep(args: str) -> list[str]:
    # -o: take the install as done (this interpreter already has the project); PY: this interpreter.
    return ["make", "--no-print-directory", "-o", ".venv/.installed", "sweep", f"PY={sys.executable}", f"ARGS={args}"]


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_sweep_with_a_failing_job_from_a_config_dir(tmp_path):
    """`make sweep` narrowed to single on one rank, then cfg and ulysses on two, without guidance (so cfg is
    refused), with a preset that only a `--config-dir` holds: every job (its own torchrun process) finds the
    preset, the failed job does not stop the sweep, the summary holds all three, and the sweep exits
    non-zero."""
    extra = _short_preset(tmp_path)
    sweep = tmp_path / "sweep"
    cmd = _make_sweep(f"--config-dir={extra} model=tiny_short parallel=single,cfg,ulysses guidance_scale=1 "
                      f"output.save_frames=true hydra.sweep.dir={sweep}")
    result = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output[-4000:]
    # The failed job's log says why, and the failure is named; the job after it ran.
    assert "error: parallel='cfg' is not allowed with guidance_scale=1.0" in (sweep / "1" / "job.log").read_text()
    assert not (sweep / "1" / "run.json").exists()
    assert re.search(r"job 1 \([^)]*parallel=cfg[^)]*\) failed: torchrun exited with", output), output[-3000:]
    assert "1 of 3 jobs failed" in output

    _check_layouts_sweep(sweep, result.stdout, failed="1", num_frames=5, prompts=1)  # tiny_short's frames


# The sweep process itself, its torchrun launcher's start of each job replaced by a job killed at once (as
# torchrun ends a rank whose peer failed first): no process of the job gets as far as its Hydra.
KILLED_AT_ONCE = """
import runpy, signal
from hydra.core.plugins import Plugins

Plugins.instance()  # Hydra's scan of its plugins runs their modules afresh: scanned first, then replaced
from hydra_plugins.wan_dist_launcher import torchrun_launcher

torchrun_launcher._tee = lambda cmd, log_path: -signal.SIGKILL
runpy.run_path("launch/generate.py", run_name="__main__")
"""


def test_a_job_ended_before_its_hydra_starts_is_in_the_summary(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-c", KILLED_AT_ONCE, "-m", "parallel=single,cfg", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "2 of 2 jobs failed" in output, output[-3000:]
    # Nothing of the jobs' own: only what the launcher wrote before starting them.
    assert [p.relative_to(sweep / "1").as_posix() for p in sorted((sweep / "1").rglob("*"))] == [
        ".hydra", ".hydra/overrides.yaml"]
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    # Labelled by what tells them apart: the launcher recorded the shared embedding cache as each job's
    # Hydra would.
    assert [(r["job"], r["config"], r["status"]) for r in rows] == [
        ("0", "parallel=single", "failed"), ("1", "parallel=cfg", "failed")]


@pytest.mark.full
@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_sweep_three_layouts(tmp_path):
    """`make sweep` with the layouts narrowed to three: single on one rank, cfg and ulysses on two."""
    sweep = tmp_path / "sweep"
    cmd = _make_sweep(f"parallel=single,cfg,ulysses output.save_frames=true hydra.sweep.dir={sweep}")
    result = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    _check_layouts_sweep(sweep, result.stdout, failed=None, num_frames=9, prompts=2)


@pytest.mark.full
def test_sweep_with_failing_jobs_exits_non_zero(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "launch/generate.py", "-m", "parallel=single", "height=50,60", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                            timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    # A failed job does not stop the sweep: both ran, each log says why, the failure is named.
    for job, height in enumerate((50, 60)):
        assert f"error: height={height} is not allowed" in (sweep / str(job) / "job.log").read_text()
    assert "job 0 (parallel=single height=50) failed: torchrun exited with" in output, output[-3000:]
    assert "2 of 2 jobs failed" in output
    # The summary is written all the same, with the failures in it.
    with open(sweep / "summary.csv") as handle:
        assert [(r["job"], r["status"]) for r in csv.DictReader(handle)] == [("0", "failed"), ("1", "failed")]
    assert not (tmp_path / "cache" / "models").exists()


@pytest.mark.full
def test_jobs_compose_from_the_sweeps_config_dir(tmp_path):
    """A preset that only a `--config-dir` holds: every job (its own torchrun process) must find it too."""
    extra = _short_preset(tmp_path)
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "launch/generate.py", "-m", f"--config-dir={extra}", "model=tiny_short",
           "parallel=single", "steps=1,2", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    reports = [json.loads((sweep / str(job) / "run.json").read_text()) for job in range(2)]
    assert [(r["config"]["num_frames"], r["config"]["steps"]) for r in reports] == [(5, 1), (5, 2)]
