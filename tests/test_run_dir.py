"""The run directory: checksummed checkpoints and their fallback, malformed records, stale temporaries,
the recorded time-based seed, provenance, resolved paths and W&B's directory."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from memhead import checkpoint, loggers
from memhead.registry import ConfigError
from memhead.runner import run

INTERRUPTIBLE = ("model=mh", "competitor=er_reservoir", "competitor.buffer_size=8", "seed=4")


def interrupted(cfg, run_dir, monkeypatch, at: int):
    """Run ``cfg`` in ``run_dir`` until boundary ``at``, as a preemption would stop it."""

    def log_boundary(self, i, row, *args, **kwargs):
        if i == at:
            raise KeyboardInterrupt

    monkeypatch.setattr(loggers.NullLogger, "log_boundary", log_boundary)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, run_dir)
    monkeypatch.undo()


def test_flipped_bytes_inside_a_tensor_are_detected(tmp_path):
    path = tmp_path / checkpoint.CHECKPOINT
    payload = {"exp_avg_sq": torch.linspace(0.0, 1.0, 4096)}
    checkpoint.save(path, payload)
    assert torch.equal(checkpoint.load(path)["exp_avg_sq"], payload["exp_avg_sq"])
    raw = bytearray(path.read_bytes())
    middle = len(raw) // 2  # inside the tensor's record, which torch reads without checking its CRC
    raw[middle : middle + 4] = bytes(b ^ 0xFF for b in raw[middle : middle + 4])
    path.write_bytes(bytes(raw))
    with pytest.raises(checkpoint.DamagedCheckpoint, match="checksum"):
        checkpoint.load(path)


@pytest.mark.parametrize("damage", ["empty", "truncated", "flipped"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    damage, tiny_cfg, tmp_path, monkeypatch, caplog
):
    cfg = tiny_cfg(*INTERRUPTIBLE, "checkpoint.interval_s=0")
    reference = run(cfg, tmp_path / "reference")
    run_dir = tmp_path / "cut"
    interrupted(cfg, run_dir, monkeypatch, at=4)
    newest, previous = run_dir / checkpoint.CHECKPOINT, run_dir / checkpoint.PREVIOUS
    assert previous.is_file()
    raw = newest.read_bytes()
    newest.write_bytes(
        {"empty": b"", "truncated": raw[: len(raw) // 3], "flipped": raw[:-100] + bytes(100)}[damage]
    )
    with caplog.at_level("WARNING"):
        resumed = run(cfg, run_dir)
    assert "falling back to checkpoint.prev.pt" in caplog.text
    assert resumed["ccm"] == reference["ccm"] and resumed["final"] == reference["final"]


def test_no_usable_checkpoint_starts_over_and_stale_temporaries_go(tiny_cfg, tmp_path, monkeypatch, caplog):
    cfg = tiny_cfg(*INTERRUPTIBLE, "checkpoint.interval_s=0")
    reference = run(cfg, tmp_path / "reference")
    run_dir = tmp_path / "cut"
    interrupted(cfg, run_dir, monkeypatch, at=3)
    (run_dir / checkpoint.CHECKPOINT).write_bytes(b"")
    (run_dir / checkpoint.PREVIOUS).write_bytes(b"garbage")
    stale = [run_dir / ".checkpoint.pt.abc123.tmp", run_dir / ".metrics.json.xyz.tmp"]
    for path in stale:
        path.write_bytes(b"half a write")
    with caplog.at_level("WARNING"):
        resumed = run(cfg, run_dir)
    assert "starting over" in caplog.text
    assert resumed["ccm"] == reference["ccm"]
    assert not any(path.exists() for path in stale)


@pytest.mark.parametrize("content", [b"{", b"[]", b"\xff\xfe", b'{"complete": true}'])
def test_a_malformed_metrics_json_is_not_a_finished_run(content, tiny_cfg, tmp_path):
    (tmp_path / "metrics.json").write_bytes(content)
    record = run(tiny_cfg("model=lp"), tmp_path)
    assert record["complete"] and json.loads((tmp_path / "metrics.json").read_text())["complete"]


def test_a_time_based_seed_is_the_recorded_one_when_relaunched(tiny_cfg, tmp_path, caplog):
    cfg = tiny_cfg("model=lp", "seed=-1", "benchmark.order=IID")  # one distribution: no checkpoint
    first = run(cfg, tmp_path)
    assert not (tmp_path / checkpoint.CHECKPOINT).exists()
    with caplog.at_level("INFO"):
        again = run(cfg, tmp_path)
    assert "nothing to do" in caplog.text and again["seed"] == first["seed"]


def test_provenance_is_recorded_and_not_part_of_the_identity(tiny_cfg, tmp_path, monkeypatch):
    record = run(tiny_cfg("model=lp"), tmp_path)
    prov = record["provenance"]
    assert set(prov["packages"]) == {"torch", "hydra-core", "numpy", "memhead"}
    assert prov["packages"]["torch"] == torch.__version__.split("+")[0]
    assert prov["python"] == ".".join(map(str, sys.version_info[:3])) and prov["argv"] == sys.argv
    if (REPO / ".git").exists():
        assert len(prov["git_commit"]) == 40 and isinstance(prov["git_dirty"], bool)
    monkeypatch.setattr(sys, "argv", ["elsewhere.py", "--other"])
    assert run(tiny_cfg("model=lp"), tmp_path)["final"] == record["final"]  # same run, not refused


def test_wandb_dir_wins_when_set(monkeypatch, tmp_path):
    import wandb
    from omegaconf import OmegaConf

    seen = {}

    def init(**kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(wandb, "init", init)
    cfg = OmegaConf.create(
        {"name": "wandb", "project": "p", "entity": None, "mode": "offline", "group": None, "tags": []}
    )
    with pytest.warns(UserWarning):
        loggers.make_logger(cfg, {}, run_dir=str(tmp_path / "run"))
    assert seen["dir"] == str(tmp_path / "run")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    with pytest.warns(UserWarning):
        loggers.make_logger(cfg, {}, run_dir=str(tmp_path / "run"))
    assert seen["dir"] == str(tmp_path / "wandb_home")


@pytest.mark.slow
def test_relative_paths_survive_hydra_job_chdir(tmp_path):
    from memhead.bench import write_stream

    write_stream(tmp_path / "stream.npz", distributions=2)
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "run.py"),
            "model=lp",
            "benchmark=features",
            "benchmark.path=stream.npz",
            "progress=false",
            "hydra.job.chdir=true",
            f"hydra.run.dir={run_dir}",
        ],  # fmt: skip
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["config"]["benchmark"]["path"] == "stream.npz"  # as given
    assert record["paths"] == {"benchmark.path": str(tmp_path / "stream.npz")}  # where it led


def test_a_second_process_is_refused_a_directory_in_use(tiny_cfg, tmp_path):
    from memhead import run_dir

    held = run_dir.lock(tmp_path)  # as another process's run would hold it
    try:
        with pytest.raises(ConfigError, match="in use by another memhead process"):
            run(tiny_cfg(), tmp_path)
        assert not (tmp_path / "metrics.json").exists()
    finally:
        held.close()
    assert run(tiny_cfg(), tmp_path)["complete"]  # released: the directory is free again


@pytest.mark.slow
def test_concurrent_launches_never_share_a_directory(tmp_path):
    """Three runs started at once with the default run directory: three directories, three records."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / "run.py"), f"seed={s}", "benchmark.n=200", "progress=false"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for s in (1, 2, 3)
    ]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read()
    records = sorted((tmp_path / "outputs").glob("*/*/metrics.json"))
    assert len(records) == 3
    assert sorted(json.loads(r.read_text())["seed"] for r in records) == [1, 2, 3]


@pytest.mark.slow
def test_sigterm_checkpoints_at_the_next_boundary_and_resumes_exactly(tmp_path):
    """A cluster's SIGTERM: the run checkpoints, exits 143 with one line, and resumes to the same result."""
    import signal
    import time

    from conftest import compose_config

    args = [*INTERRUPTIBLE, "benchmark.n=4000", "progress=false"]  # default, time-spaced checkpoints
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cut = tmp_path / "cut"
    command = [sys.executable, "run.py", *args, f"hydra.run.dir={cut}"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (cut / "metrics.json").is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the signal: make the stream longer"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = err.decode().strip().splitlines()
    assert proc.returncode == 143 and "stopped by signal" in lines[-1] and "resumes from" in lines[-1]
    partial = json.loads((cut / "metrics.json").read_text())
    assert not partial["complete"] and len(partial["boundaries"]) < 8
    resumed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    reference = run(compose_config(args), tmp_path / "reference")
    after = json.loads((cut / "metrics.json").read_text())
    assert after["complete"]
    for key in ("final", "ccm", "boundaries", "competitor"):
        assert after[key] == reference[key], key


def _files(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_refused_relaunch_leaves_every_file_as_it_was(tmp_path, capsys):
    import run as run_module

    run_dir = tmp_path / "r"
    common = ["model=lp", "benchmark.n=80", "progress=false", f"hydra.run.dir={run_dir}"]
    assert run_module.cli(common) == 0
    before = _files(run_dir)
    assert run_module.cli([*common, "optimizer.lr=0.005"]) == 2
    assert "another configuration (optimizer.lr: 0.01 -> 0.005)" in capsys.readouterr().err
    assert _files(run_dir) == before  # .hydra/config.yaml still says lr 0.01, as metrics.json does


def test_a_refused_multirun_relaunch_leaves_the_sweep_as_it_was(tmp_path, capsys):
    import run as run_module

    sweep = tmp_path / "s"
    common = ["-m", "model=lp", "seed=1,2", "benchmark.n=80", "progress=false", f"hydra.sweep.dir={sweep}"]
    assert run_module.cli(common) == 0
    before = _files(sweep)
    assert run_module.cli([*common, "optimizer.lr=0.05"]) == 1  # both jobs refused, each alone
    err = capsys.readouterr().err
    assert "2 job(s) of the multirun failed" in err and "another configuration" in err
    assert _files(sweep) == before
