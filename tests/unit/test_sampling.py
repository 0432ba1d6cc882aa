"""Sampling defaults from one source each: a key the user sets, else the preset chosen explicitly, else the
folder (its scheduler config, as diffusers' pipeline reads it), else the library default; plan.json says
which."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.planning import plan_of
from wan_dist.config.schema import RunConfig
from wan_dist.plan.sampling import SCHEDULER_CONFIG, read_scheduler_config, resolve_sampling

FOLDER_SOURCE = f"folder {SCHEDULER_CONFIG}"


def scheduler_folder(tmp_path: Path, class_name: str = "UniPCMultistepScheduler", **config) -> Path:
    path = tmp_path / SCHEDULER_CONFIG
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"_class_name": class_name, **config}))
    return tmp_path


def resolved(run: RunConfig, folder: Path, given: list[str] = (), seed: int = 0):
    return resolve_sampling(run, preset=run.model.preset, given=given, scheduler_config=read_scheduler_config(folder),
                            seed=seed,
                            drawn=run.seed < 0)


def test_a_folder_given_alone_samples_with_its_own_shift(tmp_path):
    sampling = resolved(RunConfig(), scheduler_folder(tmp_path, flow_shift=12.0), ["model.path=/models/a14b"])
    assert (sampling.flow_shift, sampling.sources["flow_shift"]) == (12.0, FOLDER_SOURCE)
    assert (sampling.scheduler, sampling.sources["scheduler"]) == ("unipc", FOLDER_SOURCE)
    # What the folder does not say is the library default.
    assert (sampling.steps, sampling.sources["steps"]) == (RunConfig.steps, "default")
    assert sampling.sources["seed"] == "default"


def test_a_flow_match_folder_names_euler_and_its_shift(tmp_path):
    sampling = resolved(RunConfig(), scheduler_folder(tmp_path, "FlowMatchEulerDiscreteScheduler", shift=8.0))
    assert (sampling.scheduler, sampling.flow_shift) == ("euler", 8.0)


@pytest.mark.parametrize("given, set_shift, expected", [
    # The user's key wins, even at the default preset's own value.
    (["flow_shift=3.0"], 3.0, (3.0, "user")),
    (["flow_shift=7"], 7.0, (7.0, "user")),
    # Set by a config file (an experiment): not named on the command line, but not what the preset puts there.
    ([], 5.0, (5.0, "user")),
    # The preset chosen explicitly wins over the folder, also the default preset named by the user.
    (["model=tiny"], None, (3.0, "preset tiny")),
])
def test_the_user_then_the_explicit_preset_win_over_the_folder(tmp_path, given, set_shift, expected):
    run = RunConfig()
    if set_shift is not None:
        run.flow_shift = set_shift
    sampling = resolved(run, scheduler_folder(tmp_path, flow_shift=12.0), given)
    assert (sampling.flow_shift, sampling.sources["flow_shift"]) == expected


def test_a_real_preset_is_explicit_without_being_named(tmp_path):
    """A preset other than the default one was chosen by someone (a config file, a sweep)."""
    run = RunConfig()
    run.model.preset, run.flow_shift, run.steps = "t2v_14b", 5.0, 50
    sampling = resolved(run, scheduler_folder(tmp_path, flow_shift=3.0))
    assert (sampling.flow_shift, sampling.sources["flow_shift"]) == (5.0, "preset t2v_14b")


def test_a_drawn_seed_says_so(tmp_path):
    run = RunConfig()
    run.seed = -1
    sampling = resolved(run, scheduler_folder(tmp_path, flow_shift=3.0), ["seed=-1"], seed=1234)
    assert (sampling.seed, sampling.sources["seed"]) == (1234, "drawn")


def test_the_plan_runs_with_the_folder_shift_and_plan_json_says_where_from(family_folders, image_path, tmp_path):
    """The Wan2.2 two-expert folder's scheduler says shift 12: the plan's config, its expert step counts
    and plan.json follow the folder, and the plan table names the source."""
    run = RunConfig()
    run.model.path, run.image = str(family_folders["moe_i2v"]), str(image_path)
    plan = plan_of(run, 1, tmp_path, given=[f"model.path={run.model.path}", f"image={run.image}"])
    assert plan.config.flow_shift == plan.sampling.flow_shift == 12.0
    assert run.flow_shift == RunConfig.flow_shift  # the caller's config is not changed
    # 4 steps at shift 12: timesteps 999, 973, 923, 800 against the boundary 900, three high-noise steps
    # (at shift 3: 999, 900, 750, 500, two).
    assert plan.expert_steps == (3, 1)
    sampling = plan.to_json()["sampling"]
    assert sampling["flow_shift"] == {"value": 12.0, "source": FOLDER_SOURCE}
    assert sampling["steps"] == {"value": RunConfig.steps, "source": "default"}
    assert f"shift 12 ({FOLDER_SOURCE})" in plan.table()
