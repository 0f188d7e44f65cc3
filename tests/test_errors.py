"""Bad input: one line on stderr, exit code 2, no traceback, no run directory left behind."""

import json

import numpy as np
import pytest

import run as run_module

BAD_OVERRIDES = [
    ["benchmark.order=XYZ"],
    ["model.hidden=abc"],
    ["threads=abc"],
    ["benchmark.n=1e3"],
    ["loss=l2"],
    ["benchmark=nosuch"],
    ["model.typo=3"],
    ["model=lp", "+model.typo=1"],
    ["model=mlp", "+model.hiden=4"],
    ["benchmark=features"],
    ["benchmark=features", "benchmark.path=/nonexistent/x.npz"],
    ["~plots"],
    ["~competitor"],
    ["optimizer.lr=nan"],
    ["optimizer.lr=inf"],
    ["optimizer.lr=0"],
    ["optimizer.lr=-1"],
    ["optimizer.weight_decay=-1"],
    ["optimizer=sgd", "optimizer.momentum=-1"],
    ["optimizer=sgd", "optimizer.momentum=nan"],
    ["checkpoint.interval_s=-1"],
    ["checkpoint.interval_s=nan"],
    ["seed=99999999999999999999"],
    ["threads=100000000"],
    ["threads=0"],
    ["model.key_mem_units=0"],
    ["model.key_mem_units=10000000000"],
    ["model=mlp", "model.hidden=100000000000"],
    ["benchmark.n=1000000000000"],
    ["competitor=er_reservoir", "competitor.buffer_size=1000000000000"],
    ["competitor=ensemble", "competitor.members=0"],
    ["optimized_metric=tst.acc"],
    ["optimized_metric=val.accuracy"],
    ["device=gpu"],
    ["eval.chunk_size=0"],
    ["stream.batch_size=0"],
    ["model.distance=manhattan"],
]


def bad_files(tmp_path):
    """Feature files that must be refused, each with a word its message names."""

    def arrays():
        out = {}
        for s in ("train", "val", "test"):
            out[f"X_{s}"] = np.zeros((4, 2))
            out[f"y_{s}"] = np.array([0, 1, 0, 1])
            out[f"distributions_{s}"] = np.array([0, 0, 1, 1])
        return out

    cases = {}
    a = arrays()
    a["X_train"][2, 1] = np.nan
    cases["nan"] = (a, "row 2")
    a = arrays()
    a["X_val"][3, 0] = np.inf
    cases["inf"] = (a, "X_val")
    a = arrays()
    a["X_train"] = np.array([["a", "b"]] * 4)
    cases["string"] = (a, "numbers")
    a = arrays()
    a["y_train"] = np.array([0, 1, 0, 10**9])
    cases["label"] = (a, "label")
    a = arrays()
    a["X_train"] = np.zeros(4)
    cases["one_d"] = (a, "shape")
    a = arrays()
    a["distributions_train"] = np.array([0, 1, 0, 1])
    cases["not_contiguous"] = (a, "contiguous")
    out = []
    for name, (arr, word) in cases.items():
        path = tmp_path / f"{name}.npz"
        np.savez(path, **arr)
        out.append((path, word))
    # A header claiming 1 TiB (the data is not there).
    path = tmp_path / "huge.npz"
    np.savez(path, **arrays())
    import zipfile

    with zipfile.ZipFile(path, "a") as zf, zf.open("X_big.npy", "w") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (2**38, 1)}
        )
    out.append((path, "memory"))
    return out


def check_refused(capsys, tmp_path, args, word=None):
    run_dir = tmp_path / "run"
    rc = run_module.cli(["progress=false", "benchmark.n=80", *args, f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert rc == 2, (args, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, err)
    assert "Traceback" not in err
    if word is not None:
        assert word in lines[0], (word, lines[0])
    assert not run_dir.exists(), (args, list(run_dir.rglob("*")))


@pytest.mark.parametrize("args", BAD_OVERRIDES, ids=" ".join)
def test_bad_override_is_one_line_and_leaves_no_run_dir(args, capsys, tmp_path):
    # benchmark.n (a small stream) is not an option of benchmark=features
    if any(a.startswith("benchmark=features") for a in args):
        run_dir = tmp_path / "run"
        rc = run_module.cli([*args, f"hydra.run.dir={run_dir}", "progress=false"])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1 and not run_dir.exists(), err
        assert "benchmark." in err, err
        return
    # The line names the option: the last segment of the last override's key.
    check_refused(capsys, tmp_path, args, word=args[-1].split("=")[0].lstrip("+~").split(".")[-1])


def test_bad_feature_files_are_one_line_naming_the_rule(capsys, tmp_path):
    cases = bad_files(tmp_path)
    assert len(BAD_OVERRIDES) + len(cases) >= 40
    for path, word in cases:
        run_dir = tmp_path / "run"
        rc = run_module.cli(
            ["model=lp", "benchmark=features", f"benchmark.path={path}", f"hydra.run.dir={run_dir}"]
        )
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1 and word in lines[0], (path.name, err)
        assert not run_dir.exists(), path.name


def test_inspect_and_run_share_the_validator(tmp_path):
    from data.inspect import SchemaError, load_splits

    for path, word in bad_files(tmp_path):
        with pytest.raises(SchemaError, match=word.split()[0]):
            load_splits(path)


def test_integers_in_float_lists_are_valid(capsys, tmp_path):
    rc = run_module.cli(
        [
            "model=lp",
            "benchmark.n=80",
            "progress=false",
            "benchmark.stds=[[1,0.08,0.015,0.03],[0.04,0.02,0.06,0.015]]",
            f"hydra.run.dir={tmp_path}",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["config"]["benchmark"]["stds"][0][0] == 1.0


def test_disk_full_is_one_line(capsys, tmp_path, monkeypatch):
    import errno

    from memhead import runner

    def full(path, payload):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(runner, "write_json_atomic", full)
    rc = run_module.cli(["model=lp", "benchmark.n=80", "progress=false", f"hydra.run.dir={tmp_path / 'r'}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "disk full" in err, err


def test_multirun_bad_job_fails_alone(capsys, tmp_path):
    rc = run_module.cli(
        ["-m", "model.key_mem_units=0,10", "benchmark.n=80", "progress=false", f"hydra.sweep.dir={tmp_path}"]
    )
    err = capsys.readouterr().err
    assert rc == 1, err
    failed = json.loads((tmp_path / "0" / "metrics.json").read_text())
    assert failed["failed"] is True and failed["complete"] is False and "key_mem_units" in failed["error"]
    assert failed["config"]["model"]["key_mem_units"] == 0
    assert json.loads((tmp_path / "1" / "metrics.json").read_text())["complete"] is True
    assert "error: job 0" in err and "1 job(s) of the multirun failed" in err
    assert "job 1 (" in err and "val.avg_accuracy=" in err  # the one-line summary of a finished job


def test_main_returns_the_optimized_metric(capsys, tmp_path):
    from memhead.config import optimized_value

    record = {"final": {"val": {"avg_accuracy": 0.25}, "test": {"avg_accuracy": 0.75}}}
    assert optimized_value(record, "val.avg_accuracy") == 0.25
    assert optimized_value(record, "test.avg_accuracy") == 0.75


def test_optuna_sweep_optimises_val_and_survives_a_bad_job(capsys, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    rc = run_module.cli(
        [
            "-m",
            "hydra/sweeper=optuna",
            "hydra.sweeper.n_trials=3",
            "hydra.sweeper.direction=maximize",
            "hydra.sweeper.sampler.seed=1",
            "model=lp",
            "benchmark.n=80",
            "progress=false",
            "optimizer.lr=choice(-1,0.01,0.05)",
            f"hydra.sweep.dir={tmp_path}",
        ]
    )
    capsys.readouterr()
    results = tmp_path / "optimization_results.yaml"
    assert results.is_file()
    import yaml

    best = yaml.safe_load(results.read_text())
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*/metrics.json")]
    done = [r for r in records if r.get("complete")]
    assert done
    assert best["best_value"] == pytest.approx(max(r["final"]["val"]["avg_accuracy"] for r in done))
    assert rc in (0, 1)  # 1 when the sampler drew the bad lr
