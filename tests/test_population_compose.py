"""The population launcher's composer: a derived job config equals the one Hydra composes."""

import pytest
from conftest import REPO
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from hydra_plugins.memhead_population.compose import MemberComposer
from memhead.config import register_sweeps

SWEEPS = ["mh_modes", "heads_modes", "competitors_modes", "mh_ns_imagenet", "smoke"]


def sweep_jobs(loader, master, limit: int) -> list[list[str]]:
    """``limit`` jobs of the sweep in ``master``, in the basic sweeper's order: the first half, then
    jobs spread over the rest (so that every swept option, the outermost too, changes)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = [f"{k}={v}" for k, v in master.hydra.sweeper.params.items()]
    params += list(master.hydra.overrides.task)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(params)
    (batch,) = BasicSweeper.split_arguments(parsed, None)
    head, rest = batch[: limit // 2], batch[limit // 2 :]
    spread = rest[:: max(1, len(rest) // (limit - len(head)))][: limit - len(head)]
    return [list(job) for job in head + spread]


def _flags(cfg) -> list:
    """Every node's path, type and flags (struct, readonly), depth first."""
    out = [("", OmegaConf.get_type(cfg), dict(cfg._metadata.flags))]
    keys = range(len(cfg)) if OmegaConf.is_list(cfg) else list(cfg.keys())
    for key in keys:
        node = cfg._get_node(key)
        if OmegaConf.is_config(node):
            out += [(f"{key}.{path}", kind, flags) for path, kind, flags in _flags(node)]
        else:
            out.append((str(key), type(node).__name__, dict(node._metadata.flags)))
    return out


@pytest.fixture
def loader():
    register_sweeps()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


@pytest.mark.parametrize("sweep", SWEEPS)
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="plain"),
        pytest.param(["eval.chunk_size=50", "optimizer.weight_decay=0.01"], id="cli", marks=pytest.mark.slow),
    ],
)
def test_derived_configs_equal_hydras(loader, sweep, extra):
    master = loader.load_configuration(
        "config", [f"sweep={sweep}", "hydra/launcher=population", *extra], run_mode=RunMode.MULTIRUN
    )
    composer = MemberComposer(loader)
    jobs = sweep_jobs(loader, master, 16)
    for job in jobs:
        ours = composer.load_sweep_config(master, job)
        hydras = loader.load_sweep_config(master, job)
        assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(hydras), job
        assert _flags(ours) == _flags(hydras)
        tasks = []
        for cfg in (ours, hydras):  # the task config, resolved, as the run reads it
            with open_dict(cfg):
                del cfg["hydra"]
            tasks.append(OmegaConf.to_yaml(cfg, resolve=True))
        assert tasks[0] == tasks[1], job
    assert composer.derived > 0  # the check covered derived configs, not only composed ones
    orders = {OmegaConf.select(loader.load_sweep_config(master, job), "benchmark.order") for job in jobs}
    assert len(orders) > 1 or sweep in ("mh_ns_imagenet", "smoke")  # a swept option outside the members
    assert composer.composed + composer.derived == len(jobs)


def test_shapes_and_non_member_overrides_compose_through_hydra(loader):
    master = loader.load_configuration("config", ["hydra/launcher=population"], run_mode=RunMode.MULTIRUN)
    composer = MemberComposer(loader)
    jobs = [
        ["seed=1", "model=mh"],
        ["seed=2", "model=mh"],  # derived: same shape
        ["seed=2", "model=lp"],  # another shape
        ["seed=3", "model=mh", "model.delta=3"],
        ["seed=4", "model=mh", "model.delta=3"],  # derived
        ["model=mh", "seed=5"],  # overrides in another order: another shape
    ]
    for job in jobs:
        ours = composer.load_sweep_config(master, job)
        assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(loader.load_sweep_config(master, job))
    assert (composer.composed, composer.derived) == (4, 2)


def test_values_derive_but_adds_and_deletes_compose(loader):
    """A plain option derives from its shape's template; a job that also adds or deletes a task option
    composes through Hydra (a value set before a delete must stay deleted, one after an add depends
    on it)."""
    master = loader.load_configuration("config", ["hydra/launcher=population"], run_mode=RunMode.MULTIRUN)
    composer = MemberComposer(loader)
    jobs = [
        ["benchmark.order=CI", "model=mlp", "model.hidden=7"],
        ["benchmark.order=CDID", "model=mlp", "model.hidden=9"],  # derived
        ["+extra=1", "model=mlp"],
        ["+extra=2", "model=mlp"],  # another shape
        ["+extra=1", "extra=5"],
        ["+extra=1", "extra=6"],  # composed: the value may depend on the add before it
        ["model=mlp", "model.hidden=3", "model={hidden:5}"],
        ["model=mlp", "model.hidden=7", "model={hidden:5}"],  # composed: the dict merges after the value
    ]
    for job in jobs:
        ours = composer.load_sweep_config(master, job)
        assert OmegaConf.to_yaml(ours) == OmegaConf.to_yaml(loader.load_sweep_config(master, job)), job
    assert (composer.composed, composer.derived) == (7, 1)


def test_a_value_its_template_refuses_fails_through_hydra(loader):
    from hydra.errors import ConfigCompositionException

    master = loader.load_configuration("config", ["hydra/launcher=population"], run_mode=RunMode.MULTIRUN)
    composer = MemberComposer(loader)
    composer.load_sweep_config(master, ["model=mlp", "model.hidden=3"])
    with pytest.raises(ConfigCompositionException, match="model.hidden=many"):
        composer.load_sweep_config(master, ["model=mlp", "model.hidden=many"])
    assert (composer.composed, composer.derived) == (1, 0)


def test_a_job_hydra_refuses_is_refused_the_same(loader):
    """No template is kept from a failed composition: every such job fails through Hydra itself."""
    from hydra.errors import ConfigCompositionException

    master = loader.load_configuration("config", ["hydra/launcher=population"], run_mode=RunMode.MULTIRUN)
    composer = MemberComposer(loader)
    for seed in (1, 2):
        with pytest.raises(ConfigCompositionException, match="model.tau_mu"):
            composer.load_sweep_config(master, ["model=lp", f"seed={seed}", "model.tau_mu=7"])
    assert (composer.composed, composer.derived) == (0, 0)
