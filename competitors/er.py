"""Experience Replay (Chaudhry et al. 2019, "On Tiny Episodic Memories in Continual Learning").

After the incoming batch's backward, a replay batch drawn from the buffer adds the gradient of its own
mean loss, so the step follows the *sum of two means*; the incoming samples are stored only after the
step, so a sample is never replayed in the step that brought it. ``er_reservoir`` keeps a uniform sample
of the whole stream; ``er_random`` keeps each new sample with probability 1/2 (the paper's ``ER_random``,
biased towards recent data).

``ReplayCompetitor`` holds what every replay competitor shares (buffer, counters, checks, resume).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from competitors.base import Competitor, require_int
from competitors.buffer import ReplayBuffer


class ReplayCompetitor(Competitor):
    """A buffer filled after every step with ``policy``, plus replay counters; no replay of its own."""

    @dataclass
    class Config:
        name: str = "replay"
        buffer_size: int = 64
        buffer_batch_size: int = 8

    #: name of the buffer's slot policy (see ``competitors.buffer``).
    policy: str = "reservoir"

    def __init__(self, cfg, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        self.buffer = ReplayBuffer(self.cfg.buffer_size, self.device, self.policy)
        self.replayed = 0

    @classmethod
    def check(cls, cfg) -> None:
        options = cls.parse(cfg)
        require_int("buffer_size", options.buffer_size, 1)
        require_int("buffer_batch_size", options.buffer_batch_size, 1)

    def after_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.buffer.add(x, y, self.generator)

    def replay(self, model: nn.Module, slots: torch.Tensor) -> None:
        """Backward the mean loss of the stored samples at ``slots``; gradients add to the current ones."""
        x, y = self.buffer.get(slots)
        self.loss_fn(model(x), y).backward()
        self.replayed += len(slots)

    def summary(self) -> dict:
        return {
            "buffer_per_class": self.buffer.class_counts(self.num_classes),
            "stream_samples_seen": self.buffer.seen,
            "replayed_samples": self.replayed,
        }

    def state_dict(self) -> dict:
        return {"buffer": self.buffer.state_dict(), "replayed": self.replayed}

    def load_state_dict(self, state: dict) -> None:
        self.buffer.load_state_dict(state["buffer"])
        self.replayed = int(state["replayed"])


class ERReservoir(ReplayCompetitor):
    """Experience Replay over a reservoir buffer (``competitor=er_reservoir``)."""

    @dataclass
    class Config(ReplayCompetitor.Config):
        name: str = "er_reservoir"

    def after_backward(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        slots = self.buffer.sample_slots(self.cfg.buffer_batch_size, self.generator)
        if len(slots) > 0:
            self.replay(model, slots)


class ERRandom(ERReservoir):
    """Experience Replay over a buffer that keeps each new sample with probability 1/2."""

    @dataclass
    class Config(ReplayCompetitor.Config):
        name: str = "er_random"

    policy = "random"
