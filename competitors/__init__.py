"""Continual-learning competitors, by configuration name, behind the hooks of ``competitors.base``."""

from __future__ import annotations

from competitors.agem import AGEM
from competitors.base import Competitor
from competitors.ensemble import Ensemble
from competitors.er import ERRandom, ERReservoir
from competitors.gdumb import GDumb
from competitors.mir import MIR
from memhead.registry import Registry

__all__ = ["COMPETITORS", "Competitor", "build_competitor", "check_competitor"]

COMPETITORS: Registry[type[Competitor]] = Registry("competitor")
COMPETITORS.register("none")(Competitor)
COMPETITORS.register("er_reservoir")(ERReservoir)
COMPETITORS.register("er_random")(ERRandom)
COMPETITORS.register("mir")(MIR)
COMPETITORS.register("agem")(AGEM)
COMPETITORS.register("gdumb")(GDumb)
COMPETITORS.register("ensemble")(Ensemble)


def _name(cfg) -> str:
    return cfg["name"] if hasattr(cfg, "keys") else cfg.name


def check_competitor(cfg) -> None:
    """Validate a ``competitor`` config node with its class's ``check`` (``ConfigError`` if invalid)."""
    COMPETITORS.get(_name(cfg)).check(cfg)


def build_competitor(cfg, **kwargs) -> Competitor:
    """Build the competitor named ``cfg.name``; ``kwargs`` as in ``Competitor.__init__``."""
    return COMPETITORS.get(_name(cfg))(cfg, **kwargs)
