"""``python -m memhead.bench --population``: its steps are the runs' steps, and it prints its rows."""

import re
import subprocess
import sys

import torch
from conftest import REPO

from memhead import runner
from memhead.population.bench import HEADS, build_population, compose, population_steps, single_steps


def test_measured_population_step_advances_every_member_as_its_run_alone():
    """The bench's two steps are the runs' steps: after the same samples, each member of the population
    (seeds 1..3) holds the state of the run with its seed stepped alone (counters exactly, keys and
    memories to float round-off, as tests/test_population.py compares them)."""
    device = torch.device("cpu")
    cfg = compose([*HEADS["2-D MH"], "progress=false", "benchmark.n=120"])
    stream, _ = runner.build_stream(cfg, device, False)
    x, y = stream.train.x, stream.train.y
    model, optimizer = build_population(cfg, 3, stream, device)
    population_steps(model, optimizer, cfg.loss.name, 3, x, y)(len(x) + 7)  # wraps around the stream
    for member, seed in enumerate((1, 2, 3)):
        cfg.seed = seed
        learner = runner.build_learner(cfg, stream, device, runner.seed_everything(seed))
        single_steps(learner, x, y)(len(x) + 7)
        alone = learner.model.state_dict()
        state = model.member_state(member)
        assert state.keys() == alone.keys()
        for name, value in alone.items():
            if name in ("memories", "keys"):
                torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=name)
            else:
                assert torch.equal(state[name], value), (seed, name)


def test_bench_population_prints_a_row_per_head_and_size():
    command = [
        sys.executable,
        "-m",
        "memhead.bench",
        "--population",
        "--repeats",
        "2",
        "--population-sizes",
        "1,2",
    ]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("population ")]
    pattern = r"population (\d+), (.+): per-member step (\S+) us = (\S+) x single-run step \((\S+) us;"
    parsed = [re.match(pattern, row) for row in rows]
    assert all(parsed), rows
    assert [(m[1], m[2]) for m in parsed] == [(size, head) for head in HEADS for size in ("1", "2")]
    for m in parsed:  # the ratio is the two printed times' (no claim on the times themselves)
        member, ratio, single = float(m[3]), float(m[4]), float(m[5])
        assert member > 0 and single > 0
        rounding = 5e-4 + ratio * (0.05 / member + 0.05 / single)  # printed to 3 decimals, 0.1 us
        assert abs(ratio - member / single) <= rounding, m[0]
    assert "512 -> 100, m=100" in result.stdout and "2 -> 4, m=10" in result.stdout


def test_bench_population_sizes_must_be_positive_integers():
    command = [sys.executable, "-m", "memhead.bench", "--population-sizes", "8,0"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "--population-sizes: '8,0': allowed are positive integers" in result.stderr
