"""Continual-learning metrics as pure functions of a continual confusion matrix.

``R[i][j]`` is the accuracy on distribution ``j`` after training up to distribution ``i`` (NaN where
not measured). Definitions follow ``protocol.md``; each function reads ``R[0..i][0..i]``.
"""

from __future__ import annotations

import numpy as np

METRICS = ("avg_accuracy", "avg_forgetting", "backward_transfer", "forward_transfer")


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


def all_metrics(R: np.ndarray, i: int) -> dict[str, float]:
    """Every metric of ``METRICS`` after boundary ``i``."""
    return {
        "avg_accuracy": avg_accuracy(R, i),
        "avg_forgetting": avg_forgetting(R, i),
        "backward_transfer": backward_transfer(R, i),
        "forward_transfer": forward_transfer(R, i),
    }


def matrix_rows(R: np.ndarray) -> list[list[float | None]]:
    """JSON-ready rows, ``None`` for unfilled cells."""
    return [[None if np.isnan(v) else float(v) for v in row] for row in R]


def format_matrix(R: np.ndarray, digits: int = 2) -> str:
    """The matrix as aligned text, ``N.A.`` for unfilled cells (the paper's printout)."""
    width = max(4, digits + 2)
    cells = [[("N.A." if np.isnan(v) else f"{v:.{digits}f}").rjust(width) for v in row] for row in R]
    return "\n".join(" ".join(row) for row in cells)
