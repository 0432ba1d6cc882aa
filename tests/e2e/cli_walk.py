"""Runs launch/generate.py once per command line inside one interpreter, so a walk over many bad inputs
pays for Python, torch and diffusers imports once. Reads a JSON list of {"argv": [...], "cache": path}
from argv[1], writes a JSON list of {"code", "stdout", "stderr"} to argv[2]."""

from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import signal
import sys
import traceback
from pathlib import Path

SCRIPT = str(Path(__file__).resolve().parents[2] / "launch" / "generate.py")


def run_one(argv: list[str], cache: str) -> dict:
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_argv = dict(os.environ), list(sys.argv)
    saved_handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    os.environ["WAN_DIST_CACHE"] = cache
    sys.argv = [SCRIPT, *argv]
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(SCRIPT, run_name="__main__")
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else 1
            except BaseException:
                traceback.print_exc()
                code = 1
    finally:
        from hydra.core.global_hydra import GlobalHydra

        GlobalHydra.instance().clear()
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv = saved_argv
        for sig, handler in saved_handlers.items():
            signal.signal(sig, handler)
    return {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    cases = json.loads(Path(sys.argv[1]).read_text())
    results = [run_one(case["argv"], case["cache"]) for case in cases]
    Path(sys.argv[2]).write_text(json.dumps(results))
