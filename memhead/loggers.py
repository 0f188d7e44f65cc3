"""Experiment trackers. They only record what the run computed; a tracker failure never stops a run.

The runner calls, in order: :func:`make_logger`, ``log_boundary`` after each distribution boundary,
``log_final`` once the record is written, and ``close`` (always, in a ``finally``).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

from torch import nn

log = logging.getLogger(__name__)

# wandb.watch: samples between two histogram logs (one sample per step in the paper's protocol).
WATCH_LOG_FREQ = 1000


class NullLogger:
    """``logger=none``: console and ``metrics.json`` only."""

    def log_boundary(
        self, index: int, row: dict, *, model: nn.Module | None = None, images: Sequence[Path] = ()
    ) -> None:
        """Record the metrics after boundary ``index``.

        Args:
            index: the boundary (0-based).
            row: ``{split: {"boundary": b, metric: value}}`` as ``metrics.json``'s boundaries.
            model: the model now, for its Memory Heads' scrambling counts.
            images: pictures drawn at this boundary.
        """

    def log_final(self, record: dict, *, images: Sequence[Path] = ()) -> None:
        """Record the finished run: final metrics, timing, confusion matrices and ``images``."""

    def close(self) -> None:
        """Flush and end the tracking run."""


def image_key(path: Path) -> str:
    """The W&B key of a picture: ``plots/<name>``, boundary pictures of one kind under one key."""
    stem = Path(path).stem
    kind, sep, index = stem.rpartition("_boundary_")
    return f"plots/{kind}_boundary" if sep and index.isdigit() else f"plots/{stem}"


def scramble_metrics(model: nn.Module) -> dict[str, int]:
    """``scramble_count/<head>`` (all key sets) and, with per-neuron keys, ``scramble_count/<head>/<k>``."""
    from memhead.plots import scramble_counts

    values: dict[str, int] = {}
    for name, counts in scramble_counts(model).items():
        values[f"scramble_count/{name}"] = sum(counts)
        if len(counts) > 1:
            values.update({f"scramble_count/{name}/{k}": count for k, count in enumerate(counts)})
    return values


class WandbLogger(NullLogger):
    """``logger=wandb``: resolved config, per-boundary metrics and scrambling counts, final metrics,
    confusion matrices (tables) and the run's pictures.

    Any W&B failure (no package, no network, a refused login, a failing call) becomes a warning and
    the tracker goes quiet or skips that call; the run goes on.
    """

    def __init__(
        self, cfg, config: dict, *, run_dir: str, group: str | None, name: str | None, model: nn.Module | None
    ) -> None:
        self.run = None
        self._last_step = -1
        try:
            import wandb

            self._wandb = wandb
            self.run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                # WANDB_MODE in the environment wins, so that one variable silences a whole sweep.
                mode=os.environ.get("WANDB_MODE") or getattr(cfg.mode, "name", cfg.mode),
                group=cfg.group or group,
                name=name,
                tags=list(cfg.tags),
                # W&B's convention: WANDB_DIR wins when set; otherwise beside the run's own files.
                dir=os.environ.get("WANDB_DIR") or run_dir,
                config=config,
                reinit="create_new",
            )
        except Exception as err:  # noqa: BLE001 - tracking must never cost the run
            warnings.warn(f"logger=wandb disabled: could not start W&B ({err})", stacklevel=2)
            return
        if cfg.get("watch", False) and model is not None:
            self._safe(self.run.watch, model, log="all", log_freq=WATCH_LOG_FREQ)

    def _safe(self, fn, *args, **kwargs) -> None:
        if self.run is None:
            return
        try:
            fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            warnings.warn(f"logger=wandb: logging failed ({err}); the run continues", stacklevel=3)

    def _images(self, paths: Sequence[Path]) -> dict:
        return {image_key(path): self._wandb.Image(str(path)) for path in paths}

    def log_boundary(
        self, index: int, row: dict, *, model: nn.Module | None = None, images: Sequence[Path] = ()
    ) -> None:
        def put():
            values = {
                f"{split}/{key}": value
                for split, metrics in row.items()
                for key, value in metrics.items()
                if key != "boundary"
            }
            if model is not None:
                values.update(scramble_metrics(model))
            values.update(self._images(images))
            self.run.log({"boundary": index, **values}, step=index)
            self._last_step = index

        self._safe(put)

    def log_final(self, record: dict, *, images: Sequence[Path] = ()) -> None:
        def put():
            summary = self.run.summary
            for split, values in record["final"].items():
                for key, value in values.items():
                    summary[f"final/{split}/{key}"] = value
            for split, boundary in record.get("final_boundary", {}).items():
                summary[f"final/{split}/boundary"] = boundary
            for key, value in record["timing"].items():
                summary[f"timing/{key}"] = value
            logged = self._images(images)
            for split, rows in record.get("ccm", {}).items():
                columns = ["after"] + [f"d{j}" for j in range(len(rows[0]) if rows else 0)]
                logged[f"ccm/{split}"] = self._wandb.Table(
                    columns=columns, data=[[f"d{i}", *row] for i, row in enumerate(rows)]
                )
            # On the last boundary's step, so that W&B keeps the history in order.
            self.run.log(logged, step=max(self._last_step, len(record.get("boundaries", [])) - 1, 0))

        self._safe(put)

    def close(self) -> None:
        if self.run is not None:
            self._safe(self.run.finish)


def make_logger(
    cfg,
    config: dict,
    *,
    run_dir: str,
    group: str | None = None,
    name: str | None = None,
    model: nn.Module | None = None,
) -> NullLogger:
    """The tracker ``cfg`` names (``logger.name``).

    Args:
        cfg: the ``logger`` config node.
        config: the resolved run configuration, recorded with the run.
        run_dir: the run directory (W&B writes its files under ``run_dir/wandb``).
        group: the sweep group (runs differing only by seed), unless ``cfg.group`` is set.
        name: the run's display name.
        model: the model, for ``logger.watch``.
    """
    if cfg.name == "wandb":
        return WandbLogger(cfg, config, run_dir=run_dir, group=group, name=name, model=model)
    return NullLogger()
