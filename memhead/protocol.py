"""The paper's online protocol: one pass over the training stream, evaluation at every boundary.

See ``protocol.md``. The loop is the only place where a model is trained; a competitor acts only
through the hooks of :class:`competitors.base.Competitor`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from competitors.base import Competitor
from data.stream import Split, Stream
from memhead import metrics
from memhead.models import ClosedFormModel

log = logging.getLogger(__name__)

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def xent_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits, y)


def hinge_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The paper's hinge: ``sum(max(0, -t * o))`` with ``t = 2 * onehot(y) - 1``, no margin."""
    t = 2.0 * torch.nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype) - 1.0
    return torch.clamp(-t * logits, min=0).sum()


LOSSES: dict[str, LossFn] = {"xent": xent_loss, "hinge": hinge_loss}


def accuracy_per_distribution(model: torch.nn.Module, split: Split, chunk_size: int) -> np.ndarray:
    """Accuracy on each distribution of ``split`` (eval mode, no gradient, ``chunk_size`` at a time)."""
    was_training = model.training
    model.eval()
    correct = torch.empty(len(split), dtype=torch.float32, device=split.y.device)
    with torch.inference_mode():
        for start in range(0, len(split), chunk_size):
            stop = start + chunk_size
            logits = model(split.x[start:stop])
            correct[start:stop] = (logits.argmax(dim=-1) == split.y[start:stop]).float()
    model.train(was_training)
    hits = torch.bincount(split.dist, weights=correct, minlength=split.num_distributions)
    counts = torch.bincount(split.dist, minlength=split.num_distributions)
    return (hits / counts).cpu().numpy().astype(np.float64)


def distribution_ends(dist: torch.Tensor) -> list[int]:
    """Index one past the last sample of each distribution of a (contiguous, sorted) split."""
    changes = (torch.nonzero(dist[1:] != dist[:-1]).flatten() + 1).tolist()
    return changes + [len(dist)]


@dataclass
class Timer:
    """Wall time of the parts of a run; synchronises CUDA so that GPU work is counted where it ran."""

    device: torch.device
    seconds: dict[str, float] = field(default_factory=lambda: {"train_s": 0.0, "eval_s": 0.0})
    samples: dict[str, int] = field(default_factory=lambda: {"train_s": 0, "eval_s": 0})

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def measure(self, part: str, samples: int):
        """Add the wall time of the enclosed block, and its ``samples``, to ``part``."""
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.seconds[part] += time.perf_counter() - start
        self.samples[part] += samples


@dataclass
class ProtocolState:
    """What the loop has measured so far; with the model and optimizer, enough to resume a run."""

    ccm: dict[str, np.ndarray]
    boundaries: list[dict] = field(default_factory=list)
    last: dict[str, dict] = field(default_factory=dict)
    next_distribution: int = 0
    # Accuracy of the untrained model on each distribution of each split (GEM's FWT baseline),
    # measured once before the first sample; empty for a state saved before it was recorded.
    initial: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def start(cls, stream: Stream) -> ProtocolState:
        splits = stream.splits()
        return cls(
            ccm={name: np.full((s.num_distributions,) * 2, np.nan) for name, s in splits.items()},
            last={name: {} for name in splits},
        )

    def state_dict(self) -> dict:
        return {
            "ccm": {name: torch.from_numpy(m.copy()) for name, m in self.ccm.items()},
            "boundaries": self.boundaries,
            "last": self.last,
            "next_distribution": self.next_distribution,
            "initial": {name: torch.from_numpy(b.copy()) for name, b in self.initial.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> ProtocolState:
        return cls(
            ccm={name: m.numpy().astype(np.float64) for name, m in state["ccm"].items()},
            boundaries=list(state["boundaries"]),
            last=dict(state["last"]),
            next_distribution=int(state["next_distribution"]),
            initial={name: b.numpy().astype(np.float64) for name, b in state.get("initial", {}).items()},
        )


@dataclass
class ProtocolResult:
    """Continual confusion matrices (NaN where unfilled), metrics after every boundary, final model."""

    ccm: dict[str, np.ndarray]
    boundaries: list[dict]
    final: dict[str, dict]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer | None
    initial: dict[str, np.ndarray] = field(default_factory=dict)


BoundaryCallback = Callable[[int, dict, torch.nn.Module, torch.optim.Optimizer | None, ProtocolState], None]


def run_protocol(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    competitor: Competitor,
    stream: Stream,
    loss_fn: LossFn,
    *,
    batch_size: int = 1,
    chunk_size: int = 1000,
    progress: bool = False,
    timer: Timer | None = None,
    state: ProtocolState | None = None,
    on_boundary: BoundaryCallback | None = None,
    verbose: bool = False,
) -> ProtocolResult:
    """Train once over ``stream.train`` and fill the continual confusion matrices.

    Batches never cross a distribution boundary. A ``state`` from an earlier, interrupted call resumes
    at its ``next_distribution`` (the model, optimizer and competitor must hold the matching states).
    ``on_boundary(i, metrics_by_split, model, optimizer, state)`` runs after each boundary's evaluation
    (checkpoints and trackers use it). A fresh start first evaluates the untrained model on every split
    (``state.initial``, the baseline of ``forward_transfer_gem``).

    A :class:`~memhead.models.ClosedFormModel` learns each batch by its ``learn`` in place of forward,
    loss, backward and step, and needs no optimizer (``None``); its ``end_distribution`` runs at each
    boundary before the competitor's hook. Evaluation is the same for every model.
    """
    timer = timer or Timer(stream.train.x.device)
    state = state or ProtocolState.start(stream)
    splits = stream.splits()
    train = stream.train
    ends = distribution_ends(train.dist)
    closed_form = isinstance(model, ClosedFormModel)
    model.train()

    start = ends[state.next_distribution - 1] if state.next_distribution > 0 else 0
    bar = tqdm(
        total=len(train),
        initial=start,
        desc="stream",
        unit="sample",
        disable=not progress,
        leave=False,
        dynamic_ncols=True,
    )
    if state.next_distribution == 0 and not state.initial:
        # The untrained model, before the first sample: the baseline of GEM's forward transfer.
        for name, split in splits.items():
            with timer.measure("eval_s", len(split)):
                state.initial[name] = accuracy_per_distribution(model, split, chunk_size)
    for i in range(state.next_distribution, len(ends)):
        end = ends[i]
        with timer.measure("train_s", end - start):
            for lo in range(start, end, batch_size):
                hi = min(lo + batch_size, end)
                x, y = train.x[lo:hi], train.y[lo:hi]
                if closed_form:
                    model.learn(x, y)
                elif competitor.trains_on_stream:
                    loss = loss_fn(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    competitor.after_backward(model, optimizer, x, y)
                    optimizer.step()
                competitor.after_step(x, y)
                bar.update(hi - lo)
            if closed_form:
                model.end_distribution()
            replaced = competitor.at_boundary(model, optimizer)
            if replaced is not None:
                model, optimizer = replaced
        start = end

        row: dict[str, dict] = {}
        for name, split in splits.items():
            if i < split.num_distributions:
                with timer.measure("eval_s", len(split)):
                    state.ccm[name][i] = accuracy_per_distribution(model, split, chunk_size)
                values = metrics.all_metrics(state.ccm[name], i, state.initial.get(name))
                state.last[name] = {"boundary": i, **values}
            row[name] = state.last[name]
        state.boundaries.append({"index": i, **row})
        state.next_distribution = i + 1
        _print_boundary(i, train.num_distributions, row, state.ccm, verbose)
        if on_boundary is not None:
            on_boundary(i, row, model, optimizer, state)
    bar.close()
    return ProtocolResult(
        ccm=state.ccm,
        boundaries=state.boundaries,
        final=state.last,
        model=model,
        optimizer=optimizer,
        initial=state.initial,
    )


# Few enough distributions to print the matrices after each boundary (the paper omits them on 300).
MAX_PRINTED_MATRIX = 20


def format_metrics(values: dict, short: bool = False) -> str:
    """The paper's metrics of one split; ``short``: accuracy and forgetting only (the per-boundary line)."""
    names = zip(metrics.METRICS, ("acc", "forgetting", "bwt", "fwt"))
    return " ".join(
        f"{name}={values[key]:.{3 if short else 4}f}"
        for key, name in (list(names)[:2] if short else names)
        if key in values
    )


def _print_boundary(i: int, total: int, row: dict, ccm: dict[str, np.ndarray], verbose: bool) -> None:
    """One line per boundary (0-based, as in metrics.json); the matrices too with ``verbose``."""
    parts = [
        f"{name} {format_metrics(values, short=True)}"
        + ("" if values["boundary"] == i else f" (from boundary {values['boundary']})")
        for name, values in row.items()
        if values
    ]
    log.info("boundary %d (of 0..%d): %s", i, total - 1, " | ".join(parts))
    if verbose:
        log_matrices(ccm, upto=i)


def log_matrices(ccm: dict[str, np.ndarray], upto: int | None = None) -> None:
    """The continual confusion matrices (rows after distribution i, 0-based), when small enough to read."""
    for name, matrix in ccm.items():
        if len(matrix) <= MAX_PRINTED_MATRIX and (upto is None or upto < len(matrix)):
            text = metrics.format_matrix(matrix).replace("\n", "\n    ")
            log.info("  continual confusion matrix (%s):\n    %s", name, text)
