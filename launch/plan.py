"""What fits where, before anything is downloaded or loaded: for each world size and GPU memory, the
lossless layout that fits (the plan's memory model per rank), or that none does.

    python launch/plan.py model=t2v_14b                                   # 1, 2, 4, 8 GPUs of 24, 48, 80 GB
    python launch/plan.py model=t2v_1_3b 'plan.world_sizes=[1,2]' 'plan.gpu_memory_gib=[24]' plan.out=p.json
    python launch/plan.py model=i2v_14b_720p parallel=cfg_usp             # settings given are kept

The same overrides as launch/generate.py, plus `plan.world_sizes` (default [1,2,4,8]), `plan.gpu_memory_gib`
(default [24,48,80]) and `plan.out` (a JSON file). A real preset without `model.path` is planned from its
architecture's shapes alone (a folder of configs and header-only weights, no download). Settings given
explicitly (a preset, degrees, `parallel.fsdp`, `parallel.vae_decode`) are kept; the planner
(wan_dist/plan/planner.py, the same `parallel=auto` runs with a GPU's free memory) fills only what is left open,
step by step until a layout fits within 90% of the GPU's memory.
"""

from __future__ import annotations

import json
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wan_dist.wan.building import ensure_shapes_folder  # noqa: E402
from wan_dist.config.schema import compose_run  # noqa: E402
from wan_dist.config.errors import ConfigError  # noqa: E402
from wan_dist.wan.loading import read_component_config  # noqa: E402
from wan_dist.plan.cost import HOST_LINK, NVLINK, PCIE, estimated_step_s, mode_of, predict_transfer  # noqa: E402
from wan_dist.plan.inputs import DeviceFacts, Inputs, prepare  # noqa: E402
from wan_dist.plan.job import JobPlan  # noqa: E402
from wan_dist.plan.planner import Choice, choose, given_keys  # noqa: E402
from wan_dist.config.presets import MODEL_PRESETS  # noqa: E402

HOPPER = (9, 0)  # the kernels are chosen for an H100-class GPU; memory does not depend on it
DEFAULTS = {"world_sizes": [1, 2, 4, 8], "gpu_memory_gib": [24, 48, 80], "out": None}


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
    run = compose_run(overrides)
    preset = MODEL_PRESETS[run.model.preset]
    if not run.model.path and not preset.built:
        run.model.path = str(ensure_shapes_folder(run.model.preset))
        run.model.random_weights = False
    return run


def plan_for(run, inputs: Inputs, given: frozenset[str], world_size: int, gpu_gib: int) -> Choice:
    """The first of the planner's steps that fits (or the last one tried, which does not), and its plan."""
    return choose(run, inputs, given=given, world_size=world_size, memory_bytes=gpu_gib * 2**30)


def transfers(plan: JobPlan) -> list[dict]:
    """FSDP's all-gather (over NVLink and PCIe) or offload's copy per block against the block's compute on
    an H100-class GPU (wan_dist/plan/cost.py), for a plan that shards or streams the DiT."""
    dit = plan.components["dit"]
    option = "fsdp" if plan.fsdp else "offload" if dit.offload else None
    if option is None:
        return []
    gpus, mode = len(plan.dims.dit_ranks), mode_of(plan.dims)
    config = read_component_config(plan.folder, "transformer")
    single = estimated_step_s(config, plan.num_tokens, guided=plan.guided)
    stored = dit.storage_dtype or dit.dtype
    return [asdict(predict_transfer(config, plan.num_tokens, option=option, mode=mode, gpus=gpus, link=link,
                                    single_step_s=single, guided=plan.guided,
                                    bytes_per_element=stored.itemsize))
            for link in ((NVLINK, PCIE) if option == "fsdp" else (HOST_LINK,))]


def row(choice: Choice | str, world_size: int, gpu_gib: int) -> dict:
    """`choice` a string: why the layout as given cannot run on this many GPUs."""
    if isinstance(choice, str) or choice.plan is None:
        return {"world_size": world_size, "gpu_memory_gib": gpu_gib, "fits": False, "overrides": [], "ranks": [],
                **({"error": choice} if isinstance(choice, str) else {})}
    plan, extra = choice.plan, list(choice.added)
    return {
        "world_size": world_size, "gpu_memory_gib": gpu_gib, "fits": choice.fits, "overrides": extra,
        "layout": plan.dims.describe(), "fsdp": plan.fsdp, "vae_decode": plan.vae_decode,
        "ranks": [{"rank": r.rank, "role": r.role, "weights_bytes": dict(r.weight_bytes),
                   "activations_bytes": m.activations + m.gather_buffers + m.context_cache,
                   "decode_bytes": m.decode, "peak_bytes": m.peak}
                  for r, m in zip(plan.ranks, plan.memory)],
        "transfers": transfers(plan),
    }


def table(rows: list[dict]) -> str:
    lines = ["| GPUs | GPU GiB | fits | layout | added | peak GiB per rank (max) "
             "| per block: transfer / compute ms, hidden by prefetch |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        peak = max((rank["peak_bytes"] for rank in r["ranks"]), default=0) / 2**30
        moved = "; ".join(f"{t['option']} over {t['link']} {1e3 * t['transfer_s']:.1f} / {1e3 * t['compute_s']:.1f}"
                          f" {'yes' if t['hidden'] else 'no'}" for t in r.get("transfers", [])) or "-"
        lines.append(f"| {r['world_size']} | {r['gpu_memory_gib']} | {'yes' if r['fits'] else 'no'} "
                     f"| {r.get('layout', '-')} | {' '.join(r['overrides']) or '-'} | {peak:.1f} | {moved} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    try:
        overrides, settings = _split_args(argv)
        run = _compose(overrides)
        given = given_keys(run, overrides)
        # One GPU kind for every size: the memory is the planner's question, asked of each size below.
        with tempfile.TemporaryDirectory() as out_dir:
            try:
                inputs: Inputs | str = prepare(run, DeviceFacts("cuda", HOPPER), given=overrides, out_dir=out_dir)
            except ConfigError as error:  # said in every row, as a layout no size suits
                inputs = str(error)
        rows = []
        for world_size in settings["world_sizes"]:
            for gpu_gib in settings["gpu_memory_gib"]:
                try:
                    choice: Choice | str = inputs if isinstance(inputs, str) else \
                        plan_for(run, inputs, given, world_size, gpu_gib)
                except ConfigError as error:  # this world size does not suit the layout given
                    choice = str(error)
                rows.append(row(choice, world_size, gpu_gib))
    except ConfigError as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    print(table(rows))
    if settings["out"]:
        Path(settings["out"]).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
