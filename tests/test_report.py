"""memhead.report on hand-made run folders: exact statistics, selection on val, runs without metrics."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import REPO

from memhead import report
from memhead.report import ReportError, build_report, main

SPLITS = ("train", "val", "test")
HI, LO = "optimizer.lr=0.01", "optimizer.lr=0.001"


def make_run(root, name, overrides, *, seed, test, val, model="mh", competitor="none", forgetting=0.0):
    """A run folder as Hydra and memhead.runner leave it: .hydra/overrides.yaml and metrics.json."""
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    lines = [*overrides, f"seed={seed}"]
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {line}\n" for line in lines))
    values = {"train": 0.0, "val": val, "test": test}
    final = {
        split: {
            "avg_accuracy": values[split],
            "avg_forgetting": forgetting,
            "backward_transfer": 0.0,
            "forward_transfer": 0.0,
        }
        for split in SPLITS
    }
    config = {
        "model": {"name": model},
        "competitor": {"name": competitor},
        "benchmark": {"name": "modes", "order": "CDI"},
    }
    (run_dir / "metrics.json").write_text(json.dumps({"final": final, "seed": seed, "config": config}))
    return run_dir


@pytest.fixture
def sweep(tmp_path):
    """Two Memory Head configurations (3 seeds each) and one MLP configuration (2 seeds).

    lr=0.01 is the better one on validation, lr=0.001 the better one on test: selection must use val.
    """
    root = tmp_path / "sweep"
    for i, (seed, test, val) in enumerate([(1, 0.5, 0.9), (2, 0.6, 0.8), (3, 0.9, 0.7)]):
        make_run(root, str(i), ["model=mh", HI], seed=seed, test=test, val=val, forgetting=0.3)
    for i, (seed, test, val) in enumerate([(1, 0.95, 0.5), (2, 0.85, 0.6), (3, 0.9, 0.4)], start=3):
        make_run(root, str(i), ["model=mh", LO], seed=seed, test=test, val=val, forgetting=0.1)
    for i, (seed, test, val) in enumerate([(1, 0.25, 0.5), (2, 0.35, 0.5)], start=6):
        make_run(root, str(i), ["model=mlp", HI], seed=seed, test=test, val=val, model="mlp")
    return root


def by_label(rep):
    return {(c.method[1], c.label): c for c in rep.configurations}


def test_groups_by_everything_but_the_seed_with_exact_mean_and_sample_std(sweep):
    configs = by_label(build_report(sweep))
    assert sorted(configs) == [("mh", LO), ("mh", HI), ("mlp", HI)]
    mh = configs[("mh", HI)]
    assert mh.seeds == [1, 2, 3]
    # test accuracies 0.5, 0.6, 0.9: mean 2/3; deviations -1/6, -1/15, 7/30; sample variance 0.13/3.
    mean, std = mh.mean_std("test", "avg_accuracy")
    assert mean == pytest.approx(2 / 3, abs=1e-12)
    assert std == pytest.approx((0.13 / 3) ** 0.5, abs=1e-12)
    assert configs[("mlp", HI)].mean_std("test", "avg_accuracy") == pytest.approx((0.3, 0.1 / 2**0.5))


def test_selects_per_method_on_validation_not_test(sweep):
    rep = build_report(sweep)
    assert {(c.method[1], c.label) for c in rep.selected} == {("mh", HI), ("mlp", HI)}
    on_test = build_report(sweep, select_split="test")
    assert ("mh", LO) in {(c.method[1], c.label) for c in on_test.selected}
    # Forgetting: the lowest is best (0.1 for lr=0.001 against 0.3).
    on_forgetting = build_report(sweep, select_metric="avg_forgetting")
    assert ("mh", LO) in {(c.method[1], c.label) for c in on_forgetting.selected}


def test_cli_writes_csv_and_markdown_and_prints_the_table(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([str(sweep), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "report.md").read_text()
    assert "| modes-CDI | mh | none | optimizer.lr=0.01 | 3 | 0.8000 ± 0.1000 | 0.6667 ± 0.2082 |" in printed
    with (out / "report.csv").open() as fh:
        rows = {(r["model"], r["configuration"]): r for r in csv.DictReader(fh)}
    row = rows[("mh", LO)]
    assert (row["n_seeds"], row["seeds"], row["selected"], row["runs"]) == ("3", "1 2 3", "0", "3 4 5")
    assert float(row["test.avg_accuracy.mean"]) == pytest.approx(0.9, abs=1e-12)
    assert float(row["test.avg_accuracy.std"]) == pytest.approx(0.05, abs=1e-12)
    assert float(row["val.avg_accuracy.mean"]) == pytest.approx(0.5, abs=1e-12)
    assert row["overrides"] == "model=mh optimizer.lr=0.001"


def test_runs_without_metrics_are_listed(sweep, capsys):
    failed = sweep / "8"
    (failed / ".hydra").mkdir(parents=True)
    (failed / ".hydra" / "overrides.yaml").write_text("- model=mlp\n- optimizer.lr=0.01\n- seed=3\n")
    (failed / "run.log").write_text("Traceback ...\n")
    broken = make_run(sweep, "9", ["model=mlp", "optimizer.lr=0.01"], seed=4, test=0.1, val=0.1, model="mlp")
    (broken / "metrics.json").write_text('{"final": ')  # cut short
    rep = build_report(sweep)
    problems = {p.path.name: p.problem for p in rep.without_metrics}
    assert problems["8"].startswith("no metrics.json") and "run.log" in problems["8"]
    assert problems["9"].startswith("unreadable metrics.json")
    # The failed runs do not count as seeds of their configuration.
    assert by_label(rep)[("mlp", HI)].seeds == [1, 2]
    assert main([str(sweep)]) == 0
    captured = capsys.readouterr()
    assert "## Runs without metrics (2)" in captured.out
    assert "| 8 | model=mlp optimizer.lr=0.01 seed=3 | no metrics.json" in captured.out
    assert "warning: 2 runs without metrics" in captured.err


def test_jobs_of_the_sweep_that_never_got_a_directory_are_listed(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "0", ["model=lp"], seed=1, test=0.5, val=0.5, model="lp")
    (root / ".submitit" / "77_1").mkdir(parents=True)  # a submitted job's folder is not a run
    (root / "multirun.yaml").write_text(
        "hydra:\n"
        "  sweeper:\n"
        "    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        "    params:\n"
        "      seed: 1,2\n"
        "  overrides:\n"
        "    task: [model=lp]\n"
    )
    rep = build_report(root)
    (missing,) = rep.without_metrics
    assert missing.overrides == ("model=lp", "seed=2")
    assert missing.problem.startswith("no run directory") and ".submitit/" in missing.problem
    assert [c.seeds for c in rep.configurations] == [[1]]


def test_overrides_compare_by_value():
    assert report.normalise_overrides(["seed=1", "optimizer.lr=1.0e-4"]) == ("optimizer.lr=0.0001", "seed=1")


def test_a_folder_without_runs_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty" / "nothing").mkdir(parents=True)
    with pytest.raises(ReportError, match="no runs under"):
        build_report(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2
    assert capsys.readouterr().err.startswith("error: no runs under")
    done = subprocess.run(
        [sys.executable, "-m", "memhead.report", str(tmp_path / "absent")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr == f"error: {tmp_path / 'absent'} is not a directory\n"
    bad = subprocess.run(
        [sys.executable, "-m", "memhead.report", str(tmp_path), "--metric", "loss"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and bad.stderr.startswith("error: argument --metric: invalid choice")


def test_curves_draw_mean_and_std_over_seeds_of_the_selected_configurations(tmp_path, capsys):
    import matplotlib.image

    root = tmp_path / "sweep"
    for i, (model, seed) in enumerate([("mh", 1), ("mh", 2), ("mlp", 1), ("mlp", 2)]):
        run_dir = make_run(root, str(i), [f"model={model}"], seed=seed, test=0.5, val=0.5, model=model)
        record = json.loads((run_dir / "metrics.json").read_text())
        level = 0.9 if model == "mh" else 0.3
        record["boundaries"] = [
            {
                "index": b,
                **{s: {"boundary": b, "avg_accuracy": level - 0.05 * b + 0.01 * seed} for s in SPLITS},
            }
            for b in range(4)
        ]
        (run_dir / "metrics.json").write_text(json.dumps(record))
    assert main([str(root), "--curves", "selected"]) == 0
    image = matplotlib.image.imread(root / "curves.png")
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert len({tuple(px) for px in image[::7, ::7, :3].reshape(-1, 3).round(2)}) > 10  # lines and bands
    assert "curves.png" in capsys.readouterr().err
    empty = build_report(root)
    empty.configurations.clear()
    with pytest.raises(ReportError, match="no configuration"):
        report.write_curves(empty, tmp_path / "none.png")
