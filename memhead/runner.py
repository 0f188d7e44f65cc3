"""``run(cfg)``: one experiment from a composed config to ``metrics.json``, callable without Hydra."""

from __future__ import annotations

import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from memhead.registry import ConfigError

log = logging.getLogger(__name__)

_DEVICE = re.compile(r"^(cpu|auto|cuda(:\d+)?)$")


def resolve_seed(seed: int) -> int:
    """A negative seed means "time-based"; the seed actually used is recorded."""
    return int(time.time_ns() % (2**31)) if seed < 0 else int(seed)


def resolve_device(name: str) -> torch.device:
    if not _DEVICE.match(str(name)):
        raise ConfigError(f"device={name!r} is not allowed; allowed: cpu, cuda, cuda:N, auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name!r} but CUDA is not available here; use device=cpu or device=auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device={name!r} but only {torch.cuda.device_count()} CUDA device(s) exist")
    return device


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; request deterministic kernels. Returns the run's generator."""
    # cuBLAS needs this before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    return torch.Generator().manual_seed(seed)


def check_config(cfg: DictConfig) -> int:
    """Cross-field rules of every group, before any data is read. Returns the input feature count."""
    from competitors import COMPETITORS
    from data.benchmarks import BENCHMARKS
    from memhead.models import MODELS, check_model

    resolve_device(cfg.device)
    if cfg.eval.chunk_size < 1:
        raise ConfigError(f"eval.chunk_size must be >= 1 (got {cfg.eval.chunk_size})")
    if cfg.stream.batch_size < 1:
        raise ConfigError(f"stream.batch_size must be >= 1 (got {cfg.stream.batch_size})")
    if cfg.optimizer.lr <= 0:
        raise ConfigError(f"optimizer.lr must be > 0 (got {cfg.optimizer.lr})")
    if cfg.optimizer.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0 (got {cfg.optimizer.weight_decay})")
    MODELS.get(cfg.model.name)
    benchmark = BENCHMARKS.get(cfg.benchmark.name)
    benchmark.check(cfg.benchmark)
    in_features = benchmark.input_features(cfg.benchmark)
    check_model(cfg.model, in_features)
    COMPETITORS.get(cfg.competitor.name).check(cfg.competitor)
    return in_features


def make_optimizer_factory(cfg):
    def make(module: torch.nn.Module) -> torch.optim.Optimizer:
        params = [p for p in module.parameters() if p.requires_grad]
        if cfg.name == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if cfg.name == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum)
        raise ConfigError(f"optimizer={cfg.name!r} is unknown; known: adam, sgd")

    return make


def default_progress() -> bool:
    return sys.stderr.isatty()


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write JSON so that readers never see a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=1)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def run(cfg: DictConfig, out_dir: str | Path | None = None, *, group: str | None = None) -> dict:
    """Run the online protocol for ``cfg``; write ``metrics.json`` into ``out_dir``; return the record."""
    from competitors import build_competitor
    from data.benchmarks import BENCHMARKS
    from data.stream import to_stream
    from memhead.loggers import make_logger
    from memhead.metrics import matrix_rows
    from memhead.models import MODELS
    from memhead.protocol import LOSSES, Timer, format_metrics, run_protocol

    t_start = time.perf_counter()
    check_config(cfg)
    out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    seed = resolve_seed(cfg.seed)
    device = resolve_device(cfg.device)
    generator = seed_everything(seed)
    progress = default_progress() if cfg.progress is None else bool(cfg.progress)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config["seed"] = seed

    timer = Timer(device)
    t0 = time.perf_counter()
    arrays = BENCHMARKS.get(cfg.benchmark.name).build(cfg.benchmark, device, progress)
    stream = to_stream(arrays, device, source=f"benchmark={cfg.benchmark.name}")
    features_s = time.perf_counter() - t0
    log.info(
        "benchmark %s: %d/%d/%d train/val/test samples, %d distributions, %d classes, %d features (%.2fs)",
        cfg.benchmark.name, len(stream.train), len(stream.val), len(stream.test), stream.num_distributions,
        stream.num_classes, stream.in_features, features_s,
    )

    loss_fn = LOSSES[cfg.loss.name]
    make_optimizer = make_optimizer_factory(cfg.optimizer)
    model = MODELS.get(cfg.model.name)(cfg.model, stream.in_features, stream.num_classes).to(device)
    competitor = build_competitor(
        cfg.competitor, loss_fn=loss_fn, make_optimizer=make_optimizer, num_classes=stream.num_classes,
        device=device, generator=generator,
    )
    model = competitor.wrap(model).to(device)
    optimizer = make_optimizer(model)
    log.info("model: %s", model)

    tracker = make_logger(cfg.logger, config, run_dir=str(out_dir), group=group, name=out_dir.name)
    try:
        result = run_protocol(
            model, optimizer, competitor, stream, loss_fn, batch_size=cfg.stream.batch_size,
            chunk_size=cfg.eval.chunk_size, progress=progress, timer=timer, on_boundary=tracker.log_boundary,
        )
        total_s = time.perf_counter() - t_start
        seconds = timer.seconds
        record = {
            "final": {split: {k: v for k, v in values.items() if k != "boundary"}
                      for split, values in result.final.items()},
            "final_boundary": {split: values["boundary"] for split, values in result.final.items()},
            "ccm": {split: matrix_rows(matrix) for split, matrix in result.ccm.items()},
            "boundaries": result.boundaries,
            "timing": {
                "train_s": seconds["train_s"],
                "eval_s": seconds["eval_s"],
                "features_s": features_s,
                "total_s": total_s,
                "train_samples_per_s": timer.samples["train_s"] / max(seconds["train_s"], 1e-12),
                "eval_samples_per_s": timer.samples["eval_s"] / max(seconds["eval_s"], 1e-12),
            },
            "competitor": competitor.summary(),
            "seed": seed,
            "device": str(device),
            "config": config,
        }
        write_json_atomic(out_dir / "metrics.json", record)
        tracker.log_final(record)
    finally:
        tracker.close()

    log.info("final metrics (each split at its last boundary):")
    for split, values in result.final.items():
        log.info("  %-5s %s (after boundary %d)", split, format_metrics(values), values["boundary"] + 1)
    t = record["timing"]
    log.info("time: train %.2fs (%.0f samples/s), eval %.2fs, features %.2fs, total %.2fs -> %s",
             t["train_s"], t["train_samples_per_s"], t["eval_s"], t["features_s"], t["total_s"],
             out_dir / "metrics.json")
    return record
