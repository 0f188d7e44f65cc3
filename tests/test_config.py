"""Composition of every config option, and bad input failing with one clear line (no traceback)."""

import os
import subprocess
import sys

import pytest
from conftest import REPO, compose_config

GROUP_OPTIONS = {
    "model": ["lp", "mlp", "mh", "ncm", "slda"],
    "benchmark": ["modes", "moons", "features", "ns_imagenet"],
    "competitor": ["none", "er_reservoir", "er_random", "mir", "agem", "gdumb", "ensemble"],
    "optimizer": ["adam", "sgd"],
    "logger": ["none", "wandb"],
}


def test_every_group_option_has_a_yaml_file():
    for group, options in GROUP_OPTIONS.items():
        on_disk = sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))
        assert on_disk == sorted(options), group


@pytest.mark.parametrize("group, option", [(g, o) for g, opts in GROUP_OPTIONS.items() for o in opts])
def test_every_option_composes(group, option):
    cfg = compose_config([f"{group}={option}"])
    assert cfg[group].name == option


def test_default_is_the_papers_2d_memory_head():
    cfg = compose_config()
    assert (cfg.model.name, cfg.benchmark.name, cfg.benchmark.order.name) == ("mh", "modes", "CDI")
    m = cfg.model
    assert (m.distance.name, m.key_mem_units, m.delta, m.gamma_alpha, m.beta_k) == (
        "euclidean",
        10,
        2,
        25,
        0.01,
    )
    assert (m.tau_alpha, m.tau_mu, m.tau_eta, m.upd_m.name, m.upd_k.name) == (
        0.95,
        50,
        50,
        "WTA",
        "ad_hoc_WTA",
    )
    assert m.scramble and m.shared_keys
    assert (cfg.optimizer.name, cfg.optimizer.lr) == ("adam", 0.01)


def run_cli(*args, timeout=120):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": ""}
    env.pop("HYDRA_FULL_ERROR")
    return subprocess.run(
        [sys.executable, "run.py", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


@pytest.mark.parametrize(
    "args, expected",
    [
        (["benchmark.order=XYZ"], ["benchmark.order", "IID", "CI", "CDI", "CDID"]),
        (["model.hidden=abc"], ["model.hidden", "abc"]),
        (["benchmark=nosuch"], ["benchmark", "nosuch", "modes"]),
        (["loss=l2"], ["loss", "xent", "hinge"]),
        (["model.distance=manhattan"], ["model.distance", "cosine", "euclidean", "dot_scaled"]),
        (["device=gpu"], ["device", "cpu", "cuda"]),
        (["model.scramble=true", "model.upd_k=grad_WTA"], ["scramble", "ad_hoc_WTA"]),
        (["model.key_mem_units=0"], ["model.key_mem_units=0", "an integer >= 1"]),
        (["model.gamma_alpha=0"], ["model.gamma_alpha=0", "a number > 0"]),
        (["model.beta_k=-0.5"], ["model.beta_k=-0.5", ">= 0"]),
        (["model.tau_alpha=1.5"], ["model.tau_alpha=1.5", "model.distance=euclidean", "<= 1"]),
        (["model.impl=gpu"], ["model.impl", "auto", "reference", "fast"]),
        (
            ["benchmark=features", "benchmark.path=/nonexistent/x.npz"],
            ["benchmark.path", "/nonexistent/x.npz"],
        ),
        (["competitor=mir", "competitor.candidates=4", "competitor.buffer_batch_size=8"], ["candidates"]),
        (["eval.chunk_size=0"], ["eval.chunk_size"]),
    ],
)
def test_bad_input_fails_with_one_clear_line(args, expected, tmp_path):
    proc = run_cli(*args, f"hydra.run.dir={tmp_path}", "progress=false")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    assert len([line for line in out.splitlines() if line.strip()]) <= 5, out
    for word in expected:
        assert word in out, (word, out)
    assert not (tmp_path / "metrics.json").exists()


def test_sweep_group_ignores_seed_and_reporting_options():
    from run import sweep_group

    assert sweep_group(
        ["seed=3", "model=mlp", "plots.enabled=true", "logger=wandb", "benchmark.order=CI"]
    ) == ("benchmark.order=CI,model=mlp")
    assert sweep_group(["seed=1"]) is None


def test_a_clipped_delta_is_named_by_its_config_path():
    """The layer says ``delta=7 is above key_mem_units=3``; a run's checks and its model builder say
    it with the config paths, as they do for errors."""
    from memhead.models import MODELS, check_model

    cfg = compose_config(["model.key_mem_units=3", "model.delta=7"])
    with pytest.warns(UserWarning) as record:
        check_model(cfg.model, 2)
        head = MODELS.get("mh")(cfg.model, 2, 4)
    expected = "model.delta=7 is above model.key_mem_units=3; using model.delta=3"
    assert [str(warning.message) for warning in record] == [expected, expected]
    assert head.delta == 3
