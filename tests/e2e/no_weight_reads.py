"""Run a script (launch/generate.py) with every way of reading weights shut: safetensors' readers and
torch.load raise, and every Python-level open of a weight file must come from the header reader.
Violations are written to $NO_WEIGHT_READS_LOG (one line each), header reads counted there too.

    python tests/e2e/no_weight_reads.py launch/generate.py dry_run=true ...
    torchrun --nproc_per_node=2 tests/e2e/no_weight_reads.py launch/generate.py dry_run=true ...
"""

from __future__ import annotations

import os
import runpy
import sys

LOG = os.environ["NO_WEIGHT_READS_LOG"]
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def _record(line: str) -> None:
    with open(LOG, "a") as handle:  # an audit event inside this open is not a weight file
        handle.write(line + "\n")


def _refuse(name: str):
    def refused(*args, **kwargs):
        _record(f"weights read: {name}{args[:1]}")
        raise RuntimeError(f"{name} called in a run that must read no weights")

    return refused


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not isinstance(args[0], (str, bytes, os.PathLike)):
        return
    path = os.fsdecode(args[0])
    if not path.endswith(WEIGHT_SUFFIXES):
        return
    frame, callers = sys._getframe(1), []
    while frame is not None:
        callers.append(frame.f_code.co_name)
        frame = frame.f_back
    _record(f"header read: {path}" if "read_safetensors_header" in callers else f"weights opened: {path}")


import safetensors  # noqa: E402
import safetensors.torch  # noqa: E402
import torch  # noqa: E402

safetensors.safe_open = _refuse("safetensors.safe_open")
safetensors.torch.safe_open = _refuse("safetensors.torch.safe_open")
safetensors.torch.load_file = _refuse("safetensors.torch.load_file")
safetensors.torch.load = _refuse("safetensors.torch.load")
torch.load = _refuse("torch.load")
sys.addaudithook(_audit)

target = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(target, run_name="__main__")
