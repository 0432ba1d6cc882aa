"""A rank stopped (SIGSTOP: alive, connected, silent) at each point of a two-rank run, in both directions:
the other rank ends within parallel.timeout_s + 45 s, non-zero, with one line naming the stopped rank, and
leaves no half-written output. The stop is timed by what the run prints as it goes: the plan's line
(loading), the hand-over, the progress bar (denoise), the decode's line (the decode, in bands or on rank
0, and the report after it). A rank that only works longer than the timeout is no loss."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass

import pytest

from tests.e2e.test_faults import PROGRESS, _exited, torchrun

TIMEOUT_S = 5
# What a lost peer may take past parallel.timeout_s to end a run.
MARGIN_S = 45
SHORT = ("steps=2", "height=32", "width=32", "num_frames=5")
LONG = ("steps=5000", "height=32", "width=32", "num_frames=5")
# Frames large enough that the decode is still running when the stop lands.
DECODE = ("steps=2", "height=160", "width=160", "num_frames=9")
STAGE_SPLIT = ("parallel=stage_split",)
BANDS = ("parallel=stage_split", "parallel.vae_decode=patch")


@dataclass(frozen=True)
class StopPoint:
    name: str
    stopped: int
    at: str  # a pattern in the run's log: the stop comes as soon as it shows
    layout: tuple[str, ...]
    run: tuple[str, ...]
    written: tuple[str, ...] = ()  # whole outputs already written when the stop comes


STOP_POINTS = [
    # rank 0 has its plan; both ranks build the groups and load their models
    StopPoint("loading_rank1", 1, r"outputs in", STAGE_SPLIT, SHORT),
    StopPoint("loading_rank0", 0, r"outputs in", STAGE_SPLIT, SHORT),
    # the DiT rank denoises with rank 0 gone, talking to nobody until it hands back
    StopPoint("handoff_rank0", 0, r"video 1/1: inputs handed over", STAGE_SPLIT, LONG),
    # rank 0 waits for the latents
    StopPoint("denoise_rank1", 1, PROGRESS.pattern, STAGE_SPLIT, LONG),
    StopPoint("denoise_rank0", 0, PROGRESS.pattern, STAGE_SPLIT, LONG),
    # in the middle of the bands' exchanges
    StopPoint("decode_bands_rank1", 1, r"video 1/1: decoding", BANDS, DECODE),
    StopPoint("decode_bands_rank0", 0, r"video 1/1: decoding", BANDS, DECODE),
    # the DiT rank waits for rank 0's decode, then both gather the report
    StopPoint("report_rank1", 1, r"video 1/1: decoding", STAGE_SPLIT, DECODE, written=("video.mp4",)),
    StopPoint("report_rank0", 0, r"video 1/1: decoding", STAGE_SPLIT, DECODE),
]


# `make test` stops each phase once, each rank at some phase, the bands included; `make test-slow` the
# other rank at each phase too (each case is a run of 15-35 s).
EVERY_PHASE_ONCE = {"loading_rank1", "handoff_rank0", "denoise_rank1", "decode_bands_rank0", "report_rank1"}


@pytest.mark.parametrize("point", [pytest.param(p, id=p.name, marks=() if p.name in EVERY_PHASE_ONCE
                                                else pytest.mark.slow) for p in STOP_POINTS])
def test_stopped_peer_is_named(tmp_path, t2v_folder, point):
    with torchrun(tmp_path, t2v_folder, f"parallel.timeout_s={TIMEOUT_S}", layout=point.layout,
                  run=point.run) as job:
        job.wait_for(lambda: re.search(point.at, job.text()), repr(point.at))
        workers = job.workers()
        assert sorted(workers) == [0, 1], workers
        workers[point.stopped].suspend()
        stopped_at = time.monotonic()
        survivor_rank = 1 - point.stopped
        job.wait_for(lambda: _exited([workers[survivor_rank]]), "the other rank's exit", timeout=TIMEOUT_S + MARGIN_S)
        survivor_s = time.monotonic() - stopped_at
        # torchrun reports an exit status once it has ended the other workers: a stopped one takes it 30 s
        # (SIGTERM waits for SIGCONT), a killed one none. It names the first failure it saw, which may be
        # the killed rank's when both are seen at one poll.
        workers[point.stopped].kill()
        job.proc.wait(timeout=60)
        text = job.text()
    exit_line = re.search(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) ", text)
    assert exit_line and job.proc.returncode != 0, text[-3000:]
    if int(exit_line.group(2)) == survivor_rank:
        assert int(exit_line.group(1)) == 1
    # Otherwise the survivor's status is not reported; its one line below is said right before it exits 1.
    print(f"{point.name}: rank {survivor_rank} exited {survivor_s:.1f} s after rank {point.stopped} was "
          f"stopped (parallel.timeout_s={TIMEOUT_S})")
    # Anywhere in a line: a progress bar may hold the line the error starts on.
    lines = re.findall(rf"error: rank {survivor_rank}: [^\n]*", text)
    assert len(lines) == 1, text[-3000:]
    assert re.match(rf"error: rank {survivor_rank}: rank {point.stopped} (stopped responding|was lost)", lines[0]), \
        lines[0]
    assert not re.search(r'File "[^"]*(wan_dist|launch)/', text), text[-3000:]  # no traceback of ours
    left = sorted(p.name for p in job.out.iterdir()) if job.out.exists() else []
    assert left == sorted(point.written), left


def test_a_denoise_longer_than_the_timeout_is_no_loss(tmp_path, t2v_folder):
    """Rank 0 waits for the latents as long as the DiT rank works on them, not parallel.timeout_s."""
    with torchrun(tmp_path, t2v_folder, f"parallel.timeout_s={TIMEOUT_S}", layout=STAGE_SPLIT,
                  run=("steps=6000", "height=32", "width=32", "num_frames=5")) as job:
        job.proc.wait(timeout=600)
        text = job.text()
    assert job.proc.returncode == 0, text[-3000:]
    report = json.loads((job.out / "run.json").read_text())
    print(f"denoise {report['timings']['denoise_s']:.1f} s with parallel.timeout_s={TIMEOUT_S}")
    assert report["timings"]["denoise_s"] > TIMEOUT_S
