"""Continual-learning metrics as pure functions of a continual confusion matrix.

``R[i][j]`` is the accuracy on distribution ``j`` after training up to distribution ``i`` (NaN where
not measured). Two conventions, under distinct names, each function reading ``R[0..i][0..i]``:

* the paper's (``protocol.md``): ``avg_forgetting`` against the best earlier row, ``backward_transfer``
  clamped at 0, ``forward_transfer`` without a baseline;
* GEM's (Lopez-Paz & Ranzato, 2017), which Avalanche-style libraries report (suffix ``_gem``):
  forgetting against the accuracy just after learning (``R[j][j] - R[i][j]``), signed backward
  transfer (= minus that forgetting), forward transfer against the untrained model's accuracy ``b``.
"""

from __future__ import annotations

import numpy as np

METRICS = ("avg_accuracy", "avg_forgetting", "backward_transfer", "forward_transfer")
GEM_METRICS = ("avg_forgetting_gem", "backward_transfer_gem", "forward_transfer_gem")
# Every name a run records (metrics.json, W&B) and memhead.report can select.
ALL_METRICS = METRICS + GEM_METRICS
# Forgetting: lower is better; every other metric is better when higher.
LOWER_IS_BETTER = frozenset({"avg_forgetting", "avg_forgetting_gem"})


def avg_accuracy(R: np.ndarray, i: int) -> float:
    return float(np.mean(R[i, : i + 1]))


def avg_forgetting(R: np.ndarray, i: int) -> float:
    if i == 0:
        return 0.0
    best_before = R[:i, :i].max(axis=0)
    return float(np.mean(best_before - R[i, :i]))


def backward_transfer(R: np.ndarray, i: int) -> float:
    """Positive backward transfer only (clamped at 0), as the paper reports it."""
    T = i + 1
    if T == 1:
        return 0.0
    sub = R[:T, :T]
    lower = np.tril_indices(T, k=-1)  # a > b
    total = np.sum(sub[lower] - np.diag(sub)[lower[1]])
    return float(max(0.0, 2.0 / (T * (T - 1)) * total))


def forward_transfer(R: np.ndarray, i: int) -> float:
    T = i + 1
    if T == 1:
        return 0.0
    upper = np.triu_indices(T, k=1)  # a < b
    return float(2.0 / (T * (T - 1)) * np.sum(R[:T, :T][upper]))


def avg_forgetting_gem(R: np.ndarray, i: int) -> float:
    """Mean over ``j < i`` of ``R[j][j] - R[i][j]``: the drop since distribution ``j`` was learnt."""
    if i == 0:
        return 0.0
    return float(np.mean(np.diag(R)[:i] - R[i, :i]))


def backward_transfer_gem(R: np.ndarray, i: int) -> float:
    """GEM's signed BWT: mean over ``j < i`` of ``R[i][j] - R[j][j]`` (negative when forgetting)."""
    return -avg_forgetting_gem(R, i)


def forward_transfer_gem(R: np.ndarray, i: int, baseline: np.ndarray) -> float:
    """GEM's FWT: mean over ``0 < j <= i`` of ``R[j-1][j] - b[j]``, ``b`` the untrained model's accuracy."""
    if i == 0:
        return 0.0
    j = np.arange(1, i + 1)
    return float(np.mean(R[j - 1, j] - np.asarray(baseline, dtype=np.float64)[j]))


def all_metrics(R: np.ndarray, i: int, baseline: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of ``ALL_METRICS`` after boundary ``i`` (``forward_transfer_gem`` needs ``baseline``)."""
    values = {
        "avg_accuracy": avg_accuracy(R, i),
        "avg_forgetting": avg_forgetting(R, i),
        "backward_transfer": backward_transfer(R, i),
        "forward_transfer": forward_transfer(R, i),
        "avg_forgetting_gem": avg_forgetting_gem(R, i),
        "backward_transfer_gem": backward_transfer_gem(R, i),
    }
    if baseline is not None:
        values["forward_transfer_gem"] = forward_transfer_gem(R, i, baseline)
    return values


def matrix_rows(R: np.ndarray) -> list[list[float | None]]:
    """JSON-ready rows, ``None`` for unfilled cells."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in R]


def format_matrix(R: np.ndarray, digits: int = 2) -> str:
    """The matrix as aligned text, ``N.A.`` for unfilled cells (the paper's printout)."""
    width = max(4, digits + 2)
    cells = [[("N.A." if np.isnan(v) else f"{v:.{digits}f}").rjust(width) for v in row] for row in R]
    return "\n".join(" ".join(row) for row in cells)
