"""memhead's entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra).

Examples::

    python run.py                                           # Memory Head on MODES-CDI (the paper's 2-D run)
    python run.py model=mlp benchmark=moons benchmark.order=CI seed=3
    python run.py -m model=lp,mlp,mh seed=1,2,3             # a multirun sweep
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from memhead.config import prepare_arguments, register_configs
from memhead.registry import ConfigError
from memhead.run_dir import Preempted
from memhead.runner import run

register_configs()

__all__ = ["main", "run"]


# Overrides that do not change what a run computes, left out of its tracking group.
NOT_IN_GROUP = ("seed", "progress", "plots", "logger", "checkpoint", "device")


def sweep_group(overrides: list[str]) -> str | None:
    """Runs of one sweep that differ only by seed (or by how they report) share a tracking group."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~").split(".")[0] not in NOT_IN_GROUP]
    return ",".join(sorted(kept)) or None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    try:
        hydra_cfg = HydraConfig.get()
        record = run(cfg, hydra_cfg.runtime.output_dir, group=sweep_group(list(hydra_cfg.overrides.task)))
    except ConfigError as err:
        # A bad option is the user's to fix: one line, no traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except Preempted as err:
        # A cluster's preemption: the checkpoint is written; a requeued job resumes from it.
        print(f"memhead: {err}", file=sys.stderr)
        sys.exit(128 + err.signum)
    # What a Hydra sweeper would optimise.
    return record["final"]["test"]["avg_accuracy"]


if __name__ == "__main__":
    try:
        sys.argv[1:] = prepare_arguments(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
