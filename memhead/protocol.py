"""The paper's online protocol: one pass over the training stream, evaluation at every boundary.

See ``protocol.md``. The loop is the only place where a model is trained; a competitor acts only
through the hooks of :class:`competitors.base.Competitor`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from competitors.base import Competitor
from data.stream import Split, Stream
from memhead import metrics

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

    def measure(self, part: str, samples: int):
        timer = self

        class _Span:
            def __enter__(self):
                timer.sync()
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                timer.sync()
                timer.seconds[part] += time.perf_counter() - self.start
                timer.samples[part] += samples

        return _Span()


@dataclass
class ProtocolResult:
    """Continual confusion matrices (NaN where unfilled) and the metrics after every boundary."""

    ccm: dict[str, np.ndarray]
    boundaries: list[dict]
    final: dict[str, dict]
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer


def run_protocol(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    competitor: Competitor,
    stream: Stream,
    loss_fn: LossFn,
    *,
    batch_size: int = 1,
    chunk_size: int = 1000,
    progress: bool = False,
    timer: Timer | None = None,
    on_boundary: Callable[[int, dict], None] | None = None,
) -> ProtocolResult:
    """Train once over ``stream.train`` and fill the continual confusion matrices.

    Batches never cross a distribution boundary. ``on_boundary(i, metrics_by_split)`` is called after
    the evaluation of each boundary (loggers use it).
    """
    timer = timer or Timer(stream.train.x.device)
    splits = stream.splits()
    ccm = {name: np.full((s.num_distributions, s.num_distributions), np.nan) for name, s in splits.items()}
    last: dict[str, dict] = {name: {} for name in splits}
    boundaries: list[dict] = []
    train = stream.train
    model.train()

    bar = tqdm(total=len(train), desc="stream", unit="sample", disable=not progress, leave=False, dynamic_ncols=True)
    start = 0
    for i, end in enumerate(distribution_ends(train.dist)):
        with timer.measure("train_s", end - start):
            for lo in range(start, end, batch_size):
                hi = min(lo + batch_size, end)
                x, y = train.x[lo:hi], train.y[lo:hi]
                if competitor.trains_on_stream:
                    loss = loss_fn(model(x), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    competitor.after_backward(model, optimizer, x, y)
                    optimizer.step()
                competitor.after_step(x, y)
                bar.update(hi - lo)
            replaced = competitor.at_boundary(model, optimizer)
            if replaced is not None:
                model, optimizer = replaced
        start = end

        row: dict[str, dict] = {}
        for name, split in splits.items():
            if i < split.num_distributions:
                with timer.measure("eval_s", len(split)):
                    ccm[name][i] = accuracy_per_distribution(model, split, chunk_size)
                last[name] = {"boundary": i, **metrics.all_metrics(ccm[name], i)}
            row[name] = last[name]
        boundaries.append({"index": i, **row})
        _print_boundary(i, train.num_distributions, row, ccm)
        if on_boundary is not None:
            on_boundary(i, row)
    bar.close()
    return ProtocolResult(ccm=ccm, boundaries=boundaries, final=last, model=model, optimizer=optimizer)


# Few enough distributions to print the matrices after each boundary (the paper omits them on 300).
MAX_PRINTED_MATRIX = 20


def format_metrics(values: dict) -> str:
    return " ".join(
        f"{short}={values[key]:.4f}"
        for key, short in zip(metrics.METRICS, ("acc", "forgetting", "bwt", "fwt"))
        if key in values
    )


def _print_boundary(i: int, total: int, row: dict, ccm: dict[str, np.ndarray]) -> None:
    log.info("boundary %d/%d", i + 1, total)
    for name, values in row.items():
        if values:
            log.info("  %-5s %s%s", name, format_metrics(values), "" if values["boundary"] == i else
                     f" (kept from boundary {values['boundary'] + 1})")
    if total <= MAX_PRINTED_MATRIX:
        for name, matrix in ccm.items():
            if i < len(matrix):
                text = metrics.format_matrix(matrix).replace("\n", "\n    ")
                log.info("  continual confusion matrix (%s):\n    %s", name, text)
