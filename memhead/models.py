"""The model registry: ``model.name -> builder(cfg, in_features, num_classes)``.

Every model maps flattened features ``(b, in_features)`` to logits ``(b, num_classes)``. Most learn by
gradients through the run's optimizer; a :class:`ClosedFormModel` (``ncm``, ``slda``) learns by an
exact update of running statistics instead, and has no trainable parameters.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from memhead.registry import ConfigError, Registry

ModelBuilder = Callable[[object, int, int], nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")

# Options of the `mh` config that are not MemoryHead arguments.
_NOT_HEAD_OPTIONS = ("name", "bias", "hidden")


# Models that learn by a closed-form update (their builders return a ClosedFormModel).
CLOSED_FORM = frozenset({"ncm", "slda"})


class ClosedFormModel(nn.Module):
    """A model that learns from each incoming batch by an exact update, without gradients.

    The online loop calls :meth:`learn` in place of forward, backward and optimizer step, and
    :meth:`end_distribution` at every boundary before evaluating; evaluation is the plain forward, as
    for every model. All state lives in buffers, so ``state_dict`` (and so a checkpoint) carries it.
    """

    def learn(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Update the statistics with the batch ``x (b, in_features)``, ``y (b,)``."""
        raise NotImplementedError

    def end_distribution(self) -> None:
        """Called once the training samples of a distribution have all been learned."""


def _choice(value) -> str:
    """An option of a closed set by name (the schemas hand over Enums)."""
    return getattr(value, "name", value)


def head_options(cfg) -> dict:
    """The MemoryHead keyword arguments of a ``model=mh`` config (Enums passed by name)."""
    return {key: getattr(value, "name", value) for key, value in cfg.items() if key not in _NOT_HEAD_OPTIONS}


def check_model(cfg, in_features: int, competitor: str = "none") -> None:
    """Reject invalid model options, and models the ``competitor`` cannot train, before any data is read."""
    if cfg.name in CLOSED_FORM and competitor != "none":
        raise ConfigError(
            f"competitor={competitor} trains by gradients, but model={cfg.name} learns in closed form "
            "without any; use competitor=none"
        )
    if cfg.name == "slda":
        from memhead.slda import check_shrinkage

        check_shrinkage(cfg.shrinkage)
    hidden = cfg.get("hidden")
    if hidden is not None and hidden < 1:
        raise ConfigError(f"model.hidden must be >= 1 (got {hidden})")
    if cfg.name == "mh":
        from memhead.layer import check_options

        with layer_errors_as_config_errors():
            check_options(hidden or in_features, 1, **head_options(cfg))


@contextmanager
def layer_errors_as_config_errors():
    """The layer names its arguments (``upd_k='foo' ...``); a run names config paths (``model.upd_k``),
    in its errors and in its warnings (other warnings pass unchanged)."""
    from memhead.layer import MemoryHeadOptionError, MemoryHeadOptionWarning

    try:
        with warnings.catch_warnings(record=True) as caught:
            try:
                yield
            except MemoryHeadOptionError as error:
                raise ConfigError(error.option_message("model.")) from None
    finally:
        for warning in caught:
            message = warning.message
            if isinstance(message, MemoryHeadOptionWarning):
                message = message.prefixed("model.")
            warnings.warn_explicit(message, warning.category, warning.filename, warning.lineno)


@MODELS.register("lp")
def build_lp(cfg, in_features: int, num_classes: int) -> nn.Module:
    return nn.Linear(in_features, num_classes, bias=cfg.bias)


@MODELS.register("mlp")
def build_mlp(cfg, in_features: int, num_classes: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(in_features, cfg.hidden, bias=cfg.bias),
        nn.Tanh(),
        nn.Linear(cfg.hidden, num_classes, bias=cfg.bias),
    )


@MODELS.register("mh")
def build_mh(cfg, in_features: int, num_classes: int) -> nn.Module:
    from memhead.layer import MemoryHead

    with layer_errors_as_config_errors():
        head = MemoryHead(
            in_features if cfg.hidden is None else cfg.hidden, num_classes, bias=cfg.bias, **head_options(cfg)
        )
    if cfg.hidden is None:
        return head
    return nn.Sequential(nn.Linear(in_features, cfg.hidden, bias=cfg.bias), nn.Tanh(), head)


@MODELS.register("ncm")
def build_ncm(cfg, in_features: int, num_classes: int) -> nn.Module:
    from memhead.ncm import NearestClassMean

    return NearestClassMean(in_features, num_classes, metric=_choice(cfg.metric), normalize=cfg.normalize)


@MODELS.register("slda")
def build_slda(cfg, in_features: int, num_classes: int) -> nn.Module:
    from memhead.slda import StreamingLDA

    return StreamingLDA(
        in_features,
        num_classes,
        shrinkage=cfg.shrinkage,
        streaming_covariance=cfg.streaming_covariance,
        covariance_update=_choice(cfg.covariance_update),
    )
