"""The sweep summary on a sweep dir laid out as Hydra leaves it: job folders with .hydra/overrides.yaml and,
for the jobs that finished, run.json. Also the torchrun launcher's option checks."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from wan_dist.run.sweep import collect_jobs, write_summary

ROOT = Path(__file__).resolve().parents[2]


def _job(sweep: Path, name: str, overrides: list[str], report: dict | None) -> None:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if report is not None:
        (job / "run.json").write_text(json.dumps(report))


def _report(world: int, steps: list, total: float, peaks_gib: list[float]) -> dict:
    return {"world_size": world, "mesh": {"describe": f"{world} ranks"},
            "timings": {"steps_s": steps, "total_s": total},
            "memory": [{"peak_bytes": int(p * 2**30), "peak_kind": "cpu_max_rss"} for p in peaks_gib]}


@pytest.fixture
def sweep(tmp_path) -> Path:
    """Two step counts x (single, cfg), one cfg job failed; folder 10 sorts after 2."""
    common = ["prompt=x", "embedding_cache=/c"]
    _job(tmp_path, "0", common + ["parallel=single", "steps=4"], _report(1, [9.0, 2.0, 2.0, 2.2], 10.0, [1.0]))
    _job(tmp_path, "2", common + ["parallel=cfg", "steps=4"], _report(2, [9.0, 1.0, 1.0, 1.2], 6.0, [0.7, 0.6]))
    _job(tmp_path, "10", common + ["parallel=single", "steps=8"], _report(1, [[9.0, 4.0], [4.0, 4.0]], 30.0, [1.1]))
    _job(tmp_path, "11", common + ["parallel=cfg", "steps=8"], None)
    (tmp_path / "embeddings").mkdir()  # not a job
    return tmp_path


def test_rows_labels_and_speedup(sweep):
    rows = collect_jobs(sweep)
    assert [r.job for r in rows] == ["0", "2", "10", "11"]
    # Labelled by what differs between jobs; the common overrides are left out.
    assert [r.config for r in rows] == ["parallel=single steps=4", "parallel=cfg steps=4",
                                        "parallel=single steps=8", "parallel=cfg steps=8"]
    assert [r.ok for r in rows] == [True, True, True, False]
    # Median step without the first (warm-up) step; a prompt queue's videos flattened.
    assert [r.step_s for r in rows[:3]] == [2.0, 1.0, 4.0]
    # Each job against the one-rank job of its own step count.
    assert [r.speedup for r in rows] == [1.0, 2.0, 1.0, None]
    assert rows[1].peak_gib == pytest.approx([0.7, 0.6])


def test_files(sweep):
    write_summary(sweep)
    with open(sweep / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["job"], r["status"], r["speedup"], r["peak_gib_rank1"]) for r in rows] == [
        ("0", "ok", "1", ""), ("2", "ok", "2", "0.6"), ("10", "ok", "1", ""), ("11", "failed", "", "")]
    markdown = (sweep / "summary.md").read_text()
    assert "| 2 | parallel=cfg steps=4 | 2 | 2 ranks | 1.000 | 6.00 | 2.00x | 0.70 / 0.60 |" in markdown
    assert "| 11 | parallel=cfg steps=8 | failed (no run.json) |" in markdown
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_command_line(sweep, tmp_path):
    result = subprocess.run([sys.executable, "-m", "wan_dist.run.sweep", str(sweep)], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (sweep / "summary.csv").is_file() and "sweep summary (4 jobs)" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert write_summary(empty) == [] and not list(empty.iterdir())


@pytest.mark.parametrize("kwargs, fragment", [
    ({"nproc_per_node": 0}, "hydra.launcher.nproc_per_node=0 is not allowed: auto or a positive integer"),
    ({"nproc_per_node": "four"}, "hydra.launcher.nproc_per_node='four' is not allowed"),
    ({"default_nproc": -1}, "hydra.launcher.default_nproc=-1 is not allowed: a positive integer"),
])
def test_launcher_options_checked(kwargs, fragment):
    from hydra_plugins.wan_dist_launcher.torchrun_launcher import TorchrunLauncher

    with pytest.raises(ValueError, match=fragment.replace("(", r"\(")):
        TorchrunLauncher(**kwargs)


def test_lone_job_labelled_by_all_its_overrides(tmp_path):
    _job(tmp_path, "0", ["parallel=cfg", "steps=2"], _report(2, [1.0, 1.0], 3.0, [0.5, 0.5]))
    assert [r.config for r in collect_jobs(tmp_path)] == ["parallel=cfg steps=2"]
