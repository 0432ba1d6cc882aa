"""A Hydra launcher that gives every job of a multirun its own torchrun world on this machine.

Hydra's basic launcher runs the jobs inside the sweeping process, so they all share one world size; here
each job is `torchrun --standalone --nproc_per_node=N <the app> <its overrides> hydra.run.dir=<its sweep
subdir>`, one after the other, with N from the job's parallel degrees (or fixed per sweep). Select it with
`hydra/launcher=torchrun` (the default of conf/generate.yaml).
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

log = logging.getLogger(__name__)


class JobFailed(RuntimeError):
    """A job's torchrun exited non-zero; the sweep reports it and exits non-zero."""


class TorchrunLauncher(Launcher):
    def __init__(self, nproc_per_node: int | str = "auto", default_nproc: int = 2,
                 share_embedding_cache: bool = True, before_job: str | None = None) -> None:
        """`nproc_per_node`: ranks for every job, or `auto`: the world size the job's parallel degrees pin
        down (`parallel=single`: 1, `parallel=cfg`: 2), else `default_nproc`.
        `share_embedding_cache`: jobs that set no `embedding_cache` share one in the sweep dir.
        `before_job`: `module:function` called as function(job_dir, nproc) right before each job starts
        (the bench measures the machine's parallel ceiling there)."""
        if not (nproc_per_node == "auto" or (isinstance(nproc_per_node, int) and nproc_per_node > 0)):
            raise ValueError(f"hydra.launcher.nproc_per_node={nproc_per_node!r} is not allowed: auto or a "
                             "positive integer")
        if not (isinstance(default_nproc, int) and default_nproc > 0):
            raise ValueError(f"hydra.launcher.default_nproc={default_nproc!r} is not allowed: a positive integer")
        self.nproc_per_node = nproc_per_node
        self.default_nproc = default_nproc
        self.share_embedding_cache = share_embedding_cache
        self.before_job = _import_callable(before_job) if before_job else None
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from wan_dist.parallel.session import rank_env

        if rank_env().launcher != "python":
            # Already one rank of a torchrun/srun world (`torchrun ... generate.py -m ...`): starting
            # worlds from every rank would multiply them, so the jobs run in this world, as Hydra's basic
            # launcher runs them.
            from hydra._internal.core_plugins.basic_launcher import BasicLauncher

            inner = BasicLauncher()
            inner.setup(hydra_context=self.hydra_context, task_function=self.task_function, config=self.config)
            return inner.launch(job_overrides, initial_job_idx)

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        log.info("Launching %d jobs locally, one torchrun each", len(job_overrides))
        returns = [self._run_job(initial_job_idx + i, list(overrides)) for i, overrides in enumerate(job_overrides)]
        failed = [r for r in returns if r.status == JobStatus.FAILED]
        if failed:
            log.error("%d of %d jobs failed", len(failed), len(returns))
            # Hydra's sweeper raises on a failed job before the end-of-sweep callbacks run, so the summary
            # of what did finish is written here.
            from wan_dist.run.sweep import write_summary

            write_summary(self.config.hydra.sweep.dir)
        return returns

    def _run_job(self, idx: int, overrides: list[str]) -> JobReturn:
        from wan_dist.run.sweep import record_job, shared_embedding_cache

        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        # The subdir may interpolate ${hydra.job.num} and friends, resolved against this job's config.
        HydraConfig.instance().set_config(sweep_config)
        job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
        job_dir.mkdir(parents=True, exist_ok=True)
        nproc = self._nproc(sweep_config)
        args = list(overrides)
        if self.share_embedding_cache and OmegaConf.select(sweep_config, "embedding_cache") is None:
            args.append(f"embedding_cache={shared_embedding_cache(sweep_config.hydra.sweep.dir).resolve()}")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               os.path.abspath(sys.argv[0]), f"--config-name={sweep_config.hydra.job.config_name}",
               *_config_search_args(sweep_config), *args, f"hydra.run.dir={job_dir.resolve()}"]
        log.info("\t#%d : %s (%d rank%s)", idx, " ".join(filter_overrides(overrides)), nproc, "s"[: nproc != 1])
        record_job(job_dir, args)
        if self.before_job is not None:
            self.before_job(job_dir, nproc)
        returncode = _tee(cmd, job_dir / "job.log")

        ret = JobReturn(overrides=overrides, hydra_cfg=sweep_config, working_dir=os.getcwd(),
                        task_name=sweep_config.hydra.job.name)
        ret.cfg = OmegaConf.masked_copy(sweep_config, [k for k in sweep_config if k != "hydra"])
        if returncode == 0:
            ret.status, ret.return_value = JobStatus.COMPLETED, None
        else:
            ret.status = JobStatus.FAILED
            ret._return_value = JobFailed(f"job {idx} ({' '.join(overrides)}) failed: torchrun exited with "
                                          f"{returncode}; its log is {job_dir / 'job.log'}")
        return ret

    def _nproc(self, sweep_config: DictConfig) -> int:
        if self.nproc_per_node != "auto":
            return int(self.nproc_per_node)
        from wan_dist.config.schema import ParallelConfig
        from wan_dist.parallel.dims import pinned_world_size

        parallel = OmegaConf.to_object(sweep_config.parallel)
        assert isinstance(parallel, ParallelConfig)
        return pinned_world_size(parallel) or self.default_nproc


def _import_callable(spec: str):
    module, _, name = spec.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"hydra.launcher.before_job={spec!r} is not allowed: a module:function that can be "
                         f"imported ({error})") from None


def _config_search_args(sweep_config: DictConfig) -> list[str]:
    """The sweep's own config search path for the job: the primary config dir (`--config-path` may have
    moved it) and every `--config-dir`, so that a job composes exactly what the sweep composed."""
    args = []
    for source in OmegaConf.select(sweep_config, "hydra.runtime.config_sources", default=None) or []:
        if source.schema != "file":
            continue
        if source.provider == "main":
            args.append(f"--config-path={os.path.abspath(source.path)}")
        elif source.provider == "command-line":
            args.append(f"--config-dir={os.path.abspath(source.path)}")
    return args


def _tee(cmd: list[str], log_path: Path) -> int:
    """Run `cmd`, its output (stdout and stderr) both to this process's stdout and to `log_path`."""
    out = getattr(sys.stdout, "buffer", None)
    with open(log_path, "wb") as log_file, subprocess.Popen(cmd, stdout=subprocess.PIPE,
                                                             stderr=subprocess.STDOUT) as proc:
        # read1: whatever is there, so progress bars (carriage returns, no newline) show as they come.
        for chunk in iter(lambda: proc.stdout.read1(1 << 16), b""):
            log_file.write(chunk)
            if out is not None:
                out.write(chunk)
                out.flush()
    return proc.returncode
