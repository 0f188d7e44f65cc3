"""``hydra/launcher=population``: the sweep's jobs grouped into populations (``memhead.population``).

Each job's config is composed as Hydra's basic launcher composes it, and its directory gets the same
``.hydra/`` files (through :func:`hydra.core.utils.run_job`, with a task function that only collects
the job). Jobs whose configs are equal except for member options form a group; each group trains as
one population (split into populations of at most ``max_members``); a group that populations cannot
train runs its jobs one by one through the sweep's own task function.
"""

import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class PopulationLauncherConf:
    _target_: str = "hydra_plugins.memhead_population.population_launcher.PopulationLauncher"
    # Most runs in one population (null: a whole group); larger groups are split.
    max_members: Any = None
    # Where groups run: inline (this process, one group after the other).
    executor: str = "inline"


ConfigStore.instance().store(group="hydra/launcher", name="population", node=PopulationLauncherConf)

EXECUTORS = ("inline",)


@dataclass
class Job:
    """One job of the sweep: its number, overrides, composed config and, once set up, its return."""

    idx: int
    overrides: list[str]
    config: DictConfig
    ret: JobReturn | None = None


def write_job_dir(config: DictConfig) -> JobReturn:
    """A member job's directory and ``.hydra/`` files, as :func:`hydra.core.utils.run_job` writes them
    before it calls the task (the same bytes; the tests compare them with the basic launcher's).

    A population runs its members' tasks together, so the rest of ``run_job`` (the working directory,
    the job's logging set-up, job callbacks) does not apply; the population's log goes to every member's
    log file instead (:func:`member_logs`).
    """
    output_dir = os.path.abspath(os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)))
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = output_dir
    ret = JobReturn()
    ret.hydra_cfg = OmegaConf.masked_copy(config, "hydra")  # what run_job's HydraConfig holds
    ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)
    ret.cfg = config  # the job's own config, split in place rather than copied: the task part
    with read_write(ret.cfg), open_dict(ret.cfg):
        del ret.cfg["hydra"]
    ret.working_dir = os.getcwd()
    ret.task_name = str(ret.hydra_cfg.hydra.job.name)
    os.makedirs(output_dir, exist_ok=True)
    if ret.hydra_cfg.hydra.output_subdir is not None:
        hydra_output = os.path.join(output_dir, str(ret.hydra_cfg.hydra.output_subdir))
        os.makedirs(hydra_output, exist_ok=True)
        for name, node in (("config.yaml", ret.cfg), ("hydra.yaml", ret.hydra_cfg),
                           ("overrides.yaml", ret.hydra_cfg.hydra.overrides.task)):  # fmt: skip
            with open(os.path.join(hydra_output, name), "w", encoding="utf-8") as file:
                file.write(OmegaConf.to_yaml(node))
    return ret


@contextlib.contextmanager
def member_logs(rets: list[JobReturn]):
    """The population's log lines also go to each member's ``<job name>.log``, as a run's own would."""
    handlers = []
    formatter = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for ret in rets:
        path = os.path.join(ret.hydra_cfg.hydra.runtime.output_dir, f"{ret.hydra_cfg.hydra.job.name}.log")
        handler = logging.FileHandler(path, mode="a")
        handler.setFormatter(formatter)
        handlers.append(handler)
    root = logging.getLogger()
    for handler in handlers:
        root.addHandler(handler)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()


def split(members: list, max_members: int | None) -> list[list]:
    """``members`` in consecutive chunks of at most ``max_members`` (all of them for ``None``)."""
    if not max_members:
        return [members]
    return [members[i : i + max_members] for i in range(0, len(members), max_members)]


class PopulationLauncher(Launcher):
    def __init__(self, max_members: int | None = None, executor: str = "inline") -> None:
        super().__init__()
        if max_members is not None and (isinstance(max_members, bool) or int(max_members) < 1):
            raise ValueError(
                f"hydra.launcher.max_members={max_members} is not allowed; allowed: null or >= 1"
            )
        if executor not in EXECUTORS:
            raise ValueError(
                f"hydra.launcher.executor={executor!r} is not allowed; allowed: {', '.join(EXECUTORS)}"
            )
        self.max_members = None if max_members is None else int(max_members)
        self.executor = executor
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra_plugins.memhead_population.compose import MemberComposer

        # The sweeper shares this context: its validation pass composes through the same cache.
        if not isinstance(hydra_context.config_loader, MemberComposer):
            hydra_context.config_loader = MemberComposer(hydra_context.config_loader)
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def _compose(self, idx: int, overrides: list[str]) -> DictConfig:
        sweep_config = self.hydra_context.config_loader.take(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return sweep_config

    def _run_job(self, job: Job, task_function) -> JobReturn:
        ret = run_job(
            hydra_context=self.hydra_context,
            task_function=task_function,
            config=job.config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret

    def launch(self, job_overrides, initial_job_idx: int) -> list[JobReturn]:
        from memhead.population.members import group_key, unsupported

        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [
            Job(initial_job_idx + i, list(overrides), self._compose(initial_job_idx + i, overrides))
            for i, overrides in enumerate(job_overrides)
        ]
        groups: dict[str, list[Job]] = {}
        reasons: dict[str, str | None] = {}
        for job in jobs:
            key = group_key(job.config)  # the hydra node is not part of the key
            groups.setdefault(key, []).append(job)
            reasons.setdefault(key, unsupported(job.config))
        batched = sum(1 for key in groups if reasons[key] is None)
        composer = self.hydra_context.config_loader
        log.info("Composed %d job configs through Hydra, derived %d", composer.composed, composer.derived)
        log.info(
            "Launching %d jobs as %d groups (%d as populations, %d one by one)",
            len(jobs), len(groups), batched, len(groups) - batched,
        )  # fmt: skip
        for number, (key, members) in enumerate(groups.items()):
            names = ", ".join(f"#{job.idx}" for job in members)
            if reasons[key] is not None:
                log.info(
                    "group %d (%d jobs: %s) runs one by one: %s", number, len(members), names, reasons[key]
                )
                for job in members:
                    log.info("\t#%d : %s", job.idx, " ".join(filter_overrides(job.overrides)))
                    job.ret = self._run_job(job, self.task_function)
                continue
            for part in split(members, self.max_members):
                log.info(
                    "group %d: a population of %d jobs (%s)",
                    number,
                    len(part),
                    ", ".join(f"#{j.idx}" for j in part),
                )
                self._run_population(part)
        return [job.ret for job in jobs]

    def _run_population(self, jobs: list[Job]) -> None:
        from memhead.config import optimized_value
        from memhead.hydra_callbacks import SNAPSHOTS, holds_a_run, user_error
        from memhead.population.run import run_population
        from memhead.run_dir import Preempted
        from memhead.runner import write_failure_record

        for job in jobs:  # directories and .hydra/ files, as the basic launcher writes them
            job.ret = write_job_dir(job.config)
        out_dirs = [job.ret.hydra_cfg.hydra.runtime.output_dir for job in jobs]
        kept = [holds_a_run(Path(out_dir)) for out_dir in out_dirs]  # never replaced by a failure record
        try:
            with member_logs([job.ret for job in jobs]):
                outcomes = run_population([job.ret.cfg for job in jobs], out_dirs)
        except Preempted as err:  # the members' checkpoints are written: a relaunch resumes them
            print(f"memhead: {err}", file=sys.stderr)
            sys.exit(128 + err.signum)
        except Exception as err:  # the population failed: so did each of its jobs
            if user_error(err, out_dirs[0]) is None:  # a bug: its traceback, once
                log.exception("population of jobs %s failed", [job.idx for job in jobs])
            outcomes = [err] * len(jobs)
        for job, out_dir, was_kept, outcome in zip(jobs, out_dirs, kept, outcomes):
            if isinstance(outcome, Exception):
                reason = (
                    user_error(outcome, out_dir) or f"{type(outcome).__name__}: {outcome}".splitlines()[0]
                )
                # As run.py's failed jobs: a value that says so, and the other jobs go on.
                job.ret.status, job.ret.return_value = JobStatus.COMPLETED, f"failed: {reason}"
                if was_kept:  # refused where another run's files stay as they were
                    SNAPSHOTS.restore(Path(out_dir))
                    SNAPSHOTS.refused.append(f"{out_dir}: {reason}")
                else:
                    write_failure_record(Path(out_dir), reason, job.ret.cfg)
                print(f"error: job #{job.idx}: {reason}", file=sys.stderr)
                continue
            SNAPSHOTS.accepted += 1
            job.ret.status = JobStatus.COMPLETED
            job.ret.return_value = optimized_value(outcome, job.ret.cfg.optimized_metric)
