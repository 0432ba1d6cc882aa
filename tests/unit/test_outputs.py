"""Outputs: a readable mp4 at any size, frames and run.json written atomically, float -> uint8."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from wan_dist.plan.outputs import write_json
from wan_dist.run.video import to_uint8, write_frames, write_video


def read_video(path: Path) -> tuple[np.ndarray, float]:
    import imageio.v2 as imageio

    with imageio.get_reader(path, format="FFMPEG") as reader:
        fps = reader.get_meta_data()["fps"]
        frames = np.stack([frame for frame in reader])
    return frames, fps


def ramp_frames(num_frames: int, height: int, width: int) -> np.ndarray:
    """Smooth content an encoder keeps well: a horizontal ramp, brighter each frame."""
    x = np.linspace(0.1, 0.9, width, dtype=np.float32)[None, None, :, None]
    t = np.linspace(0.0, 0.1, num_frames, dtype=np.float32)[:, None, None, None]
    return np.broadcast_to(x + t, (num_frames, height, width, 3)).copy()


def leftovers(folder: Path, final: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != final)


# -------------------------------------------------------------------------------------------- to_uint8


def test_to_uint8_rounds_and_clips():
    values = np.array([-1.0, 0.0, 0.001, 0.002, 0.5, 254.4 / 255, 254.6 / 255, 1.0, 1.5, np.inf, -np.inf])
    out = to_uint8(values)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 0, 1, 128, 254, 255, 255, 255, 255, 0]


def test_to_uint8_keeps_shape():
    frames = np.random.RandomState(0).rand(2, 5, 7, 3).astype(np.float32)
    out = to_uint8(frames)
    assert out.shape == frames.shape
    assert np.abs(out.astype(np.float64) - frames * 255).max() <= 0.5 + 1e-4


# ------------------------------------------------------------------------------------------ write_video


@pytest.mark.parametrize("height, width", [(64, 64), (48, 80), (50, 70), (33, 47), (16, 16)])
def test_write_video_readable(tmp_path, height, width):
    frames = ramp_frames(9, height, width)
    path = write_video(frames, tmp_path / "video.mp4", frame_rate=16)
    assert path == tmp_path / "video.mp4"
    back, fps = read_video(path)
    assert back.shape == (9, height, width, 3)
    assert fps == pytest.approx(16)
    # lossy, but the content is the one written
    err = np.abs(back.astype(np.float64) - to_uint8(frames).astype(np.float64)).mean()
    assert err < 6, err
    assert leftovers(tmp_path, "video.mp4") == []
    assert oct(path.stat().st_mode & 0o777) == oct(0o644)


def test_write_video_single_frame_and_nested_dir(tmp_path):
    path = write_video(ramp_frames(1, 32, 48), tmp_path / "a" / "b" / "video_0.mp4", frame_rate=8)
    back, _ = read_video(path)
    assert back.shape == (1, 32, 48, 3)


def test_write_video_failure_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="F, H, W, 3"):
        write_video(np.zeros((4, 8), dtype=np.float32), tmp_path / "video.mp4", frame_rate=16)
    assert list(tmp_path.iterdir()) == []


def test_write_video_failure_keeps_previous_video(tmp_path):
    path = write_video(ramp_frames(5, 32, 32), tmp_path / "video.mp4", frame_rate=16)
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_video(np.zeros((5, 32), dtype=np.float32), path, frame_rate=16)
    assert path.read_bytes() == before
    assert leftovers(tmp_path, "video.mp4") == []


def test_write_video_replaces_previous_video(tmp_path):
    path = write_video(ramp_frames(5, 32, 32), tmp_path / "video.mp4", frame_rate=16)
    write_video(ramp_frames(9, 48, 64), path, frame_rate=16)
    back, _ = read_video(path)
    assert back.shape == (9, 48, 64, 3)
    assert leftovers(tmp_path, "video.mp4") == []


# ----------------------------------------------------------------------------------------- write_frames


def test_write_frames_roundtrip(tmp_path):
    frames = np.random.RandomState(1).rand(3, 6, 10, 3)  # float64 in
    path = write_frames(frames, tmp_path / "frames.npy")
    back = np.load(path)
    assert back.dtype == np.float32
    assert back.shape == (3, 6, 10, 3)
    np.testing.assert_array_equal(back, frames.astype(np.float32))
    assert leftovers(tmp_path, "frames.npy") == []


def test_write_frames_failure_leaves_nothing(tmp_path):
    bad = np.array([["not a number"]], dtype=object)
    with pytest.raises(ValueError):
        write_frames(bad, tmp_path / "frames.npy")
    assert list(tmp_path.iterdir()) == []


def test_write_frames_failure_keeps_previous(tmp_path):
    path = write_frames(np.ones((1, 2, 2, 3)), tmp_path / "frames.npy")
    before = path.read_bytes()
    with pytest.raises(ValueError):
        write_frames(np.array([["x"]], dtype=object), path)
    assert path.read_bytes() == before
    assert leftovers(tmp_path, "frames.npy") == []


def test_write_frames_other_suffix(tmp_path):
    frames = np.zeros((1, 2, 2, 3), dtype=np.float32)
    path = write_frames(frames, tmp_path / "frames.bin")
    assert leftovers(tmp_path, "frames.bin") == []
    np.testing.assert_array_equal(np.load(path), frames)


# ------------------------------------------------------------------------------------------- write_json


def test_write_json_roundtrip(tmp_path):
    data = {"timings": {"total_s": 1.5, "per_step_s": [0.1, 0.2]}, "dir": tmp_path, "name": "é"}
    path = write_json(data, tmp_path / "run.json")
    text = path.read_text()
    assert text.endswith("\n")
    back = json.loads(text)
    assert back["timings"] == {"total_s": 1.5, "per_step_s": [0.1, 0.2]}
    assert back["dir"] == str(tmp_path)  # non-JSON values written as text
    assert back["name"] == "é"
    assert leftovers(tmp_path, "run.json") == []


def test_write_json_failure_leaves_nothing(tmp_path):
    circular: dict = {}
    circular["self"] = circular
    with pytest.raises(ValueError):
        write_json(circular, tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []


def test_write_json_failure_keeps_previous(tmp_path):
    path = write_json({"a": 1}, tmp_path / "run.json")
    circular: list = []
    circular.append(circular)
    with pytest.raises(ValueError):
        write_json({"b": circular}, path)
    assert json.loads(path.read_text()) == {"a": 1}
    assert leftovers(tmp_path, "run.json") == []


def test_write_json_interrupted_leaves_nothing(tmp_path):
    """A BaseException (Ctrl-C while writing) cleans up as well."""

    class Interrupting:
        def __str__(self) -> str:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_json({"x": Interrupting()}, tmp_path / "run.json")
    assert list(tmp_path.iterdir()) == []
