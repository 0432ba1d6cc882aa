"""Determinism and load, in one spawned world of two ranks: the same configuration twice gives the same
bits; a 16-prompt queue through the stage split writes all 16 videos, records them, and does not grow any
rank's memory from one video to the next. The queue's lines are taken as text only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.dist_utils import run_on_ranks
from tests.modes import Case

# Lines that would do harm if a prompt were ever taken as a path, an interpolation or code.
HOSTILE = ["/etc/passwd", "${oc.env:HOME}", "__import__('os').system('touch MARKER')", "../../video_0.mp4",
           "$(touch MARKER)"]
QUEUE_LEN = 16
# RSS after each video may move by allocator noise; a leak of one latent or embedding per video would
# show as steady growth over 16 videos.
GROWTH_BOUND = 24 * 2**20


@pytest.fixture(scope="module")
def results(t2v_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    marker = root / "marker"
    prompts = [line.replace("MARKER", str(marker)) for line in HOSTILE]
    prompts += [f"a paper boat on a pond, take {i}" for i in range(QUEUE_LEN - len(prompts))]
    prompts_file = root / "prompts.txt"
    prompts_file.write_text("\n".join(prompts) + "\n")
    folder = str(t2v_folder)
    cases = [Case("same_a", folder, ulysses=2), Case("same_b", folder, ulysses=2),
             Case("queue16", folder, stage_split=True, prompts_file=str(prompts_file), height=16, width=16,
                  num_frames=1, steps=1)]
    from tests.modes import run_cases

    run_on_ranks(2, run_cases, cases, str(root), timeout=600)
    return root, prompts, marker


def test_same_config_twice_is_bit_identical(results):
    root, _, _ = results
    first, second = (np.load(root / name / "frames.npy") for name in ("same_a", "same_b"))
    assert first.shape == (9, 48, 80, 3)
    assert np.array_equal(first, second)
    assert (root / "same_a" / "video.mp4").read_bytes() == (root / "same_b" / "video.mp4").read_bytes()


def test_queue_of_16_through_stage_split(results):
    root, prompts, marker = results
    out = root / "queue16"
    report = json.loads((out / "run.json").read_text())
    assert report["mesh"]["stage_split"] is True
    assert [v["prompt"] for v in report["videos"]] == prompts
    assert [v["video"] for v in report["videos"]] == [f"video_{i}.mp4" for i in range(QUEUE_LEN)]
    for i in range(QUEUE_LEN):
        assert (out / f"video_{i}.mp4").stat().st_size > 0
        assert np.load(out / f"frames_{i}.npy").shape == (1, 16, 16, 3)
    assert not marker.exists(), "a prompt was run as code"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_no_memory_growth_along_the_queue(results):
    root, _, _ = results
    report = json.loads((root / "queue16" / "run.json").read_text())
    for rank in report["memory"]:
        after = rank["after_video_bytes"]
        assert len(after) == QUEUE_LEN and rank["after_video_kind"] == "cpu_rss"
        # from the fourth video on (warm caches), nothing accumulates
        growth = max(after[3:]) - after[3]
        mib = [round(b / 2**20, 1) for b in after]
        print(f"rank {rank['rank']} ({rank['role']}) RSS after each video, MiB: {mib}")
        assert growth <= GROWTH_BOUND, f"rank {rank['rank']} grew {growth / 2**20:.1f} MiB: {mib}"
        # and the second half of the queue is flat: a per-video leak would keep climbing
        assert max(after[8:]) - after[8] <= GROWTH_BOUND // 3, f"rank {rank['rank']}: {mib}"
