"""Shared test helpers: compose the real config (shrunk) and locate the shared reference files."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from memhead.config import register_configs

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
PAPER_2D = SHARED / "reference-data" / "paper-2d"

register_configs()

# A small 2-D stream: 8 distributions, a few dozen samples, runs in well under a second.
TINY = ["progress=false"]
TINY_2D = ["benchmark.n=80"]


def compose_config(overrides: list[str] | tuple[str, ...] = ()):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.fixture
def tiny_cfg():
    """Compose with the tiny stream plus the test's own overrides."""

    def make(*overrides: str):
        two_d = not any(
            o.startswith("benchmark=") and o not in ("benchmark=modes", "benchmark=moons") for o in overrides
        )
        return compose_config([*overrides, *TINY, *(TINY_2D if two_d else [])])

    return make


def need_shared(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference files not found at {path} (shared/ is expected beside the clone)")
    return path
