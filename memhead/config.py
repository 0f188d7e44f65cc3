"""Structured-config schemas: the types and allowed values of every option.

Values live in the YAML files under ``conf/``; the dataclasses here only fix types (Enums for closed
sets, so that a bad override fails at composition with the allowed values) and are registered in
Hydra's ConfigStore as ``schema/<group>/<option>``, which each option's YAML file lists first in its
defaults (``- /schema/model/mh@_here_``). Fields without a value here (``MISSING``) must be set by the
YAML file.
"""

from __future__ import annotations

import math
import re
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


class NCMMetric(Enum):
    euclidean = "euclidean"
    cosine = "cosine"


class CovarianceUpdate(Enum):
    exact = "exact"
    hayes_kanan = "hayes_kanan"


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


@dataclass
class NCMConfig:
    name: str = "ncm"
    metric: NCMMetric = MISSING
    normalize: bool = MISSING


@dataclass
class SLDAConfig:
    name: str = "slda"
    shrinkage: float = MISSING
    streaming_covariance: bool = MISSING
    covariance_update: CovarianceUpdate = MISSING


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
    verbose: bool = MISSING
    optimized_metric: str = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    stream: StreamConfig = field(default_factory=StreamConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    plots: PlotsConfig = field(default_factory=PlotsConfig)


def _group_schemas() -> dict[str, dict[str, type]]:
    from competitors import COMPETITORS
    from data import ns_imagenet

    return {
        "model": {"lp": LPConfig, "mlp": MLPConfig, "mh": MHConfig, "ncm": NCMConfig, "slda": SLDAConfig},
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
    * integers inside float lists (``benchmark.stds=[[1,0.08]]``) are written as floats;
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
        elif sep and "." in key:
            arg = f"{key}={floats_in_lists(key, value)}"
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


# --- values a schema cannot express ----------------------------------------------------------------

SPLIT_NAMES = ("train", "val", "test")
METRIC_NAMES = ("avg_accuracy", "avg_forgetting", "backward_transfer", "forward_transfer")
# torch.manual_seed takes a 64-bit value; negative seeds mean "time-based".
MAX_SEED = 2**63 - 1


def parse_optimized_metric(value: str) -> tuple[str, str]:
    """``"val.avg_accuracy"`` -> ``("val", "avg_accuracy")``; anything else is a ConfigError."""
    from memhead.registry import ConfigError

    split, _, metric = str(value).partition(".")
    if split not in SPLIT_NAMES or metric not in METRIC_NAMES:
        raise ConfigError(
            f"optimized_metric={value!r} is not allowed; allowed: SPLIT.METRIC with SPLIT in "
            f"{', '.join(SPLIT_NAMES)} and METRIC in {', '.join(METRIC_NAMES)}"
        )
    return split, metric


def optimized_value(record: dict, optimized_metric: str) -> float:
    """The value a Hydra sweeper optimises: ``record["final"][split][metric]``."""
    split, metric = parse_optimized_metric(optimized_metric)
    return float(record["final"][split][metric])


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _missing_keys(cfg) -> list[str]:
    from omegaconf import OmegaConf

    return sorted(key for key in OmegaConf.missing_keys(cfg) if not key.startswith("hydra."))


def check_structure(cfg) -> None:
    """Every required node present, every value set, no option its schema does not know."""
    from dataclasses import fields

    from memhead.registry import ConfigError

    for f in fields(Config):
        if f.name not in cfg:
            raise ConfigError(f"{f.name} cannot be removed (~{f.name}): every run needs it")
    missing = _missing_keys(cfg)
    if missing:
        key = missing[0]
        group = key.split(".")[0]
        where = f" (needed by {group}={cfg[group].name})" if group in _group_schemas() and "." in key else ""
        raise ConfigError(f"{key} must be set{where}: {key}=...")
    for group, options in _group_schemas().items():
        node = cfg[group]
        schema = options.get(str(node.get("name")))
        if schema is None:
            continue  # the registries name the known options
        known = [f.name for f in fields(schema)]
        unknown = [key for key in node if key not in known]
        if unknown:
            raise ConfigError(
                f"{group}.{unknown[0]} is not an option of {group}={node.name}; options: {', '.join(known)}"
            )


def check_values(cfg) -> None:
    """Top-level values with rules beyond their type (before anything is read or allocated)."""
    import os

    from memhead.registry import ConfigError

    check_structure(cfg)
    if cfg.seed > MAX_SEED:
        raise ConfigError(f"seed={cfg.seed} is too large; allowed: 0..{MAX_SEED} (negative: time-based)")
    cpus = os.cpu_count() or 1
    if cfg.threads is not None and not 1 <= cfg.threads <= cpus:
        raise ConfigError(
            f"threads={cfg.threads} is not allowed; allowed: 1..{cpus} (this machine's CPUs) or null"
        )
    parse_optimized_metric(cfg.optimized_metric)
    for key in ("lr", "weight_decay", "momentum"):
        if key in cfg.optimizer and not _finite(cfg.optimizer[key]):
            raise ConfigError(f"optimizer.{key}={cfg.optimizer[key]} must be a finite number")
    if not cfg.optimizer.lr > 0:
        raise ConfigError(f"optimizer.lr must be > 0 (got {cfg.optimizer.lr})")
    if "momentum" in cfg.optimizer and cfg.optimizer.momentum < 0:
        raise ConfigError(f"optimizer.momentum must be >= 0 (got {cfg.optimizer.momentum})")
    interval = cfg.checkpoint.interval_s
    if not _finite(interval) or interval < 0:
        raise ConfigError(f"checkpoint.interval_s must be a finite number >= 0 (got {interval})")
    from memhead.limits import check_benchmark_size

    check_benchmark_size(cfg)


def resolve_threads(threads: int | None, batch_size: int, in_features: int) -> int | None:
    """The torch thread count of a run: ``threads``, or for ``null`` one thread on one-sample streams
    of small inputs (measured: torch's thread pool costs more than it gains on such tiny steps, and
    collapses when another process shares the CPUs); None keeps torch's default."""
    if threads is not None:
        return threads
    if batch_size == 1 and in_features <= SMALL_INPUT_FEATURES:
        return 1
    return None


# Inputs up to this many features count as small for the threads: null rule (NS-ImageNet has 512).
SMALL_INPUT_FEATURES = 4096


# --- Hydra's own errors as one line ------------------------------------------------------------------


def hydra_error_line(err: BaseException) -> str | None:
    """One line for a Hydra/OmegaConf configuration error (bad override, type, enum, missing group), or
    None when ``err`` is not one (a bug keeps its traceback)."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from memhead.registry import ConfigError

    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    if isinstance(err.__cause__, ConfigError):  # a plugin's own one-line refusal (the launcher's options)
        return str(err.__cause__)
    cause = err.__cause__ if isinstance(err.__cause__, OmegaConfBaseException) else None
    text = str(cause if cause is not None else err)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    key = getattr(cause or err, "full_key", None)
    if not key:
        found = re.search(r"full_key: (\S+)", text)
        key = found.group(1) if found else None
    if not key:
        found = re.search(r"override (\S+)", str(err))
        key = found.group(1).split("=")[0] if found else None
    first = first.rstrip(".")
    return f"{key}: {first}" if key and key not in first else first


# --- integers in float lists ------------------------------------------------------------------------

_INT_TOKEN = re.compile(r"(?<![\w.+-])(-?\d+)(?![\w.])")


def _float_list_fields(group: str) -> set[str]:
    """Fields of ``group``'s schemas typed as (nested) lists of floats."""
    from dataclasses import fields

    out = set()
    for schema in _group_schemas().get(group, {}).values():
        for f in fields(schema):
            hint = str(f.type)
            if hint.startswith("list[") and "float" in hint and "int" not in hint:
                out.add(f.name)
    return out


def floats_in_lists(key: str, value: str) -> str:
    """``benchmark.stds=[[1,0.08]]`` -> ``[[1.0,0.08]]``: OmegaConf refuses an int in a float list."""
    group, _, name = key.lstrip("+").partition(".")
    if not value.lstrip().startswith("[") or "." in name or name not in _float_list_fields(group):
        return value
    return _INT_TOKEN.sub(r"\1.0", value)
