"""A real SLURM job array through Hydra's submitit launcher (conf/hydra/launcher/slurm.yaml).

Needs a SLURM cluster that answers (`.ci/slurm.sh` starts a one-node one as root); skipped otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from conftest import REPO
from omegaconf import OmegaConf
from test_sweeps import TINY_MULTIRUN, check_report_matches_runs, read_runs

SUBMIT_TIMEOUT_S = 600
SKIP_HINT = "run `sudo .ci/slurm.sh` for a one-node cluster"


def default_partition() -> str:
    """The default partition (``sinfo`` marks it with ``*``), else the first one; skip without SLURM."""
    if shutil.which("sinfo") is None:
        pytest.skip(f"sinfo not found: SLURM is not installed ({SKIP_HINT})")
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%P %a %T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.skip(f"SLURM does not answer: sinfo timed out ({SKIP_HINT})")
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()]
    working = ("idle", "mixed", "allocated")
    usable = [(p, a) for p, a, state in rows if a == "up" and state.rstrip("*~#") in working]
    if done.returncode != 0 or not usable:
        pytest.skip(
            f"SLURM does not answer or has no usable node: {(done.stderr or done.stdout).strip()!r} "
            f"({SKIP_HINT})"
        )
    for partition, _ in usable:
        if partition.endswith("*"):
            return partition.rstrip("*")
    return usable[0][0]


def test_multirun_is_one_slurm_job_array_and_the_report_tables_it(tmp_path):
    partition = default_partition()
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        str(REPO / "run.py"),
        *TINY_MULTIRUN,
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={partition}",
        "hydra.launcher.mem_gb=1",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # Leave no job behind: cancel the array the sweep submitted (its id names the submitit folders).
        job_ids = {p.name.split("_")[0] for p in (sweep_dir / ".submitit").glob("*_*")}
        subprocess.run(["scancel", *sorted(job_ids)], capture_output=True, timeout=30)
        pytest.fail(f"the SLURM sweep did not finish within {SUBMIT_TIMEOUT_S}s (squeue shows why)")
    assert done.returncode == 0, done.stderr[-3000:]

    runs = read_runs(sweep_dir)
    assert sorted(runs) == ["model=lp seed=1", "model=lp seed=2", "model=mlp seed=1", "model=mlp seed=2"]
    # Each run was a task of one array: Hydra records SLURM's "<array id>_<task index>" as the job id.
    job_ids = [str(OmegaConf.load(p).hydra.job.id) for p in sorted(sweep_dir.glob("*/.hydra/hydra.yaml"))]
    assert all(re.fullmatch(r"\d+_[0-3]", job_id) for job_id in job_ids), job_ids
    assert len({job_id.split("_")[0] for job_id in job_ids}) == 1
    (batch_script,) = (sweep_dir / ".submitit").glob("*/*_submission.sh")
    script = batch_script.read_text()
    assert "#SBATCH --array=0-3" in script and f"#SBATCH --partition={partition}" in script
    assert f" {sys.executable} -u -m submitit.core._submit " in script  # the jobs ran this interpreter
    check_report_matches_runs(sweep_dir, runs)


def test_population_sweep_is_one_slurm_job_array_over_its_groups(tmp_path):
    """hydra/launcher=population with executor=slurm: a task per group (two populations and two groups
    run one by one), every run equal to the same sweep under the basic launcher."""
    partition = default_partition()
    sweep = ["progress=false", "benchmark.n=120", "model=lp,mlp", "competitor=none,mir", "seed=1,2"]
    sweep_dir = tmp_path / "slurm"
    command = [
        sys.executable, str(REPO / "run.py"), "-m", *sweep, "hydra/launcher=population",
        "hydra.launcher.executor=slurm", f"hydra.launcher.slurm.partition={partition}",
        "hydra.launcher.slurm.mem_gb=1", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "as 4 groups (2 as populations, 2 one by one)" in done.stderr + done.stdout
    (batch_script,) = (sweep_dir / ".submitit").glob("*/*_submission.sh")
    script = batch_script.read_text()
    assert "#SBATCH --array=0-3" in script and f"#SBATCH --partition={partition}" in script
    basic_dir = tmp_path / "basic"
    basic = [sys.executable, str(REPO / "run.py"), "-m", *sweep, f"hydra.sweep.dir={basic_dir}"]
    reference = subprocess.run(basic, cwd=REPO, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
    assert reference.returncode == 0, reference.stderr[-3000:]
    for job in range(8):
        mine = json.loads((sweep_dir / str(job) / "metrics.json").read_text())
        theirs = json.loads((basic_dir / str(job) / "metrics.json").read_text())
        assert mine["complete"] and mine["ccm"] == theirs["ccm"] and mine["config"] == theirs["config"]
