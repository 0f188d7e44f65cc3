"""Structured-config schemas: the types and allowed values of every option.

Values live in the YAML files under ``conf/``; the dataclasses here only fix types (Enums for closed
sets, so that a bad override fails at composition with the allowed values) and are registered in
Hydra's ConfigStore as ``schema/<group>/<option>``, which each option's YAML file lists first in its
defaults (``- /schema/model/mh@_here_``). Fields without a value here (``MISSING``) must be set by the
YAML file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from omegaconf import MISSING

from memhead.layer import CHOICES


class Order(Enum):
    IID = "IID"
    CI = "CI"
    CDI = "CDI"
    CDID = "CDID"


class Loss(Enum):
    xent = "xent"
    hinge = "hinge"


# The Memory Head's closed option sets come from the layer's signature (memhead.layer.CHOICES).
Distance = Enum("Distance", {name: name for name in CHOICES["distance"]})
Psi = Enum("Psi", {name: name for name in CHOICES["psi"]})
UpdM = Enum("UpdM", {name: name for name in CHOICES["upd_m"]})
UpdK = Enum("UpdK", {name: name for name in CHOICES["upd_k"]})
Impl = Enum("Impl", {name: name for name in CHOICES["impl"]})


class WandbMode(Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


# --- model ---------------------------------------------------------------------------------------


@dataclass
class LPConfig:
    name: str = "lp"
    bias: bool = MISSING


@dataclass
class MLPConfig:
    name: str = "mlp"
    bias: bool = MISSING
    hidden: int = MISSING


@dataclass
class MHConfig:
    name: str = "mh"
    bias: bool = MISSING
    # Optional Linear -> Tanh layer below the head; null puts the head directly on the features.
    hidden: int | None = MISSING
    key_mem_units: int = MISSING
    delta: int = MISSING
    distance: Distance = MISSING
    sigma_eu: float = MISSING
    psi: Psi = MISSING
    key_size: int | None = MISSING
    upd_m: UpdM = MISSING
    upd_k: UpdK = MISSING
    beta_k: float | None = MISSING
    gamma_alpha: float = MISSING
    tau_alpha: float | None = MISSING
    tau_mu: float | None = MISSING
    tau_eta: float | None = MISSING
    scramble: bool = MISSING
    shared_keys: bool = MISSING
    layer_norm: bool = MISSING
    random_memories: bool = MISSING
    impl: Impl = MISSING


# --- benchmark -----------------------------------------------------------------------------------


@dataclass
class ModesConfig:
    name: str = "modes"
    order: Order = MISSING
    n: int = MISSING
    ratios: list[float] = MISSING
    centers: list[list[list[float]]] = MISSING
    stds: list[list[float]] = MISSING
    seeds: list[list[int]] = MISSING
    shuffle_seed: int = MISSING


@dataclass
class MoonsConfig:
    name: str = "moons"
    order: Order = MISSING
    n: int = MISSING
    ratios: list[float] = MISSING
    offsets: list[list[list[float]]] = MISSING
    noise: list[list[float]] = MISSING
    seeds: list[list[int]] = MISSING
    shuffle_seed: int = MISSING


@dataclass
class FeaturesConfig:
    name: str = "features"
    path: str = MISSING


# --- optimizer -----------------------------------------------------------------------------------


@dataclass
class AdamConfig:
    name: str = "adam"
    lr: float = MISSING
    weight_decay: float = MISSING


@dataclass
class SGDConfig:
    name: str = "sgd"
    lr: float = MISSING
    weight_decay: float = MISSING
    momentum: float = MISSING


# --- logger --------------------------------------------------------------------------------------


@dataclass
class NoLoggerConfig:
    name: str = "none"


@dataclass
class WandbConfig:
    name: str = "wandb"
    project: str = MISSING
    entity: str | None = MISSING
    mode: WandbMode = MISSING
    # Runs of one sweep share a group; null derives it from the overrides minus the seed.
    group: str | None = MISSING
    tags: list[str] = MISSING
    # wandb.watch: gradient and parameter histograms of the model.
    watch: bool = MISSING


# --- top level -----------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    chunk_size: int = MISSING


@dataclass
class StreamConfig:
    batch_size: int = MISSING


@dataclass
class CheckpointConfig:
    enabled: bool = MISSING
    interval_s: float = MISSING


@dataclass
class PlotsConfig:
    enabled: bool = MISSING
    every_boundary: bool = MISSING


@dataclass
class Config:
    model: Any = MISSING
    benchmark: Any = MISSING
    competitor: Any = MISSING
    optimizer: Any = MISSING
    logger: Any = MISSING
    seed: int = MISSING
    device: str = MISSING
    loss: Loss = MISSING
    progress: bool | None = MISSING
    threads: int | None = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)


def _group_schemas() -> dict[str, dict[str, type]]:
    from competitors import COMPETITORS
    from data import ns_imagenet

    return {
        "model": {"lp": LPConfig, "mlp": MLPConfig, "mh": MHConfig},
        "benchmark": {
            "modes": ModesConfig,
            "moons": MoonsConfig,
            "features": FeaturesConfig,
            "ns_imagenet": ns_imagenet.Config,
        },
        "optimizer": {"adam": AdamConfig, "sgd": SGDConfig},
        "logger": {"none": NoLoggerConfig, "wandb": WandbConfig},
        "competitor": {name: COMPETITORS.get(name).Config for name in COMPETITORS},
    }


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent; call before composing)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, options in _group_schemas().items():
        for name, schema in options.items():
            cs.store(group=f"schema/{group}", name=name, node=schema)
    register_sweeps()


SWEEPS_DIR = Path(__file__).resolve().parents[1] / "sweeps"


def register_sweeps(sweeps_dir: Path = SWEEPS_DIR) -> list[str]:
    """Store every ``sweeps/NAME.yaml`` as option ``NAME`` of the ``sweep`` group (global package).

    The files live beside ``conf/`` rather than in it, so a search path would not find them as a
    group; the ConfigStore makes ``sweep=NAME`` resolve from any working directory, and it travels
    with the job when the submitit launchers pickle it. Returns the registered names.
    """
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    names = []
    for path in sorted(sweeps_dir.glob("*.yaml")):
        node = OmegaConf.load(path)
        ConfigStore.instance().store(group="sweep", name=path.stem, node=node, package="_global_")
        names.append(path.stem)
    return names


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def _options(group: str) -> list[str]:
    folder = SWEEPS_DIR if group == "sweep" else CONF_DIR / group
    return sorted(p.stem for p in folder.glob("*.yaml"))


def prepare_arguments(argv: list[str]) -> list[str]:
    """Normalise command-line overrides before Hydra sees them, and reject unknown group options.

    * ``plots=true|false`` means ``plots.enabled=...`` (Hydra cannot set the ``plots`` node to a bool);
    * ``+sweep=NAME`` means ``sweep=NAME`` (``conf/config.yaml`` already lists the optional group);
    * ``group=unknown`` fails in one line: Hydra's own message lists search paths, and it silently
      skips an unknown name of an optional group such as ``sweep``.

    Raises:
        ConfigError: an option that is not a file of its group (``conf/<group>/`` or ``sweeps/``).
    """
    from memhead.registry import ConfigError

    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and key == "plots" and value.lower() in ("true", "false"):
            arg = f"plots.enabled={value.lower()}"
        elif sep and key == "+sweep":
            arg = f"sweep={value}"
        group = key.lstrip("+~")
        is_group = group == "sweep" or (
            group != "hydra" and "." not in group and "/" not in group and (CONF_DIR / group).is_dir()
        )
        if sep and is_group and "(" not in value:  # sweeper functions such as choice(...) are Hydra's
            known = _options(group)
            for option in value.split(","):
                if option and option != "null" and option not in known:
                    raise ConfigError(f"{group}={option!r} is unknown; known: {', '.join(known)}")
        out.append(arg)
    return out
