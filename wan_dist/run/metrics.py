"""Per-rank timings and memory for run.json."""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


@dataclass
class RankMetrics:
    rank: int
    role: str
    device: str
    parameter_bytes: dict[str, int] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    step_seconds: list[list[float]] = field(default_factory=list)
    peak_parameter_bytes: int = 0
    loaded: dict[str, int] = field(default_factory=dict)
    # Memory in use after each video (not the peak), so growth along a prompt queue shows.
    after_video_bytes: list[int] = field(default_factory=list)
    # The process's peak so far right after each component was loaded: at most what loading it (and all
    # before it) took, the load's own peak where it is the largest yet.
    peak_when_loaded: dict[str, int] = field(default_factory=dict)
    # The most a phase (the VAE decode) allocated beyond what was there when it began.
    phase_peak_bytes: dict[str, int] = field(default_factory=dict)
    _cuda_peak_floor: int = 0  # the CUDA peak before a phase's measurement reset the counter

    @contextmanager
    def peak(self, phase: str, device: torch.device) -> Iterator[None]:
        """Measure what `phase` allocates at most: CUDA's peak counter (reset for it, the run's peak kept
        aside), or on CPU every tensor it allocates and frees (parallel/live_memory.py; RSS would mix in the
        allocator's caching)."""
        if device.type == "cuda":
            self._cuda_peak_floor = max(self._cuda_peak_floor, torch.cuda.max_memory_allocated(device))
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            try:
                yield
            finally:
                used = torch.cuda.max_memory_allocated(device) - base
                self.phase_peak_bytes[phase] = max(self.phase_peak_bytes.get(phase, 0), used)
            return
        from ..parallel.live_memory import LiveTensorBytes

        with LiveTensorBytes() as live:
            yield
        self.phase_peak_bytes[phase] = max(self.phase_peak_bytes.get(phase, 0), live.peak)

    @contextmanager
    def timed(self, name: str, device: torch.device | None = None) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            if device is not None and device.type == "cuda":
                torch.cuda.synchronize(device)
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start

    def hold(self, component: str, nbytes: int) -> None:
        self.parameter_bytes[component] = nbytes
        self.loaded[component] = nbytes
        self.peak_when_loaded[component] = peak_memory_bytes(torch.device(self.device))
        self.peak_parameter_bytes = max(self.peak_parameter_bytes, sum(self.parameter_bytes.values()))

    def release(self, component: str) -> None:
        self.parameter_bytes.pop(component, None)

    def video_done(self, device: torch.device) -> None:
        self.after_video_bytes.append(current_memory_bytes(device))

    def snapshot(self, device: torch.device) -> dict:
        return {
            "rank": self.rank, "role": self.role, "device": self.device,
            "loaded_parameter_bytes": dict(self.loaded),
            "held_parameter_bytes_at_end": dict(self.parameter_bytes),
            "peak_parameter_bytes": self.peak_parameter_bytes,
            "peak_bytes": max(peak_memory_bytes(device), self._cuda_peak_floor), "peak_kind": peak_kind(device),
            "phase_peak_bytes": dict(self.phase_peak_bytes),
            "peak_bytes_when_loaded": dict(self.peak_when_loaded),
            "after_video_bytes": list(self.after_video_bytes),
            "after_video_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
            # The cores this rank may run on (parallel.pin_cpus) and its compute threads.
            "cpu_cores": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "threads": torch.get_num_threads(),
            "timings": dict(self.timings),
            "step_seconds": [list(steps) for steps in self.step_seconds],
        }


def peak_kind(device: torch.device) -> str:
    return "cuda_max_allocated" if device.type == "cuda" else "cpu_max_rss"


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def current_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:  # no procfs (macOS): the peak is the best there is
        return peak_memory_bytes(device)


def steady_step_seconds(steps_s: list[float] | list[list[float]]) -> float | None:
    """Median seconds per denoising step from run.json's `steps_s` (one list, or one per video of a
    prompt queue), without the very first step, which carries one-off warm-up."""
    steps = [s for video in steps_s for s in video] if steps_s and isinstance(steps_s[0], list) else list(steps_s)
    if not steps:
        return None
    return statistics.median(steps[1:] or steps)
