"""Metrics against hand-computed values (protocol.md's definitions)."""

import numpy as np
import pytest

from memhead import metrics

R = np.array(
    [
        [0.9, 0.1, 0.0],
        [0.6, 0.8, 0.2],
        [0.5, 0.7, 0.9],
    ]
)


@pytest.mark.parametrize(
    "i, expected",
    [
        (0, dict(avg_accuracy=0.9, avg_forgetting=0.0, backward_transfer=0.0, forward_transfer=0.0)),
        # forgetting: 0.9 - 0.6; bwt: (0.6 - 0.9) < 0 -> clamped; fwt: R[0][1]
        (1, dict(avg_accuracy=0.7, avg_forgetting=0.3, backward_transfer=0.0, forward_transfer=0.1)),
        # forgetting: mean(0.9 - 0.5, 0.8 - 0.7); fwt: (0.1 + 0.0 + 0.2) / 3
        (2, dict(avg_accuracy=0.7, avg_forgetting=0.25, backward_transfer=0.0, forward_transfer=0.1)),
    ],
)
def test_metrics_hand_computed(i, expected):
    assert metrics.all_metrics(R, i) == pytest.approx(expected)


def test_positive_backward_transfer():
    R2 = np.array([[0.5, 0.0], [0.8, 0.9]])
    assert metrics.backward_transfer(R2, 1) == pytest.approx(0.3)  # 2/(2*1) * (0.8 - 0.5)


def test_backward_transfer_three_rows():
    R3 = np.array([[0.2, 0, 0], [0.6, 0.5, 0], [0.4, 0.9, 1.0]])
    # 2/(3*2) * ((0.6-0.2) + (0.4-0.2) + (0.9-0.5)) = 1/3 * 1.0
    assert metrics.backward_transfer(R3, 2) == pytest.approx(1 / 3)


def test_forgetting_uses_best_previous_row_only():
    # R[2][0] = 1.0 does not count as "before" when measuring forgetting after boundary 1.
    R4 = np.array([[0.4, 0.0, 0.0], [0.1, 0.5, 0.0], [1.0, 1.0, 1.0]])
    assert metrics.avg_forgetting(R4, 1) == pytest.approx(0.3)


def test_matrix_rows_and_format_mark_unfilled_cells():
    M = np.full((2, 2), np.nan)
    M[0] = [0.5, 0.25]
    assert metrics.matrix_rows(M) == [[0.5, 0.25], [None, None]]
    text = metrics.format_matrix(M)
    assert text.splitlines()[1].split() == ["N.A.", "N.A."]
    assert text.splitlines()[0].split() == ["0.50", "0.25"]
