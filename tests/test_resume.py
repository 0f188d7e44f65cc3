"""Resume: a run killed with SIGKILL mid-stream and started again ends exactly like an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO

from memhead.registry import ConfigError
from memhead.runner import run

# A long 2-D stream with every kind of state: Memory Head keys and counters, Adam, a replay buffer and RNGs.
LONG = [
    "model=mh",
    "competitor=er_reservoir",
    "competitor.buffer_size=16",
    "competitor.buffer_batch_size=4",
    "benchmark.n=4000",
    "seed=3",
    "progress=false",
    "checkpoint.interval_s=0",
]


def start(run_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "run.py", *LONG, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def boundaries_written(run_dir):
    try:
        return len(json.loads((run_dir / "metrics.json").read_text())["boundaries"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_run_resumes_to_identical_final_metrics(tmp_path):
    killed = tmp_path / "killed"
    proc = start(killed)
    deadline = time.time() + 120
    while boundaries_written(killed) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed: make the stream longer"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = json.loads((killed / "metrics.json").read_text())
    assert not partial["complete"] and 2 <= len(partial["boundaries"]) < 8
    assert (killed / "checkpoint.pt").is_file()

    resumed = start(killed)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    from conftest import compose_config

    reference = run(compose_config(LONG), tmp_path / "reference")
    after = json.loads((killed / "metrics.json").read_text())
    assert after["complete"]
    assert after["final"] == reference["final"]
    assert after["ccm"] == reference["ccm"]
    assert after["boundaries"] == reference["boundaries"]
    assert after["competitor"] == reference["competitor"]


def test_finished_run_is_not_run_again_and_other_configs_are_refused(tiny_cfg, tmp_path, caplog):
    first = run(tiny_cfg("seed=5"), tmp_path)
    mtime = (tmp_path / "metrics.json").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        again = run(tiny_cfg("seed=5"), tmp_path)
    assert again["final"] == first["final"]
    assert (tmp_path / "metrics.json").stat().st_mtime_ns == mtime
    assert "nothing to do" in caplog.text
    with pytest.raises(ConfigError, match="model.delta: 2 -> 3"):
        run(tiny_cfg("seed=5", "model.delta=3"), tmp_path)


def test_resume_in_process_from_each_boundary(tiny_cfg, tmp_path, monkeypatch):
    """Interrupt after boundary k (for every k) by raising from the tracker, resume, compare."""
    cfg = tiny_cfg(
        "model=mh",
        "competitor=mir",
        "competitor.buffer_size=8",
        "competitor.buffer_batch_size=2",
        "competitor.candidates=4",
        "seed=11",
    )
    reference = run(cfg, tmp_path / "reference")
    from memhead import loggers

    for k in (0, 3, 6):

        def log_boundary(self, i, row, *args, k=k, **kwargs):
            if i == k:
                raise KeyboardInterrupt  # what a preemption looks like from inside the loop

        monkeypatch.setattr(loggers.NullLogger, "log_boundary", log_boundary)
        run_dir = tmp_path / f"cut{k}"
        with pytest.raises(KeyboardInterrupt):
            run(cfg, run_dir)
        monkeypatch.undo()
        resumed = run(cfg, run_dir)
        assert resumed["ccm"] == reference["ccm"], k
        assert resumed["final"] == reference["final"], k
