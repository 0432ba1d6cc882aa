"""`rank_env`: ranks and rendezvous from torchrun's or Slurm's variables, else a world of one."""

from __future__ import annotations

import pytest

from wan_dist.config.errors import ConfigError
from wan_dist.parallel.session import RankEnv, check_gpus_per_node, rank_env


def test_torchrun_variables():
    env = rank_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.7",
                    "MASTER_PORT": "29611"})
    assert env == RankEnv(rank=3, world_size=8, local_rank=1, master_addr="10.0.0.7", master_port=29611,
                          launcher="torchrun")


def test_torchrun_defaults():
    env = rank_env({"RANK": "0", "WORLD_SIZE": "2"})
    assert (env.rank, env.world_size, env.local_rank) == (0, 2, 0)
    assert env.master_addr == "127.0.0.1" and env.master_port == 29500
    assert env.launcher == "torchrun"


def test_torchrun_wins_over_slurm():
    """`srun torchrun ...`: both sets are present; torchrun's describe this process."""
    env = rank_env({"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "5", "MASTER_ADDR": "a", "MASTER_PORT": "1234",
                    "SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_STEP_ID": "0",
                    "SLURM_JOB_NODELIST": "gpu[01-02]", "SLURM_JOB_ID": "77"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (5, 16, 5, "torchrun")
    assert (env.master_addr, env.master_port) == ("a", 1234)


def slurm(**extra: str) -> dict[str, str]:
    base = {"SLURM_PROCID": "4", "SLURM_NTASKS": "6", "SLURM_LOCALID": "1", "SLURM_STEP_ID": "0",
            "SLURM_JOB_NODELIST": "gpu[03-05,07]", "SLURM_JOB_ID": "123456"}
    base.update(extra)
    return base


def test_slurm_variables():
    env = rank_env(slurm())
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (4, 6, 1, "slurm")
    assert env.master_addr == "gpu03"
    assert env.master_port == 20000 + 123456 % 20000 == 23456


@pytest.mark.parametrize("nodelist, first", [
    ("gpu[03-05,07]", "gpu03"),
    ("gpu[07,03-05]", "gpu07"),
    ("node1,node2", "node1"),
    ("node1", "node1"),
    ("gpu[12]", "gpu12"),
    ("gpu-a[001-004],cpu[1-2]", "gpu-a001"),
    ("gpu[03-05,07],cpu1", "gpu03"),
])
def test_slurm_master_is_first_host(nodelist, first):
    assert rank_env(slurm(SLURM_JOB_NODELIST=nodelist)).master_addr == first


def test_slurm_port_is_per_job():
    ports = {rank_env(slurm(SLURM_JOB_ID=str(job))).master_port for job in (1, 2, 3, 19999)}
    assert len(ports) == 4
    assert all(20000 <= port < 40000 for port in ports)
    assert rank_env(slurm(SLURM_JOB_ID="40001")).master_port == 20001


def test_slurm_same_job_same_port_on_every_task():
    ports = {rank_env(slurm(SLURM_PROCID=str(r), SLURM_LOCALID=str(r % 2))).master_port for r in range(6)}
    addrs = {rank_env(slurm(SLURM_PROCID=str(r))).master_addr for r in range(6)}
    assert len(ports) == 1 and addrs == {"gpu03"}


def test_slurm_explicit_master_wins():
    env = rank_env(slurm(MASTER_ADDR="head", MASTER_PORT="31000"))
    assert (env.master_addr, env.master_port) == ("head", 31000)


def test_slurm_without_job_id_or_nodelist():
    env = rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_ID": "0"})
    assert env == RankEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1", master_port=20000,
                          launcher="slurm")


@pytest.mark.parametrize("environ", [
    {},
    {"RANK": "1"},  # half of torchrun's pair
    {"SLURM_PROCID": "1"},  # half of Slurm's pair (e.g. an salloc shell)
    {"SLURM_JOB_ID": "5", "SLURM_JOB_NODELIST": "gpu01"},
    {"PATH": "/usr/bin", "HOME": "/root"},
])
def test_world_of_one(environ):
    assert rank_env(environ) == RankEnv(rank=0, world_size=1, local_rank=0, master_addr="127.0.0.1",
                                        master_port=0, launcher="python")


def test_explicit_empty_environ_ignores_process_environment(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert rank_env({}).world_size == 1
    assert rank_env().world_size == 4  # None means os.environ


def test_slurm_batch_script_itself_is_a_world_of_one():
    """The batch step sees the job's task count but is no rank: it has no SLURM_STEP_ID."""
    env = rank_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1"})
    assert (env.world_size, env.launcher) == (1, "python")


def test_slurm_step_task_count_wins_over_the_job_count():
    env = rank_env({"SLURM_PROCID": "1", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2",
                    "SLURM_STEP_ID": "3", "SLURM_JOB_ID": "9", "SLURM_JOB_NODELIST": "n1"})
    assert (env.rank, env.world_size, env.launcher) == (1, 2, "slurm")


def test_more_ranks_than_gpus_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        check_gpus_per_node(device_count=2, ranks_on_node=4)
    message = str(refused.value)
    assert message.startswith("4 ranks on this node but 2 GPUs: ")
    assert "--nproc_per_node=2" in message and "\n" not in message


def test_one_rank_per_gpu_or_fewer_is_fine():
    check_gpus_per_node(device_count=2, ranks_on_node=2)
    check_gpus_per_node(device_count=8, ranks_on_node=1)
