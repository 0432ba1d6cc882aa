"""launch/gpu_check.py rehearsed on a CPU: its plan fits its calls, a step that hangs is stopped with
everything it started and the steps after it run or are not reached, the summary is rewritten after
every step, and the exit code says that a step failed. `make test` rehearses the hang in this process on a
short clock, with a quick stand-in for the kernels; `make test-full` runs the CLI with the real preflight and
kernels steps too."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "launch" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _gpu_check()


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _marked_by(pid: int) -> list[int]:
    """Processes whose environment carries a step marker of the check run `pid`."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(gpu_check.MARKER, "").startswith(f"{pid}:") and _running(proc.pid):
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


@pytest.mark.parametrize("call", sorted(gpu_check.CALLS))
def test_each_call_fits_its_total(call):
    steps = gpu_check.CALLS[call]
    assert sum(step.cap_s for step in steps) < gpu_check.CALL_TOTAL_S
    assert all(0 < step.min_s <= step.cap_s for step in steps)
    assert len({step.name for step in steps}) == len(steps)


def _quick_step(ctx):
    """A stand-in for call 1's kernels step (a real child, seconds less): what the rehearsal keeps of a step
    that finished before the hang."""
    cmd = [sys.executable, "-c", "print('quick step done')"]
    return cmd, lambda child: gpu_check._verdict(child.code == 0 and child.says("quick step done"), "ok",
                                                 rows=[{"size": "small", "ok": True}])


def test_rehearsal_survives_a_hung_step_quickly(tmp_path, monkeypatch, capsys):
    """make test's rehearsal: call 1's plan with --rehearse-hang's step after a quick stand-in for the
    kernels (preflight left out), on a 12 s clock: the hang is stopped with everything it started, what
    finished before it is kept, and what comes after it is not reached. The CLI with the real preflight and
    kernels steps is test_rehearsal_survives_a_hung_step (make test-full)."""
    real = gpu_check.CALLS[1]
    kernels = next(i for i, s in enumerate(real) if s.name == "kernels")
    steps = [s for s in real[:kernels] if s.name != "preflight"]
    steps += [gpu_check.Step("kernels", 20, 1, "a quick stand-in", _quick_step), *real[kernels + 1:]]
    monkeypatch.setitem(gpu_check.CALLS, 1, steps)
    monkeypatch.setattr(gpu_check, "_cuda_available", lambda env: False)
    out = tmp_path / "out"
    # 12 s: the hang gets what the quick step leaves less the kill's 5 s grace, about 6 s (its minimum is 3).
    code = gpu_check.run_call(1, out, None, allow_cpu=True, rehearse_hang=True, total_s=12)
    stdout = capsys.readouterr().out
    assert code == 1, stdout
    summary = json.loads((out / gpu_check.SUMMARY).read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert [s["name"] for s in summary["steps"]] == [s.name for s in gpu_check.plan(1, rehearse_hang=True)]
    assert list(steps)[:3] == ["wheels", "kernels", "hang"], list(steps)
    assert summary["failed"] == ["hang"], summary["failed"]
    assert steps["wheels"]["status"] == "not_reached"
    assert steps["kernels"]["status"] == "passed" and steps["kernels"]["details"]["rows"], steps["kernels"]

    _check_the_hang_and_after(summary, stdout, out, marker_parent=os.getpid())


def _check_the_hang_and_after(summary: dict, stdout: str, out: Path, marker_parent: int) -> None:
    """The hung step stopped with every process it started, the steps after it not reached, and the
    summary, stdout and log saying so."""
    steps = {step["name"]: step for step in summary["steps"]}
    hang = steps["hang"]
    assert hang["status"] == "failed" and hang["why"].startswith("timed out after"), hang
    assert "survivors" not in hang, hang
    # The step itself and the worker it started in a session of its own, which ignores SIGTERM.
    assert len(hang["details"]["pids"]) == 2
    assert not [pid for pid in hang["details"]["pids"] if _running(pid)]
    assert not _marked_by(marker_parent)

    after = summary["steps"][[s["name"] for s in summary["steps"]].index("hang") + 1:]
    assert after and all(step["status"] == "not_reached" and step["why"] for step in after), after
    assert steps["bench"] == {**steps["bench"], "status": "not_reached", "why": "needs a CUDA device"}
    assert summary["not_shown_on_one_gpu"] == gpu_check.NOT_SHOWN_ON_ONE_GPU
    assert "[gpu_check] hang: failed" in stdout and "[gpu_check] bench: not reached: needs a CUDA device" in stdout
    log = (out / gpu_check.LOG).read_text()
    assert all(f"===== {name} =====" in log for name, step in steps.items() if "seconds" in step)


@pytest.mark.full
def test_rehearsal_survives_a_hung_step(tmp_path):
    """The CLI, with call 1's real preflight and kernels steps before the hang."""
    out = tmp_path / "out"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "WAN_DIST_CACHE": str(tmp_path / "cache")}
    # 60 s: preflight and the kernels run within twice their caps (a shared CPU imports slowly); the hang
    # takes the rest.
    cmd = [sys.executable, "launch/gpu_check.py", "--call", "1", "--allow-cpu", "--rehearse-hang", "--total-s", "60",
           "--cap-scale", "2", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stdout, _ = proc.communicate(timeout=180)
    assert proc.returncode == 1, stdout
    summary = json.loads((out / gpu_check.SUMMARY).read_text())
    steps = {step["name"]: step for step in summary["steps"]}
    assert [s["name"] for s in summary["steps"]] == [s.name for s in gpu_check.plan(1, rehearse_hang=True)]
    assert summary["failed"] == ["hang"], summary["failed"]
    assert steps["wheels"]["status"] == "not_reached"
    assert steps["preflight"]["status"] == "passed", steps["preflight"]
    rows = steps["kernels"]["details"]["rows"]
    assert steps["kernels"]["status"] == "passed" and {r["size"] for r in rows} == {"real", "small"}, rows
    assert all(r["ok"] and r["rel_err"] <= r["tolerance"] for r in rows), rows

    _check_the_hang_and_after(summary, stdout, out, marker_parent=proc.pid)


def test_budget_and_summary_on_a_fake_clock(tmp_path, monkeypatch):
    """Each step takes what the fake clock says; the last one cannot get its minimum. The summary on disk
    when each verdict runs already holds the steps before it."""
    now = [0.0]
    seen = []

    def step(name: str, takes_s: float, ok: bool = True):
        def launch(ctx):
            def verdict(child):
                seen.append([s["status"] for s in json.loads((tmp_path / gpu_check.SUMMARY).read_text())["steps"]])
                now[0] += takes_s
                return gpu_check._verdict(ok and child.code == 0, name)

            return [sys.executable, "-c", "pass"], verdict

        return launch

    monkeypatch.setattr(gpu_check, "_cuda_available", lambda env: False)
    monkeypatch.setitem(gpu_check.CALLS, 1, [
        gpu_check.Step("a", 50, 10, "", step("a", 30)), gpu_check.Step("b", 50, 10, "", step("b", 30, ok=False)),
        gpu_check.Step("c", 50, 40, "", step("c", 30)), gpu_check.Step("d", 50, 10, "", step("d", 30))])
    code = gpu_check.run_call(1, tmp_path, None, total_s=100, clock=lambda: now[0])
    summary = json.loads((tmp_path / gpu_check.SUMMARY).read_text())
    statuses = {s["name"]: s["status"] for s in summary["steps"]}
    assert code == 1 and summary["failed"] == ["b"]
    # c: 40 s left, less the kill's grace, under its 40 s minimum; d: 10 s minimum, 35 s budget.
    assert statuses == {"a": "passed", "b": "failed", "c": "not_reached", "d": "passed"}, summary["steps"]
    assert summary["steps"][2]["why"] == "35 s left of 100 (after a kill's 5 s grace), it needs at least 40 s"
    assert summary["steps"][3]["budget_s"] == 40 - gpu_check.KILL_GRACE_S
    assert seen == [["pending"] * 4, ["passed", "pending", "pending", "pending"],
                    ["passed", "failed", "not_reached", "pending"]]


def test_pytest_step_stopped_at_its_cap_keeps_what_finished(tmp_path, monkeypatch):
    """A pytest step whose last test hangs: stopped at the step's cap (no junit XML then), the tests that
    finished are still in the summary, read from pytest's verbose lines."""
    tests = tmp_path / "test_probe.py"
    tests.write_text("import threading\n\ndef test_passes():\n    pass\n\ndef test_fails():\n    assert False\n\n"
                     "def test_hangs():\n    threading.Event().wait()\n")
    monkeypatch.setattr(gpu_check, "_cuda_available", lambda env: False)
    # 8 s: pytest starts and runs the first two tests within about a second here; the rest is room for a
    # loaded machine.
    step = gpu_check.Step("probe", 8, 1, "", gpu_check._pytest("probe", [str(tests)]))
    monkeypatch.setitem(gpu_check.CALLS, 1, [step])
    code = gpu_check.run_call(1, tmp_path / "out", None, total_s=60)
    (step,) = json.loads((tmp_path / "out" / gpu_check.SUMMARY).read_text())["steps"]
    assert code == 1 and step["status"] == "failed" and step["why"].startswith("timed out after 8 s"), step
    outcomes = {test.split("::")[-1]: outcome for test, outcome in step["details"]["tests"].items()}
    assert outcomes == {"test_passes": "passed", "test_fails": "failed", "(unfinished)": outcomes["(unfinished)"]}
    assert not (tmp_path / "out" / "junit_probe.xml").exists()
