"""The heartbeat's watch on an in-memory store, with this process as rank 0 and ranks that never beat (or
say they are done): a silent peer interrupts the main thread and is named; past the grace the hang callback
gets the same line; a finished peer is no loss; a wait on a failed rank's post ends."""

from __future__ import annotations

import threading

import pytest
import torch.distributed as dist

from wan_dist.parallel.session import Heartbeat, PeerLostError

TIMEOUT_S = 1.0


def _interrupted_by(heartbeat: Heartbeat) -> None:
    """Block the main thread, as a rank computing or waiting in Python would, until the watch interrupts it."""
    never = threading.Event()
    with heartbeat.interrupting(), pytest.raises(PeerLostError) as lost:
        never.wait(30 * TIMEOUT_S)
    assert str(lost.value) == heartbeat.lost_message


def test_a_silent_peer_interrupts_and_is_named():
    hung = threading.Event()
    said: list[str] = []
    heartbeat = Heartbeat(dist.HashStore(), rank=0, world_size=3, timeout_s=TIMEOUT_S, grace_s=0.5,
                          on_hang=lambda message: (said.append(message), hung.set()))
    try:
        _interrupted_by(heartbeat)
        assert heartbeat.lost_message.startswith("ranks 1, 2 stopped responding: no heartbeat for "
                                                 "parallel.timeout_s=1 s")
        assert hung.wait(10) and said == [heartbeat.lost_message]
        assert heartbeat.diagnose(RuntimeError("any")) == heartbeat.lost_message
    finally:
        heartbeat.close()


def test_a_finished_peer_is_no_loss():
    store = dist.HashStore()
    store.set("done/1", "1")
    heartbeat = Heartbeat(store, rank=0, world_size=3, timeout_s=TIMEOUT_S)
    try:
        _interrupted_by(heartbeat)
        assert heartbeat.lost_message.startswith("rank 2 stopped responding")
    finally:
        heartbeat.close()


def test_waiting_on_a_failed_rank_ends():
    store = dist.HashStore()
    store.set("failed/1", "1")
    heartbeat = Heartbeat(store, rank=0, world_size=2)  # no timeout: the watch stays out of it
    try:
        with pytest.raises(PeerLostError, match="rank 1 failed"):
            heartbeat.await_post("handoff/latents/0", src=1)
    finally:
        heartbeat.close()


def test_a_post_is_received_in_order():
    store = dist.HashStore()
    sender, receiver = (Heartbeat(store, rank=r, world_size=2) for r in (0, 1))
    try:
        sender.post("handoff/inputs/1")
        sender.post("handoff/inputs/1")
        receiver.await_post("handoff/inputs/1", src=0)
        receiver.await_post("handoff/inputs/1", src=0)
        assert not store.check(["posted/handoff/inputs/1/1"])  # consumed
    finally:
        sender.close()
        receiver.close()
