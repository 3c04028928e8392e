"""Which processes are ranks: SLURM's variables map to torch's inside an srun step only."""
from __future__ import annotations

import pytest

from pipeline.distributed import _env_from_slurm, gpu_for_rank

TORCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in [*TORCH_VARS, *(n for n in os.environ if n.startswith("SLURM_"))]:
        monkeypatch.setenv(name, "")  # recorded, so what _env_from_slurm sets is undone after the test
        monkeypatch.delenv(name)
    return monkeypatch


def test_an_srun_task_is_a_rank_of_its_step(clean_env):
    import os

    for name, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "8",
                        "SLURM_LOCALID": "1"}.items():
        clean_env.setenv(name, value)
    _env_from_slurm()
    assert [os.environ[n] for n in TORCH_VARS] == ["5", "8", "1"]  # the step's tasks, not the job's


def test_a_batch_scripts_own_process_is_not_a_rank(clean_env):
    """sbatch --ntasks=2: the script's shell has SLURM_PROCID=0 and SLURM_NTASKS=2 but no step;
    treating it as rank 0 of 2 would wait for a rank 1 that never starts."""
    import os

    clean_env.setenv("SLURM_PROCID", "0")
    clean_env.setenv("SLURM_NTASKS", "2")
    _env_from_slurm()
    assert not any(n in os.environ for n in TORCH_VARS)


def test_ranks_set_by_a_launcher_win_over_slurm(clean_env):
    import os

    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}.items():
        clean_env.setenv(name, value)
    _env_from_slurm()
    assert os.environ["RANK"] == "3" and os.environ["WORLD_SIZE"] == "4"


def test_each_rank_gets_its_own_gpu_or_the_only_one_it_sees():
    assert [gpu_for_rank(r, 8) for r in range(8)] == list(range(8))
    assert gpu_for_rank(5, 1) == 0  # one GPU bound per task
    with pytest.raises(RuntimeError, match="LOCAL_RANK=4, but this process sees 4 GPUs: start at most 4 ranks"):
        gpu_for_rank(4, 4)
