"""Experiment trackers. They only record what the run computed; a tracker failure never stops a run."""

from __future__ import annotations

import logging
import os
import warnings

log = logging.getLogger(__name__)


class NullLogger:
    """``logger=none``: console and ``metrics.json`` only."""

    def log_boundary(self, index: int, row: dict) -> None:
        pass

    def log_final(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class WandbLogger(NullLogger):
    """``logger=wandb``: resolved config, per-boundary metrics, final metrics and matrices."""

    def __init__(self, cfg, config: dict, *, run_dir: str, group: str | None, name: str | None) -> None:
        import wandb

        self._wandb = wandb
        self.run = None
        try:
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                # WANDB_MODE in the environment wins, so that one variable silences a whole sweep.
                mode=os.environ.get("WANDB_MODE") or cfg.mode.name,
                group=cfg.group or group,
                name=name,
                tags=list(cfg.tags),
                dir=run_dir,
                config=config,
                reinit="create_new",
            )
        except Exception as err:  # noqa: BLE001 - tracking must never cost the run
            warnings.warn(f"logger=wandb disabled: could not start W&B ({err})", stacklevel=2)

    def _safe(self, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"logger=wandb: logging failed ({err}); the run continues", stacklevel=3)

    def log_boundary(self, index: int, row: dict) -> None:
        flat = {f"{split}/{key}": value for split, values in row.items() for key, value in values.items()
                if key != "boundary"}
        self._safe(self.run.log, {"boundary": index, **flat}, step=index)

    def log_final(self, record: dict) -> None:
        def put():
            for split, values in record["final"].items():
                for key, value in values.items():
                    self.run.summary[f"final/{split}/{key}"] = value
            for key, value in record["timing"].items():
                self.run.summary[f"timing/{key}"] = value
            for split, rows in record["ccm"].items():
                columns = [f"d{j}" for j in range(len(rows))]
                table = self._wandb.Table(columns=["after"] + columns,
                                          data=[[f"d{i}"] + [v for v in row] for i, row in enumerate(rows)])
                self.run.log({f"ccm/{split}": table})

        self._safe(put)

    def close(self) -> None:
        self._safe(self.run.finish)


def make_logger(cfg, config: dict, *, run_dir: str, group: str | None = None, name: str | None = None):
    if cfg.name == "wandb":
        return WandbLogger(cfg, config, run_dir=run_dir, group=group, name=name)
    return NullLogger()
