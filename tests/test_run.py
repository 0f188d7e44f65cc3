"""End to end: run(cfg) on tiny streams for every option, and the metrics.json record."""

import json

import numpy as np
import pytest
from conftest import PAPER_2D, need_shared
from test_config import GROUP_OPTIONS

from memhead.metrics import ALL_METRICS
from memhead.runner import run

METRIC_KEYS = set(ALL_METRICS)  # the paper's convention and GEM's


def check_record(record, out_dir, num_dists=8, num_val=4):
    on_disk = json.loads((out_dir / "metrics.json").read_text())
    assert on_disk["final"] == record["final"]
    for split in ("train", "val", "test"):
        assert set(record["final"][split]) == METRIC_KEYS
        final = record["final"][split]
        assert 0.0 <= final["avg_accuracy"] <= 1.0 and final["backward_transfer"] >= 0.0
        assert -1.0 <= final["avg_forgetting"] <= 1.0
    assert len(record["ccm"]["train"]) == num_dists and len(record["ccm"]["val"]) == num_val
    # The untrained model's accuracy on every distribution of every split (GEM's FWT baseline).
    assert [len(record["initial_accuracy"][s]) for s in ("train", "val")] == [num_dists, num_val]
    assert [b["index"] for b in record["boundaries"]] == list(range(num_dists))
    assert set(record["timing"]) == {
        "train_s",
        "eval_s",
        "features_s",
        "total_s",
        "train_samples_per_s",
        "eval_samples_per_s",
    }
    assert record["config"]["model"]["name"] == on_disk["config"]["model"]["name"]
    # The final test metrics are those of the last row of the test matrix.
    last = np.array(record["ccm"]["test"][-1], dtype=float)
    assert record["final"]["test"]["avg_accuracy"] == pytest.approx(last.mean())
    return on_disk


@pytest.mark.parametrize(
    "overrides",
    [
        [f"{g}={o}"]
        for g, opts in GROUP_OPTIONS.items()
        for o in opts
        if (g, o) not in {("benchmark", "features"), ("benchmark", "ns_imagenet")}
    ]
    + [
        ["loss=hinge"],
        ["stream.batch_size=4"],
        ["benchmark=moons", "benchmark.order=CDID"],
        ["model=mh", "model.distance=cosine", "model.shared_keys=false", "model.upd_m=vanilla"],
        ["model=mh", "model.hidden=5"],
    ],
    ids=lambda o: " ".join(o),
)
def test_every_option_runs_on_a_tiny_stream(overrides, tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg(
        *overrides,
        "competitor.buffer_size=8"
        if "competitor=" in overrides[0] and not overrides[0].endswith(("none", "ensemble"))
        else "seed=1",
    )
    record = run(cfg, tmp_path)
    check_record(record, tmp_path)


@pytest.mark.parametrize("order, dists, val", [("IID", 1, 1), ("CI", 4, 2), ("CDI", 8, 4), ("CDID", 8, 4)])
def test_orders_give_their_distribution_counts(order, dists, val, tiny_cfg, tmp_path):
    record = run(tiny_cfg("model=lp", f"benchmark.order={order}"), tmp_path)
    check_record(record, tmp_path, num_dists=dists, num_val=val)


def test_features_benchmark_replays_the_papers_file(tiny_cfg, tmp_path):
    path = need_shared(PAPER_2D / "bi-modals_CDI.npz")
    record = run(tiny_cfg("model=lp", "benchmark=features", f"benchmark.path={path}"), tmp_path)
    check_record(record, tmp_path)
    with np.load(path) as data:
        assert sum(len(r) for r in record["ccm"]["test"]) == 8 * len(np.unique(data["distributions_test"]))


def test_same_seed_same_result_and_negative_seed_is_recorded(tiny_cfg, tmp_path):
    a = run(tiny_cfg("seed=7"), tmp_path / "a")
    b = run(tiny_cfg("seed=7"), tmp_path / "b")
    assert a["ccm"] == b["ccm"]
    c = run(tiny_cfg("seed=-1", "model=lp"), tmp_path / "c")
    assert c["seed"] >= 0 and c["config"]["seed"] == c["seed"]


def test_bad_feature_file_is_rejected_with_its_rule(tiny_cfg, tmp_path):
    from memhead.registry import ConfigError

    arrays = {
        f"{k}_{s}": np.zeros(4, dtype=np.int64)
        for k in ("y", "distributions")
        for s in ("train", "val", "test")
    }
    arrays.update({f"X_{s}": np.zeros((4, 2)) for s in ("train", "val", "test")})
    arrays["distributions_test"] = np.array([0, 1, 1, 2])  # 3 distributions, train has 1
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match="prefix"):
        run(tiny_cfg("benchmark=features", f"benchmark.path={path}"), tmp_path)
    arrays["distributions_test"] = np.array([0, 0, 2, 2])  # not contiguous
    np.savez(path, **arrays)
    with pytest.raises(ConfigError, match="contiguous"):
        run(tiny_cfg("benchmark=features", f"benchmark.path={path}"), tmp_path)


@pytest.mark.parametrize("verbose", [False, True])
def test_one_line_per_boundary_and_the_matrices_once_unless_verbose(verbose, tiny_cfg, tmp_path, caplog):
    with caplog.at_level("INFO"):
        run(tiny_cfg(f"verbose={str(verbose).lower()}"), tmp_path)
    messages = [r.getMessage() for r in caplog.records]
    boundary_lines = [m for m in messages if m.startswith("boundary ")]
    # 0-based, as metrics.json, W&B and the plot files number them
    assert [m.split(" (of")[0] for m in boundary_lines] == [f"boundary {i}" for i in range(8)]
    assert all("\n" not in m and " train acc=" in m and " test acc=" in m for m in boundary_lines)
    matrices = [m for m in messages if "continual confusion matrix (test)" in m]
    assert len(matrices) == (8 if verbose else 1)


def test_threads_null_means_one_thread_on_one_sample_streams(tiny_cfg, tmp_path):
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        run(tiny_cfg(), tmp_path / "default")
        assert torch.get_num_threads() == 1  # one-sample 2-D stream: the thread pool costs more than it gains
        torch.set_num_threads(2)
        run(tiny_cfg("stream.batch_size=16"), tmp_path / "batched")
        assert torch.get_num_threads() == 2  # batched: torch's default stays
        run(tiny_cfg("threads=2"), tmp_path / "explicit")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_deterministic_kernels_are_requested_without_importing_the_compiler():
    """``seed_everything`` leaves the state ``torch.use_deterministic_algorithms(True, warn_only=True)``
    leaves, through torch's own setter (this fails if torch drops it), without importing the compiler,
    whose ``deterministic`` option is on once it is imported; afterwards the public call is used."""
    import os
    import subprocess
    import sys

    from conftest import REPO

    code = """
import sys, torch
assert hasattr(torch._C, "_set_deterministic_algorithms")
from memhead.runner import seed_everything
assert not torch.are_deterministic_algorithms_enabled()
seed_everything(1)
assert "torch._inductor.config" not in sys.modules
assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
import torch._inductor.config as inductor
assert inductor.deterministic
torch.use_deterministic_algorithms(False)
seed_everything(2)
assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_DETERMINISTIC"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr
