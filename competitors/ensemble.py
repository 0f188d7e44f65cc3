"""Ensemble control (the Memory Head paper, Tiezzi et al. 2024): K times the parameters, no memory.

``wrap`` replaces the model with ``members`` independently re-initialised copies whose logits are
averaged; the loop's single optimizer then trains them jointly on the loss of the mean. It tells
whether a Memory Head's gains come from its extra parameters rather than from how it routes them.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from competitors.base import Competitor, reinitialise, require_int


class MeanOfMembers(nn.Module):
    """Averages the logits of its members.

    Args:
        members: modules mapping ``(b, in_features)`` to ``(b, num_classes)``.

    Shape:
        - Input: ``(b, in_features)``.
        - Output: ``(b, num_classes)``, the mean of the members' outputs.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([member(x) for member in self.members]).mean(dim=0)


class Ensemble(Competitor):
    """Mean of ``members`` re-initialised copies of the model (``competitor=ensemble``)."""

    @dataclass
    class Config:
        name: str = "ensemble"
        members: int = 5

    @classmethod
    def check(cls, cfg) -> None:
        require_int("members", cls.parse(cfg).members, 1)

    def wrap(self, model: nn.Module) -> nn.Module:
        members = []
        for _ in range(self.cfg.members):
            member = copy.deepcopy(model)
            reinitialise(member, self.generator)
            members.append(member)
        return MeanOfMembers(members)

    def summary(self) -> dict:
        return {"members": self.cfg.members}
