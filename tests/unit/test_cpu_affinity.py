"""Each CPU rank on cores of its own when the node's ranks fit them; nothing pinned otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from wan_dist.run.cpu_affinity import rank_cores


def test_ranks_share_out_the_cores_in_order():
    cores = [0, 1, 4, 5, 6, 7]
    assert [rank_cores(r, 3, 2, cores) for r in range(3)] == [[0, 1], [4, 5], [6, 7]]
    assert [rank_cores(r, 2, 1, [0, 1]) for r in range(2)] == [[0], [1]]


def test_each_rank_gets_an_equal_share_beyond_its_threads():
    """Two one-thread ranks on seven cores: three each, for the helper threads; the odd one is left out."""
    cores = [0, 1, 2, 3, 4, 5, 6]
    assert [rank_cores(r, 2, 1, cores) for r in range(2)] == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize("local_rank, world, threads", [(0, 1, 1), (0, 3, 1), (1, 2, 2), (0, 2, 0)])
def test_nothing_is_pinned_when_the_ranks_do_not_fit_or_are_alone(local_rank, world, threads):
    assert rank_cores(local_rank, world, threads, [0, 1]) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs Linux and two cores")
def test_every_thread_of_the_process_is_pinned_even_those_started_before():
    """In a child process, so that this test process keeps its cores."""
    code = (
        "import os, threading, time\n"
        "from wan_dist.run.cpu_affinity import pin_cpu_rank\n"
        "stop = threading.Event()\n"
        "early = threading.Thread(target=stop.wait); early.start()\n"
        "cores = pin_cpu_rank(1, 2, 1)\n"
        "late = threading.Thread(target=stop.wait); late.start()\n"
        "masks = {t: sorted(os.sched_getaffinity(int(t))) for t in os.listdir('/proc/self/task')}\n"
        "stop.set(); early.join(); late.join()\n"
        "print(cores, len(masks), sorted({tuple(m) for m in masks.values()}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    expected = sorted(os.sched_getaffinity(0))[1]
    assert out[0] == f"[{expected}]"
    assert int(out[1]) >= 3  # main, early, late
    assert out[2] == f"[({expected},)]"
