"""Generate Wan2.1 videos on one or more ranks.

    python launch/generate.py prompt="..."                         # a world of one
    torchrun --nproc_per_node=2 launch/generate.py prompt="..."    # two ranks, split chosen by parallel=
    srun -K python launch/generate.py ...                          # Slurm, one task per GPU
    python launch/generate.py -m parallel=single,cfg               # a sweep: each job its own torchrun world
"""

from __future__ import annotations

import logging
import os
import secrets
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from wan_dist.config import ConfigError, RunConfig, register_configs, validate_run  # noqa: E402
from wan_dist.loading import dit_num_heads, model_folder  # noqa: E402
from wan_dist.parallel_dims import resolve_parallel_dims  # noqa: E402
from wan_dist.runner import generate  # noqa: E402
from wan_dist.session import distributed_session, rank_env  # noqa: E402
from wan_dist.sweep import shared_embedding_cache  # noqa: E402

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


@hydra.main(config_path="../conf", config_name="generate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    env = rank_env()
    _quiet_other_ranks(env.rank)
    run: RunConfig = OmegaConf.to_object(cfg)
    hydra_cfg = HydraConfig.get()
    if run.embedding_cache is None and hydra_cfg.mode == RunMode.MULTIRUN:
        # Jobs run in this process or by another launcher (submitit) share one cache per sweep, as the
        # torchrun launcher's jobs do: each prompt is encoded once.
        run.embedding_cache = str(shared_embedding_cache(hydra_cfg.sweep.dir))
    try:
        validate_run(run)
        with distributed_session(
            lambda world: resolve_parallel_dims(run.parallel, world_size=world, num_heads=dit_num_heads(run.model),
                                                guidance_scale=run.guidance_scale),
            timeout_s=run.parallel.timeout_s, env=env,
            store_prefix=f"wan_dist/job{OmegaConf.select(hydra_cfg, 'job.num', default=0)}",
        ) as session:
            # Hydra resolves its run dir per process (the clock differs by rank): rank 0's is the one.
            out_dir = Path(session.agree(run.output.dir or hydra_cfg.runtime.output_dir))
            run.output.dir = str(out_dir)  # recorded in run.json
            # seed=-1 draws one; every rank must draw the same noise, so rank 0's draw is used.
            run.seed = session.agree(run.seed if run.seed >= 0 else secrets.randbelow(2**31))
            if session.rank == 0:
                log.info("%d rank(s): %s; outputs in %s", session.world_size, session.dims.describe(), out_dir)
                model_folder(run.model)  # builds the tiny model once, before the other ranks read it
            session.barrier()
            generate(run, session, out_dir)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    rank = rank_env().rank
    if rank != 0:
        # Rank 0's run dir is the one every rank writes to (agreed in main); the others' Hydra dirs
        # would only be stray folders (their clocks may resolve ${now:} differently), so park them.
        parked = Path(tempfile.gettempdir()) / "wan_dist_hydra" / f"rank{rank}"
        sys.argv += ["hydra.output_subdir=null", f"hydra.run.dir={parked}", f"hydra.sweep.dir={parked}"]
    main()
