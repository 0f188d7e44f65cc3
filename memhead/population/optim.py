"""Adam and SGD over a population: every tensor has a leading member dimension, and each member has
its own learning rate and weight decay.

Two ways to step, both without a loop over members in Python:

* *vectorised* (``fused=False``): one pass per parameter tensor over all members, the per-member
  hyperparameters as tensors of shape ``(P, 1, ...)``, with the arithmetic of ``torch.optim.Adam`` /
  ``SGD``'s single-tensor step (L2 weight decay added to the gradient, Adam's bias corrections):
  bitwise that step, member by member;
* *fused* (the default where torch has fused kernels, as the run alone uses them): torch's fused
  kernel, once per distinct ``(lr, weight_decay)`` pair, over every member with that pair (each
  member's slices of the parameters are views): bitwise what the run alone computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def _per_member(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``values`` as a ``(P, 1, ...)`` tensor that broadcasts against ``like`` ``(P, ...)``."""
    return torch.tensor(list(values), dtype=like.dtype, device=like.device).view(-1, *[1] * (like.dim() - 1))


class PopulationOptimizer:
    """What Adam and SGD share: the parameters, per-member hyperparameters, ``zero_grad``, state."""

    def __init__(
        self,
        params: list[torch.Tensor],
        lr: Sequence[float],
        weight_decay: Sequence[float],
        fused: bool | None = None,
    ):
        self.params = [p for p in params if p.requires_grad]
        members = {p.shape[0] for p in self.params}
        if members != {len(lr)} or len(weight_decay) != len(lr):
            raise ValueError(f"parameters lead with {members} members; got {len(lr)} learning rates")
        self.lr = [float(v) for v in lr]
        self.weight_decay = [float(v) for v in weight_decay]
        self._wd = [_per_member(self.weight_decay, p) for p in self.params]
        self._decays = any(self.weight_decay)
        if fused is None:
            fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in self.params)
        self.fused = bool(fused) and bool(self.params)
        # Members that share (lr, weight_decay) share a fused call.
        groups: dict[tuple[float, float], list[int]] = {}
        for member, pair in enumerate(zip(self.lr, self.weight_decay)):
            groups.setdefault(pair, []).append(member)
        self.groups = list(groups.items())

    def _views(self, tensors: list[torch.Tensor], members: list[int]) -> list[torch.Tensor]:
        """Member slices of each tensor, parameter-major (the order of the parameter views)."""
        unbound = [t.unbind(0) for t in tensors]
        return [rows[m] for rows in unbound for m in members]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def _decayed(self, i: int, p: torch.Tensor) -> torch.Tensor:
        # grad + wd * param, as torch's L2 decay; members with wd = 0 get their gradient unchanged.
        return p.grad.addcmul(self._wd[i], p) if self._decays else p.grad


class PopulationAdam(PopulationOptimizer):
    """``torch.optim.Adam`` (no amsgrad) with a learning rate and weight decay per member."""

    def __init__(self, params, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8, fused=None):
        super().__init__(params, lr, weight_decay, fused)
        self.betas, self.eps = betas, eps
        self.steps = 0
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        if self.fused:
            # The kernel reads the step count from a tensor (float32, on the parameters' device).
            self._step = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
            self._fixed = [
                (self._views(self.params, members), self._views(self.exp_avg, members),
                 self._views(self.exp_avg_sq, members))
                for _, members in self.groups
            ]  # fmt: skip

    @torch.no_grad()
    def step(self) -> None:
        if any(p.grad is None for p in self.params):
            raise RuntimeError("every population parameter needs a gradient at each step")
        if self.fused:
            self._fused_step()
            return
        beta1, beta2 = self.betas
        self.steps += 1
        bias_correction1 = 1 - beta1**self.steps
        bias_correction2_sqrt = (1 - beta2**self.steps) ** 0.5
        # The step size is computed in double per member, then rounded, as torch does with its scalar.
        step_sizes = [lr / bias_correction1 for lr in self.lr]
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = self._decayed(i, p)
            exp_avg, exp_avg_sq = self.exp_avg[i], self.exp_avg_sq[i]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.sub_(_per_member(step_sizes, p) * exp_avg / denom)

    def _fused_step(self) -> None:
        self.steps += 1
        self._step.fill_(self.steps)
        grads = [p.grad.unbind(0) for p in self.params]  # once per step, shared by the groups
        for ((lr, weight_decay), members), (params, exp_avgs, exp_avg_sqs) in zip(self.groups, self._fixed):
            torch._fused_adam_(
                params, [rows[m] for rows in grads for m in members], exp_avgs, exp_avg_sqs, [],
                [self._step] * len(params), lr=lr, beta1=self.betas[0], beta2=self.betas[1],
                weight_decay=weight_decay, eps=self.eps, amsgrad=False, maximize=False,
            )  # fmt: skip

    def state_dict(self) -> dict:
        return {"steps": self.steps, "exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}

    def load_state_dict(self, state: dict) -> None:
        self.steps = int(state["steps"])
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine.copy_(saved)

    def member_state(self, rows: slice) -> dict:
        """The moments of the members at ``rows`` (a run and, for an ensemble, its sub-models), and the
        step count: what a member's checkpoint holds."""
        return {
            "step": self.steps,
            "exp_avg": [t[rows].clone() for t in self.exp_avg],
            "exp_avg_sq": [t[rows].clone() for t in self.exp_avg_sq],
        }

    def load_member(self, rows: slice, state: dict) -> None:
        self.steps = int(state["step"])
        for mine, saved in zip(self.exp_avg + self.exp_avg_sq, state["exp_avg"] + state["exp_avg_sq"]):
            mine[rows].copy_(saved)


class PopulationSGD(PopulationOptimizer):
    """``torch.optim.SGD`` (no dampening, no Nesterov) with a learning rate and weight decay per member."""

    def __init__(self, params, lr, weight_decay, momentum: float = 0.0, fused=None):
        super().__init__(params, lr, weight_decay, fused)
        self.momentum = float(momentum)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    @torch.no_grad()
    def step(self) -> None:
        if self.fused:
            self._fused_step()
            return
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            d_p = self._decayed(i, p)
            if self.momentum:
                if self.buffers[i] is None:
                    self.buffers[i] = d_p.clone()
                else:
                    self.buffers[i].mul_(self.momentum).add_(d_p)
                d_p = self.buffers[i]
            # param + (-lr) * d_p in one rounding, as torch's ``add_(d_p, alpha=-lr)``.
            p.addcmul_(-_per_member(self.lr, p), d_p)

    def _fused_step(self) -> None:
        first = self.momentum != 0 and self.buffers[0] is None
        if first:
            self.buffers = [torch.empty_like(p) for p in self.params]
        params, grads = [p.unbind(0) for p in self.params], [p.grad.unbind(0) for p in self.params]
        buffers = [b.unbind(0) for b in self.buffers] if self.momentum else []
        for (lr, weight_decay), members in self.groups:
            torch._fused_sgd_(
                [rows[m] for rows in params for m in members], [rows[m] for rows in grads for m in members],
                [rows[m] for rows in buffers for m in members],
                weight_decay=weight_decay, momentum=self.momentum, lr=lr, dampening=0.0, nesterov=False,
                maximize=False, is_first_step=first,
            )  # fmt: skip

    def state_dict(self) -> dict:
        return {"buffers": self.buffers}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = [None if b is None else b.clone() for b in state["buffers"]]

    def member_state(self, rows: slice) -> dict:
        """The momentum buffers of the members at ``rows`` (``None`` before the first step)."""
        return {"buffers": [None if b is None else b[rows].clone() for b in self.buffers]}

    def load_member(self, rows: slice, state: dict) -> None:
        for i, saved in enumerate(state["buffers"]):
            if saved is None:
                continue
            if self.buffers[i] is None:  # members of one population step together: all or none have one
                self.buffers[i] = torch.zeros_like(self.params[i])
            self.buffers[i][rows].copy_(saved)
