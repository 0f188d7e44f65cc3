"""Maximally Interfered Retrieval (Aljundi et al. 2019, "Online Continual Learning with Maximally
Interfered Retrieval").

Experience Replay whose replay batch is chosen, not drawn: ``candidates`` slots are drawn from the
reservoir buffer, scored by how much a plain SGD step on the incoming batch would raise their loss,
``loss(θ - lr·g; x) - loss(θ; x)`` (per-sample cross-entropy, ``lr`` the optimizer's), and the
``buffer_batch_size`` highest-scoring ones are replayed as in ER.

Unlike the paper's code, which draws only ``buffer_batch_size`` candidates (so its MIR replays exactly
what ER would), ``candidates`` must exceed ``buffer_batch_size``. Scoring runs in eval mode without
gradient on a functional copy of the parameters, so it changes nothing in the model: no parameter, no
BatchNorm statistic, no Memory Head key or counter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from competitors.base import require_int
from competitors.er import ERReservoir, ReplayCompetitor
from memhead.registry import ConfigError


class MIR(ERReservoir):
    """Replay of the buffered samples the incoming batch's update would hurt most (``competitor=mir``)."""

    @dataclass
    class Config(ReplayCompetitor.Config):
        name: str = "mir"
        candidates: int = 50

    @classmethod
    def check(cls, cfg) -> None:
        super().check(cfg)
        options = cls.parse(cfg)
        require_int("candidates", options.candidates, 2)
        if options.candidates <= options.buffer_batch_size:
            raise ConfigError(
                f"competitor.candidates ({options.candidates}) must be > "
                f"competitor.buffer_batch_size ({options.buffer_batch_size}) for mir"
            )

    def after_backward(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        slots = self.buffer.sample_slots(self.cfg.candidates, self.generator)
        if len(slots) > self.cfg.buffer_batch_size:
            cx, cy = self.buffer.get(slots)
            scores = interference_scores(model, optimizer.param_groups[0]["lr"], cx, cy)
            slots = slots[scores.topk(self.cfg.buffer_batch_size).indices.cpu()]
        if len(slots) > 0:
            self.replay(model, slots)


def interference_scores(model: nn.Module, lr: float, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample ``loss(θ - lr·grad; x) - loss(θ; x)`` with the gradients now in ``.grad``.

    Parameters without a gradient stay as they are in the virtual step. The model is left unchanged,
    its train/eval flags included.
    """
    virtual = {
        name: p.detach() if p.grad is None else (p - lr * p.grad).detach()
        for name, p in model.named_parameters()
    }
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            before = F.cross_entropy(model(x), y, reduction="none")
            after = F.cross_entropy(functional_call(model, virtual, (x,)), y, reduction="none")
    finally:
        for module, training in modes.items():
            module.training = training
    return after - before
