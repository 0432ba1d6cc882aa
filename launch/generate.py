"""Generate Wan videos on one or more ranks: config, then the plan, then this rank's stages.

    python launch/generate.py prompt="..."                         # a world of one
    torchrun --nproc_per_node=2 launch/generate.py prompt="..."    # two ranks, split chosen by parallel=
    srun -K python launch/generate.py ...                          # Slurm, one task per GPU
    python launch/generate.py -m parallel=single,cfg               # a sweep: each job its own torchrun world
    python launch/generate.py dry_run=true ...                     # print the plan, write plan.json, stop
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import tempfile
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_dist.run.allocator import keep_freed_host_memory  # noqa: E402
from wan_dist.run.cpu_affinity import pin_cpu_rank  # noqa: E402
from wan_dist.plan.checks import validate_run  # noqa: E402
from wan_dist.config.schema import RunConfig, register_configs  # noqa: E402
from wan_dist.config.errors import ConfigError  # noqa: E402
from wan_dist.config.hydra_errors import check_schema_keys, composition_error_line  # noqa: E402
from wan_dist.plan.job import write_plan  # noqa: E402
from wan_dist.run.runner import generate, plan_job  # noqa: E402
from wan_dist.parallel.session import PeerLostError, Terminated, distributed_session, raise_terminated, rank_env  # noqa: E402
from wan_dist.run.sweep import shared_embedding_cache  # noqa: E402

log = logging.getLogger("wan_dist")
register_configs()


def _quiet_other_ranks(rank: int) -> None:
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
        os.environ.setdefault("TQDM_DISABLE", "1")
    for noisy in ("diffusers", "transformers", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def say_error(message: str) -> None:
    """`error: <message>` on stderr in one write: the ranks of a run often fail at the same moment into one
    stream, and print() writes the text and its newline separately, so two ranks' lines could merge."""
    sys.stderr.write(f"error: {message}\n")
    sys.stderr.flush()


def _end_hung_rank(rank: int):
    """What a rank does when a lost peer holds its main thread in a wait nothing interrupts: say so and end
    (the outputs are written to temp files renamed when whole, so nothing half-written stays)."""
    def end(message: str) -> None:
        say_error(f"rank {rank}: {message}")
        os._exit(1)
    return end


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    # What the imports made lives as long as the process: kept out of the collector's scans, so that the
    # stages' gc.collect() between phases (what frees a released model's memory) costs milliseconds.
    gc.freeze()
    env = rank_env()
    _quiet_other_ranks(env.rank)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        check_schema_keys(cfg)
        run: RunConfig = OmegaConf.to_object(cfg)
        hydra_cfg = HydraConfig.get()
        if run.embedding_cache is None and hydra_cfg.mode == RunMode.MULTIRUN:
            # Jobs run in this process or by another launcher (submitit) share one cache per sweep, as the
            # torchrun launcher's jobs do: each prompt is encoded once.
            run.embedding_cache = str(shared_embedding_cache(hydra_cfg.sweep.dir))
        validate_run(run)
        if run.parallel.pin_cpus and not torch.cuda.is_available():
            # Before the process group starts its threads, so that they inherit the rank's cores.
            pin_cpu_rank(env.local_rank, env.local_world_size, torch.get_num_threads())
        with distributed_session(
            timeout_s=run.parallel.timeout_s, env=env, on_hang=_end_hung_rank(env.rank),
            store_prefix=f"wan_dist/job{OmegaConf.select(hydra_cfg, 'job.num', default=0)}",
        ) as session:
            # What the user named is kept; on a GPU the planner fills the rest to fit it. Hydra resolves its
            # run dir per process (the clock differs by rank): rank 0's is the one.
            plan = plan_job(run, session, given=list(hydra_cfg.overrides.task),
                            out_dir=hydra_cfg.runtime.output_dir)
            if session.rank == 0:
                log.info("%d rank(s): %s; outputs in %s", session.world_size, plan.dims.describe(), plan.out_dir)
            # Process-wide, so decided here, by the program, and before any weight is read. Sharded, the
            # blocks FSDP gathers and frees every step are the memory sharding is for: they go back to
            # the kernel as glibc returns them by default (README, Memory).
            if not plan.fsdp:
                keep_freed_host_memory()
            if run.dry_run:
                if session.rank == 0:
                    print(plan.table(), flush=True)
                    write_plan(plan, plan.out_dir / "plan.json")
                    log.info("dry run: plan written to %s; no weight was read", plan.out_dir / "plan.json")
                return
            generate(plan, session)
    except ConfigError as error:
        say_error(str(error))
        sys.exit(2)
    except OmegaConfBaseException as error:
        say_error(composition_error_line(error, sys.argv[1:]))
        sys.exit(2)
    except PeerLostError as error:
        say_error(f"rank {env.rank}: {error}")
        sys.exit(1)
    except (KeyboardInterrupt, Terminated) as stop:
        signum = stop.signum if isinstance(stop, Terminated) else signal.SIGINT
        say_error(f"rank {env.rank} stopped by {signal.Signals(signum).name}; no output was left half-written")
        sys.exit(128 + signum)


if __name__ == "__main__":
    rank = rank_env().rank
    if rank != 0:
        # Rank 0's run dir is the one every rank writes to (agreed in main); the others' Hydra dirs
        # would only be stray folders (their clocks may resolve ${now:} differently), so park them.
        parked = Path(tempfile.gettempdir()) / "wan_dist_hydra" / f"rank{rank}"
        sys.argv += ["hydra.output_subdir=null", f"hydra.run.dir={parked}", f"hydra.sweep.dir={parked}"]
    # Hydra prints its own composition errors (a misspelt key, an unknown preset, a wrong type) over
    # several lines and exits 1; have it raise them instead, to be said in one line like any bad value.
    # HYDRA_FULL_ERROR=1 set by the user still shows the full traceback.
    full_error = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        main()
    except (HydraException, OmegaConfBaseException) as error:
        if full_error:
            raise
        say_error(composition_error_line(error, sys.argv[1:]))
        sys.exit(2)
