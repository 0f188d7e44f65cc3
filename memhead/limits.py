"""Refuse what cannot fit in memory before allocating it: estimates of the stream, model and buffer."""

from __future__ import annotations

import os

import torch

from memhead.registry import ConfigError

# Bytes held per generated 2-D point: float64 (x, y), label, domain and distribution, plus the
# generator's temporaries and the float32 copy on the device.
BYTES_PER_2D_POINT = 160
# Parameters, their gradients and two Adam moments; the evaluation buffers come on top.
TRAINING_COPIES = 4


def available_bytes() -> int:
    """Memory this process may still allocate (MemAvailable, else the physical memory)."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**62  # unknown: refuse nothing


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


def refuse_if_too_big(option: str, needed: float, what: str) -> None:
    free = available_bytes()
    if needed > free:
        raise ConfigError(
            f"{option}: {what} needs about {_gb(needed)}, more than the {_gb(free)} of memory available"
        )


def check_benchmark_size(cfg) -> None:
    """The generated or loaded stream must fit (2-D generators: ``benchmark.n``; files: their headers)."""
    bench = cfg.benchmark
    if bench.name in ("modes", "moons"):
        refuse_if_too_big(f"benchmark.n={bench.n}", 2 * bench.n * BYTES_PER_2D_POINT, "the stream")


def model_bytes(cfg, in_features: int, num_classes: int) -> int:
    """Bytes of the model's parameters and buffers, counted on the meta device (nothing allocated)."""
    from memhead.models import MODELS

    with torch.device("meta"):
        model = MODELS.get(cfg.model.name)(cfg.model, in_features, num_classes)
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _model_option(cfg) -> str:
    model = cfg.model
    if model.name == "mh":
        return f"model.key_mem_units={model.key_mem_units}"
    if model.name == "mlp":
        return f"model.hidden={model.hidden}"
    return "model=lp"


def check_learner_size(cfg, in_features: int, num_classes: int) -> None:
    """The model (with training state, times ensemble members) and a replay buffer must fit."""
    competitor = cfg.competitor
    members = int(competitor.get("members", 1) or 1)
    needed = TRAINING_COPIES * members * model_bytes(cfg, in_features, num_classes)
    what = f"the model ({in_features} features, {num_classes} classes)"
    refuse_if_too_big(_model_option(cfg), needed, what)
    size = competitor.get("buffer_size")
    if size is not None and size > 0:
        refuse_if_too_big(
            f"competitor.buffer_size={size}", size * (4 * in_features + 16), "the replay buffer"
        )
