"""Sweep presets (sweeps/*.yaml), the submitit launcher configs, and sweeps run end to end then reported."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from enum import Enum

import pytest
from conftest import REPO
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from memhead.config import prepare_arguments, register_sweeps
from memhead.registry import ConfigError

SWEEPS = sorted(p.stem for p in (REPO / "sweeps").glob("*.yaml"))
PAPER_SWEEPS = [
    f"{family}_{bench}"
    for family in ("mh", "competitors", "heads")
    for bench in ("modes", "moons", "ns_imagenet")
]
RUN_TIMEOUT_S = 300


def compose_with_hydra(overrides: list[str], config_dir=REPO / "conf"):
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def expand_jobs(cfg) -> list[list[str]]:
    """The jobs Hydra's basic sweeper makes of a composed config's ``hydra.sweeper.params``."""
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    (jobs,) = BasicSweeper.split_arguments(parsed, None)
    return jobs


def stated_runs(name: str) -> int:
    """The run count a sweep file's header comment promises (``... = N runs``)."""
    header = "".join(line for line in (REPO / "sweeps" / f"{name}.yaml").open() if line.startswith("#"))
    match = re.search(r"= (\d+) runs", header)
    assert match, f"sweeps/{name}.yaml does not state its number of runs"
    return int(match.group(1))


def covering_jobs(jobs: list[list[str]]) -> list[list[str]]:
    """A few jobs that between them use every value of every swept option."""
    seen, chosen = set(), []
    for job in jobs:
        if not set(job) <= seen:
            chosen.append(job)
            seen |= set(job)
    return chosen


def test_every_paper_grid_and_the_smoke_sweep_has_a_file():
    assert set(PAPER_SWEEPS) | {"smoke"} <= set(SWEEPS)
    assert sorted(register_sweeps()) == SWEEPS


@pytest.mark.parametrize("name", SWEEPS)
def test_sweep_expands_to_its_stated_runs_and_every_value_composes(name):
    text = (REPO / "sweeps" / f"{name}.yaml").read_text()
    assert text.startswith("# @package _global_"), "sweep files are global diffs"
    assert re.search(r"^# Time: .*\d", text, re.M), "the header says how long the sweep takes"
    cfg = compose_with_hydra([f"sweep={name}"])
    jobs = expand_jobs(cfg)
    assert len(jobs) == stated_runs(name)
    if name != "smoke":
        assert str(cfg.hydra.sweeper.params.seed) == "1,2,3,4,5"
    for job in covering_jobs(jobs):
        job_cfg = compose_with_hydra([f"sweep={name}", *job])
        for override in job:
            key, value = override.split("=", 1)
            if (REPO / "conf" / key).is_dir():  # a group: the option chosen
                composed = job_cfg.hydra.runtime.choices[key]
            else:
                composed = OmegaConf.select(job_cfg, key)
            assert same_value(composed, value), (override, composed)


def same_value(composed, text: str) -> bool:
    if isinstance(composed, Enum):
        composed = composed.name
    if isinstance(composed, float):
        return composed == float(text)
    return str(composed) == text


def test_sweep_names_plus_form_and_unknown_names():
    assert prepare_arguments(["-m", "+sweep=smoke", "seed=3"]) == ["-m", "sweep=smoke", "seed=3"]
    assert prepare_arguments(["sweep=smoke"]) == ["sweep=smoke"]
    with pytest.raises(ConfigError, match="sweep='nosuch' is unknown; known: .*smoke"):
        prepare_arguments(["+sweep=nosuch"])
    done = subprocess.run(
        [sys.executable, str(REPO / "run.py"), "-m", "sweep=nosuch"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    assert done.returncode == 2 and done.stderr.startswith("error: sweep='nosuch' is unknown")
    assert "Traceback" not in done.stderr


def test_smoke_sweep_sets_the_tiny_stream():
    cfg = compose_with_hydra(["sweep=smoke"])
    assert (cfg.benchmark.n, cfg.benchmark.order.name) == (80, "CI")
    assert sorted(" ".join(job) for job in expand_jobs(cfg)) == [
        "model=lp seed=1",
        "model=lp seed=2",
        "model=mlp seed=1",
        "model=mlp seed=2",
    ]


# --- launcher configs ---------------------------------------------------------------------------


def test_slurm_launcher_takes_site_values_from_conf_local(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(REPO / "conf", conf)
    shutil.rmtree(conf / "local", ignore_errors=True)  # a developer's own site values stay out of it
    plain = compose_with_hydra(["hydra/launcher=slurm"], conf).hydra.launcher
    assert plain._target_.endswith(".SlurmLauncher")
    assert plain.max_num_timeout > 0 and plain.partition is None and plain.cpus_per_task == 1
    assert any("OMP_NUM_THREADS" in line for line in plain.setup)

    (conf / "local").mkdir()
    (conf / "local" / "slurm.yaml").write_text("partition: gpu\naccount: lab42\ntimeout_min: 240\n")
    site = compose_with_hydra(["hydra/launcher=slurm", "hydra.launcher.timeout_min=30"], conf).hydra.launcher
    assert (site.partition, site.account, site.timeout_min) == ("gpu", "lab42", 30)


def test_local_launcher_is_submitit_local():
    launcher = compose_with_hydra(["hydra/launcher=local"]).hydra.launcher
    assert launcher._target_.endswith(".LocalLauncher")
    assert launcher.submitit_folder.endswith("/.submitit/%j")


# --- end to end -----------------------------------------------------------------------------------


def run_cli(args: list[str], cwd=REPO) -> subprocess.CompletedProcess:
    # One thread per run: the sweeps' processes share few cores (see conf/hydra/launcher/local.yaml).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def read_runs(sweep_dir) -> dict[str, dict]:
    """``{"model=lp seed=1": metrics, ...}`` for every run directory of a sweep."""
    runs = {}
    for metrics in sorted(sweep_dir.glob("*/metrics.json")):
        overrides = OmegaConf.load(metrics.parent / ".hydra" / "overrides.yaml")
        key = " ".join(o for o in overrides if o.split("=")[0] in ("model", "seed"))
        runs[key] = json.loads(metrics.read_text())
    return runs


# The example multirun: two models x two seeds on a tiny MODES-CI stream.
TINY_MULTIRUN = [
    "-m",
    "model=lp,mlp",
    "seed=1,2",
    "benchmark=modes",
    "benchmark.order=CI",
    "benchmark.n=80",
    "progress=false",
]


def check_report_matches_runs(sweep_dir, runs: dict[str, dict]) -> list[dict]:
    """Report the sweep; each model's row holds the mean and std of its two seeds' test accuracies."""
    done = run_cli(["-m", "memhead.report", str(sweep_dir)])
    assert "| modes-CI | lp | none |" in done.stdout and "| modes-CI | mlp | none |" in done.stdout
    with (sweep_dir / "report.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(row["model"] for row in rows) == ["lp", "mlp"]
    for row in rows:
        accs = [runs[f"model={row['model']} seed={s}"]["final"]["test"]["avg_accuracy"] for s in (1, 2)]
        assert (row["n_seeds"], row["seeds"], row["selected"]) == ("2", "1 2", "1")
        assert float(row["test.avg_accuracy.mean"]) == pytest.approx((accs[0] + accs[1]) / 2, abs=1e-12)
        std = abs(accs[0] - accs[1]) / 2**0.5  # the sample std of two values
        assert float(row["test.avg_accuracy.std"]) == pytest.approx(std, abs=1e-12)
    assert (sweep_dir / "report.md").read_text() == done.stdout
    return rows


def test_submitit_local_multirun_writes_four_runs_and_the_report_tables_them(tmp_path):
    sweep_dir = tmp_path / "sweep"
    run_cli([str(REPO / "run.py"), *TINY_MULTIRUN, "hydra/launcher=local", f"hydra.sweep.dir={sweep_dir}"])
    runs = read_runs(sweep_dir)
    assert sorted(runs) == ["model=lp seed=1", "model=lp seed=2", "model=mlp seed=1", "model=mlp seed=2"]
    assert all(run["seed"] == int(key[-1]) for key, run in runs.items())
    assert len(list((sweep_dir / ".submitit").glob("*/*_result.pkl"))) == 4  # one submitit job per run
    check_report_matches_runs(sweep_dir, runs)


def test_smoke_sweep_runs_from_another_working_directory(tmp_path):
    run_cli([str(REPO / "run.py"), "-m", "+sweep=smoke", "hydra.sweep.dir=sweep"], cwd=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # nothing else lands in the cwd
    runs = read_runs(tmp_path / "sweep")
    assert sorted(runs) == ["model=lp seed=1", "model=lp seed=2", "model=mlp seed=1", "model=mlp seed=2"]
    assert {run["config"]["benchmark"]["n"] for run in runs.values()} == {80}
    assert {len(run["boundaries"]) for run in runs.values()} == {4}  # CI: one boundary per class
