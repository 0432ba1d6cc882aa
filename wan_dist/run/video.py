"""Outputs, written atomically: a reader never sees a half-written video, frames file or run.json."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool = True) -> Path:
    """Write to a temp file beside `path`, then move it into place; with `overwrite=False` an existing
    `path` is kept (the move is a hard link, which fails rather than replace, even against a racing
    writer) and FileExistsError raised."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be shared
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def output_names(index: int, queued: bool) -> tuple[str, str]:
    """The video and frames file names of video `index` (a prompt queue numbers them)."""
    return (f"video_{index}.mp4", f"frames_{index}.npy") if queued else ("video.mp4", "frames.npy")


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255).round().astype(np.uint8)


def write_video(frames: np.ndarray, path: Path, frame_rate: int, *, overwrite: bool = True) -> Path:
    """H.264 mp4 through imageio-ffmpeg's bundled ffmpeg; frames (F, H, W, 3) float in [0, 1]."""
    import imageio.v2 as imageio

    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be (F, H, W, 3), got shape {frames.shape}")

    def write(tmp: Path) -> None:
        # macro_block_size=1 keeps small sizes exact instead of resizing them to multiples of 16.
        with imageio.get_writer(tmp, fps=frame_rate, codec="libx264", format="FFMPEG", macro_block_size=1,
                                pixelformat="yuv420p" if frames.shape[1] % 2 == 0 and frames.shape[2] % 2 == 0
                                else "yuv444p", ffmpeg_log_level="error") as writer:
            for frame in to_uint8(frames):
                writer.append_data(frame)

    return atomic_write(path, write, overwrite)


def write_frames(frames: np.ndarray, path: Path, *, overwrite: bool = True) -> Path:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle, so np.save adds no ".npy" to the temp name
            np.save(handle, frames.astype(np.float32))

    return atomic_write(path, write, overwrite)


def write_json(data: dict[str, Any], path: Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))
