"""Populations: each member equals the run it replaces (2-D, exact), and the population launcher."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, compose_config
from omegaconf import OmegaConf

from memhead.population.members import group_key, unsupported
from memhead.population.optim import PopulationAdam, PopulationSGD
from memhead.population.run import run_population
from memhead.registry import ConfigError
from memhead.runner import run

TINY = ["progress=false", "benchmark.n=120"]
# Members with different seeds and scalar options (lr, weight decay, beta, gamma, tau, sigma).
MIXED = [
    ["seed=1"],
    ["seed=2", "optimizer.lr=0.001", "optimizer.weight_decay=0.01"],
    ["seed=3", "model.beta_k=0.001", "model.gamma_alpha=5", "model.tau_alpha=0.7", "model.tau_mu=20"],
    ["seed=1", "model.tau_eta=10", "model.sigma_eu=0.5", "optimizer.weight_decay=0.001"],
]
PLAIN = [["seed=1"], ["seed=2", "optimizer.lr=0.001"], ["seed=3", "optimizer.weight_decay=0.01"]]


def assert_members_equal_single_runs(tmp_path, base, members):
    cfgs = [compose_config([*base, *TINY, *m]) for m in members]
    population = run_population(cfgs, [tmp_path / f"member{i}" for i in range(len(cfgs))])
    for i, (cfg, record) in enumerate(zip(cfgs, population)):
        alone = run(cfg, tmp_path / f"alone{i}")
        assert record["ccm"] == alone["ccm"]  # every accuracy at every boundary, exactly
        assert record["final"] == alone["final"] and record["boundaries"] == alone["boundaries"]
        assert record["config"] == alone["config"] and record["competitor"] == alone["competitor"]
        assert record["timing"]["population"] == len(cfgs)
        on_disk = json.loads((tmp_path / f"member{i}" / "metrics.json").read_text())
        assert on_disk["complete"] and on_disk["ccm"] == alone["ccm"]


@pytest.mark.parametrize(
    "base",
    [
        ["model=mh"],
        ["model=mh", "model.distance=cosine", "model.shared_keys=false", "model.upd_m=vanilla"],
        ["model=mh", "model.distance=dot_scaled", "model.hidden=5", "stream.batch_size=4"],
        ["model=mh", "model.layer_norm=true", "model.random_memories=true", "loss=hinge"],
        ["model=mh", "model.upd_k=grad_WTA", "model.scramble=false", "model.delta=3"],
        ["model=mh", "model.upd_k=grad_not_WTA", "model.scramble=false", "model.distance=cosine"],
        ["model=mh", "optimizer=sgd", "optimizer.momentum=0.9"],
    ],
    ids=lambda o: " ".join(o),
)
def test_memory_head_members_equal_their_runs_alone(tmp_path, base):
    assert_members_equal_single_runs(tmp_path, base, MIXED)


@pytest.mark.parametrize(
    "base",
    [["model=lp"], ["model=mlp"], ["model=mlp", "competitor=ensemble"], ["model=lp", "optimizer=sgd"]],
    ids=lambda o: " ".join(o),
)
def test_plain_heads_members_equal_their_runs_alone(tmp_path, base):
    assert_members_equal_single_runs(tmp_path, base, PLAIN)


@pytest.mark.parametrize(
    "base",
    [
        ["model=mlp", "competitor=er_reservoir", "competitor.buffer_size=5", "stream.batch_size=3"],
        ["model=mlp", "competitor=er_random", "competitor.buffer_size=8", "competitor.buffer_batch_size=3"],
        ["model=mh", "competitor=er_reservoir", "stream.batch_size=2"],
        ["model=lp", "competitor=er_random", "optimizer=sgd", "loss=hinge"],
    ],
    ids=lambda o: " ".join(o),
)
def test_replay_members_equal_their_runs_alone(tmp_path, base):
    """Per-member buffers: the same samples stored, the same slots replayed, in the run alone's order."""
    assert_members_equal_single_runs(tmp_path, base, PLAIN)


GRID_CDID = ["model=mh", "progress=false", "benchmark.order=CDID", "model.delta=3", "model.tau_alpha=0.95",
             "model.tau_mu=50", "model.tau_eta=50"]  # fmt: skip


@pytest.mark.parametrize(
    "base, members",
    [
        (["model=mh", *TINY], MIXED),
        # mh_modes jobs on the full stream (a population once drifted from its runs here, at step 3).
        (GRID_CDID, [["optimizer.lr=0.01", "model.beta_k=0.01", "model.gamma_alpha=25", "seed=1"],
                     ["optimizer.lr=0.001", "model.beta_k=0.001", "model.gamma_alpha=5", "seed=2"]]),
    ],
    ids=["mixed", "mh_modes CDID"],
)  # fmt: skip
def test_final_member_state_equals_the_run_alone(tmp_path, base, members):
    """Not only the metrics: a member's final state is the run's: the keys and counters (which record
    every step's winners) exactly, the memories to float rounding.

    The run alone applies a selected unit with ``torch.mv`` and the population with a batched product;
    on some CPUs (AVX-512: MKL's kernels) the two round a 3-term dot product differently, so logits
    and memory gradients may differ in the last bit (measured: memories within 6e-8 after 120 steps)
    while every winner, and so every metric, stays the same."""
    from memhead.protocol import run_protocol
    from memhead.runner import build_learner, build_stream, resolve_device, seed_everything

    cfgs = [compose_config([*base, *m]) for m in members]
    models = []
    run_population(cfgs, [tmp_path / f"m{i}" for i in range(len(cfgs))], models_out=models)
    for cfg, member in zip(cfgs, models):
        device = resolve_device(cfg.device)
        stream, _ = build_stream(cfg, device, False)
        learner = build_learner(cfg, stream, device, seed_everything(cfg.seed))
        result = run_protocol(learner.model, learner.optimizer, learner.competitor, stream, learner.loss_fn)
        alone = result.model.state_dict()
        state = {"memories", "keys", "usage", "age", "scramble_count"}
        assert set(member.state_dict()) == set(alone) == state
        for name, value in member.state_dict().items():
            if name == "memories":
                torch.testing.assert_close(value, alone[name], rtol=0, atol=1e-6)
            else:
                assert torch.equal(value, alone[name]), name


def test_finished_members_are_not_run_again(tmp_path, caplog):
    cfgs = [compose_config(["model=lp", *TINY, *m]) for m in PLAIN]
    dirs = [tmp_path / f"m{i}" for i in range(len(cfgs))]
    first = run_population(cfgs[:2], dirs[:2])
    caplog.set_level("INFO")
    again = run_population(cfgs, dirs)
    assert again[:2] == first and again[2]["timing"]["population"] == 1
    assert "2 of 3 runs already finished" in caplog.text


def test_groups_are_everything_but_member_options():
    a = compose_config(["seed=1", "optimizer.lr=0.1", "model.beta_k=0.5"])
    b = compose_config(["seed=7", "optimizer.lr=0.001", "model.tau_eta=3"])
    assert group_key(a) == group_key(b)
    assert group_key(a) != group_key(compose_config(["model.delta=3"]))
    assert group_key(a) != group_key(compose_config(["benchmark.order=IID"]))
    assert unsupported(a) is None
    assert "competitor=mir" in unsupported(compose_config(["competitor=mir"]))
    with pytest.raises(ConfigError, match="member options"):
        run_population([a, compose_config(["model.delta=3"])], ["/nonexistent/a", "/nonexistent/b"])


@pytest.mark.parametrize("kind", ["adam", "sgd"])
@pytest.mark.parametrize("fused", [True, False])
def test_population_optimizer_is_torch_optimizer_per_member(kind, fused):
    """Per-member lr and weight decay: each member's slice steps as torch's optimizer steps it alone
    (fused: as torch's fused kernel; vectorised: as its single-tensor step), bitwise."""
    torch.manual_seed(0)
    lrs, wds = [0.01, 0.001, 0.01, 0.1], [0.0, 0.001, 0.0, 0.01]
    start = [torch.randn(4, 5, 3), torch.randn(4, 7)]
    population = [t.clone().requires_grad_() for t in start]
    alone = [[t[p].clone().requires_grad_() for t in start] for p in range(4)]
    if kind == "adam":
        opt = PopulationAdam(population, lrs, wds, fused=fused)
        singles = [torch.optim.Adam(a, lr=rate, weight_decay=w, fused=fused or None, foreach=False)
                   for a, rate, w in zip(alone, lrs, wds)]  # fmt: skip
    else:
        opt = PopulationSGD(population, lrs, wds, momentum=0.9, fused=fused)
        singles = [torch.optim.SGD(a, lr=rate, weight_decay=w, momentum=0.9, fused=fused or None)
                   for a, rate, w in zip(alone, lrs, wds)]  # fmt: skip
    for _ in range(20):
        grads = [torch.randn_like(t) for t in start]
        for t, g in zip(population, grads):
            t.grad = g.clone()
        for p in range(4):
            for t, g in zip(alone[p], grads):
                t.grad = g[p].clone()
        opt.step()
        for single in singles:
            single.step()
    for p in range(4):
        for t, a in zip(population, alone[p]):
            assert torch.equal(t[p], a)


def _multirun(tmp_path, name, *overrides):
    command = [sys.executable, "run.py", "-m", f"hydra.sweep.dir={tmp_path / name}", *TINY, *overrides]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def _records(sweep_dir):
    return {
        path.parent.name: json.loads(path.read_text()) for path in sorted(sweep_dir.glob("*/metrics.json"))
    }


def _hydra_yaml(job_dir):
    """A job's ``.hydra/hydra.yaml`` without what names its launcher and its sweep directory."""
    hydra = OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra
    del hydra.launcher, hydra.overrides.hydra
    for choice in [c for c in hydra.runtime.choices if "launcher" in c]:  # its config's defaults too
        del hydra.runtime.choices[choice]
    text = OmegaConf.to_yaml(hydra)
    return text.replace(str(job_dir.parent), "SWEEP")


@pytest.mark.slow
def test_launcher_equals_basic_launcher_and_falls_back(tmp_path):
    """A mixed sweep: mh and mlp groups train as populations, the mir group runs one by one; every
    job's directory, .hydra/ files and metrics equal those of the basic launcher's sweep."""
    sweep = ["model=mh,mlp", "competitor=none,mir", "seed=1,2", "optimizer.lr=0.01,0.001", "model.hidden=4"]
    out = _multirun(tmp_path, "population", *sweep, "hydra/launcher=population", "hydra.launcher.workers=2")
    _multirun(tmp_path, "basic", *sweep)
    assert "as 4 groups (2 as populations, 2 one by one)" in out
    assert "2 populations in 2 worker processes" in out
    assert "competitor=mir" in out
    population, basic = _records(tmp_path / "population"), _records(tmp_path / "basic")
    assert sorted(population) == sorted(basic) and len(population) == 16
    for job, record in basic.items():
        assert population[job]["ccm"] == record["ccm"] and population[job]["config"] == record["config"]
        for name in ("config.yaml", "overrides.yaml"):
            mine = (tmp_path / "population" / job / ".hydra" / name).read_text()
            assert mine == (tmp_path / "basic" / job / ".hydra" / name).read_text()
        assert _hydra_yaml(tmp_path / "population" / job) == _hydra_yaml(tmp_path / "basic" / job)
        assert "boundary" in (tmp_path / "population" / job / "run.log").read_text()
    report = subprocess.run(
        [sys.executable, "-m", "memhead.report", str(tmp_path / "population")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    reference = subprocess.run(
        [sys.executable, "-m", "memhead.report", str(tmp_path / "basic")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert report.returncode == 0 and report.stdout == reference.stdout.replace(
        str(tmp_path / "basic"), str(tmp_path / "population")
    )


RESUMABLE = ["benchmark.order=CDID", "checkpoint.interval_s=0"]


class Killed(BaseException):
    """Stands for kill -9 right after a boundary's checkpoints (nothing after it runs)."""


def _crash_after(monkeypatch, boundary: int):
    import memhead.population.run as population_run

    real = population_run._at_boundary

    def at_boundary(i, *args, **kwargs):
        real(i, *args, **kwargs)
        if i == boundary:
            raise Killed

    monkeypatch.setattr(population_run, "_at_boundary", at_boundary)
    return lambda: monkeypatch.setattr(population_run, "_at_boundary", real)


@pytest.mark.parametrize(
    "base",
    [["model=mh"], ["model=mlp", "competitor=er_reservoir", "optimizer=sgd", "optimizer.momentum=0.9"],
     ["model=mlp", "competitor=ensemble"]],
    ids=lambda o: " ".join(o),
)  # fmt: skip
def test_killed_population_resumes_to_identical_results(tmp_path, monkeypatch, base):
    members = MIXED if base == ["model=mh"] else PLAIN
    cfgs = [compose_config([*base, *TINY, *RESUMABLE, *m]) for m in members]
    whole = run_population(cfgs, [tmp_path / f"whole{i}" for i in range(len(cfgs))])
    dirs = [tmp_path / f"run{i}" for i in range(len(cfgs))]
    undo = _crash_after(monkeypatch, 2)
    with pytest.raises(Killed):
        run_population(cfgs, dirs)
    undo()
    assert all((d / "checkpoint.pt").is_file() for d in dirs)
    assert not any(json.loads((d / "metrics.json").read_text())["complete"] for d in dirs)
    resumed = run_population(cfgs, dirs)
    for mine, reference in zip(resumed, whole):
        assert mine["ccm"] == reference["ccm"] and mine["boundaries"] == reference["boundaries"]
        assert mine["final"] == reference["final"] and mine["competitor"] == reference["competitor"]
        assert mine["initial_accuracy"] == reference["initial_accuracy"]


def test_resume_points_finished_and_alone_members(tmp_path, monkeypatch, caplog):
    """A member already finished is not run again, a member checkpointed by a run alone resumes alone,
    the others resume together; every result equals the uninterrupted one."""
    cfgs = [compose_config(["model=mh", *TINY, *RESUMABLE, *m]) for m in MIXED]
    whole = run_population(cfgs, [tmp_path / f"whole{i}" for i in range(len(cfgs))])
    dirs = [tmp_path / f"run{i}" for i in range(len(cfgs))]
    undo = _crash_after(monkeypatch, 1)
    with pytest.raises(Killed):
        run_population(cfgs[1:], dirs[1:])
    undo()
    run(cfgs[0], dirs[0])  # finished alone
    import memhead.runner as runner_module

    real_at_boundary = runner_module.Recorder.at_boundary

    def killed_alone(self, i, *args, **kwargs):
        real_at_boundary(self, i, *args, **kwargs)
        if i == 3:
            raise Killed

    for leftover in [*dirs[3].glob("checkpoint*.pt"), dirs[3] / "metrics.json"]:
        leftover.unlink()
    monkeypatch.setattr(runner_module.Recorder, "at_boundary", killed_alone)
    with pytest.raises(Killed):
        run(cfgs[3], dirs[3])  # member 3 now holds a run alone's checkpoint
    monkeypatch.setattr(runner_module.Recorder, "at_boundary", real_at_boundary)
    with caplog.at_level("INFO"):
        resumed = run_population(cfgs, dirs)
    assert "1 of 4 runs already finished" in caplog.text
    assert "holds a checkpoint of a run alone: it resumes alone" in caplog.text
    assert "2 runs resume together after boundary 1" in caplog.text
    for mine, reference in zip(resumed, whole):
        assert mine["ccm"] == reference["ccm"] and mine["final"] == reference["final"]


def test_a_run_alone_refuses_a_population_checkpoint(tmp_path, monkeypatch):
    cfg = compose_config(["model=mh", *TINY, *RESUMABLE])
    undo = _crash_after(monkeypatch, 0)
    with pytest.raises(Killed):
        run_population([cfg], [tmp_path / "m"])
    undo()
    with pytest.raises(ConfigError, match="written by a population .* resume it with that launcher"):
        run(cfg, tmp_path / "m")


def test_launcher_member_refused_alone(tmp_path):
    """A member whose directory holds another run is refused alone, its files byte-identical; the
    others of its population train; the multirun exits 1 saying so."""
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        "run.py",
        "-m",
        "hydra/launcher=population",
        f"hydra.sweep.dir={sweep_dir}",
        *TINY,
    ]
    first = subprocess.run([*command, "seed=1,2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    for leftover in [*(sweep_dir / "1").glob("checkpoint*.pt"), sweep_dir / "1" / "metrics.json"]:
        leftover.unlink()
    before = {p: p.read_bytes() for p in (sweep_dir / "0").rglob("*") if p.is_file()}
    again = subprocess.run([*command, "seed=5,2"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert again.returncode == 1
    assert "1 job(s) of the multirun failed" in again.stderr and "seed" in again.stderr
    assert {p: p.read_bytes() for p in (sweep_dir / "0").rglob("*") if p.is_file()} == before
    record = json.loads((sweep_dir / "1" / "metrics.json").read_text())
    assert record["complete"] and record["seed"] == 2


KILLABLE = ["benchmark.order=CDID", "benchmark.n=3000", "checkpoint.interval_s=0"]


def _start_and_stop(tmp_path, sweep, sig):
    """Launch ``sweep`` under the population launcher, send ``sig`` once every job holds a checkpoint;
    returns the launcher's command (without its sweep directory) and its exit status."""
    import signal
    import time

    command = [sys.executable, "run.py", "-m", "hydra/launcher=population", "progress=false", *sweep]
    stopped_dir = tmp_path / "stopped"
    process = subprocess.Popen([*command, f"hydra.sweep.dir={stopped_dir}"], cwd=REPO, stderr=subprocess.PIPE,
                               text=True)  # fmt: skip
    jobs = len(sweep[0].split(",")) * len(sweep[1].split(","))
    deadline = time.time() + 240
    while not all((stopped_dir / str(j) / "checkpoint.pt").is_file() for j in range(jobs)):
        assert process.poll() is None and time.time() < deadline, "the sweep ended before a checkpoint"
        time.sleep(0.02)
    process.send_signal(sig)
    stderr = process.communicate(timeout=240)[1]
    assert sig != signal.SIGKILL or process.returncode == -signal.SIGKILL
    return command, process.returncode, stderr


def _relaunch_equals_whole(tmp_path, command):
    """The stopped sweep relaunched into its directory ends as the same sweep run without a stop."""
    partial = [json.loads(p.read_text())["complete"] for p in (tmp_path / "stopped").glob("*/metrics.json")]
    assert partial and not all(partial)  # stopped before the end
    _multirun(tmp_path, "stopped", *command[3:])  # a worker left alive would hold its runs' locks
    _multirun(tmp_path, "whole", *command[3:])
    stopped, whole = _records(tmp_path / "stopped"), _records(tmp_path / "whole")
    assert sorted(stopped) == sorted(whole) and len(whole) >= 3
    for job in whole:
        assert stopped[job]["ccm"] == whole[job]["ccm"] and stopped[job]["final"] == whole[job]["final"]


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_launcher_kill_9_and_relaunch_gives_the_same_results(tmp_path, workers):
    """kill -9 of the launcher (with workers: they die with it) and a relaunch: the same results."""
    import signal

    sweep = ["seed=1,2,3", "model=mh,lp", *KILLABLE, f"hydra.launcher.workers={workers}"]
    command, _, _ = _start_and_stop(tmp_path, sweep, signal.SIGKILL)
    _relaunch_equals_whole(tmp_path, command)


@pytest.mark.slow
def test_preempted_workers_checkpoint_and_resume(tmp_path):
    """SIGTERM to the launcher reaches every worker: each stops at its next boundary, checkpoints
    written; the launcher exits 143 in one line, and the relaunch ends as an uninterrupted sweep."""
    import signal

    sweep = ["seed=1,2", "model=mh,lp", *KILLABLE, "hydra.launcher.workers=2"]
    command, returncode, stderr = _start_and_stop(tmp_path, sweep, signal.SIGTERM)
    assert returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "memhead: population stopped by signal 15" in stderr and "Traceback" not in stderr
    _relaunch_equals_whole(tmp_path, command)


@pytest.mark.slow
def test_local_executor_runs_each_group_as_a_process(tmp_path):
    sweep = ["model=mh,mlp", "competitor=none,mir", "seed=1,2", "model.hidden=4"]
    out = _multirun(tmp_path, "local", *sweep, "hydra/launcher=population", "hydra.launcher.executor=local")
    _multirun(tmp_path, "basic", *sweep)
    assert "submitted 4 groups as local job(s)" in out
    assert len(list((tmp_path / "local" / ".submitit").glob("*/*_result.pkl"))) == 4
    local, basic = _records(tmp_path / "local"), _records(tmp_path / "basic")
    assert sorted(local) == sorted(basic) and len(local) == 8
    for job, record in basic.items():
        assert local[job]["ccm"] == record["ccm"] and local[job]["config"] == record["config"]


@pytest.mark.parametrize(
    "option, message",
    [
        ("executor=cloud", "hydra.launcher.executor='cloud' is not allowed; allowed: inline, local, slurm"),
        ("max_members=0", "hydra.launcher.max_members=0 is not allowed; allowed: null, >= 1"),
        ("max_members=many", "hydra.launcher.max_members='many' is not allowed; allowed: null, >= 1"),
        ("workers=0", "hydra.launcher.workers=0 is not allowed; allowed: null, >= 1"),
        (
            "executor=local hydra.launcher.workers=2",
            "hydra.launcher.workers=2 is not allowed with "
            "executor=local: workers share out the inline executor's populations (allowed there: null, 1)",
        ),
    ],
)
def test_bad_launcher_options_are_one_line(tmp_path, option, message):
    options = f"hydra.launcher.{option}".split()
    command = [sys.executable, "run.py", "-m", "hydra/launcher=population", *options,
               f"hydra.sweep.dir={tmp_path}", *TINY, "seed=1,2"]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {message}"]


@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("layer_norm", [False, True])
def test_large_units_evaluate_member_by_member_as_their_runs_alone(shared_keys, layer_norm):
    """Heads with large units evaluate each member through the layer's own evaluation (no gathered
    copies of the selected units): the outputs and winners of every member's layer, evaluated alone."""
    from memhead.layer import MemoryHead, check_options
    from memhead.population.models import MH_MEMBER_OPTIONS, PopulationMemoryHead

    in_features, out_features, seeds = 64, 70, (1, 2, 3)
    options = {"key_mem_units": 9, "delta": 2, "shared_keys": shared_keys, "layer_norm": layer_norm}
    layers = []
    for seed in seeds:
        torch.manual_seed(seed)
        layers.append(MemoryHead(in_features, out_features, gamma_alpha=1.0 + seed, **options).eval())
    normalised = [check_options(in_features, out_features, gamma_alpha=1.0 + s, **options) for s in seeds]
    population = PopulationMemoryHead(
        len(seeds), normalised[0], [{n: o[n] for n in MH_MEMBER_OPTIONS} for o in normalised]
    )
    population.load_members([layer.state_dict() for layer in layers])
    population.eval()
    assert population.evaluates_per_member
    x = torch.randn(40, in_features)
    with torch.inference_mode():
        output = population(x.expand(len(seeds), *x.shape))
        for p, layer in enumerate(layers):
            expected = layer(x)
            assert torch.equal(population.last_top_indices[p], layer.last_top_indices)
            torch.testing.assert_close(output[p], expected, atol=1e-6, rtol=1e-5)
