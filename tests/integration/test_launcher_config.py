"""The launcher configs compose with Hydra's submitit plugin and every setting can be overridden
from the command line; no cluster needed."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.conftest import CONF_DIR


def _launcher(*overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=True).hydra.launcher


def test_slurm_launcher_asks_one_gpu_per_task_and_takes_cluster_settings() -> None:
    launcher = _launcher(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.tasks_per_node=4",
        "hydra.launcher.account=proj42",
        "hydra.launcher.qos=high",
        "hydra.launcher.constraint=a100",
        "+hydra.launcher.additional_parameters.mail-type=END",
    )
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == 4
    assert (launcher["partition"], launcher["account"], launcher["qos"], launcher["constraint"]) == (
        "gpu",
        "proj42",
        "high",
        "a100",
    )
    assert launcher["additional_parameters"] == {"mail-type": "END"}
    # requeue after the time limit is allowed because train.resume=auto continues from the checkpoint
    assert launcher["max_num_timeout"] > 0 and 0 < launcher["signal_delay_s"] < 600


def test_local_launcher_runs_the_same_jobs_without_a_cluster() -> None:
    launcher = _launcher("hydra/launcher=local")
    assert launcher["_target_"].endswith("LocalLauncher")
    assert launcher["gpus_per_node"] == launcher["tasks_per_node"] == 1
    assert launcher.submitit_folder.startswith("multirun/") and launcher.submitit_folder.endswith("/.submitit/%j")
