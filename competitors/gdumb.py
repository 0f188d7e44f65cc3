"""GDumb (Prabhu et al. 2020, "GDumb: A Simple Approach that Questions Our Progress in Continual
Learning").

Never trains on the stream: it only fills a greedy class-balanced memory. At every distribution
boundary, before evaluation, it re-initialises the model (``reset_parameters`` on every submodule that
has one, a Memory Head included), builds a fresh optimizer of the configured type, and trains
``epochs`` epochs on the memory in shuffled mini-batches, with optional gradient-norm clipping. The new
model and optimizer are handed back to the loop explicitly.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from competitors.base import reinitialise, require_int
from competitors.er import ReplayCompetitor
from memhead.registry import ConfigError


class GDumb(ReplayCompetitor):
    """Retrain from scratch on a class-balanced memory at every boundary (``competitor=gdumb``)."""

    @dataclass
    class Config(ReplayCompetitor.Config):
        name: str = "gdumb"
        epochs: int = 10
        clip: float | None = None

    trains_on_stream = False
    policy = "class_balanced"

    def __init__(self, cfg, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        self.retrainings = 0

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        options = cls.parse(cfg)
        require_int("epochs", options.epochs, 1)
        clip = options.clip
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip <= 0):
            raise ConfigError(f"competitor.clip must be a number > 0 or null (got {clip!r})")

    def at_boundary(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        reinitialise(model, self.generator)
        optimizer = self.make_optimizer(model)
        model.train()
        if self.buffer.filled:
            self._train_on_memory(model, optimizer)
        self.retrainings += 1
        return model, optimizer

    def _train_on_memory(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        x, y = self.buffer.contents()
        batch = self.cfg.buffer_batch_size
        for _ in tqdm(range(self.cfg.epochs), desc="gdumb", leave=False, disable=not sys.stderr.isatty()):
            order = torch.randperm(len(y), generator=self.generator).to(y.device)
            for start in range(0, len(y), batch):
                chosen = order[start : start + batch]
                optimizer.zero_grad()
                self.loss_fn(model(x[chosen]), y[chosen]).backward()
                if self.cfg.clip is not None:
                    nn.utils.clip_grad_norm_(model.parameters(), self.cfg.clip)
                optimizer.step()
                self.replayed += len(chosen)

    def summary(self) -> dict:
        return {**super().summary(), "retrainings": self.retrainings}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "retrainings": self.retrainings}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.retrainings = int(state["retrainings"])
