"""A job's output files: their names (the plan states them) and the atomic write every output goes
through, so that a reader never sees a half-written video, frames file, plan.json or run.json."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


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


def write_json(data: dict[str, Any], path: Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))
