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
    values = metrics.all_metrics(R, i)
    assert {name: values[name] for name in metrics.METRICS} == pytest.approx(expected)


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


# GEM's convention (Avalanche-style libraries) next to the paper's, on matrices where they differ.
BASELINE = np.array([0.3, 0.2, 0.5])  # the untrained model's accuracy on each distribution


def test_gem_metrics_hand_computed_next_to_the_papers():
    # After boundary 2 on R: forgetting against R[j][j]: mean(0.9 - 0.5, 0.8 - 0.7) = 0.25;
    # signed BWT: mean(0.5 - 0.9, 0.7 - 0.8) = -0.25 where the paper's BWT is clamped to 0;
    # FWT against b: mean(R01 - b1, R12 - b2) = mean(0.1 - 0.2, 0.2 - 0.5) = -0.2 (paper: 0.1).
    values = metrics.all_metrics(R, 2, BASELINE)
    assert values["avg_forgetting_gem"] == pytest.approx(0.25)
    assert values["backward_transfer_gem"] == pytest.approx(-0.25)
    assert values["backward_transfer"] == 0.0
    assert values["forward_transfer_gem"] == pytest.approx(-0.2)
    assert values["forward_transfer"] == pytest.approx(0.1)
    assert set(values) == set(metrics.ALL_METRICS)
    # After boundary 1: 0.9 - 0.6 = 0.3; FWT: R01 - b1 = -0.1.
    assert metrics.avg_forgetting_gem(R, 1) == pytest.approx(0.3)
    assert metrics.forward_transfer_gem(R, 1, BASELINE) == pytest.approx(-0.1)
    first = metrics.all_metrics(R, 0, BASELINE)
    assert [first[m] for m in metrics.GEM_METRICS] == [0.0, 0.0, 0.0]


def test_gem_forgetting_reads_the_diagonal_where_the_paper_reads_the_best_earlier_row():
    # Distribution 0 rose to 0.6 after distribution 1 (backward transfer), then fell to 0.2.
    R5 = np.array([[0.4, 0.0, 0.0], [0.6, 0.5, 0.0], [0.2, 0.9, 1.0]])
    # paper: mean(max(0.4, 0.6) - 0.2, max(0.0, 0.5) - 0.9) = mean(0.4, -0.4) = 0
    assert metrics.avg_forgetting(R5, 2) == pytest.approx(0.0)
    # GEM: mean(0.4 - 0.2, 0.5 - 0.9) = -0.1, and BWT = +0.1
    assert metrics.avg_forgetting_gem(R5, 2) == pytest.approx(-0.1)
    assert metrics.backward_transfer_gem(R5, 2) == pytest.approx(0.1)
    # paper's BWT averages every pair: 1/3 * ((0.6 - 0.4) + (0.2 - 0.4) + (0.9 - 0.5)) = 0.4 / 3
    assert metrics.backward_transfer(R5, 2) == pytest.approx(0.4 / 3)


def test_without_a_baseline_gem_forward_transfer_is_not_recorded():
    assert "forward_transfer_gem" not in metrics.all_metrics(R, 2)
