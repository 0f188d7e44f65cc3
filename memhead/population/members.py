"""Which runs can share a population: member options, group keys, and what populations support."""

from __future__ import annotations

import json

from omegaconf import DictConfig, OmegaConf

# Options that may differ between the members of one population (everything else defines the group).
MEMBER_OPTIONS = (
    "seed",
    "optimizer.lr",
    "optimizer.weight_decay",
    "model.beta_k",
    "model.gamma_alpha",
    "model.tau_alpha",
    "model.tau_mu",
    "model.tau_eta",
    "model.sigma_eu",
)
# Options that change how a run reports, not what it computes: members may differ in them too.
REPORTING_OPTIONS = ("progress",)

MODELS = ("lp", "mlp", "mh")
COMPETITORS = ("none", "ensemble", "er_reservoir", "er_random")
OPTIMIZERS = ("adam", "sgd")


def _drop(container: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node = container
    for key in parents:
        node = node.get(key)
        if not isinstance(node, dict):
            return
    node.pop(leaf, None)


def group_key(cfg: DictConfig) -> str:
    """The configuration without its member options: runs with equal keys can share a population."""
    container = {}
    for key in cfg:  # the task's options, resolved; a job's hydra node is no part of it
        if key != "hydra":
            value = cfg[key]
            if OmegaConf.is_config(value):
                value = OmegaConf.to_container(value, resolve=True, enum_to_str=True)
            container[key] = value
    for dotted in MEMBER_OPTIONS + REPORTING_OPTIONS:
        _drop(container, dotted)
    return json.dumps(container, sort_keys=True, default=str)


def member_values(cfg: DictConfig) -> dict:
    """The member options of ``cfg``, by dotted name (absent ones as None)."""
    return {name: OmegaConf.select(cfg, name) for name in MEMBER_OPTIONS}


def unsupported(cfg: DictConfig) -> str | None:
    """Why runs of ``cfg`` cannot train as a population (``None``: they can)."""
    if cfg.model.name not in MODELS:
        return f"model={cfg.model.name} (populations support {', '.join(MODELS)})"
    if cfg.competitor.name not in COMPETITORS:
        return f"competitor={cfg.competitor.name} (populations support {', '.join(COMPETITORS)})"
    if cfg.optimizer.name not in OPTIMIZERS:
        return f"optimizer={cfg.optimizer.name} (populations support {', '.join(OPTIMIZERS)})"
    if cfg.logger.name != "none":
        return f"logger={cfg.logger.name} (a population records metrics.json only)"
    if cfg.plots.every_boundary:
        return "plots.every_boundary=true (a population plots at the end only)"
    return None
