"""The one interface every continual-learning competitor implements.

The online loop (``memhead.protocol``) owns the training step and calls a competitor at fixed points,
in this order, for each incoming batch ``(x, y)``:

1. ``model.train()``; ``logits = model(x)``; ``loss = loss_fn(logits, y)``  (skipped when
   ``trains_on_stream`` is false)
2. ``optimizer.zero_grad()``; ``loss.backward()``                             (skipped likewise)
3. ``competitor.after_backward(model, optimizer, x, y)`` — replay: add gradients, rewrite them
4. ``optimizer.step()``                                                        (skipped likewise)
5. ``competitor.after_step(x, y)`` — store the incoming samples in a buffer

and at every distribution boundary, before evaluation, ``competitor.at_boundary(model, optimizer)``.
A competitor never swaps the model behind the loop's back: when it needs a new model or optimizer
(GDumb) it returns them from ``at_boundary`` and the loop adopts them explicitly. ``wrap(model)`` is
called once, before the optimizer is created (an ensemble returns its members' wrapper).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, is_dataclass

import torch
from torch import nn

from memhead.registry import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


class Competitor:
    """Plain online training: the base class does nothing at any hook (``competitor=none``).

    Args:
        cfg: the resolved ``competitor`` config node (a mapping, or a ``Config``); validated by
            ``check`` and kept as ``self.cfg``, an instance of the class's ``Config``.
        loss_fn: the run's loss, ``loss_fn(logits, y) -> scalar`` (mean or sum as configured).
        make_optimizer: builds a fresh optimizer of the configured type for a module.
        num_classes: number of classes of the benchmark.
        device: the run's device; buffers live there.
        generator: the run's seeded ``torch.Generator`` (on the CPU) for every random choice.
    """

    @dataclass
    class Config:
        """Options of ``competitor=none``: there are none besides the name."""

        name: str = "none"

    #: False for competitors that never train on the stream itself (GDumb).
    trains_on_stream: bool = True

    def __init__(
        self,
        cfg,
        *,
        loss_fn: LossFn,
        make_optimizer: OptimizerFactory,
        num_classes: int,
        device: torch.device,
        generator: torch.Generator,
    ) -> None:
        self.check(cfg)
        self.cfg = self.parse(cfg)
        self.loss_fn = loss_fn
        self.make_optimizer = make_optimizer
        self.num_classes = num_classes
        self.device = device
        self.generator = generator

    @classmethod
    def parse(cls, cfg) -> Competitor.Config:
        """Read ``cfg`` (a ``Config``, a dataclass, a dict or an OmegaConf node) into ``cls.Config``.

        Missing options take the ``Config`` defaults; an option ``Config`` lacks is a ``ConfigError``.
        """
        if isinstance(cfg, cls.Config):
            return cfg
        if is_dataclass(cfg):
            values = {f.name: getattr(cfg, f.name) for f in fields(cfg)}
        else:
            values = {str(key): cfg[key] for key in cfg.keys()}
        known = [f.name for f in fields(cls.Config)]
        for key in values:
            if key not in known:
                raise ConfigError(
                    f"competitor.{key} is not an option of competitor={cls.Config.name}; "
                    f"allowed: {', '.join(known)}"
                )
        return cls.Config(**values)

    @classmethod
    def check(cls, cfg) -> None:
        """Raise ``ConfigError`` for invalid values or combinations; run before any data is read."""
        cls.parse(cfg)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Return the module the loop trains and evaluates (called once, before the optimizer)."""
        return model

    def after_backward(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
    ) -> None:
        """Between the incoming batch's backward and the optimizer step."""

    def after_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """After the optimizer step (or in its place when ``trains_on_stream`` is false)."""

    def at_boundary(
        self, model: nn.Module, optimizer: torch.optim.Optimizer
    ) -> tuple[nn.Module, torch.optim.Optimizer] | None:
        """At a distribution boundary, before evaluation; return a new (model, optimizer) or None."""
        return None

    def summary(self) -> dict:
        """JSON-ready facts for ``metrics.json`` (buffer occupancy per class, replay counts, ...)."""
        return {}

    def state_dict(self) -> dict:
        """Everything needed to resume the competitor (buffers, counters)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` returned."""


def reinitialise(module: nn.Module, generator: torch.Generator) -> None:
    """Call ``reset_parameters`` on every submodule that has one, seeded from ``generator``.

    PyTorch initialisers draw from the global RNG; forking it under a seed drawn from the run's
    generator makes the new weights depend on that generator alone and leaves the global RNG as it was.
    """
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    cuda_devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.manual_seed(seed)
        for submodule in module.modules():
            reset = getattr(submodule, "reset_parameters", None)
            if callable(reset):
                reset()


def require_int(option: str, value, minimum: int) -> None:
    """Raise ``ConfigError`` unless ``value`` is an integer ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"competitor.{option} must be an integer >= {minimum} (got {value!r})")
    if value < minimum:
        raise ConfigError(f"competitor.{option} must be >= {minimum} (got {value})")
