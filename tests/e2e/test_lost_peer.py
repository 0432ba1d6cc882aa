"""A rank stopped (SIGSTOP: alive, connected, silent) at each point of a two-rank run, in both directions:
the other rank ends within parallel.timeout_s + 45 s (and not before the timeout), non-zero, with one
line naming the stopped rank (and the timeout, where it stopped responding), and leaves no half-written
output. The stop is timed by what the run prints as it goes: the plan's line (loading), the hand-over, the
progress bar (denoise), the decode's line (the decode, in bands or on rank 0, and the report after it). A
rank that only works longer than the timeout is no loss.

The launches run overlapped, in one sequence with tests/e2e/test_faults.py's: each next one starts once
the one before has stopped its rank (and what it had written whole is there), so it starts while the one
before waits on the timeout."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.test_faults import (PROGRESS, STRUCK, Scenario, _exited, check, register_scenarios,
                                   session_outcomes, torchrun)

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
    # Seconds past `at`, longer than the timeout, that the run works on before the stop, with no rank
    # saying a word: the other one waits on it all that while (a rank that only works longer is no loss).
    works_s: float = 0


STOP_POINTS = [
    # rank 0 has its plan; both ranks build the groups and load their models
    StopPoint("loading_rank1", 1, r"outputs in", STAGE_SPLIT, SHORT),
    StopPoint("loading_rank0", 0, r"outputs in", STAGE_SPLIT, SHORT),
    # the DiT rank denoises with rank 0 gone, talking to nobody until it hands back
    StopPoint("handoff_rank0", 0, r"video 1/1: inputs handed over", STAGE_SPLIT, LONG),
    # rank 0 waits for the latents, past the timeout while the DiT rank works, then on a stopped one
    StopPoint("denoise_rank1", 1, PROGRESS.pattern, STAGE_SPLIT, LONG, works_s=TIMEOUT_S + 3),
    StopPoint("denoise_rank0", 0, PROGRESS.pattern, STAGE_SPLIT, LONG),
    # in the middle of the bands' exchanges
    StopPoint("decode_bands_rank1", 1, r"video 1/1: decoding", BANDS, DECODE),
    StopPoint("decode_bands_rank0", 0, r"video 1/1: decoding", BANDS, DECODE),
    # the DiT rank waits for rank 0's decode, then both gather the report
    StopPoint("report_rank1", 1, r"video 1/1: decoding", STAGE_SPLIT, DECODE, written=("video.mp4",)),
    StopPoint("report_rank0", 0, r"video 1/1: decoding", STAGE_SPLIT, DECODE),
]


# `make test` stops a rank once where the other waits for it in Python (rank 0 for the latents), once
# where it computes (the DiT rank, denoising), once where it waits in a collective (the report's gather,
# after a whole video was written); `make test-full` also during loading and in the bands' exchanges
# (waits of the same kinds); `make test-slow` the other rank at each phase too (each case is a run of
# 15-35 s).
MAKE_TEST = {"handoff_rank0", "denoise_rank1", "report_rank1"}
FULL = {"loading_rank1", "decode_bands_rank0"}


def _marks(point: StopPoint) -> tuple:
    return () if point.name in MAKE_TEST else (pytest.mark.full,) if point.name in FULL else (pytest.mark.slow,)


def _steps_done(text: str) -> int:
    """The denoising steps the progress bar last showed done."""
    return int(re.findall(r"video 1/1:[^|]*\|[^|]*\|\s*(\d+)/", text)[-1])


def stopped_peer(tmp_path: Path, t2v_folder: Path, point: StopPoint) -> Scenario:
    with torchrun(tmp_path, t2v_folder, f"parallel.timeout_s={TIMEOUT_S}", layout=point.layout,
                  run=point.run) as job:
        yield from job.until(lambda: re.search(point.at, job.text()), repr(point.at))
        workers = job.workers()
        assert sorted(workers) == [0, 1], workers
        if point.works_s:
            # What is left until the stop needs one core: the next launch starts beside it.
            yield STRUCK
            working_since, steps_then = time.monotonic(), _steps_done(job.text())
            yield from job.until(lambda: time.monotonic() - working_since >= point.works_s,
                                 f"{point.works_s} s of work")
            text = job.text()
            assert "error: rank" not in text and not any(_exited([w]) for w in workers.values()), text[-3000:]
            assert _steps_done(text) > steps_then, text[-3000:]
        workers[point.stopped].suspend()
        stopped_at = time.monotonic()
        survivor_rank = 1 - point.stopped
        survivor = workers[survivor_rank]
        # What is written whole when the stop comes, written before the next launch starts.
        yield from job.until(lambda: all((job.out / name).exists() for name in point.written) or _exited([survivor]),
                             "the outputs written", timeout=TIMEOUT_S + MARGIN_S)
        yield STRUCK
        yield from job.until(lambda: _exited([survivor]), "the other rank's exit", timeout=TIMEOUT_S + MARGIN_S)
        survivor_s = time.monotonic() - stopped_at
        # torchrun reports an exit status once it has ended the other workers: a stopped one takes it 30 s
        # (SIGTERM waits for SIGCONT), a killed one none. It names the first failure it saw, which may be
        # the killed rank's when both are seen at one poll.
        workers[point.stopped].kill()
        yield from job.until_exit(timeout=60)
        text = job.text()
    exit_line = re.search(r"failed \(exitcode: (-?\d+)\) local_rank: (\d+) ", text)
    assert exit_line and job.proc.returncode != 0, text[-3000:]
    if int(exit_line.group(2)) == survivor_rank:
        assert int(exit_line.group(1)) == 1
    # Otherwise the survivor's status is not reported; its one line below is said right before it exits 1.
    print(f"{point.name}: rank {survivor_rank} exited {survivor_s:.1f} s after rank {point.stopped} was "
          f"stopped (parallel.timeout_s={TIMEOUT_S})")
    # A stopped rank is silent, not gone: only the timeout finds it (one heartbeat may have been due).
    assert TIMEOUT_S - 1 <= survivor_s, survivor_s
    # Anywhere in a line: a progress bar may hold the line the error starts on.
    lines = re.findall(rf"error: rank {survivor_rank}: [^\n]*", text)
    assert len(lines) == 1, text[-3000:]
    assert re.match(rf"error: rank {survivor_rank}: rank {point.stopped} (stopped responding|was lost)", lines[0]), \
        lines[0]
    if "stopped responding" in lines[0]:
        assert f"parallel.timeout_s={TIMEOUT_S} s" in lines[0], lines[0]
    assert not re.search(r'File "[^"]*(wan_dist|launch)/', text), text[-3000:]  # no traceback of ours
    left = sorted(p.name for p in job.out.iterdir()) if job.out.exists() else []
    assert left == sorted(point.written), left


# Enough steps that the denoise takes longer than TIMEOUT_S on a fast machine (about 4 ms a step when
# measured, on a shared one).
NO_LOSS_STEPS = 3000


def no_loss(tmp_path: Path, t2v_folder: Path) -> Scenario:
    """Rank 0 waits for the latents as long as the DiT rank works on them, not parallel.timeout_s."""
    with torchrun(tmp_path, t2v_folder, f"parallel.timeout_s={TIMEOUT_S}", layout=STAGE_SPLIT,
                  run=(f"steps={NO_LOSS_STEPS}", "height=32", "width=32", "num_frames=5")) as job:
        # From the hand-over on, rank 0 waits and the DiT rank denoises on one core.
        yield from job.until(lambda: "inputs handed over" in job.text(), "the hand-over")
        yield STRUCK
        yield from job.until_exit(timeout=600)
        text = job.text()
    assert job.proc.returncode == 0, text[-3000:]
    report = json.loads((job.out / "run.json").read_text())
    print(f"denoise {report['timings']['denoise_s']:.1f} s with parallel.timeout_s={TIMEOUT_S}")
    assert report["timings"]["denoise_s"] > TIMEOUT_S


NO_LOSS = "test_a_denoise_longer_than_the_timeout_is_no_loss"
# Places in the one sequence with tests/e2e/test_faults.py's launches (see there): the report's before
# the long denoises, so that its decode, which must end within the timeout, has the cores to itself; the
# long denoises early enough that the launches after them start beside them.
PLACES = {"report_rank1": 20, "denoise_rank1": 30, "handoff_rank0": 50, NO_LOSS: 60, "loading_rank1": 90,
          "decode_bands_rank0": 100, "loading_rank0": 110, "denoise_rank0": 120, "decode_bands_rank1": 130,
          "report_rank0": 140}


def _scenario_name(item: pytest.Item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.params["point"].name if callspec is not None else item.originalname


register_scenarios(__name__, {
    **{p.name: (PLACES[p.name], lambda tmp_path, t2v_folder, point=p: stopped_peer(tmp_path, t2v_folder, point))
       for p in STOP_POINTS},
    NO_LOSS: (PLACES[NO_LOSS], no_loss),
}, _scenario_name)


@pytest.fixture(scope="module")
def outcomes(request) -> dict[str, BaseException | None]:
    return session_outcomes(request)


@pytest.mark.parametrize("point", [pytest.param(p, id=p.name, marks=_marks(p)) for p in STOP_POINTS])
def test_stopped_peer_is_named(outcomes, point):
    check(outcomes, point.name)


# Under make test, denoise_rank1 has rank 0 wait past the timeout on the DiT rank at work, in silence,
# before it stops that rank; here the run goes on to its end.
@pytest.mark.full
def test_a_denoise_longer_than_the_timeout_is_no_loss(outcomes):
    check(outcomes, NO_LOSS)
