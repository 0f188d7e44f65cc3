"""Hydra callbacks: refuse a bad configuration in one line before Hydra creates its run directory.

Listed in ``conf/config.yaml`` under ``hydra.callbacks``. A single run is checked in ``on_run_start``,
before Hydra makes the run directory and writes ``.hydra/``. A multirun is checked for its launcher in
``on_multirun_start`` (SLURM present); its jobs are checked in the job itself, where a bad one fails
alone (``run.py``), and ``on_multirun_end`` counts the jobs that failed so that the command can exit 1.
"""

from __future__ import annotations

import copy
import json
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from memhead.registry import ConfigError

# Exit code of every configuration error, as the README says.
CONFIG_ERROR_EXIT = 2


def fail(reason: str, code: int = CONFIG_ERROR_EXIT) -> None:
    """The one line of a refused command, and its exit code."""
    print(f"error: {reason}", file=sys.stderr)
    sys.exit(code)


def one_line(err: BaseException) -> str:
    """The first line of an error's message (a ConfigError is one line already)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def check_job_config(config: DictConfig) -> None:
    """The checks ``run`` makes before it reads data, on a composed config (Hydra node included)."""
    from omegaconf import open_dict, read_write

    from memhead.config import hydra_error_line
    from memhead.runner import check_config

    task = copy.deepcopy(config)  # what the job will see: the config without the hydra node
    with read_write(task), open_dict(task):
        task.pop("hydra", None)
    try:
        check_config(task)
    except ConfigError:
        raise
    except Exception as err:  # an OmegaConf access error (missing value, bad interpolation)
        line = hydra_error_line(err)
        if line is None:
            raise
        raise ConfigError(line) from None


def user_error(err: BaseException, out_dir: str) -> str | None:
    """One line for an error that is the user's or the machine's to fix, or None (a bug: traceback)."""
    import errno

    from memhead.config import hydra_error_line

    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"disk full while writing {err.filename or out_dir}: free some space, then run again to resume"
    if isinstance(err, OSError) and err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
        return f"cannot write {err.filename or out_dir}: {err.strerror} (choose a writable hydra.run.dir)"
    if isinstance(err, RuntimeError) and ("PytorchStreamWriter" in str(err) or "unexpected pos" in str(err)):
        return f"disk full (or the file system failed) while writing a checkpoint in {out_dir}"
    if isinstance(err, MemoryError):
        return f"out of memory ({one_line(err) or 'MemoryError'}): choose smaller sizes"
    return hydra_error_line(err)


@dataclass
class RunDir:
    """What a single run's directory was before Hydra made it: the folders the run created."""

    created: Path | None = None  # the topmost folder that did not exist, or None

    def remove_created(self) -> None:
        """Remove the folders this run created (a refused run leaves nothing behind)."""
        if self.created is not None and self.created.is_dir():
            shutil.rmtree(self.created, ignore_errors=True)
        self.created = None


@dataclass
class MultirunState:
    sweep_dir: Path | None = None
    started: float = 0.0
    failed: list[str] = field(default_factory=list)  # one line per failed job, in job order


RUN = RunDir()
MULTIRUN = MultirunState()


def _topmost_missing(path: Path) -> Path | None:
    path = path.absolute()
    if path.exists():
        return None
    while not path.parent.exists():
        path = path.parent
    return path


def failed_jobs(sweep_dir: Path, since: float) -> list[str]:
    """``"<job dir>: <reason>"`` of every job under ``sweep_dir`` whose failure record was written after
    ``since`` (the failures of this launch, not of earlier launches into the same directory)."""
    out = []
    for path in sorted(sweep_dir.glob("*/metrics.json"), key=lambda p: (len(p.parent.name), p.parent.name)):
        try:
            if path.stat().st_mtime < since:
                continue
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and record.get("failed"):
            out.append(f"{path.parent}: {record.get('error', 'failed')}")
    return out


def check_launcher(config: DictConfig) -> None:
    """The SLURM launcher needs SLURM's commands on this machine (submitit calls sbatch)."""
    target = str(config.hydra.launcher.get("_target_", ""))
    if "Slurm" in target and shutil.which("sbatch") is None:
        raise ConfigError(
            "hydra/launcher=slurm needs SLURM, but sbatch is not on PATH here; "
            "submit from a SLURM login node, or use hydra/launcher=local"
        )


class CheckConfig(Callback):
    """Validate before any directory exists; count the failed jobs of a multirun."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        RUN.created = _topmost_missing(Path(str(config.hydra.run.dir)))
        try:
            check_job_config(config)
        except ConfigError as err:
            fail(str(err))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_launcher(config)
        except ConfigError as err:
            fail(str(err))
        MULTIRUN.sweep_dir = Path(str(config.hydra.sweep.dir))
        MULTIRUN.started = time.time() - 1.0  # file times have coarse resolution on some file systems
        MULTIRUN.failed = []

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if MULTIRUN.sweep_dir is not None and MULTIRUN.sweep_dir.is_dir():
            MULTIRUN.failed = failed_jobs(MULTIRUN.sweep_dir, MULTIRUN.started)
        MULTIRUN.failed += SNAPSHOTS.refused  # refused where a record of another run stays untouched


# Files Hydra (re)writes in a job's directory before the job can refuse: they must stay as they were.
def _metadata_files(job_dir: Path) -> list[Path]:
    return [p for p in [*job_dir.glob(".hydra/*"), *job_dir.glob("*.log")] if p.is_file()]


@dataclass
class Snapshots:
    """The bytes of every metadata file of the directories a launch may write into, taken before it does."""

    files: dict[Path, bytes] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)  # in-process jobs refused in a directory they kept
    accepted: int = 0  # in-process jobs of this launch that ran (or found their run finished)

    def take(self, paths: list[Path]) -> None:
        self.files = {}
        for path in paths:
            try:
                self.files[path.absolute()] = path.read_bytes()
            except OSError:
                pass

    def restore(self, job_dir: Path) -> None:
        """Put back the metadata of ``job_dir`` as it was; drop what Hydra added there since."""
        job_dir = job_dir.absolute()
        for path in _metadata_files(job_dir):
            if path.absolute() not in self.files:
                path.unlink(missing_ok=True)
        for path, content in self.files.items():
            if job_dir in path.parents and (not path.is_file() or path.read_bytes() != content):
                path.write_bytes(content)


SNAPSHOTS = Snapshots()


def holds_a_run(job_dir: Path) -> bool:
    from memhead.checkpoint import CHECKPOINT

    return (job_dir / "metrics.json").is_file() or (job_dir / CHECKPOINT).is_file()


class KeepRunDirs(Callback):
    """A job refused in a directory that holds a run leaves that directory's files exactly as they were.

    Hydra writes ``.hydra/*.yaml`` (and ``multirun.yaml``) before the job can look at what the directory
    holds; this callback keeps their earlier bytes, and ``run.py`` puts them back when the job fails.
    """

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        SNAPSHOTS.take(_metadata_files(Path(str(config.hydra.run.dir))))
        SNAPSHOTS.refused, SNAPSHOTS.accepted = [], 0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(str(config.hydra.sweep.dir))
        jobs = [p for p in sweep.glob("*") if p.is_dir()] if sweep.is_dir() else []
        SNAPSHOTS.take([sweep / "multirun.yaml", *(f for job in jobs for f in _metadata_files(job))])
        SNAPSHOTS.refused, SNAPSHOTS.accepted = [], 0

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        # multirun.yaml describes the last launch that ran something; a launch refused whole keeps the old.
        if SNAPSHOTS.refused and not SNAPSHOTS.accepted:
            SNAPSHOTS.restore(Path(str(config.hydra.sweep.dir)))
