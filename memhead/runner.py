"""``run(cfg)``: one experiment from a composed config to ``metrics.json``, callable without Hydra."""

from __future__ import annotations

import copy
import functools
import json
import logging
import os
import random
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.contrib.logging import logging_redirect_tqdm

from memhead import run_dir
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


def request_deterministic_kernels() -> None:
    """``torch.use_deterministic_algorithms(True, warn_only=True)``, without importing torch's compiler.

    The public call imports ``torch._inductor`` (about 1 s of a process's start) only to set its
    ``deterministic`` option, which the compiler also reads from ``TORCHINDUCTOR_DETERMINISTIC`` when
    it is imported; runs never compile. So the option goes to the environment and the kernels' switch
    is set by the setter the public call uses (``tests/test_run.py`` checks that it exists and that the
    two calls leave the same state). A population, which builds no torch optimizer (whose first use
    imports the compiler too), starts that much sooner. Once the compiler is imported: the public call.
    """
    if torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled():
        return  # set already (the public call costs ~4 ms)
    if "torch._inductor.config" in sys.modules:
        torch.use_deterministic_algorithms(True, warn_only=True)
        return
    os.environ["TORCHINDUCTOR_DETERMINISTIC"] = "1"
    torch._C._set_deterministic_algorithms(True, warn_only=True)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy and torch; request deterministic kernels. Returns the run's generator."""
    # cuBLAS needs this before its first use to be deterministic.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    request_deterministic_kernels()
    # Deterministic mode would also fill every new tensor with NaN (a debugging aid that costs a pass
    # over each allocation, gradients included); results never read uninitialised memory.
    torch.utils.deterministic.fill_uninitialized_memory = False
    return torch.Generator().manual_seed(seed)


def check_config(cfg: DictConfig) -> int:
    """Cross-field rules of every group, before any data is read. Returns the input feature count."""
    from competitors import COMPETITORS
    from data.benchmarks import BENCHMARKS
    from memhead.config import check_values
    from memhead.limits import check_learner_size
    from memhead.models import MODELS, check_model

    check_values(cfg)  # structure, scalar ranges, stream size: before anything is generated or read
    resolve_device(cfg.device)
    if cfg.eval.chunk_size < 1:
        raise ConfigError(f"eval.chunk_size must be >= 1 (got {cfg.eval.chunk_size})")
    if cfg.stream.batch_size < 1:
        raise ConfigError(f"stream.batch_size must be >= 1 (got {cfg.stream.batch_size})")
    if cfg.optimizer.weight_decay < 0:
        raise ConfigError(f"optimizer.weight_decay must be >= 0 (got {cfg.optimizer.weight_decay})")
    MODELS.get(cfg.model.name)
    benchmark = BENCHMARKS.get(cfg.benchmark.name)
    benchmark.check(cfg.benchmark)
    in_features = benchmark.input_features(cfg.benchmark)
    check_model(cfg.model, in_features, competitor=cfg.competitor.name)
    COMPETITORS.get(cfg.competitor.name).check(cfg.competitor)
    check_learner_size(cfg, in_features, benchmark.min_classes)
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
    """The record of a finished run in ``path``, or None (no file, a partial or a malformed one)."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # ValueError: bad JSON or bad UTF-8
        log.warning("%s is unreadable (%s); treated as not finished", path, type(err).__name__)
        return None
    if not isinstance(record, dict) or record.get("complete") is not True:
        return None  # a partial run, a failure record, or no record of ours
    if not isinstance(record.get("config"), dict):
        log.warning("%s is not a memhead record; treated as not finished", path)
        return None
    return record


def write_failure_record(out_dir: Path, reason: str, cfg: DictConfig) -> None:
    """``metrics.json`` of a failed job: the report lists it as failed, with its reason."""
    record: dict = {"complete": False, "failed": True, "error": reason}
    try:
        record["config"] = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    except Exception:  # noqa: BLE001 - a config that cannot resolve is why the job failed
        pass
    try:
        write_json_atomic(Path(out_dir) / "metrics.json", record)
    except OSError:
        pass  # the failure is still reported on stderr and counted


def provenance() -> dict:
    """Where a record comes from: code version, packages, host, command line (never part of identity).

    The same for every run of a process (taken once: the code a process runs is what it imported)."""
    return copy.deepcopy(_process_provenance())


@functools.cache
def _process_provenance() -> dict:
    import platform
    import socket
    import subprocess
    from importlib import metadata

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(Path(__file__).resolve().parents[1]), *args],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "git_commit": commit.strip() if commit else None,
        "git_dirty": bool(status.strip()) if status is not None else None,
        "packages": {name: version(name) for name in ("torch", "hydra-core", "numpy", "memhead")},
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "argv": list(sys.argv),
    }


def resolve_paths(cfg: DictConfig) -> DictConfig:
    """``cfg`` (a copy when it changes) with benchmark path options made absolute (relative to where
    the run was launched, also under ``hydra.job.chdir=true``)."""
    from hydra.utils import to_absolute_path

    from data.benchmarks import BENCHMARKS

    names = [name for name in BENCHMARKS.get(cfg.benchmark.name).paths if cfg.benchmark.get(name)]
    if not names:
        return cfg  # nothing to rewrite (the 2-D benchmarks): no copy needed
    cfg = cfg.copy()
    for name in names:
        cfg.benchmark[name] = to_absolute_path(str(Path(str(cfg.benchmark[name])).expanduser()))
    return cfg


@dataclass
class RunPlan:
    """What a run is and where it lives, settled before anything is built (see :func:`prepare`)."""

    cfg: DictConfig
    out_dir: Path
    seed: int
    config: dict  # the resolved configuration, with the seed actually used
    saved: dict | None  # the checkpoint to resume from
    done: dict | None  # the record of a finished run: nothing left to do
    provenance: dict | None = None  # code, packages, host, command line of this process
    lock: object = None  # the open lock file of the run directory (see memhead.run_dir.lock)

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    @property
    def metrics_path(self) -> Path:
        return self.out_dir / "metrics.json"


def prepare(cfg: DictConfig, out_dir: str | Path | None) -> RunPlan:
    """Check the configuration, settle the seed, and find what the run directory already holds."""

    given = cfg
    cfg = resolve_paths(cfg)
    check_config(cfg)
    out_dir = Path(out_dir) if out_dir is not None else Path.cwd()
    out_dir.mkdir(parents=True, exist_ok=True)
    held = run_dir.lock(out_dir)
    try:
        return _settle(cfg, given, out_dir, held)
    except BaseException:
        held.close()
        raise


def _settle(cfg: DictConfig, given: DictConfig, out_dir: Path, held) -> RunPlan:
    from memhead import checkpoint

    saved = checkpoint.load_usable(out_dir) if cfg.checkpoint.enabled else None
    done = finished_record(out_dir / "metrics.json") if cfg.checkpoint.enabled else None
    # A time-based seed is drawn once: a resumed or finished run keeps the seed it started with.
    recorded = saved if saved is not None else done
    seed = int(recorded["seed"]) if recorded is not None and cfg.seed < 0 else resolve_seed(cfg.seed)
    # The identity of the run is what the user gave (paths as written); the record adds where they led.
    config = OmegaConf.to_container(given, resolve=True, enum_to_str=True)
    config["seed"] = seed
    if done is not None:
        checkpoint.check_same_run(out_dir, done["config"], config)
    elif saved is not None:
        checkpoint.check_same_run(out_dir, saved["config"], config)
    return RunPlan(cfg, out_dir, seed, config, saved, done, provenance(), held)


def build_stream(cfg: DictConfig, device: torch.device, progress: bool):
    """The benchmark's stream on ``device``, and the seconds its features took."""
    from data.benchmarks import BENCHMARKS
    from data.stream import to_stream

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
    return stream, features_s


@dataclass
class Learner:
    """The objects a run trains: model (wrapped by its competitor), optimizer, and how they learn."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None  # None: a closed-form model, nothing to train
    competitor: object
    loss_fn: object
    generator: torch.Generator


def build_learner(
    cfg: DictConfig, stream, device: torch.device, generator: torch.Generator, optimizer: bool = True
) -> Learner:
    """Model, competitor and optimizer as a run with ``cfg`` starts them (after :func:`seed_everything`).

    ``optimizer=False``: no optimizer (``Learner.optimizer`` is ``None``), for a population member,
    which its population's optimizer trains (building one draws nothing from any generator).
    """
    from competitors import build_competitor
    from memhead.models import MODELS
    from memhead.protocol import LOSSES

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
    return Learner(model, make_optimizer(model) if optimizer else None, competitor, loss_fn, generator)


def resume(plan: RunPlan, learner: Learner, timer):
    """Load the plan's checkpoint into ``learner``: (protocol state or None, seconds spent before)."""
    from memhead import checkpoint

    if plan.saved is None:
        return None, 0.0
    if plan.saved.get("population"):
        raise ConfigError(
            f"{plan.out_dir / checkpoint.CHECKPOINT} was written by a population "
            "(hydra/launcher=population): resume it with that launcher, or delete it to start over"
        )
    state, earlier_s = checkpoint.restore(
        plan.saved,
        model=learner.model,
        optimizer=learner.optimizer,
        competitor=learner.competitor,
        timer=timer,
        generator=learner.generator,
    )
    log.info("resuming %s after boundary %d", plan.out_dir, state.next_distribution)
    return state, earlier_s


class Recorder:
    """The ``metrics.json`` record of one run and its checkpoints, at boundaries and at the end."""

    def __init__(self, plan: RunPlan, learner: Learner, timer, *, features_s, earlier_s, device, t_start):
        self.plan, self.learner, self.timer = plan, learner, timer
        self.features_s, self.earlier_s, self.device = features_s, earlier_s, device
        self.t_start = t_start  # when this process started the run: total_s counts building too
        self.last_save = time.perf_counter()

    def elapsed_s(self) -> float:
        return self.earlier_s + time.perf_counter() - self.t_start

    def timing(self) -> dict:
        seconds, samples = self.timer.seconds, self.timer.samples
        return {
            "train_s": seconds["train_s"],
            "eval_s": seconds["eval_s"],
            "features_s": self.features_s,
            "total_s": self.elapsed_s(),
            "train_samples_per_s": samples["train_s"] / max(seconds["train_s"], 1e-12),
            "eval_samples_per_s": samples["eval_s"] / max(seconds["eval_s"], 1e-12),
        }

    def record(self, state, complete: bool) -> dict:
        from data.benchmarks import BENCHMARKS
        from memhead.metrics import matrix_rows

        record = {
            "complete": complete,
            "final": {
                split: {k: v for k, v in values.items() if k != "boundary"}
                for split, values in state.last.items()
                if values
            },
            "final_boundary": {split: values["boundary"] for split, values in state.last.items() if values},
            "boundaries": state.boundaries,
            "initial_accuracy": {split: matrix_rows(b[None])[0] for split, b in state.initial.items()},
            "timing": self.timing(),
            "competitor": self.learner.competitor.summary(),
            "seed": self.plan.seed,
            "device": str(self.device),
            "config": self.plan.config,
            "paths": {
                f"benchmark.{name}": self.plan.cfg.benchmark[name]
                for name in BENCHMARKS.get(self.plan.cfg.benchmark.name).paths
                if self.plan.cfg.benchmark.get(name)
            },
            "provenance": self.plan.provenance,
        }
        if complete:  # the matrices are large on long streams: the checkpoint holds them until the end
            record["ccm"] = {split: matrix_rows(matrix) for split, matrix in state.ccm.items()}
        return record

    def checkpoint_due(self, i: int, state, num_distributions: int, stopping: bool = False) -> bool:
        cfg = self.plan.cfg.checkpoint
        due = time.perf_counter() - self.last_save >= cfg.interval_s or i == 0 or stopping
        return cfg.enabled and due and state.next_distribution < num_distributions

    def save_checkpoint(self, model, optimizer, state) -> None:
        from memhead import checkpoint

        self.write_checkpoint(
            checkpoint.capture(
                config=self.plan.config,
                seed=self.plan.seed,
                model_state=model.state_dict(),
                optimizer_state=None if optimizer is None else optimizer.state_dict(),
                competitor_state=self.learner.competitor.state_dict(),
                state=state,
                timer=self.timer,
                elapsed_s=self.elapsed_s(),
                rng=checkpoint.rng_state(self.learner.generator),
            )
        )

    def write_checkpoint(self, payload: dict) -> None:
        """Save ``payload`` as the run's checkpoint; the next one is due ``interval_s`` from now."""
        from memhead import checkpoint

        checkpoint.save(self.plan.out_dir / checkpoint.CHECKPOINT, payload)
        self.last_save = time.perf_counter()

    def at_boundary(self, i: int, model, optimizer, state, num_distributions: int, stopping=False) -> None:
        """Metrics so far, and a checkpoint when one is due or the run is ``stopping`` (preempted)."""
        if self.checkpoint_due(i, state, num_distributions, stopping):
            self.save_checkpoint(model, optimizer, state)
        write_json_atomic(self.plan.metrics_path, self.record(state, complete=False))

    def finish(self, state) -> dict:
        record = self.record(state, complete=True)
        write_json_atomic(self.plan.metrics_path, record)
        return record


def log_summary(record: dict) -> None:
    log.info("final metrics (each split at its last boundary):")
    from memhead.protocol import format_metrics

    for split, values in record["final"].items():
        boundary = record["final_boundary"][split]
        log.info("  %-5s %s (at boundary %d)", split, format_metrics(values), boundary)
    t = record["timing"]
    log.info(
        "time: train %.2fs (%.0f samples/s), eval %.2fs, features %.2fs, total %.2fs",
        t["train_s"],
        t["train_samples_per_s"],
        t["eval_s"],
        t["features_s"],
        t["total_s"],
    )


def stop_for_preemption(recorder: Recorder, state, preemption) -> None:
    """After the boundary's checkpoint: hand the signal on, and stop."""
    where = (
        f"it resumes from {recorder.plan.out_dir} after boundary {state.next_distribution - 1}"
        if recorder.plan.cfg.checkpoint.enabled
        else "checkpoint.enabled=false: it starts over when relaunched"
    )
    preemption.hand_on()
    raise run_dir.Preempted(preemption.signum, f"stopped by signal {preemption.signum}; {where}")


def run(cfg: DictConfig, out_dir: str | Path | None = None, *, group: str | None = None) -> dict:
    """Run the online protocol for ``cfg`` in ``out_dir`` and return the ``metrics.json`` record.

    The named steps: :func:`prepare` (what the run is, what its directory holds), :func:`build_stream`,
    :func:`build_learner`, :func:`resume`, then the protocol with a :class:`Recorder` at every boundary.
    With ``checkpoint.enabled`` the run continues from ``out_dir/checkpoint.pt`` when one is there, and
    a run whose ``metrics.json`` is complete is not run again.
    """

    t_start = time.perf_counter()
    plan = prepare(cfg, out_dir)
    try:
        if plan.done is not None:
            log.info("%s already holds this run, finished: nothing to do", plan.metrics_path)
            return plan.done
        with run_dir.Preemption() as preemption:
            return _run_planned(plan, group, t_start, preemption)
    finally:
        plan.release()


def _run_planned(plan: RunPlan, group: str | None, t_start: float, preemption) -> dict:
    from memhead import checkpoint
    from memhead.config import resolve_threads
    from memhead.limits import check_learner_size
    from memhead.loggers import make_logger
    from memhead.plots import has_planar_inputs, save_boundary_plot, save_run_plots, snapshot_keys
    from memhead.protocol import ProtocolState, Timer, log_matrices, run_protocol

    cfg = plan.cfg  # paths resolved
    checkpoint.remove_stale_temporaries(plan.out_dir)
    device = resolve_device(cfg.device)
    generator = seed_everything(plan.seed)
    progress = default_progress() if cfg.progress is None else bool(cfg.progress)
    timer = Timer(device)
    stream, features_s = build_stream(cfg, device, progress)
    threads = resolve_threads(cfg.threads, cfg.stream.batch_size, stream.in_features)
    if threads is not None:
        torch.set_num_threads(threads)
    check_learner_size(cfg, stream.in_features, stream.num_classes)  # now that the labels are known
    learner = build_learner(cfg, stream, device, generator)
    log.info("model: %s", learner.model)
    # Before any checkpoint is loaded: a resumed run draws the keys its first start began with.
    initial_keys = snapshot_keys(learner.model)
    state, earlier_s = resume(plan, learner, timer)
    recorder = Recorder(
        plan, learner, timer, features_s=features_s, earlier_s=earlier_s, device=device, t_start=t_start
    )
    out_dir = plan.out_dir
    tracker = make_logger(
        cfg.logger, plan.config, run_dir=str(out_dir), group=group, name=out_dir.name, model=learner.model
    )

    def on_boundary(i, row, model, optimizer, state: ProtocolState) -> None:
        images = []
        if cfg.plots.every_boundary and has_planar_inputs(stream):
            images.append(save_boundary_plot(out_dir, i, model, stream, initial_keys))
        tracker.log_boundary(i, row, model=model, images=images)
        stopping = preemption.signum is not None and state.next_distribution < stream.num_distributions
        recorder.at_boundary(i, model, optimizer, state, stream.num_distributions, stopping)
        if stopping:
            stop_for_preemption(recorder, state, preemption)

    try:
        with logging_redirect_tqdm():  # log lines above the progress bar, not through it
            result = run_protocol(
                learner.model,
                learner.optimizer,
                learner.competitor,
                stream,
                learner.loss_fn,
                batch_size=cfg.stream.batch_size,
                chunk_size=cfg.eval.chunk_size,
                progress=progress,
                timer=timer,
                state=state,
                on_boundary=on_boundary,
                verbose=cfg.verbose,
            )
        record = recorder.finish(
            ProtocolState(result.ccm, result.boundaries, result.final, initial=result.initial)
        )
        images = []
        if cfg.plots.enabled:
            images = save_run_plots(out_dir, record, result.model, stream, initial_keys)
        tracker.log_final(record, images=images)
    finally:
        tracker.close()
    if not cfg.verbose:  # verbose printed them at every boundary
        log_matrices(result.ccm)
    log_summary(record)
    log.info("metrics: %s", plan.metrics_path)
    return record
