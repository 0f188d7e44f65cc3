"""Peer check: memhead's StreamingLDA against Avalanche's ``StreamingLDA`` on the NS-shaped stream.

Avalanche (pip ``avalanche-lib``) is not a dependency: without it the test is skipped. Run it in a
throw-away environment that has it, with this worktree first on the path::

    PYTHONPATH=. /tmp/aval/bin/python -m pytest -q tests/peers/test_slda_avalanche.py -s
    PYTHONPATH=. /tmp/aval/bin/python tests/peers/test_slda_avalanche.py     # prints the figures

Both learn the training stream one sample at a time with shrinkage 1e-4 and a streaming covariance;
both are asked for the test scores after the first half of the stream and at its end.
``covariance_update=hayes_kanan`` is the recursion Avalanche implements, so scores agree to float
tolerance; the default ``exact`` update (the pooled within-class covariance) is reported beside it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ns_shaped_stream import make_arrays  # noqa: E402

from memhead.slda import StreamingLDA  # noqa: E402

SHRINKAGE = 1e-4


def avalanche_slda(features: int, classes: int):
    from avalanche.training import StreamingLDA as AvalancheSLDA

    return AvalancheSLDA(
        slda_model=torch.nn.Identity(),
        criterion=torch.nn.CrossEntropyLoss(),
        input_size=features,
        num_classes=classes,
        shrinkage_param=SHRINKAGE,
        streaming_update_sigma=True,
        evaluator=None,
    )


def compare() -> dict[str, dict[str, float]]:
    """Prediction agreement and largest score difference (relative to the score range), per update."""
    arrays = make_arrays()
    x, y = torch.from_numpy(arrays["X_train"]), torch.from_numpy(arrays["y_train"])
    test = torch.from_numpy(arrays["X_test"])
    classes, features = int(y.max()) + 1, x.shape[1]
    peer = avalanche_slda(features, classes)
    ours = {name: StreamingLDA(features, classes, shrinkage=SHRINKAGE, covariance_update=name)
            for name in ("hayes_kanan", "exact")}  # fmt: skip
    checkpoints = {len(y) // 2: "half", len(y): "end"}
    figures: dict[str, dict[str, float]] = {}
    for i in range(len(y)):
        xi, yi = x[i : i + 1], y[i : i + 1]
        peer.fit(xi, yi)
        for model in ours.values():
            model.learn(xi, yi)
        if i + 1 in checkpoints:
            seen = torch.bincount(y[: i + 1], minlength=classes) > 0
            theirs = peer.predict(test).masked_fill(~seen, float("-inf"))  # unseen: never predicted
            scale = (theirs[:, seen].max() - theirs[:, seen].min()).item()
            for name, model in ours.items():
                mine = model(test)
                figures[f"{name}@{checkpoints[i + 1]}"] = {
                    "agreement": (mine.argmax(1) == theirs.argmax(1)).float().mean().item(),
                    "max_score_diff_rel": ((mine - theirs)[:, seen].abs().max() / scale).item(),
                }
    return figures


def test_same_predictions_as_avalanche():
    pytest.importorskip("avalanche", reason="Avalanche (pip avalanche-lib) is not installed")
    figures = compare()
    for when in ("half", "end"):
        assert figures[f"hayes_kanan@{when}"]["agreement"] >= 0.999, figures
        assert figures[f"hayes_kanan@{when}"]["max_score_diff_rel"] < 1e-3, figures


if __name__ == "__main__":
    for key, values in compare().items():
        print(f"{key:18s} agreement {values['agreement']:.4f}  max |score diff| / score range "
              f"{values['max_score_diff_rel']:.2e}")  # fmt: skip
