"""Groups sent elsewhere: ``hydra.launcher.executor=local|slurm`` runs each group as one submitit job
(on SLURM, one job array with a task per group), with the settings of ``hydra.launcher.local`` or
``hydra.launcher.slurm`` (the project's ``local`` / ``slurm`` launcher configs, site values included).

A task is a :class:`GroupTask`: it trains its group's population, or runs its jobs one by one through
the sweep's task function as Hydra's submitit launcher runs a job. A task that SLURM times out or
preempts is requeued (``submitit.helpers.Checkpointable``) and resumes from its runs' checkpoints.
"""

from __future__ import annotations

import logging
from dataclasses import fields
from typing import Any

import submitit
from hydra.core.singleton import Singleton
from hydra.core.utils import run_job, setup_globals
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import DictConfig, OmegaConf, open_dict

# Options of the submitit launcher configs that are not the executor's parameters.
NOT_PARAMETERS = {"_target_", "submitit_folder", "max_num_timeout"}


def make_executor(kind: str, settings: DictConfig) -> submitit.AutoExecutor:
    """A submitit executor for ``kind`` (``local`` or ``slurm``) from a submitit launcher config, its
    options named as Hydra's submitit launcher names them (shared ones bare, the others prefixed)."""
    options: dict[str, Any] = OmegaConf.to_container(settings, resolve=True)
    init = {"folder": options["submitit_folder"]}
    if "max_num_timeout" in options:
        init[f"{kind}_max_num_timeout"] = options["max_num_timeout"]
    executor = submitit.AutoExecutor(cluster=kind, **init)
    shared = {f.name for f in fields(BaseQueueConf)}
    executor.update_parameters(
        **{
            name if name in shared else f"{kind}_{name}": value
            for name, value in options.items()
            if name not in NOT_PARAMETERS
        }
    )
    return executor


class GroupTask(submitit.helpers.Checkpointable):
    """One submitit job: a group's population, or its jobs one by one."""

    def __init__(self, hydra_context, task_function, singleton_state) -> None:
        self.hydra_context, self.task_function = hydra_context, task_function
        self.singleton_state = singleton_state

    def __call__(self, population: bool, configs: list, out_dirs: list[str], log_files: list[str]) -> list:
        Singleton.set_state(self.singleton_state)
        setup_globals()
        if not population:
            return [self.run_alone(config) for config in configs]
        from hydra_plugins.memhead_population.population_launcher import member_logs, outcome_of
        from memhead.population.run import run_population

        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        with member_logs(log_files):
            return [outcome_of(value) for value in run_population(configs, out_dirs)]

    def run_alone(self, config: DictConfig) -> dict:
        """One job as Hydra's submitit launcher runs it: ``run_job`` with the sweep's task function."""
        with open_dict(config.hydra.job):
            config.hydra.job.id = submitit.JobEnvironment().job_id
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=self.task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        try:
            return {"value": ret.return_value}
        except Exception as err:  # noqa: BLE001 - the job's own failure, reported as the basic launcher would
            return {"error": f"{type(err).__name__}: {err}".splitlines()[0]}
