"""What fits where, before anything is downloaded or loaded: for each world size and GPU memory, the
lossless layout that fits (the plan's memory model per rank), or that none does.

    python launch/plan.py model=t2v_14b                                   # 1, 2, 4, 8 GPUs of 24, 48, 80 GB
    python launch/plan.py model=t2v_1_3b 'plan.world_sizes=[1,2]' 'plan.gpu_memory_gib=[24]' plan.out=p.json
    python launch/plan.py model=i2v_14b_720p parallel=cfg_usp             # settings given are kept

The same overrides as launch/generate.py, plus `plan.world_sizes` (default [1,2,4,8]), `plan.gpu_memory_gib`
(default [24,48,80]) and `plan.out` (a JSON file). A real preset without `model.path` is planned from its
architecture's shapes alone (a folder of configs and header-only weights, no download). Settings given
explicitly (a preset, degrees, `parallel.fsdp`, `parallel.vae_decode`) are kept; the planner fills only
what is left open, in this order, each step only if the previous does not fit: the `parallel=auto` layout
unsharded; the DiT sharded over the DiT ranks (FSDP2); also the VAE decode in bands over every rank; all
ranks on the sequence axes (usp) instead of a cfg axis, sharded, with the bands; a stage split (the VAE
alone on rank 0) with the DiT sharded; usp with the DiT's blocks streamed from host memory (block offload,
slower but lossless). A layout fits when every rank's predicted peak
is within 90% of the GPU's memory (the rest for the CUDA context and the allocator's fragmentation).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wan_dist.building import ensure_shapes_folder  # noqa: E402
from wan_dist.errors import ConfigError  # noqa: E402
from wan_dist.plan import DeviceFacts, JobPlan, build_plan  # noqa: E402
from wan_dist.presets import MODEL_PRESETS  # noqa: E402

USABLE = 0.9  # of a GPU's memory; the rest for the CUDA context and the allocator's fragmentation
HOPPER = (9, 0)  # the kernels are chosen for an H100-class GPU; memory does not depend on it
DEFAULTS = {"world_sizes": [1, 2, 4, 8], "gpu_memory_gib": [24, 48, 80], "out": None}
# What the planner may add, in order, when the user left the key open: (keys it sets, overrides).
STEPS = (
    ((), []),
    (("parallel.fsdp",), ["parallel.fsdp=true"]),
    (("parallel.fsdp", "parallel.vae_decode"), ["parallel.fsdp=true", "parallel.vae_decode=patch"]),
    # Every rank on the sequence instead of a cfg axis: each holds 1/W of the tokens' activations.
    (("parallel", "parallel.cfg_degree", "parallel.fsdp", "parallel.vae_decode"),
     ["parallel=usp", "parallel.fsdp=true", "parallel.vae_decode=patch"]),
    (("parallel", "parallel.stage_split", "parallel.fsdp"), ["parallel=stage_split", "parallel.fsdp=true"]),
    # Last: the DiT's blocks streamed from host memory (slower, still lossless).
    (("parallel", "parallel.cfg_degree", "model.dit_offload", "parallel.vae_decode"),
     ["parallel=usp", "model.dit_offload=block", "parallel.vae_decode=patch"]),
)


def _split_args(argv: list[str]) -> tuple[list[str], dict]:
    """Hydra overrides, and the planner's own `plan.*` keys."""
    import yaml

    overrides, settings = [], dict(DEFAULTS)
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key.startswith("plan."):
            name = key.removeprefix("plan.")
            if name not in DEFAULTS:
                raise ConfigError(f"{key}={value!r} is not allowed: one of {', '.join('plan.' + k for k in DEFAULTS)}")
            settings[name] = yaml.safe_load(value)
        else:
            overrides.append(arg)
    for name in ("world_sizes", "gpu_memory_gib"):
        values = settings[name]
        if not isinstance(values, list) or not values or not all(isinstance(v, int) and v > 0 for v in values):
            raise ConfigError(f"plan.{name}={values!r} is not allowed: a list of positive integers")
    return overrides, settings


def _compose(overrides: list[str]):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from wan_dist.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        run = OmegaConf.to_object(compose("generate", overrides=overrides))
    preset = MODEL_PRESETS[run.model.preset]
    if not run.model.path and not preset.built:
        run.model.path = str(ensure_shapes_folder(run.model.preset))
        run.model.random_weights = False
    return run


def _given(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def plan_for(overrides: list[str], world_size: int, gpu_gib: int) -> tuple[list[str], JobPlan | None]:
    """The first of the planner's steps that fits (or the last one tried, which does not), and its plan."""
    given = _given(overrides)
    facts = DeviceFacts("cuda", HOPPER, gpu_gib * 2**30)
    tried: tuple[list[str], JobPlan | None] = ([], None)
    for keys, extra in STEPS:
        if any(key in given for key in keys):
            continue
        try:
            run = _compose(overrides + extra)
            import torch

            with tempfile.TemporaryDirectory() as out_dir:
                plan = build_plan(run, world_size=world_size, rank=0, device=torch.device("cuda"),
                                  out_dir=out_dir, seed=0, facts_of_device=facts)
                plan.memory  # computed while the plan's folder is there
        except ConfigError:
            continue  # this step does not apply here (e.g. sharding with one DiT rank)
        tried = (extra, plan)
        if fits(plan, gpu_gib):
            break
    return tried


def fits(plan: JobPlan, gpu_gib: int) -> bool:
    return max(memory.peak for memory in plan.memory) <= USABLE * gpu_gib * 2**30


def row(plan: JobPlan | None, extra: list[str], world_size: int, gpu_gib: int) -> dict:
    if plan is None:
        return {"world_size": world_size, "gpu_memory_gib": gpu_gib, "fits": False, "overrides": extra, "ranks": []}
    return {
        "world_size": world_size, "gpu_memory_gib": gpu_gib, "fits": fits(plan, gpu_gib), "overrides": extra,
        "layout": plan.dims.describe(), "fsdp": plan.fsdp, "vae_decode": plan.vae_decode,
        "ranks": [{"rank": r.rank, "role": r.role, "weights_bytes": dict(r.weight_bytes),
                   "activations_bytes": m.activations + m.gather_buffers + m.context_cache,
                   "decode_bytes": m.decode, "peak_bytes": m.peak}
                  for r, m in zip(plan.ranks, plan.memory)],
    }


def table(rows: list[dict]) -> str:
    lines = ["| GPUs | GPU GiB | fits | layout | added | peak GiB per rank (max) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = max((rank["peak_bytes"] for rank in r["ranks"]), default=0) / 2**30
        lines.append(f"| {r['world_size']} | {r['gpu_memory_gib']} | {'yes' if r['fits'] else 'no'} "
                     f"| {r.get('layout', '-')} | {' '.join(r['overrides']) or '-'} | {peak:.1f} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        overrides, settings = _split_args(argv)
        rows = []
        for world_size in settings["world_sizes"]:
            for gpu_gib in settings["gpu_memory_gib"]:
                extra, plan = plan_for(overrides, world_size, gpu_gib)
                rows.append(row(plan, extra, world_size, gpu_gib))
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    print(table(rows))
    if settings["out"]:
        Path(settings["out"]).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
