"""Averaged GEM (Chaudhry et al. 2019, "Efficient Lifelong Learning with A-GEM").

A reservoir buffer keeps a uniform sample of everything seen. Once it holds data, the incoming
gradient ``g`` is compared with the reference gradient ``g_ref`` of the mean loss on a replay batch,
both flattened over all trainable parameters; when they conflict (``g · g_ref < 0``) the step uses
``g - (g · g_ref / g_ref · g_ref) g_ref``, the closest gradient that does not increase the replay loss
to first order. The replay batch only steers the direction: its gradient is never added.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from competitors.er import ReplayCompetitor


class AGEM(ReplayCompetitor):
    """Gradient projection against a replay batch's gradient (``competitor=agem``)."""

    @dataclass
    class Config(ReplayCompetitor.Config):
        name: str = "agem"

    def __init__(self, cfg, **kwargs) -> None:
        super().__init__(cfg, **kwargs)
        self.projections = 0

    def after_backward(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        slots = self.buffer.sample_slots(self.cfg.buffer_batch_size, self.generator)
        if len(slots) == 0:
            return
        params = [p for p in model.parameters() if p.requires_grad]
        bx, by = self.buffer.get(slots)
        # autograd.grad leaves .grad (the incoming gradient) untouched.
        ref_grads = torch.autograd.grad(self.loss_fn(model(bx), by), params, allow_unused=True)
        self.replayed += len(slots)
        g = _flatten([p.grad for p in params], params)
        g_ref = _flatten(ref_grads, params)
        projected = project(g, g_ref)
        if projected is not g:
            self.projections += 1
            _unflatten_into_grads(projected, params)

    def summary(self) -> dict:
        return {**super().summary(), "projections": self.projections}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "projections": self.projections}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.projections = int(state["projections"])


def project(g: torch.Tensor, g_ref: torch.Tensor) -> torch.Tensor:
    """``g`` itself when ``g · g_ref >= 0``, else ``g`` minus its component along ``g_ref``."""
    dot = torch.dot(g, g_ref)
    if dot >= 0:
        return g
    return g - (dot / torch.dot(g_ref, g_ref)) * g_ref


def _flatten(grads, params: list[nn.Parameter]) -> torch.Tensor:
    # A parameter the loss does not reach has a zero gradient.
    return torch.cat(
        [(torch.zeros_like(p) if grad is None else grad).reshape(-1) for grad, p in zip(grads, params)]
    )


def _unflatten_into_grads(flat: torch.Tensor, params: list[nn.Parameter]) -> None:
    offset = 0
    for p in params:
        piece = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
        if p.grad is None:
            p.grad = piece.clone()
        else:
            p.grad.copy_(piece)
