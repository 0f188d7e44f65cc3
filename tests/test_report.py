"""memhead.report on hand-made run folders: exact statistics, selection on val, runs without metrics."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys

import pytest
from conftest import REPO

from memhead import report
from memhead.report import ReportError, build_report, main

SPLITS = ("train", "val", "test")
HI, LO = "optimizer.lr=0.01", "optimizer.lr=0.001"


def make_run(
    root,
    name,
    overrides,
    *,
    seed,
    test,
    val,
    model="mh",
    competitor="none",
    forgetting=0.0,
    train=0.0,
    complete=True,
):
    """A run folder as Hydra and memhead.runner leave it: .hydra/overrides.yaml and metrics.json.

    The recorded configuration holds the model, the competitor and the ``optimizer.lr`` of the
    overrides (0.01, the default, when they give none).
    """
    run_dir = root / name
    (run_dir / ".hydra").mkdir(parents=True)
    lines = [*overrides, f"seed={seed}"]
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {line}\n" for line in lines))
    values = {"train": train, "val": val, "test": test}
    final = {
        split: {
            "avg_accuracy": values[split],
            "avg_forgetting": forgetting,
            "backward_transfer": 0.0,
            "forward_transfer": 0.0,
        }
        for split in SPLITS
    }
    lr = next((float(o.split("=")[1]) for o in overrides if o.startswith("optimizer.lr=")), 0.01)
    config = {
        "model": {"name": model},
        "competitor": {"name": competitor},
        "benchmark": {"name": "modes", "order": "CDI"},
        "optimizer": {"name": "adam", "lr": lr},
        "seed": seed,
        "progress": False,
    }
    record = {"complete": complete, "final": final, "seed": seed, "config": config}
    (run_dir / "metrics.json").write_text(json.dumps(record))
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
    assert "## Runs not counted (2)" in captured.out
    assert "| 8 | no metrics | model=mlp optimizer.lr=0.01 seed=3 | no metrics.json" in captured.out
    assert "warning: 2 runs not counted (1 no metrics, 1 unreadable" in captured.err


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
    assert missing.state == "not started" and ".submitit/" in missing.problem
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


# --- issue 11: only complete runs count, identity from the record, ties, both metric conventions ----


def by_state(rep):
    return {r.path.name: (r.state, r.problem) for r in rep.without_metrics}


def test_partial_and_failed_runs_are_listed_not_averaged(sweep, capsys):
    # A killed seed (partial metrics after 2 boundaries) would pull the mean of lr=0.01 down to 0.5.
    partial = make_run(sweep, "10", ["model=mh", HI], seed=4, test=0.0, val=0.0, complete=False)
    record = json.loads((partial / "metrics.json").read_text())
    (partial / "metrics.json").write_text(json.dumps({**record, "boundaries": [{}, {}]}))
    failed = make_run(sweep, "11", ["model=mh", HI], seed=5, test=0.0, val=0.0, complete=False)
    record = json.loads((failed / "metrics.json").read_text())
    record.update(failed=True, error="ConfigError: model.key_mem_units must be >= 1\nsecond line")
    (failed / "metrics.json").write_text(json.dumps(record))
    alone = sweep / "12"  # a job that failed before its first boundary: only failed.json
    alone.mkdir()
    (alone / "failed.json").write_text(json.dumps({"failed": True, "error": "out of memory"}))
    rep = build_report(sweep)
    mh = by_label(rep)[("mh", HI)]
    assert mh.seeds == [1, 2, 3]
    assert mh.mean_std("test", "avg_accuracy")[0] == pytest.approx(2 / 3, abs=1e-12)
    states = by_state(rep)
    assert states["10"][0] == "partial" and "2 boundaries" in states["10"][1]
    assert states["11"] == ("failed", "ConfigError: model.key_mem_units must be >= 1")
    assert states["12"] == ("failed", "out of memory")
    assert main([str(sweep)]) == 0
    captured = capsys.readouterr()
    assert (
        "| 11 | failed | model=mh optimizer.lr=0.01 seed=5 | ConfigError: model.key_mem_units" in captured.out
    )
    assert "warning: 3 runs not counted (1 partial, 2 failed;" in captured.err


def test_a_record_without_complete_true_does_not_count(sweep):
    run_dir = sweep / "0"
    record = json.loads((run_dir / "metrics.json").read_text())
    del record["complete"]  # not written by a finished memhead run
    (run_dir / "metrics.json").write_text(json.dumps(record))
    rep = build_report(sweep)
    assert by_label(rep)[("mh", HI)].seeds == [2, 3]
    assert by_state(rep)["0"][0] == "partial"


def write_multirun(root, task, params="null"):
    (root / "multirun.yaml").write_text(
        "hydra:\n"
        "  sweeper:\n"
        "    _target_: hydra._internal.core_plugins.basic_sweeper.BasicSweeper\n"
        f"    params: {params}\n"
        "  overrides:\n"
        "    task:\n" + "".join(f"    - '{line}'\n" for line in task)
    )


def test_a_deleted_job_of_a_command_line_sweep_is_listed(tmp_path):
    # run.py -m model=lp seed=7,8,9,10: no sweep file, so hydra.sweeper.params is null.
    root = tmp_path / "sweep"
    for job, seed in enumerate((7, 8, 10)):  # job 2 (seed 9) was deleted
        make_run(root, str(job if seed != 10 else 3), ["model=lp"], seed=seed, test=0.5, val=0.5, model="lp")
    write_multirun(root, ["model=lp", "seed=7,8,9,10"])
    rep = build_report(root)
    assert [(r.state, r.overrides) for r in rep.without_metrics] == [("not started", ("model=lp", "seed=9"))]
    assert rep.notes == []


def test_a_sweep_that_cannot_be_expanded_says_so(tmp_path):
    root = tmp_path / "sweep"
    make_run(root, "0", ["model=lp"], seed=1, test=0.5, val=0.5, model="lp")
    (root / "multirun.yaml").write_text("hydra: [unclosed\n")
    rep = build_report(root)
    (note,) = rep.notes
    assert note.startswith(".: multirun.yaml cannot be expanded (")
    assert "jobs that never started are not listed" in note


@pytest.mark.parametrize(
    "metrics_text, reason",
    [
        ("[]", "not a JSON object"),
        ('{"complete": true, "config": {}, "final": {"test": {"avg_accuracy": "high"}}}', "is not a number"),
        ('{"complete": true, "final": {}}', "no recorded 'config'"),
        ('{"complete": true, "config": {}, "final": [1]}', "no 'final' metrics"),
        ("\xff\xfe", "unreadable metrics.json"),
    ],
)
def test_a_malformed_metrics_json_is_listed_as_unreadable(sweep, capsys, metrics_text, reason):
    (sweep / "0" / "metrics.json").write_bytes(metrics_text.encode("latin-1"))
    assert main([str(sweep)]) == 0
    captured = capsys.readouterr()
    line = next(line for line in captured.out.splitlines() if line.startswith("| 0 |"))
    assert "| unreadable |" in line and reason in line
    assert "Traceback" not in captured.err


def test_a_malformed_overrides_yaml_is_no_traceback(sweep, capsys):
    (sweep / "0" / ".hydra" / "overrides.yaml").write_text("- [unclosed\n")
    (sweep / "0" / "metrics.json").unlink()
    (sweep / "1" / ".hydra" / "overrides.yaml").write_text("model: mh\n")  # a mapping, not a list
    rep = build_report(sweep)
    state, problem = by_state(rep)["0"]
    assert state == "unreadable" and problem.startswith("unreadable .hydra/overrides.yaml (")
    assert "\n" not in problem
    # Run 1 is complete: it counts under its recorded configuration, with a note.
    assert by_label(rep)[("mh", HI)].seeds == [2, 3]
    assert any(note.startswith("1: unreadable .hydra/overrides.yaml (not a list") for note in rep.notes)
    assert main([str(sweep)]) == 0


def test_a_nan_seed_makes_the_mean_nan_and_says_so(sweep, capsys):
    run_dir = sweep / "2"  # mh lr=0.01 seed 3
    record = json.loads((run_dir / "metrics.json").read_text())
    record["final"]["test"]["avg_accuracy"] = float("nan")
    (run_dir / "metrics.json").write_text(json.dumps(record))  # json writes NaN
    rep = build_report(sweep)
    mh = by_label(rep)[("mh", HI)]
    assert mh.seeds == [1, 2, 3]
    assert all(map(math.isnan, mh.mean_std("test", "avg_accuracy")))
    assert mh.incomplete("test", "avg_accuracy") == 1
    assert any(note.startswith("2: NaN in test.avg_accuracy") for note in rep.notes)
    assert main([str(sweep)]) == 0
    row = next(
        line
        for line in capsys.readouterr().out.splitlines()
        if "| mh | none | optimizer.lr=0.01 | 3 |" in line
    )
    assert "| NaN (1 of 3 seeds) |" in row


def test_identity_comes_from_the_record_not_a_rewritten_overrides_yaml(tmp_path):
    # Job 0 finished with lr=0.01; a refused relaunch with lr=0.005 rewrote its .hydra/overrides.yaml.
    root = tmp_path / "sweep"
    make_run(root, "0", ["model=mh", HI], seed=1, test=0.5, val=0.9)
    (root / "0" / ".hydra" / "overrides.yaml").write_text("- model=mh\n- optimizer.lr=0.005\n- seed=1\n")
    make_run(root, "1", ["model=mh", "optimizer.lr=0.005"], seed=1, test=0.7, val=0.5)
    make_run(root, "2", ["model=mh", HI], seed=2, test=0.6, val=0.8)
    write_multirun(root, ["model=mh", "optimizer.lr=0.01,0.005"], params="{seed: '1,2'}")
    rep = build_report(root)
    configs = by_label(rep)
    assert configs[("mh", "optimizer.lr=0.01")].seeds == [1, 2]
    assert configs[("mh", "optimizer.lr=0.005")].seeds == [1]
    assert configs[("mh", "optimizer.lr=0.01")].mean_std("test", "avg_accuracy")[0] == pytest.approx(0.55)
    (note,) = rep.notes
    assert note.startswith("0: .hydra/overrides.yaml disagrees with metrics.json (optimizer.lr=0.005 there")
    # The sweep's 4 jobs: lr=0.005 seed=2 never ran; job 0 answers for lr=0.01 seed=1 as it recorded.
    assert [r.overrides for r in rep.without_metrics] == [("model=mh", "optimizer.lr=0.005", "seed=2")]


def make_tied_sweep(root):
    """Three Memory Head configurations at val 1.0; lexical order would pick lr=0.001, train picks 0.01."""
    for i, (lr, train, test) in enumerate([("0.001", 0.7, 0.95), ("0.01", 0.9, 0.6), ("0.1", 0.8, 0.9)]):
        for seed in (1, 2):
            make_run(
                root,
                f"{i}{seed}",
                ["model=mh", f"optimizer.lr={lr}"],
                seed=seed,
                test=test,
                val=1.0,
                train=train,
            )
    make_run(root, "lower", ["model=mh", "optimizer.lr=0.5"], seed=1, test=1.0, val=0.9, train=1.0)


def test_a_tied_selection_is_reported_and_broken_without_reading_test(tmp_path, capsys):
    root = tmp_path / "sweep"
    make_tied_sweep(root)
    rep = build_report(root)
    (winner,) = rep.selected
    assert winner.label == "optimizer.lr=0.01"  # best train avg_accuracy, not best test (lr=0.001)
    assert sorted(c.label for c in winner.tied) == ["optimizer.lr=0.001", "optimizer.lr=0.1"]
    assert winner.decided_by == "train avg_accuracy"
    assert main([str(root)]) == 0
    captured = capsys.readouterr()
    assert "| tied with 2 on val avg_accuracy; broken by train avg_accuracy |" in captured.out
    assert "## Ties in the selection" in captured.out
    assert "modes-CDI/mh/none: 3 configurations tie on val avg_accuracy; broken by train avg_accuracy." in (
        captured.out
    )
    assert "warning: the selection of modes-CDI/mh/none is tied (3 configurations" in captured.err
    with (root / "report.csv").open() as fh:
        assert {r["configuration"]: r["tied_with"] for r in csv.DictReader(fh)}["optimizer.lr=0.01"] == "2"


def test_ties_on_every_criterion_but_test_go_to_seeds_then_the_label(tmp_path):
    root = tmp_path / "sweep"
    # Equal val and train; only test differs (0.9 for lr=0.1): test must not decide.
    for lr, seeds, test in (("0.001", (1,), 0.2), ("0.01", (1, 2), 0.3), ("0.1", (1, 2), 0.9)):
        for seed in seeds:
            make_run(root, f"{lr}-{seed}", ["model=mh", f"optimizer.lr={lr}"], seed=seed, test=test, val=1.0)
    (winner,) = build_report(root).selected
    assert (winner.label, winner.decided_by) == ("optimizer.lr=0.01", "first label (tied on every criterion)")
    assert len(winner.tied) == 2
    # Means that differ only by rounding tie: fmean(0.1, 0.2) is 0.15000000000000002.
    for i, vals in enumerate(((0.1, 0.2), (0.15, 0.15))):
        for seed, val in enumerate(vals, start=1):
            make_run(
                tmp_path / "rounding", f"{i}{seed}", [f"optimizer.lr={i + 1}"], seed=seed, test=0.5, val=val
            )
    (winner,) = build_report(tmp_path / "rounding").selected
    assert len(winner.tied) == 1
    assert report.tie_break_criteria("val", "avg_forgetting") == [
        ("val", "avg_forgetting"),
        ("val", "avg_accuracy"),
        ("train", "avg_forgetting"),
        ("train", "avg_accuracy"),
    ]
    assert all(split != "test" for split, _ in report.tie_break_criteria("train", "avg_accuracy"))


def test_metric_selects_either_convention_and_an_unknown_name_lists_the_allowed(tmp_path, capsys):
    root = tmp_path / "sweep"
    for lr, paper_bwt, gem_bwt in (("0.01", 0.2, -0.3), ("0.001", 0.0, -0.1)):
        run_dir = make_run(root, lr, ["model=mh", f"optimizer.lr={lr}"], seed=1, test=0.5, val=0.5)
        record = json.loads((run_dir / "metrics.json").read_text())
        record["final"]["val"].update(backward_transfer=paper_bwt, backward_transfer_gem=gem_bwt)
        record["final"]["test"].update(backward_transfer_gem=gem_bwt, avg_forgetting_gem=-gem_bwt)
        (run_dir / "metrics.json").write_text(json.dumps(record))
    assert [c.label for c in build_report(root, select_metric="backward_transfer").selected] == [
        "optimizer.lr=0.01"
    ]
    gem = build_report(root, select_metric="backward_transfer_gem")
    assert [c.label for c in gem.selected] == ["optimizer.lr=0.001"]
    assert main([str(root), "--metric", "backward_transfer_gem"]) == 0
    out = capsys.readouterr().out
    assert "| val backward_transfer_gem |" in out and "| test backward_transfer_gem |" in out
    assert "| -0.1000 |" in out
    assert main([str(root), "--metric", "avg_forgetting_gem"]) == 0  # lowest is best: lr=0.001 (0.1)
    assert "| optimizer.lr=0.001 | 1 | – |" in capsys.readouterr().out  # no val forgetting_gem recorded
    with pytest.raises(SystemExit) as exit_info:
        main([str(root), "--metric", "bwt"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "'bwt'" in err
    assert all(
        name in err for name in ("avg_forgetting_gem", "backward_transfer_gem", "forward_transfer_gem")
    )


def test_a_run_whose_refused_relaunch_added_an_override_still_answers_for_its_job(tmp_path):
    # Job 0 ran `model=mh seed=1` (lr 0.01 by default); `optimizer.lr=0.005` was added by a refused relaunch.
    root = tmp_path / "sweep"
    make_run(root, "0", ["model=mh"], seed=1, test=0.5, val=0.9)
    (root / "0" / ".hydra" / "overrides.yaml").write_text("- model=mh\n- seed=1\n- optimizer.lr=0.005\n")
    write_multirun(root, ["model=mh", "seed=1,2"])
    rep = build_report(root)
    assert [r.overrides for r in rep.without_metrics] == [("model=mh", "seed=2")]
    assert [c.seeds for c in rep.configurations] == [[1]]
