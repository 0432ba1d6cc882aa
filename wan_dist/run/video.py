"""The video and frames files, each written atomically (plan/outputs.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..plan.outputs import atomic_write


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
