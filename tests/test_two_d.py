"""The 2-D MODES/MOONS generator against the paper's files, its stream orders, and its two CLIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from data.two_d import (
    MODES_DEFAULTS,
    MOONS_DEFAULTS,
    ORDERS,
    apply_order,
    generate_modes,
    generate_moons,
    make_2d,
)
from memhead.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]
PAPER_2D = Path(__file__).resolve().parents[2] / "shared" / "reference-data" / "paper-2d"
FILE_STEMS = {"modes": "bi-modals", "moons": "bi-moons"}
SPLITS = ("train", "val", "test")
KEYS = [f"{name}_{split}" for split in SPLITS for name in ("X", "y", "domain", "distributions")]


@pytest.fixture(scope="module")
def base_splits() -> dict[str, dict[str, np.ndarray]]:
    return {"modes": generate_modes(), "moons": generate_moons()}


def _points_by_distribution(stream, split: str) -> dict[int, np.ndarray]:
    """Each distribution's points, sorted lexicographically so sets compare as arrays."""
    x, distributions = stream[f"X_{split}"], stream[f"distributions_{split}"]
    grouped = {}
    for distribution in np.unique(distributions):
        points = x[distributions == distribution]
        grouped[int(distribution)] = points[np.lexsort((points[:, 1], points[:, 0]))]
    return grouped


@pytest.mark.parametrize("kind", ["modes", "moons"])
@pytest.mark.parametrize("order", ORDERS)
def test_generator_reproduces_the_paper_files(base_splits, kind, order):
    reference = np.load(PAPER_2D / f"{FILE_STEMS[kind]}_{order}.npz")
    stream = apply_order(base_splits[kind], order)
    assert list(stream) == reference.files == KEYS
    for key in KEYS:
        assert stream[key].dtype == reference[key].dtype, key
        assert stream[key].shape == reference[key].shape, key
        if not key.startswith("X_"):
            np.testing.assert_array_equal(stream[key], reference[key], err_msg=key)
    for split in SPLITS:
        if order in ("IID", "CDID"):
            np.testing.assert_allclose(stream[f"X_{split}"], reference[f"X_{split}"], rtol=0, atol=1e-9)
        else:  # the published within-class order came from an unstable sort: compare sets
            ours, theirs = _points_by_distribution(stream, split), _points_by_distribution(reference, split)
            assert ours.keys() == theirs.keys()
            for distribution in ours:
                np.testing.assert_allclose(ours[distribution], theirs[distribution], rtol=0, atol=1e-9)


def test_seeded_random_state_matches_the_global_seed_permutation():
    state = np.random.get_state()
    try:
        np.random.seed(1234)
        expected = np.random.permutation(1000)
    finally:
        np.random.set_state(state)
    np.testing.assert_array_equal(np.random.RandomState(1234).permutation(1000), expected)


def test_generation_leaves_the_global_random_state_alone():
    before = np.random.get_state()[1].copy()
    make_2d("modes", "IID", n=40)
    make_2d("moons", "CDID", n=40)
    np.testing.assert_array_equal(np.random.get_state()[1], before)


def test_class_sizes_and_split_sizes_follow_the_ratios():
    splits = generate_modes(n=50)  # 2n = 100: classes 20, 40, 10, 30
    labels = np.concatenate([splits[f"y_{split}"] for split in SPLITS])
    np.testing.assert_array_equal(np.bincount(labels), [20, 40, 10, 30])
    domains = np.concatenate([splits[f"domain_{split}"] for split in SPLITS])
    for label, size in enumerate([20, 40, 10, 30]):  # nc // 2 from domain 0, the rest from domain 1
        per_domain = np.bincount(domains[labels == label], minlength=2)
        np.testing.assert_array_equal(per_domain, [size // 2, size - size // 2])
    assert [len(splits[f"y_{split}"]) for split in SPLITS] == [50, 25, 25]
    all_points = np.concatenate([splits[f"X_{split}"] for split in SPLITS])
    np.testing.assert_allclose(all_points.min(axis=0), [-1, -1])
    np.testing.assert_allclose(all_points.max(axis=0), [1, 1])


def test_moons_last_class_takes_the_remainder():
    # 2n = 20: int(20 * 0.35) = 7, int(20 * 0.15) = 3, int(20 * 0.15) = 3, remainder 7 (int would give 6).
    splits = generate_moons(n=10, ratios=[0.35, 0.15, 0.15, 0.35])
    labels = np.concatenate([splits[f"y_{split}"] for split in SPLITS])
    np.testing.assert_array_equal(np.bincount(labels), [7, 3, 3, 7])


@pytest.mark.parametrize("kind", ["modes", "moons"])
@pytest.mark.parametrize("order", ORDERS)
def test_order_invariants(base_splits, kind, order):
    base = base_splits[kind]
    stream = apply_order(base, order)
    expected_count = {"IID": 1, "CI": 4, "CDI": 8, "CDID": 8}[order]
    for split in SPLITS:
        x, y = stream[f"X_{split}"], stream[f"y_{split}"]
        domain, distributions = stream[f"domain_{split}"], stream[f"distributions_{split}"]
        # Distributions are consecutive integers and never step back.
        assert distributions[0] == 0 and set(np.diff(distributions)) <= {0, 1}
        count = len(np.unique(distributions))
        if split == "val":
            assert count == max(expected_count // 2, 1)
            kept = {  # first half of the rows (IID), classes 0-1 (CI), domain 0 (CDI, CDID)
                "IID": len(base["y_val"]) // 2,
                "CI": np.sum(base["y_val"] < 2),
                "CDI": np.sum(base["domain_val"] == 0),
                "CDID": np.sum(base["domain_val"] == 0),
            }[order]
            assert len(y) == kept
        else:
            assert count == expected_count
            assert len(y) == len(base[f"y_{split}"])
        if order == "IID":
            assert not domain.any()
            permutation = np.random.RandomState(1234).permutation(len(base[f"y_{split}"]))
            np.testing.assert_array_equal(y, base[f"y_{split}"][permutation][: len(y)])
        if order == "CI":
            assert not domain.any()
            assert np.all(np.diff(y) >= 0)
            np.testing.assert_array_equal(distributions, y)
        if order in ("CDI", "CDID"):
            np.testing.assert_array_equal(distributions, domain * 4 + y)
        if order == "CDID":
            for distribution in np.unique(distributions):
                assert np.all(np.diff(x[distributions == distribution, 0]) >= 0)
        if order == "CDI":  # stable sort: inside a distribution the base (shuffled) order is kept
            base_rows = [tuple(row) for row in base[f"X_{split}"]]
            position = {row: index for index, row in enumerate(base_rows)}
            for distribution in np.unique(distributions):
                rows = [position[tuple(row)] for row in x[distributions == distribution]]
                assert rows == sorted(rows)


def test_val_keeps_the_first_half_of_the_distributions():
    base = generate_modes()
    for order, kept_classes in (("CI", [0, 1]), ("CDI", [0, 1, 2, 3])):
        stream = apply_order(base, order)
        candidates = base["y_val"][base["domain_val"] == 0] if order == "CDI" else base["y_val"]
        val_full_counts = np.bincount(candidates)
        np.testing.assert_array_equal(np.unique(stream["y_val"]), kept_classes)
        np.testing.assert_array_equal(np.bincount(stream["y_val"]), val_full_counts[kept_classes])
    assert not apply_order(base, "CDID")["domain_val"].any()


def test_orders_are_deterministic_and_do_not_touch_their_input(base_splits):
    base = base_splits["moons"]
    snapshot = {key: value.copy() for key, value in base.items()}
    for order in ORDERS:
        first, second = apply_order(base, order), apply_order(base, order)
        for key in KEYS:
            np.testing.assert_array_equal(first[key], second[key])
    for key, value in snapshot.items():
        np.testing.assert_array_equal(base[key], value)


def test_stable_sort_keeps_ties_in_input_order():
    # Hand-made splits: two rows of class 1 with the same first coordinate in a known order.
    x = np.array([[0.5, 0.0], [0.1, 1.0], [0.5, 2.0], [0.3, 3.0]])
    split = {"X": x, "y": np.array([1, 0, 1, 0]), "domain": np.array([0, 0, 0, 0])}
    splits = {f"{name}_{part}": value for part in SPLITS for name, value in split.items()}
    stream = apply_order(splits, "CDID")
    np.testing.assert_array_equal(stream["X_train"][:, 1], [1.0, 3.0, 0.0, 2.0])
    np.testing.assert_array_equal(stream["distributions_train"], [0, 0, 1, 1])
    assert len(stream["y_val"]) == 2  # count 2 -> keeps distribution 0 only


def test_make_2d_accepts_omegaconf_lists_and_matches_plain_lists():
    params = {
        "n": 20,
        "ratios": [0.5, 0.5],
        "centers": [[[0, 0], [1, 1]], [[0, 1], [1, 0]]],
        "stds": [[0.1, 0.1], [0.1, 0.1]],
        "seeds": [[1, 2], [3, 4]],
    }
    from_lists = make_2d("modes", "CDI", **params)
    from_config = make_2d("modes", "CDI", **OmegaConf.create(params))
    for key in KEYS:
        np.testing.assert_array_equal(from_lists[key], from_config[key])
    assert np.unique(from_lists["distributions_train"]).tolist() == [0, 1, 2, 3]


def test_defaults_are_the_function_defaults():
    default = make_2d("moons", "IID")
    explicit = make_2d("moons", "IID", **MOONS_DEFAULTS)
    np.testing.assert_array_equal(default["X_train"], explicit["X_train"])
    assert set(MODES_DEFAULTS) == {"n", "ratios", "centers", "stds", "seeds", "shuffle_seed"}


@pytest.mark.parametrize(
    ("kind", "params", "message"),
    [
        ("modes", {"ratios": [0.2, 0.4, 0.1, 0.2]}, "benchmark.ratios must sum to 1 (got 0.9)"),
        ("modes", {"ratios": [0.5, 0.5]}, "benchmark.centers must have 2 domains x 2 classes x 2 coord"),
        ("modes", {"centers": [[[0, 0]] * 4]}, "benchmark.centers must have 2 domains x 4 classes x 2 coord"),
        ("modes", {"stds": [[0.1, 0.1, 0.1, 0.0], [0.1] * 4]}, "benchmark.stds must all be > 0"),
        ("modes", {"seeds": [[1, 2, 3, 4], [1, 2, 3, 4.5]]}, "benchmark.seeds must be an integer"),
        ("modes", {"seeds": [[1, 2, 3, 4], [1, 2, 3, -4]]}, "benchmark.seeds must be >= 0"),
        ("modes", {"n": 7}, "benchmark.n must be >= 8"),
        ("modes", {"n": 10.0}, "benchmark.n must be an integer"),
        ("moons", {"n": 8, "ratios": [0.45, 0.04, 0.45, 0.06]}, "benchmark.ratios give class 1 0 of 2n=16"),
        ("modes", {"ratios": [1.2, -0.2]}, "benchmark.ratios must all be > 0"),
        ("moons", {"ratios": [0.5, 0.3, 0.2]}, "benchmark.ratios must be a list of an even number of class"),
        ("moons", {"offsets": [[0, 0], [1, 1]]}, "benchmark.offsets must have 2 domains x 2 class pairs x 2"),
        ("moons", {"noise": [[0.1, -0.1], [0.1, 0.1]]}, "benchmark.noise must all be >= 0"),
        ("moons", {"shuffle_seed": 2**32}, "benchmark.shuffle_seed must be <= 4294967295"),
        ("moons", {"std": 1}, "benchmark.std is not a parameter of moons"),
    ],
)
def test_bad_parameters_raise_one_line_config_errors(kind, params, message):
    with pytest.raises(ConfigError) as error:
        make_2d(kind, "IID", **params)
    assert str(error.value).startswith(message)
    assert "\n" not in str(error.value)


def test_bad_kind_and_order_raise_config_errors():
    allowed_orders = "allowed: IID, CI, CDI, CDID"
    with pytest.raises(ConfigError, match=rf"^benchmark.order='XYZ' is not allowed; {allowed_orders}$"):
        make_2d("modes", "XYZ")
    with pytest.raises(ConfigError, match=r"^benchmark.kind='spirals' is not allowed; allowed: modes, moons"):
        make_2d("spirals", "IID")
    with pytest.raises(ValueError, match="splits lack X_val"):
        apply_order({"X_train": np.zeros((1, 2)), "y_train": [0], "domain_train": [0]}, "CI")


def _run_module(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


def test_generate_cli_writes_the_paper_files(tmp_path):
    result = _run_module("data.generate", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    written = sorted(path.name for path in tmp_path.iterdir())
    assert written == sorted(f"{stem}_{order}.npz" for stem in FILE_STEMS.values() for order in ORDERS)
    assert result.stdout.count("wrote ") == 8
    for name in ("bi-modals_IID.npz", "bi-moons_CDID.npz"):
        ours, reference = np.load(tmp_path / name), np.load(PAPER_2D / name)
        assert ours.files == reference.files
        np.testing.assert_allclose(ours["X_train"], reference["X_train"], rtol=0, atol=1e-9)
        np.testing.assert_array_equal(ours["distributions_test"], reference["distributions_test"])


def test_generate_cli_options_and_errors(tmp_path):
    result = _run_module(
        "data.generate",
        "--out",
        str(tmp_path),
        "--n",
        "40",
        "--kinds",
        "moons",
        "--orders",
        "CI",
        "--shuffle-seed",
        "7",
    )
    assert result.returncode == 0, result.stderr
    assert [path.name for path in tmp_path.iterdir()] == ["bi-moons_CI.npz"]
    expected = make_2d("moons", "CI", n=40, shuffle_seed=7)
    written = np.load(tmp_path / "bi-moons_CI.npz")
    for key in KEYS:
        np.testing.assert_array_equal(written[key], expected[key])

    result = _run_module("data.generate", "--out", str(tmp_path), "--n", "3")
    assert result.returncode == 2
    assert "--n must be >= 8 (got 3)" in result.stderr


def test_inspect_cli_describes_validates_and_plots(tmp_path):
    import matplotlib.image

    path = tmp_path / "bi-modals_CDID.npz"
    np.savez(path, **make_2d("modes", "CDID", n=100))
    plots = tmp_path / "plots"
    result = _run_module("data.inspect", str(path), "--out", str(plots))
    assert result.returncode == 0, result.stderr
    assert "valid benchmark file" in result.stdout
    assert "[train] 100 samples" in result.stdout
    assert "classes (4): 0: 20, 1: 40, 2: 10, 3: 30" in result.stdout
    assert "distributions (8, 8 contiguous blocks" in result.stdout
    for split in SPLITS:
        image = matplotlib.image.imread(plots / f"bi-modals_CDID_{split}.png")
        assert image.shape[0] > 100 and image.shape[1] > 300
        # Non-blank: many distinct colours, not a flat page.
        assert len(np.unique(image.reshape(-1, image.shape[-1]), axis=0)) > 20


def test_inspect_cli_rejects_a_broken_file(tmp_path):
    stream = make_2d("moons", "CI", n=20)
    stream["y_val"] = stream["y_val"][:-1]
    path = tmp_path / "broken.npz"
    np.savez(path, **stream)
    result = _run_module("data.inspect", str(path))
    assert result.returncode == 1
    # The rule of run.py's validator (data.stream.validate_arrays), which data.inspect shares.
    assert "y_val has shape (4,), expected (5,)" in result.stderr
    assert not list(tmp_path.glob("*.png"))
