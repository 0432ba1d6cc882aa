"""Hydra multirun sweeps with the torchrun launcher: each job its own torchrun world (so one job runs on
one rank and the next on two), outputs per job, a shared embedding cache, and the summary at the end."""

from __future__ import annotations

import csv
import json
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


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_sweep_three_layouts(tmp_path):
    """`make sweep` with the layouts narrowed to three: single on one rank, cfg and ulysses on two."""
    sweep = tmp_path / "sweep"
    # -o: take the install as done (this interpreter already has the project); PY: this interpreter.
    cmd = ["make", "--no-print-directory", "-o", ".venv/.installed", "sweep", f"PY={sys.executable}",
           f"ARGS=parallel=single,cfg,ulysses output.save_frames=true hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]

    import imageio.v2 as imageio

    reports = []
    for job in range(3):
        reader = imageio.get_reader(sweep / str(job) / "video.mp4", format="FFMPEG")
        assert len([frame for frame in reader]) == 9
        reader.close()
        assert (sweep / str(job) / "job.log").stat().st_size > 0
        reports.append(json.loads((sweep / str(job) / "run.json").read_text()))
    # Each job in a world of its own size, derived from its layout.
    assert [r["world_size"] for r in reports] == [1, 2, 2]
    assert [(r["mesh"]["cfg"], r["mesh"]["ulysses"]) for r in reports] == [(1, 1), (2, 1), (1, 2)]
    # Every layout makes the same video.
    frames = [np.load(sweep / str(job) / "frames.npy") for job in range(3)]
    assert max(max_abs_error(f, frames[0]) for f in frames[1:]) <= TOLERANCE

    # One embedding cache for the sweep: the text encoder is loaded by the first job only.
    loaded = [r["memory"][0]["loaded_parameter_bytes"] for r in reports]
    assert ["text_encoder" in components for components in loaded] == [True, False, False]
    assert {r["config"]["embedding_cache"] for r in reports} == {str(sweep / "embeddings")}
    assert len(list((sweep / "embeddings").glob("*.pt"))) == 2  # the prompt and the negative prompt

    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["config"], r["status"], r["ranks"]) for r in rows] == [
        ("0", "parallel=single", "ok", "1"), ("1", "parallel=cfg", "ok", "2"), ("2", "parallel=ulysses", "ok", "2")]
    for row, report in zip(rows, reports):
        assert float(row["total_s"]) == pytest.approx(report["timings"]["total_s"], abs=1e-3)
        assert float(row["s_per_step"]) > 0 and float(row["peak_gib_rank0"]) > 0
    assert float(rows[0]["speedup"]) == 1.0 and rows[0]["peak_gib_rank1"] == ""
    assert float(rows[1]["speedup"]) == pytest.approx(float(rows[0]["s_per_step"]) / float(rows[1]["s_per_step"]),
                                                     rel=1e-2)
    markdown = (sweep / "summary.md").read_text()
    assert markdown.count("\n| ") == 4 and "| parallel=ulysses | 2 |" in markdown  # header + 3 jobs
    assert "sweep summary (3 jobs)" in result.stdout

    from PIL import Image

    with Image.open(sweep / "summary.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > 400 and chart.size[1] > 200


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


def test_jobs_compose_from_the_sweeps_config_dir(tmp_path):
    """A preset that only a `--config-dir` holds: every job (its own torchrun process) must find it too."""
    extra = tmp_path / "extra_conf"
    (extra / "model").mkdir(parents=True)
    import yaml

    from wan_dist.config.presets import MODEL_PRESETS

    node = MODEL_PRESETS["tiny"].hydra_node()
    (extra / "model" / "tiny_short.yaml").write_text("# @package _global_\n" + yaml.safe_dump({**node, "num_frames": 5}))
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "launch/generate.py", "-m", f"--config-dir={extra}", "model=tiny_short",
           "parallel=single", "steps=1,2", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(tmp_path / "cache"), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    reports = [json.loads((sweep / str(job) / "run.json").read_text()) for job in range(2)]
    assert [(r["config"]["num_frames"], r["config"]["steps"]) for r in reports] == [(5, 1), (5, 2)]
