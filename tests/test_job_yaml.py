"""The population launcher's ``.hydra/`` YAML: the text of ``OmegaConf.to_yaml``, through either emitter."""

import random

import pytest
import yaml
from conftest import REPO
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf

from hydra_plugins.memhead_population import job_yaml
from memhead.config import register_sweeps

ALPHABET = list("abcXYZ019   _-.:#'\"{}[],&*!|>%@`?\\/=+~\n\t") + ["é", "中", "\u2028", "\x85", "\x00", "😀"]


def random_value(rng: random.Random, depth: int = 0):
    def text() -> str:
        chars = ALPHABET if rng.random() < 0.3 else ALPHABET[:-8]  # mostly ASCII, as configs are
        length = rng.choice([0, 1, 2, 5, 20, 79, 81, 120, 122, 123, 124, 127, 128, 129, 300])
        return "".join(rng.choice(chars) for _ in range(length))

    r = rng.random()
    if r < 0.4 or depth == 3:
        return text()
    if r < 0.5:
        return rng.choice(
            [1, -3, 0.5, 1e-9, float("inf"), True, None, 10**20, "1", "true", "1e3", "${a}", "null"]
        )
    if r < 0.7:
        return [random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    return {text(): random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))}


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML without libyaml: OmegaConf.to_yaml itself")
def test_random_configs_read_the_same_through_either_emitter():
    rng = random.Random(0)
    through_c = 0
    for _ in range(3000):
        cfg = OmegaConf.create({"a": random_value(rng), "b": random_value(rng)})
        assert job_yaml.to_yaml(cfg) == OmegaConf.to_yaml(cfg)
        through_c += job_yaml._c_safe(OmegaConf.to_container(cfg, enum_to_str=True))
    assert 500 < through_c < 2500  # both paths were taken


@pytest.mark.skipif(not yaml.__with_libyaml__, reason="PyYAML without libyaml: OmegaConf.to_yaml itself")
@pytest.mark.parametrize("sweep", ["mh_modes", "competitors_ns_imagenet"])
def test_a_jobs_files_are_hydras_and_go_through_the_c_emitter(sweep):
    register_sweeps()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        cfg = loader.load_configuration("config", [f"sweep={sweep}"], run_mode=RunMode.MULTIRUN)
    for node in (OmegaConf.masked_copy(cfg, "hydra"), cfg.hydra.overrides.task, cfg):
        assert job_yaml.to_yaml(node) == OmegaConf.to_yaml(node)
        assert job_yaml._c_safe(OmegaConf.to_container(node, enum_to_str=True))  # the fast path
