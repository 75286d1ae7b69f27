"""Launcher environment parsing: torchrun, SLURM (1 task per GPU and torchrun per node)."""
import pytest

from lens_megatron.parallel.env import detect_dist_env, expand_slurm_nodelist


def test_torchrun_environment():
    env = {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4",
           "MASTER_ADDR": "node0", "MASTER_PORT": "1234"}
    d = detect_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (5, 16, 1, 4)
    assert (d.master_addr, d.master_port, d.launcher, d.node_rank) == ("node0", 1234, "torchrun", 1)


def test_slurm_one_task_per_gpu_multi_node():
    env = {"SLURM_PROCID": "13", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16",
           "SLURM_LOCALID": "5",
           "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_NODELIST": "gpu[007-008]",
           "SLURM_JOB_ID": "4242"}
    d = detect_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.local_world_size) == (13, 16, 5, 8)
    assert d.master_addr == "gpu007" and d.node_rank == 1 and d.launcher == "slurm"
    assert d.master_port == 20000 + 4242 % 20000


def test_slurm_tasks_per_node_from_step_layout():
    env = {"SLURM_PROCID": "3", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
           "SLURM_LOCALID": "3",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_STEP_NODELIST": "a1,a2",
           "MASTER_PORT": "29999"}
    d = detect_dist_env(env)
    assert d.local_world_size == 4 and d.master_addr == "a1" and d.master_port == 29999


def test_torchrun_inside_srun_wins():
    # srun launches one torchrun per node: torchrun's variables describe the real ranks.
    env = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "RANK": "9", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "8"}
    d = detect_dist_env(env)
    assert (d.rank, d.world_size, d.launcher) == (9, 16, "torchrun")


def test_single_process_default():
    d = detect_dist_env({})
    assert (d.rank, d.world_size, d.launcher) == (0, 1, "single")


@pytest.mark.parametrize("nodelist,expected", [
    ("node1", ["node1"]),
    ("gpu[001-003,007]", ["gpu001", "gpu002", "gpu003", "gpu007"]),
    ("a[1-2],b5,c[09-10]", ["a1", "a2", "b5", "c09", "c10"]),
    ("rack1-n[3-4]", ["rack1-n3", "rack1-n4"]),
])
def test_expand_slurm_nodelist(nodelist, expected):
    assert expand_slurm_nodelist(nodelist) == expected


def test_bad_integer_names_the_variable():
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        detect_dist_env({"RANK": "0", "WORLD_SIZE": "two"})


def test_batch_shell_outside_srun_is_a_single_process():
    # The sbatch shell has SLURM_PROCID=0 and the job's task count, but no step variables:
    # treating it as rank 0 of 2 would wait forever for a rank 1 that was never started.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
           "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS_PER_NODE": "2"}
    d = detect_dist_env(env)
    assert (d.world_size, d.launcher) == (1, "single")


def test_step_layout_wins_over_job_layout():
    # `srun -n1` inside a --ntasks-per-node=2 job.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NUM_TASKS": "1",
           "SLURM_LOCALID": "0", "SLURM_NTASKS_PER_NODE": "2", "SLURM_STEP_TASKS_PER_NODE": "1",
           "SLURM_STEP_NODELIST": "n1"}
    d = detect_dist_env(env)
    assert (d.world_size, d.local_world_size) == (1, 1)
