"""The model registry: ``model.name -> builder(cfg, in_features, num_classes)``.

Every model maps flattened features ``(b, in_features)`` to logits ``(b, num_classes)``.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

from torch import nn

from memhead.registry import ConfigError, Registry

ModelBuilder = Callable[[object, int, int], nn.Module]
MODELS: Registry[ModelBuilder] = Registry("model")

# Options of the `mh` config that are not MemoryHead arguments.
_NOT_HEAD_OPTIONS = ("name", "bias", "hidden")


def head_options(cfg) -> dict:
    """The MemoryHead keyword arguments of a ``model=mh`` config (Enums passed by name)."""
    return {key: getattr(value, "name", value) for key, value in cfg.items() if key not in _NOT_HEAD_OPTIONS}


def check_model(cfg, in_features: int) -> None:
    """Reject invalid model options before any data is read."""
    hidden = cfg.get("hidden")
    if hidden is not None and hidden < 1:
        raise ConfigError(f"model.hidden must be >= 1 (got {hidden})")
    if cfg.name == "mh":
        from memhead.layer import check_options

        with layer_errors_as_config_errors():
            check_options(hidden or in_features, 1, **head_options(cfg))


@contextmanager
def layer_errors_as_config_errors():
    """The layer names its arguments (``upd_k='foo' ...``); a run names config paths (``model.upd_k``)."""
    from memhead.layer import MemoryHeadOptionError

    try:
        yield
    except MemoryHeadOptionError as error:
        raise ConfigError(error.option_message("model.")) from None


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
