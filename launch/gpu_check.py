"""What one lent GPU can tell about this project, in two planned calls of the device tool, each well
inside one command's limit with room for a rerun. Call 1 answers "does the CUDA path work at all";
call 2 runs what needs more than one rank or more time.

    python3 launch/gpu_check.py --call 1 --wheels .whl --out $OUT     # make gpu-check CALL=1
    python3 launch/gpu_check.py --call 2 --wheels .whl --out $OUT     # make gpu-check CALL=2

The device tool's calls (the GPU machine has CUDA torch but none of diffusers, xfuser, yunchang, distvae,
hydra-core, imageio-ffmpeg: `make gpu-wheels` puts them into .whl/, 34 MB, installed there into a
folder of their own; it may have no make):

    run(command="PYTHONUNBUFFERED=1 python3 launch/gpu_check.py --call 1 --wheels .whl --out $OUT",
        carry=[".whl"], timeout_s=330)
    run(command="PYTHONUNBUFFERED=1 python3 launch/gpu_check.py --call 2 --wheels .whl --out $OUT",
        carry=[".whl"], timeout_s=330)

Each call's steps and their caps are CALLS below, stated once, and add up to less than the call's total
(CALL_TOTAL_S); each step gets the smaller of its cap and the time left, and a step that cannot get its
minimum is "not reached", with the reason. Every step is a child process in a session of its own, its
output in a log file; on a timeout its process group, and every process that carries its marker in its
environment (torchrun's workers start sessions of their own), get SIGTERM, then SIGKILL after a grace
period, and the step fails if any of them is left. After every step <out>/gpu_check.json is rewritten
(atomically) and the step's log is appended to <out>/gpu_check.log; pytest's steps also leave
<out>/junit_<step>.xml. The exit code is 1 if any step failed.

Reading the summary: `steps` lists each step with `status` (passed / failed / not_reached), `why` (one
line), `seconds`, `budget_s` and `details` (the numbers: kernel errors against their tolerances and
timings, run.json's timings and kernels, seconds per step against diffusers' pipeline, per-test outcomes);
`not_shown_on_one_gpu` names what only several GPUs can show, which no step here claims.

On a machine without CUDA, `--allow-cpu` runs the steps a CPU can run on small shapes and marks the others
not reached; `--rehearse-hang` adds a step that hangs, to show that the check survives one
(tests/e2e/test_gpu_check.py runs both).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SUMMARY, LOG = "gpu_check.json", "gpu_check.log"
# What each call may take, the wheels' install included; the device call's timeout_s (330) leaves a
# minute above it for the machine's transfers, a last kill's grace and the summary.
CALL_TOTAL_S = 280
KILL_GRACE_S = 5.0
# Environment variable every child of a step inherits, set to the step's own value: what finds the
# processes that left the step's process group.
MARKER = "WAN_DIST_GPU_CHECK_STEP"
STEP_LOG_TAIL_BYTES = 2 * 2**20  # per step in gpu_check.log: the device tool brings back 16 MiB a file
PASSED, FAILED, NOT_REACHED = "passed", "failed", "not_reached"
NOT_SHOWN_ON_ONE_GPU = [
    "NCCL point-to-point between GPUs (the stage-split handoff, the ring's send/recv): two ranks on one GPU "
    "run gloo, staged through host memory",
    "sub-groups of an NCCL world (cfg x ulysses x ring meshes on several GPUs)",
    "FSDP2 on NCCL (the two-rank FSDP runs here use gloo)",
    "the expert pipeline (parallel.expert_split) on GPUs: its groups need a GPU each",
    "a lost peer on NCCL (a killed rank, the heartbeat's abort)",
]


# ---------------------------------------------------------------------------------------------------------
# The steps that run inside a child of this script (`--step NAME`): their result is a JSON file.


# What the project imports where the run needs it (xfuser and yunchang lazily, in the attention layer);
# xfuser's attention layer needs triton, which only CUDA builds of torch bring.
PROJECT_IMPORTS = ["wan_dist.run.runner", "wan_dist.parallel.attention", "yunchang", "hydra", "imageio_ffmpeg"]
CUDA_IMPORTS = ["xfuser.core.long_ctx_attention"]


def _import_names(wheels: Path | None) -> list[str]:
    """The package each carried wheel is for (a top-level package or module of the wheel that its
    distribution's name begins with: hydra for hydra_core; not the examples or benchmarks some ship
    beside it), and the project's own imports."""
    names: set[str] = set()
    for wheel in sorted(wheels.glob("*.whl")) if wheels else []:
        distribution = wheel.name.split("-")[0].lower()
        with zipfile.ZipFile(wheel) as archive:
            tops = {n.split("/")[0] for n in archive.namelist() if n.count("/") == 1 and n.endswith("/__init__.py")}
            tops |= {n.removesuffix(".py") for n in archive.namelist() if "/" not in n and n.endswith(".py")}
        names.update(top for top in tops if distribution.startswith(top.lower()))
    return sorted(names - set(PROJECT_IMPORTS)) + PROJECT_IMPORTS


def preflight(allow_cpu: bool, imports: list[str], out: Path) -> dict[str, Any]:
    """Versions, the device, every carried package imported, the host name, ffmpeg, free disk."""
    import importlib

    import torch

    problems: list[str] = []
    cuda = torch.cuda.is_available()
    facts: dict[str, Any] = {"python": sys.version.split()[0], "torch": torch.__version__,
                             "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
                             "cuda_available": cuda, "cpus": len(os.sched_getaffinity(0))}
    if cuda:
        facts.update(device=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                     memory_gib=round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1),
                     nccl=".".join(map(str, torch.cuda.nccl.version())))
    elif not allow_cpu:
        problems.append("torch sees no CUDA device")
    try:
        import triton

        facts["triton"] = triton.__version__
    except ImportError as error:
        facts["triton"] = None
        if cuda:
            problems.append(f"triton: {error}")
    try:
        smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        facts["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        facts["nvidia_smi"] = f"{type(error).__name__}: {error}"
        if cuda:
            problems.append(f"nvidia-smi -L: {error}")
    modules = {}
    for name in imports + (CUDA_IMPORTS if cuda else []):
        try:
            module = importlib.import_module(name)
            modules[name] = {"version": getattr(module, "__version__", None), "file": getattr(module, "__file__", None)}
        except Exception as error:  # every import is tried; each failure is named
            modules[name] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
            problems.append(f"import {name}: {type(error).__name__}: {str(error)[:200]}")
    facts["imports"] = modules
    host = socket.gethostname()
    try:
        facts["host"] = {"name": host, "address": socket.getaddrinfo(host, None)[0][4][0]}
    except OSError as error:
        facts["host"] = {"name": host, "error": str(error)}
        problems.append(f"host name {host!r} does not resolve (torchrun --standalone needs it): {error}")
    try:
        import imageio_ffmpeg

        exe = imageio_ffmpeg.get_ffmpeg_exe()
        version = subprocess.run([exe, "-version"], capture_output=True, text=True, timeout=10)
        facts["ffmpeg"] = version.stdout.splitlines()[0] if version.returncode == 0 else version.stderr[-300:]
        if version.returncode != 0:
            problems.append(f"ffmpeg -version exited {version.returncode}")
    except Exception as error:
        facts["ffmpeg"] = f"{type(error).__name__}: {error}"
        problems.append(f"imageio-ffmpeg's binary: {error}")
    disk = {}
    for where in {tempfile.gettempdir(), str(out), str(Path.home())}:
        disk[where] = round(shutil.disk_usage(where).free / 2**30, 1)
    facts["free_disk_gib"] = disk
    # The 1.3B folder (2.8 GB), its run and diffusers' beside it.
    if min(disk.values()) < 8:
        problems.append(f"under 8 GiB free on disk: {disk}")
    if cuda and "wan_dist.parallel.attention" in modules and "error" not in modules["wan_dist.parallel.attention"]:
        from wan_dist.parallel.attention import available_kernels

        facts["kernels"] = available_kernels(torch.device("cuda", 0))
    return {"ok": not problems, "problems": problems, **facts}


# Largest ‖merged − reference‖ / ‖reference‖ each input dtype may give: the inputs' own rounding (bf16's
# 2^-9, fp16's 2^-11, relative) carried through the softmax and the weighted sum, with room for the
# merge's fp32 arithmetic; fp32 inputs meet the kernel's accumulation order, and room is left for a
# memory-efficient kernel that multiplies in TF32 (2^-11).
REL_TOLERANCE = {"float32": 1e-3, "bfloat16": 1.6e-2, "float16": 2e-3}
# (batch, tokens, heads, head dim): Wan 1.3B's self-attention at 480x832x81 (32760 tokens, 12 heads of
# 128), where the kernels are timed and checked; a small shape split into more ring blocks; on a CPU,
# shapes a CPU computes in seconds.
SHAPES = {"cuda": {"real": ((1, 32760, 12, 128), 2), "small": ((1, 4096, 4, 128), 4)},
          "cpu": {"real": ((1, 1000, 3, 64), 2), "small": ((1, 256, 2, 64), 4)}}


def _reference(q, k, v, scale: float, keys: int):
    """Attention over the first `keys` keys in float64, by query chunks (a 32760-token score matrix in
    fp64 would take 100 GB), on the inputs' device."""
    import torch

    k, v = k[:, :keys].double(), v[:, :keys].double()
    chunks = []
    for qc in q.double().split(2048, dim=1):
        scores = torch.einsum("bqhd,bkhd->bhqk", qc, k) * scale
        chunks.append(torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v))
    return torch.cat(chunks, dim=1)


def _merge_blocks(outs: list, lses: list):
    """The ring's merge: each block's output weighted by exp(its LSE - the total LSE), in fp32."""
    import torch

    lse = torch.stack(lses)  # (blocks, B, H, S)
    total = torch.logsumexp(lse, dim=0)
    weights = torch.exp(lse - total).permute(0, 1, 3, 2).unsqueeze(-1)  # (blocks, B, S, H, 1)
    return (torch.stack([o.float() for o in outs]) * weights).sum(0)


def _block_kernels(cuda: bool) -> dict[str, tuple[Callable, list]]:
    """name -> (fn(q, k, v, ...) -> (out, lse) as the ring calls it, the dtypes it is checked in)."""
    import functools

    import torch

    from wan_dist.parallel.attention import _attention_with_lse, installed_kernel_libraries

    halves = [torch.bfloat16, torch.float16]
    if not cuda:
        return {"cpu_flash": (functools.partial(_attention_with_lse, kernel="sdpa"), [torch.float32, torch.bfloat16]),
                "masked": (functools.partial(_attention_with_lse, masked=True), [torch.float32, torch.bfloat16])}
    installed = installed_kernel_libraries()
    kernels = {"sdpa_flash": (functools.partial(_attention_with_lse, kernel="sdpa"), halves),
               "efficient": (functools.partial(_attention_with_lse, kernel="sdpa"), [torch.float32]),
               "masked": (functools.partial(_attention_with_lse, masked=True), [torch.bfloat16, torch.float32])}
    if "cudnn" in installed:
        kernels["cudnn"] = (functools.partial(_attention_with_lse, kernel="cudnn"), halves)
    for name, library, attn in (("fa2", "flash_attn", "FA"), ("fa3", "flash_attn_3", "FA3")):
        if library in installed:
            from yunchang.kernels import AttnType, select_flash_attn_impl

            kernels[name] = (select_flash_attn_impl(getattr(AttnType, attn), stage="fwd-only"), halves)
    return kernels


def _call(fn, q, k, v, scale: float):
    return fn(q, k, v, dropout_p=0.0, softmax_scale=scale, causal=False, window_size=(-1, -1), softcap=0.0,
              alibi_slopes=None, return_softmax=False)[:2]


def _seconds(fn, cuda: bool, repeats: int = 10) -> float:
    """Median seconds of `fn` after three warm-up calls: CUDA events on a GPU, the host clock on a CPU."""
    import statistics

    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def kernels(allow_cpu: bool) -> dict[str, Any]:
    """Every block kernel and dtype: the keys split into ring blocks, merged by their log-sum-exp and held
    against float64 attention at the small shape and at the timed real shape (masked keys too); each
    kernel timed at the real shape, and torch's flash op at head dim 136 (a head dim widened for a mask)."""
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not allow_cpu:
        return {"ok": False, "problems": ["no CUDA device"]}
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp64 reference's einsums must not round
    table = _block_kernels(cuda)
    rows, problems = [], []
    for size, (shape, ring) in SHAPES[device.type].items():
        batch, seq, heads, head_dim = shape
        gen = torch.Generator(device).manual_seed(0)
        q, k, v = (torch.randn(shape, generator=gen, device=device) for _ in range(3))
        scale = head_dim**-0.5
        padded = 5  # the last keys are padding in the masked runs
        expected = {False: _reference(q, k, v, scale, seq), True: _reference(q, k, v, scale, seq - padded)}
        for name, (fn, dtypes) in table.items():
            masked = name == "masked"
            for dtype in dtypes:
                row = {"kernel": name, "dtype": str(dtype).removeprefix("torch."), "shape": list(shape),
                       "size": size, "ring": ring, "tolerance": REL_TOLERANCE[str(dtype).removeprefix("torch.")]}
                try:
                    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
                    if masked:
                        kd = kd.clone()
                        kd[:, seq - padded:] = float("nan")
                    outs, lses = [], []
                    for kb, vb in zip(kd.chunk(ring, dim=1), vd.chunk(ring, dim=1), strict=True):
                        out, lse = _call(fn, qd, kb, vb, scale)
                        outs.append(out)
                        lses.append(lse.float().reshape(batch, heads, seq))
                    merged, ref = _merge_blocks(outs, lses).double(), expected[masked]
                    rel = float((merged - ref).norm() / ref.norm())
                    finite = bool(merged.isfinite().all())
                    row.update(rel_err=rel, max_abs_err=float((merged - ref).abs().max()), finite=finite,
                               ok=finite and rel <= row["tolerance"])
                    if size == "real" and dtype != torch.float32:
                        seconds = _seconds(lambda: _call(fn, qd, kd, vd, scale), cuda)
                        flops = 4 * batch * heads * seq * seq * head_dim
                        row.update(ms=round(seconds * 1e3, 3), tflops=round(flops / seconds / 1e12, 1))
                    del outs, lses, merged
                except Exception as error:  # recorded; the other kernels still run
                    row.update(ok=False, error=f"{type(error).__name__}: {str(error)[:300]}")
                if not row["ok"]:
                    problems.append(f"{name} {row['dtype']} at {shape}: " + (
                        row.get("error") or f"rel err {row['rel_err']:.2e} > {row['tolerance']:.0e}"
                        + ("" if row["finite"] else ", not finite")))
                rows.append(row)
        del q, k, v, expected
    if cuda:
        shape = (*SHAPES["cuda"]["real"][0][:3], 136)
        q, k, v = (torch.randn(shape, device=device, dtype=torch.bfloat16) for _ in range(3))
        try:
            seconds = _seconds(lambda: _call(table["sdpa_flash"][0], q, k, v, 128**-0.5), cuda)
            rows.append({"kernel": "sdpa_flash, head dim widened to 136", "shape": list(shape), "ok": True,
                         "ms": round(seconds * 1e3, 3)})
        except Exception as error:
            rows.append({"kernel": "sdpa_flash, head dim widened to 136", "ok": False, "error": str(error)[:300]})
            problems.append(f"flash op at head dim 136: {error}")
    return {"ok": not problems, "problems": problems, "device": str(device), "rows": rows}


def hang(result: Path) -> None:
    """A step that never ends, as a stuck torchrun would leave it: a worker in a session of its own that
    ignores SIGTERM, which only the marker finds and only SIGKILL ends."""
    worker = subprocess.Popen([sys.executable, "-c", "import signal, threading; "
                               "signal.signal(signal.SIGTERM, signal.SIG_IGN); threading.Event().wait()"],
                              start_new_session=True)
    result.write_text(json.dumps({"ok": False, "pids": [os.getpid(), worker.pid]}))
    worker.wait()


CHILD_STEPS = {"preflight", "kernels", "hang"}


# ---------------------------------------------------------------------------------------------------------
# The orchestration: each step a child in its own session, within its budget, and nothing left behind.


@dataclass
class Child:
    """One child's end: its exit code (None when it was stopped at its timeout), its seconds, its log,
    the processes of its step that were still running when it ended or timed out (and were signalled),
    and those still alive after the kill (none, unless something refuses to die)."""

    code: int | None
    seconds: float
    log: Path
    killed: list[int]
    survivors: list[int]

    @property
    def timed_out(self) -> bool:
        return self.code is None

    def says(self, text: str) -> bool:
        return text in self.log.read_text(errors="replace")


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _step_processes(marker: str, root_pid: int) -> dict[int, Any]:
    """The step's processes: the root's descendants, and every process whose environment carries the
    step's marker (a worker that started a session of its own, whose parent may be gone)."""
    import psutil

    found: dict[int, Any] = {}
    try:
        root = psutil.Process(root_pid)
        found = {p.pid: p for p in [root, *root.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for proc in psutil.process_iter():
        if proc.pid in found or proc.pid == os.getpid():
            continue
        try:
            if proc.environ().get(MARKER) == marker:
                found[proc.pid] = proc
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return {pid: proc for pid, proc in found.items() if _alive(proc)}


def end_step(marker: str, root_pid: int, grace_s: float = KILL_GRACE_S) -> tuple[list[int], list[int]]:
    """SIGTERM to every process of the step (and to their process groups), SIGKILL after `grace_s` to what
    is left; the pids signalled, and those still alive after that."""
    import psutil

    own_group = os.getpgrp()
    signalled: set[int] = set()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        procs = _step_processes(marker, root_pid)
        if not procs:
            return sorted(signalled), []
        signalled.update(procs)
        groups = set()
        for proc in procs.values():
            try:
                groups.add(os.getpgid(proc.pid))
            except ProcessLookupError:
                pass
        for group in groups - {own_group}:
            try:
                os.killpg(group, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in procs.values():
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in procs.values()):
            psutil.wait_procs([p for p in procs.values() if _alive(p)], timeout=min(0.5, grace_s))
    return sorted(signalled), sorted(_step_processes(marker, root_pid))


def run_child(name: str, cmd: list[str], env: dict[str, str], timeout_s: float, logs: Path) -> Child:
    """`cmd` in a session of its own, output to logs/<name>.log, stopped at `timeout_s`; then nothing of
    it is left running."""
    marker = f"{os.getpid()}:{name}"
    log = logs / f"{name}.log"
    began = time.monotonic()
    with log.open("wb") as sink:
        sink.write(f"$ {' '.join(cmd)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**env, MARKER: marker}, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            code: int | None = proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            code = None
        # Also after a clean exit: a worker or a forked rank may outlive its parent.
        killed, survivors = end_step(marker, proc.pid)
        proc.wait()
    return Child(code, round(time.monotonic() - began, 1), log, [pid for pid in killed if pid != proc.pid], survivors)


@dataclass(frozen=True)
class Step:
    """A step of a call: how long it may take at most (`cap_s`), the least time worth starting it with
    (`min_s`), and how it runs: `launch(ctx)` gives the command and the verdict on its Child."""

    name: str
    cap_s: float
    min_s: float
    what: str
    launch: Callable[[Context], tuple[list[str], Callable[[Child], dict[str, Any]]]]
    needs_cuda: bool = False
    needs_wheels: bool = False


@dataclass
class Context:
    work: Path
    out: Path
    env: dict[str, str]
    cuda: bool
    allow_cpu: bool
    wheels: Path | None
    site: Path


def _verdict(ok: bool, why: str, **details: Any) -> dict[str, Any]:
    return {"status": PASSED if ok else FAILED, "why": why, "details": details}


def _this(*args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *args]


def _child_step(step: str, *extra: str) -> Callable[[Context], tuple[list[str], Callable]]:
    """A step that runs `--step <step>` of this script and reports through its result file."""

    def launch(ctx: Context):
        result = ctx.work / f"{step}.json"
        cmd = _this("--step", step, "--result", str(result), "--out", str(ctx.out),
                    *(["--allow-cpu"] if ctx.allow_cpu else []), *extra)
        if step == "preflight":
            cmd += ["--imports", ",".join(_import_names(ctx.wheels))]

        def verdict(child: Child) -> dict[str, Any]:
            if not result.exists():
                return _verdict(False, f"exited {child.code} without a result")
            found = json.loads(result.read_text())
            problems = found.pop("problems", [])
            ok = bool(found.pop("ok")) and child.code == 0
            return _verdict(ok, "; ".join(problems)[:400] or ("ok" if ok else f"exited {child.code}"), **found)

        return cmd, verdict

    return launch


def _wheels(ctx: Context):
    files = sorted(str(p) for p in ctx.wheels.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
           "--no-cache-dir", "--upgrade", "--target", str(ctx.site), *files]
    return cmd, lambda child: _verdict(child.code == 0, f"{len(files)} wheels into {ctx.site}" if child.code == 0
                                       else f"pip exited {child.code}", wheels=[Path(f).name for f in files])


def _wheels_step(cap_s: float) -> Step:
    return Step("wheels", cap_s, 5, "install the carried wheels into a folder of their own", _wheels, needs_wheels=True)


def _torchrun(ctx: Context, name: str, overrides: list[str]) -> list[str]:
    # --local_addr: the agent's own address, so that a host name that does not resolve stops nothing.
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--standalone",
            "--local_addr=127.0.0.1", "launch/generate.py", "parallel.timeout_s=60",
            f"output.dir={ctx.work / name}", f"hydra.run.dir={ctx.work / name}-hydra", *overrides]


def _run_json_verdict(ctx: Context, name: str, child: Child, **expect: Any) -> dict[str, Any]:
    """A run that must succeed: its exit code, its run.json, and in it what `expect` names."""
    path = ctx.work / name / "run.json"
    if child.code != 0 or not path.exists():
        return _verdict(False, f"exited {child.code}" + ("" if path.exists() else ", no run.json"))
    report = json.loads(path.read_text())
    details = {"backend": report.get("backend"), "device": report["plan"]["device"],
               "kernels": report["plan"]["kernels"], "timings": report["timings"],
               "peak_bytes": [m.get("peak_bytes") for m in report["memory"]]}
    wrong = {k: (details.get(k), v) for k, v in expect.items() if details.get(k) != v}
    steps = details["timings"].get("steps_s") or []
    found = (f"{details['backend']} on {details['device']}, kernels {sorted(set(details['kernels'].values()))}, "
             f"{len(steps)} steps, {details['timings'].get('total_s', 0):.1f} s in all")
    return _verdict(not wrong, found if not wrong else f"run.json: {wrong} (found, expected)", **details)


def _tiny_run(name: str, *overrides: str) -> Callable[[Context], tuple[list[str], Callable]]:
    def launch(ctx: Context):
        expect = {"backend": "nccl", "device": "cuda"} if ctx.cuda else {"backend": "gloo"}
        return (_torchrun(ctx, name, ["height=48", "width=80", "num_frames=9", "steps=3", *overrides]),
                lambda child: _run_json_verdict(ctx, name, child, **expect))

    return launch


REFUSAL = "error: parallel.cfg_degree=2 is not allowed"


def _refused(ctx: Context):
    # Refused in one line before any weight is read: the rank exits 2, torchrun 1.
    def verdict(child: Child) -> dict[str, Any]:
        said = child.says(REFUSAL)
        return _verdict(child.code == 1 and said, f"exited {child.code}, {'said' if said else 'did not say'} "
                                                  f"{REFUSAL!r}")

    return _torchrun(ctx, "refused", ["parallel=cfg"]), verdict


def _bench(ctx: Context):
    out = ctx.work / "bench"
    cmd = [sys.executable, "launch/bench.py", "--model", "t2v_1_3b", "--nproc", "1", "--layouts", "single",
           "diffusers", "--out", str(out), "--", "steps=4"]

    def verdict(child: Child) -> dict[str, Any]:
        found = sorted(out.glob("*/bench.json"))
        if child.code != 0 or not found:
            return _verdict(False, f"exited {child.code}" + ("" if found else ", no bench.json"))
        report = json.loads(found[-1].read_text())
        results = {r["name"]: {k: r.get(k) for k in ("ok", "step_s", "total_s", "error")} for r in report["results"]}
        runs = sorted(out.glob("**/run.json"))
        run = json.loads(runs[-1].read_text()) if runs else {}
        ours, theirs = results.get("single", {}), results.get("diffusers", {})
        ok = bool(ours.get("ok") and theirs.get("ok") and ours.get("step_s") and theirs.get("step_s"))
        why = (f"{ours['step_s']:.2f} s per step, diffusers {theirs['step_s']:.2f} s "
               f"({theirs['step_s'] / ours['step_s']:.2f}x)" if ok else f"results: {results}")
        return _verdict(ok, why, size=report["size"], steps=report["steps"], device=report["device"],
                        results=results, peak=report.get("peak"),
                        run_json={k: run.get(k) for k in ("timings", "backend")} | {
                            "kernels": run.get("plan", {}).get("kernels"),
                            "peak_bytes": [m.get("peak_bytes") for m in run.get("memory", [])]})

    return cmd, verdict


def junit_outcomes(path: Path) -> dict[str, str]:
    """test id -> passed / failed / error / skipped, from pytest's junit XML."""
    outcomes = {}
    for case in ElementTree.parse(path).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kinds), "passed")
        outcomes[f"{case.get('classname')}::{case.get('name')}"] = {"failure": "failed"}.get(outcome, outcome)
    return outcomes


_VERBOSE_LINE = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.MULTILINE)


def verbose_outcomes(log: str) -> dict[str, str]:
    """test id -> outcome from `pytest -v`'s lines: what a pytest stopped at its step's timeout (which
    writes no junit XML) had finished; "error" at teardown follows a test's own line."""
    outcomes: dict[str, str] = {}
    for test, outcome in _VERBOSE_LINE.findall(log):
        outcomes[test] = "error" if outcome == "ERROR" else outcomes.get(test, outcome.lower())
    return outcomes


def _pytest(name: str, paths: list[str], *extra: str) -> Callable[[Context], tuple]:
    """pytest on `paths`, verbose, each test stopped at PER_TEST_S (pytest-timeout), junit XML in --out."""

    def launch(ctx: Context):
        junit = ctx.out / f"junit_{name}.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "-rA", "-p", "no:cacheprovider", f"--junitxml={junit}",
               f"--timeout={PER_TEST_S}", *extra, *paths]

        def verdict(child: Child) -> dict[str, Any]:
            if junit.exists():
                outcomes = junit_outcomes(junit)
            else:
                outcomes = verbose_outcomes(child.log.read_text(errors="replace"))
                outcomes["(unfinished)"] = "no junit report: the tests after the last one named did not finish"
            failed = sorted(t for t, o in outcomes.items() if o in ("failed", "error"))
            counts = {o: list(outcomes.values()).count(o) for o in sorted(set(outcomes.values())) if " " not in o}
            ok = child.code == 0 and junit.exists() and not failed and counts.get("passed", 0) > 0
            return _verdict(ok, f"pytest exited {child.code}, {counts}"
                            + (f"; failed: {', '.join(failed)}"[:400] if failed else ""), tests=outcomes)

        return cmd, verdict

    return launch


def _hang(ctx: Context):
    result = ctx.work / "hang.json"
    cmd, _ = _child_step("hang")(ctx)
    # It cannot pass: it ends only by its timeout. Its pids are kept, for a test to see them gone.
    return cmd, lambda child: _verdict(False, "it returned", pids=json.loads(result.read_text())["pids"])


# Per-test cap inside pytest's steps: a hung test fails alone, the next ones still run.
PER_TEST_S = 60
# tests/gpu's files for the tests_gpu step, the quick ones first; the two-rank and memory tests are steps
# of their own.
GPU_TESTS = ["tests/gpu/test_gloo_cuda.py", "tests/gpu/test_offload_cuda.py", "tests/gpu/test_attention_cuda.py",
             "tests/gpu/test_generate_cuda.py"]
# The plans. Each call: its steps in order, with their caps and minimums in seconds; the caps of a call
# add up to less than CALL_TOTAL_S (tests/e2e/test_gpu_check.py holds them to it).
CALLS: dict[int, list[Step]] = {
    1: [
        _wheels_step(25),
        Step("preflight", 20, 5, "versions, nvidia-smi -L, every carried package imports, host name, ffmpeg, disk",
             _child_step("preflight")),
        Step("kernels", 30, 10, "LSE merge of every kernel and dtype against fp64 at the real and a small shape; "
             "kernel times at the 1.3B's 480p self-attention", _child_step("kernels")),
        Step("torchrun", 40, 20, "the entry point under torchrun, nccl, the tiny model", _tiny_run("torchrun")),
        Step("refused", 20, 15, "a config torchrun's rank refuses in one line (parallel=cfg on one rank)", _refused),
        Step("bench", 130, 80, "the 1.3B (random bf16 weights) at 480x832x81, 4 steps, against diffusers' "
             "pipeline on the same GPU", _bench, needs_cuda=True),
    ],
    2: [
        _wheels_step(20),
        Step("two_ranks", 70, 30, "two gloo ranks on the one GPU against one rank, one world per layout",
             _pytest("two_ranks", ["tests/gpu/test_two_ranks_one_gpu.py"]), needs_cuda=True),
        Step("tests_gpu", 70, 30, "tests/gpu but what the other steps run, each test within its cap",
             _pytest("tests_gpu", GPU_TESTS, "-k", "not compiled"), needs_cuda=True),
        Step("compile", 45, 25, "compile=true with cuDNN and SDPA against diffusers, their kernels asserted",
             _pytest("compile", ["tests/gpu/test_generate_cuda.py"], "-k", "compiled"), needs_cuda=True),
        Step("memory", 70, 40, "the memory model against CUDA's peak, the 1.3B at 480x832x5",
             _pytest("memory", ["tests/gpu/test_memory_cuda.py"], "-k", "single or fp8"), needs_cuda=True),
    ],
}
# A step that never ends, given all the time left: what comes after it is not reached, whatever the machine's
# speed (the rehearsal's steps before it take what a loaded CPU gives them).
REHEARSAL_HANG = Step("hang", CALL_TOTAL_S, 3, "a step that never ends (--rehearse-hang)", _hang)


def plan(call: int, rehearse_hang: bool) -> list[Step]:
    steps = list(CALLS[call])
    if rehearse_hang:
        steps.insert(next(i for i, s in enumerate(steps) if s.name == "kernels") + 1, REHEARSAL_HANG)
    return steps


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _append_log(out: Path, name: str, log: Path) -> None:
    size = log.stat().st_size
    with log.open("rb") as source, (out / LOG).open("ab") as sink:
        sink.write(f"\n===== {name} =====\n".encode())
        if size > STEP_LOG_TAIL_BYTES:
            source.seek(size - STEP_LOG_TAIL_BYTES)
            sink.write(f"[first {size - STEP_LOG_TAIL_BYTES} bytes left out]\n".encode())
        shutil.copyfileobj(source, sink)


def _environment(site: Path | None) -> dict[str, str]:
    # The repository first: xfuser's wheel also installs a top-level `tests` package.
    paths = [str(ROOT), *([str(site)] if site else []), *filter(None, [os.environ.get("PYTHONPATH")])]
    cpus = len(os.sched_getaffinity(0))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
           # The CPU text encoder and the builders get the machine's cores (make exports 1 per rank).
           "OMP_NUM_THREADS": str(cpus), "TOKENIZERS_PARALLELISM": "false"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    return env


def run_call(call: int, out: Path, wheels: Path | None, *, allow_cpu: bool = False, rehearse_hang: bool = False,
             total_s: float = CALL_TOTAL_S, cap_scale: float = 1.0, clock: Callable[[], float] = time.monotonic) -> int:
    """Run one call's steps within `total_s`, each within its cap times `cap_scale`; the summary after
    every step; 1 if any step failed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / LOG).write_bytes(b"")
    start = clock()
    work = Path(tempfile.mkdtemp(prefix="wan_dist_gpu_check_"))
    (work / "logs").mkdir()
    site = work / "site"
    have_wheels = wheels is not None and any(wheels.glob("*.whl"))
    env = _environment(site if have_wheels else None)
    cuda = _cuda_available(env)
    ctx = Context(work=work, out=out, env=env, cuda=cuda, allow_cpu=allow_cpu, wheels=wheels if have_wheels else None,
                  site=site)
    steps = plan(call, rehearse_hang)
    records = [{"name": s.name, "what": s.what, "cap_s": s.cap_s, "status": "pending"} for s in steps]
    summary: dict[str, Any] = {
        "call": call, "total_s": total_s, "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cuda": cuda, "python": sys.version.split()[0], "steps": records, "not_shown_on_one_gpu": NOT_SHOWN_ON_ONE_GPU}

    def save() -> None:
        summary["elapsed_s"] = round(clock() - start, 1)
        summary["failed"] = [r["name"] for r in records if r["status"] == FAILED]
        _write_atomically(out / SUMMARY, json.dumps(summary, indent=1, default=str) + "\n")

    save()
    print(f"[gpu_check] call {call}: {len(steps)} steps in {total_s:.0f} s, summary in {out / SUMMARY}", flush=True)
    for step, record in zip(steps, records, strict=True):
        left = total_s - (clock() - start)
        budget = min(step.cap_s * cap_scale, left - KILL_GRACE_S)
        if step.needs_wheels and not have_wheels:
            record.update(status=NOT_REACHED, why="no --wheels given: this python's own packages are used")
        elif step.needs_cuda and not cuda:
            record.update(status=NOT_REACHED, why="needs a CUDA device")
        elif budget < step.min_s:
            record.update(status=NOT_REACHED, why=f"{max(budget, 0):.0f} s left of {total_s:.0f} (after a kill's "
                                                  f"{KILL_GRACE_S:.0f} s grace), it needs at least {step.min_s:.0f} s")
        else:
            cmd, verdict = step.launch(ctx)
            child = run_child(step.name, cmd, env, budget, work / "logs")
            record.update(budget_s=round(budget, 1), seconds=child.seconds, exit=child.code)
            if child.killed:
                record["killed"] = child.killed  # left running by the step, ended by the check
            if child.survivors:
                record["survivors"] = child.survivors
            try:
                outcome = verdict(child)
            except Exception as error:  # a verdict that cannot read its outputs fails its step alone
                outcome = _verdict(False, f"its outputs could not be read: {type(error).__name__}: {error}")
            if child.timed_out:
                outcome.update(status=FAILED, why=f"timed out after {budget:.0f} s (cap {step.cap_s * cap_scale:.0f} "
                                                  f"s); {outcome['why']}")
            if child.survivors:
                outcome.update(status=FAILED, why=f"processes {child.survivors} outlived the step; {outcome['why']}")
            record.update(outcome)
            _append_log(out, step.name, child.log)
        print(f"[gpu_check] {step.name}: {record['status'].replace('_', ' ')}"
              + (f" ({record['seconds']} s of {record['budget_s']} s)" if "seconds" in record else "")
              + f": {record['why']}", flush=True)
        save()
    shutil.rmtree(work, ignore_errors=True)
    print(f"[gpu_check] {sum(r['status'] == PASSED for r in records)} passed, {len(summary['failed'])} failed "
          f"({', '.join(summary['failed']) or 'none'}), {sum(r['status'] == NOT_REACHED for r in records)} not "
          f"reached, {summary['elapsed_s']} s; not shown on one GPU: {len(NOT_SHOWN_ON_ONE_GPU)} items "
          f"(the summary lists them)", flush=True)
    return 1 if summary["failed"] else 0


def _cuda_available(env: dict[str, str]) -> bool:
    """Asked of a child: this process keeps CUDA uninitialised, and torch may only import after the wheels."""
    try:
        probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"], env=env,
                               capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return False  # preflight then says what is wrong
    return probe.stdout.strip().endswith("True")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--call", type=int, choices=sorted(CALLS), default=1)
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "gpu_check_out"))
    parser.add_argument("--wheels", type=Path, default=None, help="install these wheels first (make gpu-wheels)")
    parser.add_argument("--allow-cpu", action="store_true", help="run what a CPU can, on small shapes")
    parser.add_argument("--rehearse-hang", action="store_true", help="add a step that hangs (CI's rehearsal)")
    parser.add_argument("--total-s", type=float, default=CALL_TOTAL_S, help="the call's total (a rehearsal's "
                        "shorter clock)")
    parser.add_argument("--cap-scale", type=float, default=1.0, help="every step's cap times this (a loaded CPU "
                        "rehearsing)")
    parser.add_argument("--step", choices=sorted(CHILD_STEPS), help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--imports", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.step == "preflight":
        args.result.write_text(json.dumps(preflight(args.allow_cpu, args.imports.split(","), args.out), default=str))
    elif args.step == "kernels":
        args.result.write_text(json.dumps(kernels(args.allow_cpu)))
    elif args.step == "hang":
        hang(args.result)
    else:
        return run_call(args.call, args.out, args.wheels, allow_cpu=args.allow_cpu, rehearse_hang=args.rehearse_hang,
                        total_s=args.total_s, cap_scale=args.cap_scale)
    return 0


if __name__ == "__main__":
    sys.exit(main())
