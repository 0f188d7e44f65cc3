"""memhead's entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra).

Examples::

    python run.py                                           # Memory Head on MODES-CDI (the paper's 2-D run)
    python run.py model=mlp benchmark=moons benchmark.order=CI seed=3
    python run.py -m model=lp,mlp,mh seed=1,2,3             # a multirun sweep
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from memhead.config import register_configs, sweep_arguments
from memhead.registry import ConfigError
from memhead.runner import run

register_configs()

__all__ = ["main", "run"]


CONF = Path(__file__).resolve().parent / "conf"


def check_group_choices(argv: list[str]) -> None:
    """Reject ``group=unknown`` in one line (Hydra's own message lists search paths and schemas)."""
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+~")
        if not sep or key == "hydra" or "." in key or "/" in key or "(" in value or not (CONF / key).is_dir():
            continue
        for option in value.split(","):
            if option and option != "null" and not (CONF / key / f"{option}.yaml").is_file():
                known = ", ".join(sorted(p.stem for p in (CONF / key).glob("*.yaml")))
                print(f"error: {key}={option!r} is unknown; known: {known}", file=sys.stderr)
                sys.exit(2)


def _sweep_group() -> str | None:
    """Runs of one sweep that differ only by seed share a tracking group."""
    from hydra.core.hydra_config import HydraConfig

    overrides = [o for o in HydraConfig.get().overrides.task if not o.split("=", 1)[0].lstrip("+~") == "seed"]
    return ",".join(sorted(overrides)) or None


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    try:
        record = run(cfg, HydraConfig.get().runtime.output_dir, group=_sweep_group())
    except ConfigError as err:
        # A bad option is the user's to fix: one line, no traceback.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    # What a Hydra sweeper would optimise.
    return record["final"]["test"]["avg_accuracy"]


def expand_plots_alias(argv: list[str]) -> list[str]:
    """``plots=true|false`` means ``plots.enabled=...`` (Hydra cannot set the ``plots`` node to a bool)."""
    return [f"plots.enabled={arg.split('=', 1)[1].lower()}"
            if arg.lower() in ("plots=true", "plots=false") else arg for arg in argv]


if __name__ == "__main__":
    sys.argv[1:] = expand_plots_alias(sys.argv[1:])
    check_group_choices(sys.argv[1:])
    try:
        sys.argv[1:] = sweep_arguments(sys.argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    main()
