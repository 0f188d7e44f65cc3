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
from tqdm.contrib.logging import logging_redirect_tqdm

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
            raise ConfigError(
                f"device={name!r} but CUDA is not available here; use device=cpu or device=auto"
            )
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
    # Deterministic mode would also fill every new tensor with NaN (a debugging aid that costs a pass
    # over each allocation, gradients included); results never read uninitialised memory.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return torch.Generator().manual_seed(seed)


def check_config(cfg: DictConfig) -> int:
    """Cross-field rules of every group, before any data is read. Returns the input feature count."""
    from competitors import COMPETITORS
    from data.benchmarks import BENCHMARKS
    from memhead.models import MODELS, check_model

    resolve_device(cfg.device)
    if cfg.threads is not None and cfg.threads < 1:
        raise ConfigError(f"threads must be >= 1 or null (got {cfg.threads})")
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
    check_model(cfg.model, in_features, competitor=cfg.competitor.name)
    COMPETITORS.get(cfg.competitor.name).check(cfg.competitor)
    return in_features


# Devices with fused Adam/SGD kernels: one pass over parameters, gradients and moments per step,
# which is the whole cost of a Memory Head step (weight decay changes every memory row).
_FUSED_DEVICES = ("cpu", "cuda")


def can_fuse(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused optimizer kernels accept ``params`` (floating point, on a fused device)."""
    return bool(params) and all(p.device.type in _FUSED_DEVICES and p.is_floating_point() for p in params)


def make_optimizer_factory(cfg):
    """``make(module)``: a fresh optimizer of ``cfg.name`` over the module's trainable parameters, or
    None when it has none (closed-form models such as ``ncm`` and ``slda``)."""

    def make(module: torch.nn.Module) -> torch.optim.Optimizer | None:
        params = [p for p in module.parameters() if p.requires_grad]
        if not params:
            return None
        fused = can_fuse(params) or None
        if cfg.name == "adam":
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
        if cfg.name == "sgd":
            return torch.optim.SGD(
                params, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum, fused=fused
            )
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
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are for everyone to read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def finished_record(path: Path) -> dict | None:
    """The record of a finished run in ``path``, or None (no file, or only a partial one)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("complete") else None


def run(cfg: DictConfig, out_dir: str | Path | None = None, *, group: str | None = None) -> dict:
    """Run the online protocol for ``cfg`` in ``out_dir`` and return the ``metrics.json`` record.

    With ``checkpoint.enabled`` the run continues from ``out_dir/checkpoint.pt`` when one is there, and
    a run whose ``metrics.json`` is complete is not run again.
    """
    from competitors import build_competitor
    from data.benchmarks import BENCHMARKS
    from data.stream import to_stream
    from memhead import checkpoint
    from memhead.loggers import make_logger
    from memhead.metrics import matrix_rows
    from memhead.models import MODELS
    from memhead.plots import has_planar_inputs, save_boundary_plot, save_run_plots, snapshot_keys
    from memhead.protocol import LOSSES, ProtocolState, Timer, format_metrics, run_protocol

    t_start = time.perf_counter()
    check_config(cfg)
    out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path, ckpt_path = out_dir / "metrics.json", out_dir / checkpoint.CHECKPOINT
    saved = checkpoint.load(ckpt_path) if cfg.checkpoint.enabled and ckpt_path.is_file() else None
    # A time-based seed is drawn once: a resumed run keeps the seed it started with.
    seed = saved["seed"] if saved is not None and cfg.seed < 0 else resolve_seed(cfg.seed)
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    config["seed"] = seed

    done = finished_record(metrics_path) if cfg.checkpoint.enabled else None
    if done is not None:
        checkpoint.check_same_run(out_dir, done["config"], config)
        log.info("%s already holds this run, finished: nothing to do", metrics_path)
        return done
    if saved is not None:
        checkpoint.check_same_run(out_dir, saved["config"], config)

    device = resolve_device(cfg.device)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    generator = seed_everything(seed)
    progress = default_progress() if cfg.progress is None else bool(cfg.progress)

    timer = Timer(device)
    t0 = time.perf_counter()
    arrays = BENCHMARKS.get(cfg.benchmark.name).build(cfg.benchmark, device, progress)
    stream = to_stream(arrays, device, source=f"benchmark={cfg.benchmark.name}")
    features_s = time.perf_counter() - t0
    log.info(
        "benchmark %s: %d/%d/%d train/val/test samples, %d distributions, %d classes, %d features (%.2fs)",
        cfg.benchmark.name,
        len(stream.train),
        len(stream.val),
        len(stream.test),
        stream.num_distributions,
        stream.num_classes,
        stream.in_features,
        features_s,
    )

    loss_fn = LOSSES[cfg.loss.name]
    make_optimizer = make_optimizer_factory(cfg.optimizer)
    model = MODELS.get(cfg.model.name)(cfg.model, stream.in_features, stream.num_classes).to(device)
    competitor = build_competitor(
        cfg.competitor,
        loss_fn=loss_fn,
        make_optimizer=make_optimizer,
        num_classes=stream.num_classes,
        device=device,
        generator=generator,
    )
    model = competitor.wrap(model).to(device)
    optimizer = make_optimizer(model)
    log.info("model: %s", model)
    # Before any checkpoint is loaded: a resumed run draws the keys its first start began with.
    initial_keys = snapshot_keys(model)

    state, earlier_s = None, 0.0
    if saved is not None:
        state, earlier_s = checkpoint.restore(
            saved, model=model, optimizer=optimizer, competitor=competitor, timer=timer, generator=generator
        )
        log.info(
            "resuming %s after boundary %d/%d", out_dir, state.next_distribution, stream.num_distributions
        )

    def timing() -> dict:
        seconds = timer.seconds
        return {
            "train_s": seconds["train_s"],
            "eval_s": seconds["eval_s"],
            "features_s": features_s,
            "total_s": earlier_s + time.perf_counter() - t_start,
            "train_samples_per_s": timer.samples["train_s"] / max(seconds["train_s"], 1e-12),
            "eval_samples_per_s": timer.samples["eval_s"] / max(seconds["eval_s"], 1e-12),
        }

    def record_so_far(state: ProtocolState, complete: bool) -> dict:
        record = {
            "complete": complete,
            "final": {
                split: {k: v for k, v in values.items() if k != "boundary"}
                for split, values in state.last.items()
                if values
            },
            "final_boundary": {split: values["boundary"] for split, values in state.last.items() if values},
            "boundaries": state.boundaries,
            "timing": timing(),
            "competitor": competitor.summary(),
            "seed": seed,
            "device": str(device),
            "config": config,
        }
        if complete:  # the matrices are large on long streams: the checkpoint holds them until the end
            record["ccm"] = {split: matrix_rows(matrix) for split, matrix in state.ccm.items()}
        return record

    last_save = time.perf_counter()

    def on_boundary(i, row, model, optimizer, state: ProtocolState) -> None:
        nonlocal last_save
        images = []
        if cfg.plots.every_boundary and has_planar_inputs(stream):
            images.append(save_boundary_plot(out_dir, i, model, stream, initial_keys))
        tracker.log_boundary(i, row, model=model, images=images)
        due = time.perf_counter() - last_save >= cfg.checkpoint.interval_s
        if cfg.checkpoint.enabled and (due or i == 0) and state.next_distribution < stream.num_distributions:
            payload = checkpoint.capture(
                config=config,
                seed=seed,
                model=model,
                optimizer=optimizer,
                competitor=competitor,
                state=state,
                timer=timer,
                elapsed_s=earlier_s + time.perf_counter() - t_start,
                generator=generator,
            )
            checkpoint.save(ckpt_path, payload)
            last_save = time.perf_counter()
        write_json_atomic(metrics_path, record_so_far(state, complete=False))

    tracker = make_logger(
        cfg.logger, config, run_dir=str(out_dir), group=group, name=out_dir.name, model=model
    )
    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            result = run_protocol(
                model,
                optimizer,
                competitor,
                stream,
                loss_fn,
                batch_size=cfg.stream.batch_size,
                chunk_size=cfg.eval.chunk_size,
                progress=progress,
                timer=timer,
                state=state,
                on_boundary=on_boundary,
            )
        record = record_so_far(ProtocolState(result.ccm, result.boundaries, result.final), complete=True)
        write_json_atomic(metrics_path, record)
        images = []
        if cfg.plots.enabled:
            images = save_run_plots(out_dir, record, result.model, stream, initial_keys)
        tracker.log_final(record, images=images)
    finally:
        tracker.close()

    log.info("final metrics (each split at its last boundary):")
    for split, values in result.final.items():
        log.info("  %-5s %s (after boundary %d)", split, format_metrics(values), values["boundary"] + 1)
    t = record["timing"]
    log.info(
        "time: train %.2fs (%.0f samples/s), eval %.2fs, features %.2fs, total %.2fs -> %s",
        t["train_s"],
        t["train_samples_per_s"],
        t["eval_s"],
        t["features_s"],
        t["total_s"],
        metrics_path,
    )
    return record
