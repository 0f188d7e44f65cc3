"""``hydra/launcher=population``: the sweep's jobs grouped into populations (``memhead.population``).

Each job's config is Hydra's (composed once per shape, the rest derived: ``compose.py``) and its
directory gets the basic launcher's ``.hydra/`` files (:func:`write_job_dir`). Jobs whose configs are
equal except for member options form a group; each group trains as one population (split into
populations of at most ``max_members``); a group that populations cannot train runs its jobs one by
one through the sweep's own task function. ``executor`` says where: this machine (``inline``: in
``workers`` forked processes, ``workers.py``), or one
submitit job per group (``local``, ``slurm``: ``executors.py``).
"""

import contextlib
import gc
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from hydra_plugins.memhead_population.job_yaml import to_yaml
from memhead.registry import ConfigError

log = logging.getLogger(__name__)


EXECUTORS = ("inline", "local", "slurm")
# Allocations between two young-generation collections while the launcher runs (Python's default: 700).
GC_THRESHOLD = 100_000


@dataclass
class Job:
    """One job of the sweep: its number, overrides, composed config and, once set up, its return."""

    idx: int
    overrides: list[str]
    config: DictConfig
    ret: JobReturn | None = None


def output_dir(config: DictConfig) -> str:
    """A job's directory, as ``run_job`` makes it (``hydra.sweep.dir`` / ``hydra.sweep.subdir``)."""
    return os.path.abspath(os.path.join(str(config.hydra.sweep.dir), str(config.hydra.sweep.subdir)))


def task_return(job: Job) -> JobReturn:
    """The return of a job a worker process ran: its overrides and the task part of its config (split
    in place, as :func:`write_job_dir` splits it there); the rest is settled from the worker's outcome."""
    ret = JobReturn(overrides=job.overrides, cfg=job.config, task_name=str(job.config.hydra.job.name))
    with read_write(ret.cfg), open_dict(ret.cfg):
        del ret.cfg["hydra"]
    return ret


def exit_preempted(signum: int, message: str) -> None:
    """Stop the sweep on a preemption signal, as a run alone does (its checkpoints are written)."""
    print(f"memhead: {message}", file=sys.stderr)
    sys.exit(128 + signum)


def write_job_dir(config: DictConfig) -> JobReturn:
    """A member job's directory and ``.hydra/`` files, as :func:`hydra.core.utils.run_job` writes them
    before it calls the task (the same bytes; the tests compare them with the basic launcher's).

    A population runs its members' tasks together, so the rest of ``run_job`` (the working directory,
    the job's logging set-up, job callbacks) does not apply; the population's log goes to every member's
    log file instead (:func:`member_logs`).
    """
    out_dir = output_dir(config)
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = out_dir
    ret = JobReturn()
    ret.hydra_cfg = OmegaConf.masked_copy(config, "hydra")  # what run_job's HydraConfig holds
    ret.overrides = OmegaConf.to_container(config.hydra.overrides.task)
    ret.cfg = config  # the job's own config, split in place rather than copied: the task part
    with read_write(ret.cfg), open_dict(ret.cfg):
        del ret.cfg["hydra"]
    ret.working_dir = os.getcwd()
    ret.task_name = str(ret.hydra_cfg.hydra.job.name)
    os.makedirs(out_dir, exist_ok=True)
    if ret.hydra_cfg.hydra.output_subdir is not None:
        hydra_output = os.path.join(out_dir, str(ret.hydra_cfg.hydra.output_subdir))
        os.makedirs(hydra_output, exist_ok=True)
        for name, node in (("config.yaml", ret.cfg), ("hydra.yaml", ret.hydra_cfg),
                           ("overrides.yaml", ret.hydra_cfg.hydra.overrides.task)):  # fmt: skip
            with open(os.path.join(hydra_output, name), "w", encoding="utf-8") as file:
                file.write(to_yaml(node))
    return ret


def log_file(ret: JobReturn) -> str:
    """Where a job's own log goes (Hydra's job logging writes ``<output dir>/<job name>.log``)."""
    return os.path.join(ret.hydra_cfg.hydra.runtime.output_dir, f"{ret.hydra_cfg.hydra.job.name}.log")


@contextlib.contextmanager
def member_logs(paths: list[str]):
    """The population's log lines also go to each member's log file, as a run's own would."""
    handlers = []
    formatter = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    for path in paths:
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


def outcome_of(value) -> dict:
    """One job's outcome as a task sends it back: its record, or why it failed (an exception may not
    pickle)."""
    if isinstance(value, Exception):
        from memhead.hydra_callbacks import user_error

        return {"error": user_error(value, "") or f"{type(value).__name__}: {value}".splitlines()[0]}
    return {"record": value}


def split(members: list, max_members: int | None) -> list[list]:
    """``members`` in consecutive chunks of at most ``max_members`` (all of them for ``None``)."""
    if not max_members:
        return [members]
    return [members[i : i + max_members] for i in range(0, len(members), max_members)]


def _count_option(name: str, value) -> int | None:
    if value is not None and (type(value) is not int or value < 1):
        raise ConfigError(f"hydra.launcher.{name}={value!r} is not allowed; allowed: null, >= 1")
    return value


class PopulationLauncher(Launcher):
    def __init__(
        self,
        max_members: int | None = None,
        executor: str = "inline",
        workers: int | None = None,
        **executor_settings,
    ) -> None:
        # executor_settings: the ``slurm`` and ``local`` nodes, read from the sweep's config at launch.
        super().__init__()
        if executor not in EXECUTORS:
            raise ConfigError(
                f"hydra.launcher.executor={executor!r} is not allowed; allowed: {', '.join(EXECUTORS)}"
            )
        self.max_members = _count_option("max_members", max_members)
        self.workers = _count_option("workers", workers)
        if executor != "inline" and self.workers not in (None, 1):
            raise ConfigError(
                f"hydra.launcher.workers={workers} is not allowed with executor={executor}: "
                "workers share out the inline executor's populations (allowed there: null, 1)"
            )
        self.executor = executor
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra_plugins.memhead_population.compose import MemberComposer

        # A grid's configs are hundreds of thousands of small objects, alive until the end: the cyclic
        # collector's passes over them cost ~15 % of a 2-D grid's wall time at the default thresholds.
        # Rarer passes for the launch (memory is freed by reference counting all the same).
        gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])
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
        units: list[tuple[bool, list[Job]]] = []  # (as a population?, its jobs)
        for number, (key, members) in enumerate(groups.items()):
            names = ", ".join(f"#{job.idx}" for job in members)
            if reasons[key] is not None:
                log.info(
                    "group %d (%d jobs: %s) runs one by one: %s", number, len(members), names, reasons[key]
                )
                units.append((False, members))
                continue
            for part in split(members, self.max_members):
                log.info("group %d: a population of %d jobs (%s)", number, len(part),
                         ", ".join(f"#{j.idx}" for j in part))  # fmt: skip
                units.append((True, part))
        if self.executor != "inline":
            self._submit(units)
            return [job.ret for job in jobs]
        populations = [members for population, members in units if population]
        workers = self._worker_count(populations)
        if workers > 1:
            self._run_in_workers(populations, workers)
        else:
            from memhead.run_dir import Preempted

            for members in populations:
                try:
                    self._settle_population(members, *self._train_population(members))
                except Preempted as err:  # the members' checkpoints are written: a relaunch resumes them
                    exit_preempted(err.signum, str(err))
        for population, members in units:
            if not population:
                for job in members:
                    log.info("\t#%d : %s", job.idx, " ".join(filter_overrides(job.overrides)))
                    job.ret = self._run_job(job, self.task_function)
        return [job.ret for job in jobs]

    def _worker_count(self, populations: list[list[Job]]) -> int:
        """``workers``, or by default one per usable CPU core when every population trains on the CPU
        (CUDA ones share out a GPU better within one process); never more than there are populations."""
        from hydra_plugins.memhead_population.workers import usable_cpus

        if self.workers is not None:
            return min(self.workers, len(populations))
        on_cpu = all(str(members[0].config.device) == "cpu" for members in populations)
        return min(usable_cpus(), len(populations)) if on_cpu else 1

    def _run_in_workers(self, populations: list[list[Job]], workers: int) -> None:
        """Every population in one of ``workers`` forked processes (``workers.py``), settled here once
        all have ended. A preemption signal stops them all at their next boundary, checkpoints
        written, as inline."""
        from hydra_plugins.memhead_population.workers import run_units
        from memhead.hydra_callbacks import holds_a_run

        log.info("%d populations in %d worker processes", len(populations), workers)
        out_dirs = [[output_dir(job.config) for job in jobs] for jobs in populations]
        kept = [[holds_a_run(Path(d)) for d in dirs] for dirs in out_dirs]
        preempted = None
        outcomes: dict[int, tuple | None] = dict.fromkeys(range(len(populations)))
        train = lambda unit: self._train_population(populations[unit])[2]  # noqa: E731 - dirs known here
        for unit, outcome in run_units(train, len(populations), workers):
            outcomes[unit] = outcome
            if outcome[0] == "preempted" and preempted is None:  # its checkpoints are written
                preempted = outcome[1:]
        if preempted is not None:
            exit_preempted(*preempted)
        for unit, outcome in outcomes.items():
            jobs = populations[unit]
            for job in jobs:
                job.ret = task_return(job)
            if outcome is not None and outcome[0] == "done":
                self._settle_population(jobs, out_dirs[unit], kept[unit], outcome[1])
                continue
            # Its checkpoints, if any, stay: a relaunch resumes them.
            reason = "not started: every worker process died" if outcome is None else (
                f"the worker process training it died (exit code {outcome[1]})")  # fmt: skip
            self._settle_population(jobs, out_dirs[unit], kept[unit], [{"error": reason}] * len(jobs))

    def _submit(self, units: list[tuple[bool, list[Job]]]) -> None:
        """Every unit as one submitit job (one SLURM array); wait for them, then settle each job."""
        from hydra.core.singleton import Singleton

        from hydra_plugins.memhead_population.executors import GroupTask, make_executor

        executor = make_executor(self.executor, self.config.hydra.launcher[self.executor])
        # The tasks compose nothing: they carry Hydra's own loader, not the composer and its caches.
        context = HydraContext(config_loader=self.hydra_context.config_loader.loader,
                               callbacks=self.hydra_context.callbacks)  # fmt: skip
        task = GroupTask(context, self.task_function, Singleton.get_state())
        arguments, written = [], []
        for population, members in units:
            if population:
                prepared = self._prepare_population(members)
                arguments.append((True, [job.ret.cfg for job in members], prepared[0],
                                  [log_file(job.ret) for job in members]))  # fmt: skip
            else:  # written on the node, by run_job
                prepared = None
                arguments.append((False, [job.config for job in members], [], []))
            written.append(prepared)
        submitted = executor.map_array(task, *zip(*arguments))
        log.info("submitted %d groups as %s job(s) %s", len(units), self.executor,
                 ", ".join(sorted({j.job_id.split("_")[0] for j in submitted})))  # fmt: skip
        for (population, members), prepared, job in zip(units, written, submitted):
            try:
                outcomes = job.results()[0]
            except Exception as err:  # noqa: BLE001 - the task failed: so did each of its jobs
                last = (str(err).strip().splitlines() or [type(err).__name__])[-1].strip()
                reason = f"{self.executor} job {job.job_id} failed ({last}); its log: {job.paths.stderr}"
                outcomes = [{"error": reason}] * len(members)
            if population:
                self._settle_population(members, *prepared, outcomes)
                continue
            for member, outcome in zip(members, outcomes):
                member.ret = JobReturn(overrides=member.overrides, status=JobStatus.COMPLETED)
                member.ret.return_value = outcome.get("value", f"failed: {outcome.get('error')}")

    def _prepare_population(self, jobs: list[Job]) -> tuple[list[str], list[bool]]:
        """Each job's directory and ``.hydra/`` files, as the basic launcher writes them; which held a run."""
        from memhead.hydra_callbacks import holds_a_run

        for job in jobs:
            job.ret = write_job_dir(job.config)
        out_dirs = [job.ret.hydra_cfg.hydra.runtime.output_dir for job in jobs]
        kept = [holds_a_run(Path(out_dir)) for out_dir in out_dirs]  # never replaced by a failure record
        return out_dirs, kept

    def _train_population(self, jobs: list[Job]) -> tuple[list[str], list[bool], list[dict]]:
        """A population's job directories, trained: where they are, which held a run before, and each
        job's outcome. On a preemption signal: :class:`~memhead.run_dir.Preempted`."""
        from memhead.hydra_callbacks import user_error
        from memhead.population.run import run_population
        from memhead.run_dir import Preempted

        out_dirs, kept = self._prepare_population(jobs)
        try:
            with member_logs([log_file(job.ret) for job in jobs]):
                outcomes = [outcome_of(v) for v in run_population([job.ret.cfg for job in jobs], out_dirs)]
        except Preempted:  # the members' checkpoints are written: a relaunch resumes them
            raise
        except Exception as err:  # the population failed: so did each of its jobs
            if user_error(err, out_dirs[0]) is None:  # a bug: its traceback, once
                log.exception("population of jobs %s failed", [job.idx for job in jobs])
            outcomes = [outcome_of(err)] * len(jobs)
        return out_dirs, kept, outcomes

    def _settle_population(self, jobs: list[Job], out_dirs: list[str], kept: list[bool], outcomes) -> None:
        """Each job's return (its optimised value, or ``"failed: <reason>"`` as run.py returns it) and
        failure record; a job refused where another run's files are keeps them as they were."""
        from memhead.config import optimized_value
        from memhead.hydra_callbacks import SNAPSHOTS
        from memhead.runner import write_failure_record

        for job, out_dir, was_kept, outcome in zip(jobs, out_dirs, kept, outcomes):
            job.ret.status = JobStatus.COMPLETED  # as run.py's failed jobs: the other jobs go on
            if "error" in outcome:
                reason = outcome["error"]
                job.ret.return_value = f"failed: {reason}"
                if was_kept:
                    SNAPSHOTS.restore(Path(out_dir))
                    SNAPSHOTS.refused.append(f"{out_dir}: {reason}")
                else:
                    write_failure_record(Path(out_dir), reason, job.ret.cfg)
                print(f"error: job #{job.idx}: {reason}", file=sys.stderr)
                continue
            SNAPSHOTS.accepted += 1
            job.ret.return_value = optimized_value(outcome["record"], job.ret.cfg.optimized_metric)
