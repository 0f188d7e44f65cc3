"""NS-ImageNet end to end through run(cfg): the whole 300-distribution protocol on a tiny stand-in."""

import json

import pytest
from test_ns_imagenet import write_layout

from memhead.runner import run


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini_imagenet")
    write_layout(root)  # 100 classes (64/16/20), 10 images each
    return root


def test_300_distributions_run_and_the_second_run_reuses_the_cache(root, tiny_cfg, tmp_path):
    overrides = [
        "model=lp",
        "benchmark=ns_imagenet",
        f"benchmark.root={root}",
        "benchmark.weights=null",
        "benchmark.image_size=32",
        f"benchmark.cache_dir={tmp_path / 'cache'}",
        "checkpoint.enabled=false",
    ]
    first = run(tiny_cfg(*overrides), tmp_path / "first")
    record = json.loads((tmp_path / "first" / "metrics.json").read_text())
    assert len(record["ccm"]["train"]) == 300 and all(len(row) == 300 for row in record["ccm"]["train"])
    assert len(record["ccm"]["test"]) == 300 and len(record["ccm"]["val"]) == 150
    assert len(record["boundaries"]) == 300
    assert record["final_boundary"] == {"train": 299, "val": 149, "test": 299}

    second = run(tiny_cfg(*overrides), tmp_path / "second")
    assert second["ccm"] == first["ccm"]  # same features, same seed
    assert second["timing"]["features_s"] < 0.25 * first["timing"]["features_s"]
