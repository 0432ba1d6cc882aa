"""Weights come from safetensors; pickle files only when model.allow_pickle=true, and then only plain
tensors (torch.load(weights_only=True)): a pickle that would run code is refused without running it.
A finished video is kept unless output.overwrite=true."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from wan_dist.plan.checks import check_model_folder, validate_run
from wan_dist.config.schema import ConfigError, RunConfig
from wan_dist.wan.loading import load_transformer
from wan_dist.run.video import write_video


class _RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _pickle_folder(t2v_folder: Path, tmp_path: Path, payload) -> Path:
    folder = shutil.copytree(t2v_folder, tmp_path / "model")
    for weights in (folder / "transformer").glob("*.safetensors*"):
        weights.unlink()
    torch.save(payload, folder / "transformer" / "diffusion_pytorch_model.bin")
    return folder


def test_pickle_weights_refused_unless_allowed(t2v_folder, tmp_path):
    reference = load_transformer(t2v_folder, torch.float32, torch.device("cpu"))
    folder = _pickle_folder(t2v_folder, tmp_path, reference.state_dict())
    with pytest.raises(ConfigError, match=r"model\.allow_pickle=true"):
        check_model_folder(str(folder), allow_pickle=False)
    check_model_folder(str(folder), allow_pickle=True)
    loaded = load_transformer(folder, torch.float32, torch.device("cpu"), allow_pickle=True)
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_pickle_that_runs_code_is_not_run(t2v_folder, tmp_path):
    marker = tmp_path / "marker"
    folder = _pickle_folder(t2v_folder, tmp_path, {"blocks.0.attn1.to_q.weight": _RunsCode(marker)})
    with pytest.raises(Exception) as raised:
        load_transformer(folder, torch.float32, torch.device("cpu"), allow_pickle=True)
    chain, error = [], raised.value
    while error is not None:
        chain.append(str(error))
        error = error.__cause__ or error.__context__
    assert any("weights_only" in text or "Unsupported global" in text for text in chain), chain
    assert not marker.exists()


def test_safetensors_loader_ignores_pickle_beside_it(t2v_folder, tmp_path):
    """Without allow_pickle a .bin next to the safetensors is never opened."""
    marker = tmp_path / "marker"
    folder = shutil.copytree(t2v_folder, tmp_path / "model")
    torch.save({"x": _RunsCode(marker)}, folder / "transformer" / "diffusion_pytorch_model.bin")
    load_transformer(folder, torch.float32, torch.device("cpu"))
    assert not marker.exists()


def test_finished_video_is_kept(tmp_path):
    frames = np.zeros((1, 16, 16, 3), dtype=np.float32)
    path = write_video(frames, tmp_path / "video.mp4", frame_rate=16)
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_video(frames + 1, path, frame_rate=16, overwrite=False)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]  # no temp file left
    write_video(frames + 1, path, frame_rate=16, overwrite=True)
    assert path.read_bytes() != before


def test_overwrite_key_lets_validation_pass(tmp_path):
    (tmp_path / "video.mp4").write_bytes(b"done")
    run = RunConfig()
    run.output.dir = str(tmp_path)
    with pytest.raises(ConfigError, match=r"output\.overwrite=true"):
        validate_run(run)
    run.output.overwrite = True
    validate_run(run)
