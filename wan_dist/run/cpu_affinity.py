"""Give each CPU rank cores of its own when the ranks' threads on a node fit its cores.

Left to the scheduler, the ranks' compute threads migrate between cores and are preempted by the other
rank's communication threads (gloo runs each collective on worker threads of its own, and a sequence-
parallel forward has 17 collectives). Pinned, a rank's helper threads run on its own core while its
compute thread waits in the collective. On the 2-core bench machine this took a 2-rank Ulysses forward of
the bench model from 0.42-0.44 s to 0.40 s.

One rank alone is never pinned: its background threads (the text encoder encoding the next prompt)
should use the cores no other rank needs.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def rank_cores(local_rank: int, local_world_size: int, threads: int, available: list[int]) -> list[int] | None:
    """This rank's equal, contiguous share of `available` (sorted): at least `threads` cores, and all it
    can have, so that its helper threads (the text encoder, gloo, the heartbeat) need not share the
    compute threads' cores where the node has more. None when the ranks' threads do not fit or there is
    only one rank."""
    share = len(available) // local_world_size if local_world_size else 0
    if local_world_size < 2 or threads < 1 or share < threads:
        return None
    return available[local_rank * share:(local_rank + 1) * share]


def pin_cpu_rank(local_rank: int, local_world_size: int, threads: int) -> list[int] | None:
    """Pin every thread of this process (and so every thread it starts later) to this rank's cores.
    Returns the cores, or None when nothing was pinned (not Linux, one rank, or too few cores)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    cores = rank_cores(local_rank, local_world_size, threads, sorted(os.sched_getaffinity(0)))
    if cores is None:
        return None
    # sched_setaffinity(0) sets the calling thread's mask only; threads already running keep theirs.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), cores)
        except ProcessLookupError:  # the thread ended meanwhile
            continue
    log.debug("local rank %d of %d pinned to cores %s", local_rank, local_world_size, cores)
    return cores
