"""memhead's entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra).

Examples::

    python run.py                                           # Memory Head on MODES-CDI (the paper's 2-D run)
    python run.py model=mlp benchmark=moons benchmark.order=CI seed=3
    python run.py -m model=lp,mlp,mh seed=1,2,3             # a multirun sweep
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from memhead.config import prepare_arguments, register_configs
from memhead.hydra_callbacks import user_error
from memhead.registry import ConfigError
from memhead.run_dir import Preempted
from memhead.runner import run, write_failure_record

register_configs()
log = logging.getLogger("run")

__all__ = ["cli", "main", "run"]


# Overrides that do not change what a run computes, left out of its tracking group.
NOT_IN_GROUP = ("seed", "progress", "plots", "logger", "checkpoint", "device")


def sweep_group(overrides: list[str]) -> str | None:
    """Runs of one sweep that differ only by seed (or by how they report) share a tracking group."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in NOT_IN_GROUP]
    return ",".join(sorted(kept)) or None


def close_logs_in(out_dir: Path) -> None:
    """Close the log files Hydra opened in ``out_dir`` (and only those: other handlers keep logging)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name is not None and Path(name).resolve().is_relative_to(out_dir.resolve()):
            handler.close()
            root.removeHandler(handler)


def _job_name(hydra_cfg) -> str:
    overrides = " ".join(hydra_cfg.overrides.task)
    return f"job {hydra_cfg.job.num}" + (f" ({overrides})" if overrides else "")


def _interrupted(out_dir: Path) -> None:
    from memhead import checkpoint

    where = out_dir / checkpoint.CHECKPOINT
    if where.is_file():
        hint = f"run the same command again to resume from {where}"
    else:
        hint = f"no checkpoint yet in {out_dir}: the same command starts the run again"
    print(f"interrupted: {hint}", file=sys.stderr)
    sys.exit(130)


# Absolute: the same config whether run.py is the script or imported (tests call cli in-process).
@hydra.main(
    version_base="1.3", config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config"
)
def main(cfg: DictConfig) -> float | str:
    """One job. Returns ``optimized_metric`` for a sweeper; a failed job of a multirun returns the string
    ``"failed: <reason>"``, which sweepers (optuna) record as a failed trial and go on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from memhead.config import optimized_value
    from memhead.hydra_callbacks import RUN, SNAPSHOTS, fail, holds_a_run

    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    out_dir = Path(hydra_cfg.runtime.output_dir)
    # Held a run before this job (Hydra writes only .hydra/ and the log): if the job fails, every file
    # there stays exactly as it was, and no failure record replaces that run's record.
    kept = holds_a_run(out_dir)
    try:
        record = run(cfg, out_dir, group=sweep_group(list(hydra_cfg.overrides.task)))
        value = optimized_value(record, cfg.optimized_metric)
    except KeyboardInterrupt:
        _interrupted(out_dir)
    except Preempted as err:
        # A cluster's preemption: the checkpoint is written; a requeued job resumes from it.
        print(f"memhead: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    except Exception as err:
        reason = user_error(err, str(out_dir))
        if reason is None:
            if not multirun:
                raise
            # A bug in one job: its traceback goes to its run.log; the other jobs run.
            log.exception("job failed")
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
        if kept:
            close_logs_in(out_dir)
            SNAPSHOTS.restore(out_dir)
        if not multirun:
            # Nothing of a refused run stays behind (a directory that existed is another matter).
            close_logs_in(out_dir)
            RUN.remove_created()
            fail(reason)
        if kept:
            SNAPSHOTS.refused.append(f"{out_dir}: {reason}")
        else:
            write_failure_record(out_dir, reason, cfg)
        print(f"error: {_job_name(hydra_cfg)}: {reason}", file=sys.stderr)
        return f"failed: {reason}"
    SNAPSHOTS.accepted += 1
    if multirun:
        print(f"{_job_name(hydra_cfg)}: {job_summary(record, cfg.optimized_metric)}", file=sys.stderr)
    return value


def job_summary(record: dict, optimized_metric: str) -> str:
    """One line per finished job of a multirun: the optimised value, the test accuracy, the time."""
    final = record["final"]
    split, metric = optimized_metric.split(".", 1)
    parts = [f"{optimized_metric}={final[split][metric]:.4f}"]
    if optimized_metric != "test.avg_accuracy" and "test" in final:
        parts.append(f"test.avg_accuracy={final['test']['avg_accuracy']:.4f}")
    timing = record.get("timing", {})
    if "total_s" in timing:
        parts.append(f"{timing['total_s']:.1f}s")
    return " ".join(parts)


def cli(argv: list[str]) -> int:
    """``python run.py ARGS``: the exit code. Every configuration error is one line on stderr and exit
    code 2; a multirun whose jobs failed exits 1 after all of them ran, saying how many failed."""
    import os

    from memhead.config import hydra_error_line
    from memhead.hydra_callbacks import MULTIRUN, RUN

    try:
        args = prepare_arguments(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # Hydra's own errors reach us as exceptions (not as its multi-line print with exit code 1).
    os.environ["HYDRA_FULL_ERROR"] = "1"
    MULTIRUN.sweep_dir, MULTIRUN.failed = None, []
    RUN.created = None
    saved_argv = sys.argv
    sys.argv = [saved_argv[0] if saved_argv else "run.py", *args]
    try:
        main()
    except SystemExit as done:  # a refused run (2) or an interrupted one (130), already reported
        return done.code if isinstance(done.code, int) else 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        line = hydra_error_line(err) or user_error(err, "the run directory")
        if line is None:
            raise
        RUN.remove_created()
        print(f"error: {line}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved_argv
    if MULTIRUN.failed:
        print(
            f"error: {len(MULTIRUN.failed)} job(s) of the multirun failed (listed by memhead.report): "
            f"{MULTIRUN.failed[0]}" + (" ..." if len(MULTIRUN.failed) > 1 else ""),
            file=sys.stderr,
        )
        return 1
    return 0


def exit_now(code: int) -> None:
    """Exit without the interpreter's last garbage collection: a sweep leaves hundreds of thousands of
    config nodes in reference cycles, and collecting them (2 s after a 160-run sweep) frees nothing that
    the process's end does not (every file a run writes is closed by then; logging shuts down at exit)."""
    import gc

    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    exit_now(cli(sys.argv[1:]))
