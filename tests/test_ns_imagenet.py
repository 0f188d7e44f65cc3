"""NS-ImageNet on a tiny stand-in of the mini-ImageNet cache layout, its feature cache and the extraction CLI.

Every build uses a randomly initialised ResNet-18 (``weights=None``) at ``image_size=32``: the layout,
order, perturbation and cache logic are the same as with the real weights, at a fraction of the cost.
"""

from __future__ import annotations

import json
import pickle
import time
import urllib.error
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import compose_config
from omegaconf import OmegaConf
from PIL import Image

from data import backbone, extract_features, ns_imagenet
from data.perturbations import Perturbation, PerturbationKind, as_perturbation, class_generator, perturb
from data.stream import load_npz, validate_arrays
from memhead.registry import ConfigError

REPO = Path(__file__).resolve().parents[1]
LAYOUT = dict(zip(ns_imagenet.SPLIT_FILES, ns_imagenet.LAYOUT_CLASS_COUNTS))
PER_CLASS = 10
GAUSS = Perturbation(PerturbationKind.gaussian, noise_factor=0.5, sig=0.2)
OCCLUDE = Perturbation(PerturbationKind.occlusion, occlusion_factor=0.25)
PAPER = ns_imagenet.Config().perturbations  # none, gaussian (0.25, 0.1), gaussian (0.5, 0.2)


def write_layout(
    root: Path, per_class: int = PER_CLASS, counts=None, class_dict: bool = False, seed: int = 0
):
    """Write the three cache pickles (a stand-in of a third-party file, hence pickle) with random images."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    images = {}
    for name, n_classes in zip(ns_imagenet.SPLIT_FILES, counts or ns_imagenet.LAYOUT_CLASS_COUNTS):
        data = rng.integers(0, 256, size=(n_classes * per_class, 84, 84, 3), dtype=np.uint8)
        content = {"image_data": data}
        if class_dict:
            content["class_dict"] = {
                f"n{c:03d}": list(range(c * per_class, (c + 1) * per_class)) for c in range(n_classes)
            }
        with open(root / name, "wb") as handle:
            pickle.dump(content, handle)
        images[name] = data
    return images


def make_cfg(root: Path, cache: Path, **changes) -> ns_imagenet.Config:
    return replace(
        ns_imagenet.Config(root=str(root), cache_dir=str(cache), weights=None, image_size=32), **changes
    )


def build(cfg) -> dict[str, np.ndarray]:
    return ns_imagenet.build(cfg, device=torch.device("cpu"), progress=False)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path_factory.mktemp("mini_imagenet")
    return root, write_layout(root)


@pytest.fixture(scope="module")
def small_root(tmp_path_factory) -> Path:
    """Five classes (3/1/1 per file, named by class_dict): for tests that build several times."""
    root = tmp_path_factory.mktemp("small")
    write_layout(root, counts=(3, 1, 1), class_dict=True)
    return root


@pytest.fixture(scope="module")
def built(layout, tmp_path_factory) -> tuple[ns_imagenet.Config, dict[str, np.ndarray]]:
    # The clean images and the paper's small noise: 200 distributions (two perturbations keep it fast).
    cfg = make_cfg(layout[0], tmp_path_factory.mktemp("cache"), perturbations=PAPER[:2])
    return cfg, build(cfg)


@pytest.fixture(scope="module")
def stream(built) -> dict[str, np.ndarray]:
    return built[1]


@pytest.fixture
def counters(monkeypatch) -> dict[str, int]:
    """Count feature extractions, pickle loads and backbone builds made by ns_imagenet."""
    counts = {"extract": 0, "pickle": 0, "backbone": 0}

    def counting(name, module, attribute):
        original = getattr(module, attribute)

        def wrapper(*args, **kwargs):
            counts[name] += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(module, attribute, wrapper)

    counting("extract", backbone, "extract_features")
    counting("pickle", ns_imagenet, "_read_pickle")
    counting("backbone", backbone, "build_backbone")
    return counts


# --- the stream ----------------------------------------------------------------------------------


def test_shapes_dtypes_and_70_10_20_split(stream):
    n_dist = 2 * 100
    # 10 images per class: 7 train, 1 val, 2 test; val keeps the first 100 of 200 distributions.
    assert stream["X_train"].shape == (n_dist * 7, 512)
    assert stream["X_val"].shape == (100 * 1, 512)
    assert stream["X_test"].shape == (n_dist * 2, 512)
    for split in ("train", "val", "test"):
        assert stream[f"X_{split}"].dtype == np.float32
        for key in ("y", "distributions", "domain"):
            assert stream[f"{key}_{split}"].dtype == np.int64
            assert len(stream[f"{key}_{split}"]) == len(stream[f"X_{split}"])
    assert np.isfinite(stream["X_train"]).all()
    assert set(stream) == {
        f"{k}_{s}" for k in ("X", "y", "distributions", "domain") for s in ("train", "val", "test")
    }
    assert ns_imagenet.input_features(ns_imagenet.Config()) == 512


def test_split_bounds_rounding():
    assert ns_imagenet.split_bounds(600) == (420, 480)
    assert ns_imagenet.split_bounds(10) == (7, 8)
    assert ns_imagenet.split_bounds(15) == (10, 12)  # the remainder goes to test (3 images)


def test_distribution_order_labels_and_domains(stream):
    validate_arrays(stream, "ns_imagenet")
    np.testing.assert_array_equal(stream["distributions_train"], np.repeat(np.arange(200), 7))
    np.testing.assert_array_equal(stream["distributions_test"], np.repeat(np.arange(200), 2))
    for split in ("train", "val", "test"):
        dist = stream[f"distributions_{split}"]
        np.testing.assert_array_equal(stream[f"y_{split}"], dist % 100)
        np.testing.assert_array_equal(stream[f"domain_{split}"], dist // 100)


def test_val_keeps_the_first_val_fraction_of_distributions(built, counters):
    cfg, stream = built
    np.testing.assert_array_equal(stream["distributions_val"], np.arange(100))
    quarter = build(replace(cfg, val_fraction=0.25))
    np.testing.assert_array_equal(quarter["distributions_val"], np.arange(50))
    np.testing.assert_array_equal(quarter["X_val"], stream["X_val"][:50])
    assert counters["extract"] == 0  # the split is not part of the cache key


def test_rows_hold_the_features_of_the_right_perturbed_images(stream, layout):
    """Class 70 (6th of the val pickle), perturbation 1, image 8: first test image of distribution 170."""
    root, images = layout
    perturbation = PAPER[1]
    class_images = images["mini-imagenet-cache-val.pkl"][6 * PER_CLASS : 7 * PER_CLASS]
    perturbed = perturb(class_images, perturbation, class_generator(perturbation, 0, 70))
    model = backbone.build_backbone("resnet18", None, device="cpu", init_seed=0)
    with torch.inference_mode():
        expected = backbone.embed(model, torch.from_numpy(perturbed[8:9]).permute(0, 3, 1, 2), 32)[0].numpy()
    row = 170 * 2
    assert stream["distributions_test"][row] == 170 and stream["y_test"][row] == 70
    np.testing.assert_allclose(stream["X_test"][row], expected, rtol=1e-4, atol=1e-4)
    # The same image without noise gives other features: the perturbation was really applied.
    assert not np.allclose(stream["X_test"][70 * 2], expected, atol=1e-3)


def test_samples_per_class_keeps_the_first_images(tmp_path):
    counts = (3, 1, 1)
    write_layout(tmp_path / "full", per_class=20, counts=counts, class_dict=True)
    short = write_layout(tmp_path / "short", per_class=20, counts=counts, class_dict=True)
    # The same data cut to the first 10 images of each class, as its own files.
    for name, data in short.items():
        n_classes = len(data) // 20
        content = {"image_data": data.reshape(n_classes, 20, 84, 84, 3)[:, :10].reshape(-1, 84, 84, 3)}
        with open(tmp_path / "short" / name, "wb") as handle:
            pickle.dump(
                content | {"class_dict": {c: list(range(c * 10, c * 10 + 10)) for c in range(n_classes)}},
                handle,
            )
    perturbations = [Perturbation(), GAUSS, OCCLUDE]
    cut = build(
        make_cfg(tmp_path / "full", tmp_path / "c1", perturbations=perturbations, samples_per_class=10)
    )
    small = build(make_cfg(tmp_path / "short", tmp_path / "c2", perturbations=perturbations))
    assert cut["X_train"].shape == (3 * 5 * 7, 512)
    for key in cut:
        np.testing.assert_allclose(cut[key], small[key], rtol=1e-5, atol=1e-5, err_msg=key)


def test_class_dict_orders_classes_by_first_index(tmp_path):
    images = write_layout(tmp_path / "a", per_class=10, counts=(3, 1, 1), class_dict=True)
    (tmp_path / "b").mkdir()
    for name, data in images.items():
        n_classes = len(data) // 10
        reversed_dict = {f"n{c}": list(range(c * 10, c * 10 + 10)) for c in reversed(range(n_classes))}
        with open(tmp_path / "b" / name, "wb") as handle:
            pickle.dump({"image_data": data, "class_dict": reversed_dict}, handle)
    first = build(make_cfg(tmp_path / "a", tmp_path / "c1", perturbations=[Perturbation()]))
    second = build(make_cfg(tmp_path / "b", tmp_path / "c2", perturbations=[Perturbation()]))
    np.testing.assert_allclose(first["X_train"], second["X_train"], atol=1e-6)


# --- perturbations -------------------------------------------------------------------------------


def test_gaussian_noise_statistics_on_mid_grey():
    grey = np.full((40, 84, 84, 3), 128, dtype=np.uint8)
    noisy = perturb(grey, GAUSS, np.random.default_rng(0))
    noise = noisy - 128 / 255
    assert noisy.dtype == np.float32 and noisy.shape == grey.shape
    assert abs(noise.mean()) < 1e-3
    assert noise.std() == pytest.approx(0.5 * 0.2, rel=0.01)


def test_gaussian_noise_is_clipped_to_unit_range():
    white = np.full((4, 84, 84, 3), 255, dtype=np.uint8)
    noisy = perturb(white, GAUSS, np.random.default_rng(0))
    assert noisy.max() == 1.0 and noisy.min() >= 0.0
    assert 0.4 < (noisy == 1.0).mean() < 0.6  # half of the noise is positive and clipped away
    black = perturb(np.zeros_like(white), GAUSS, np.random.default_rng(0))
    assert black.min() == 0.0 and black.max() <= 1.0


def test_occlusion_sets_a_square_of_the_configured_side_to_one():
    dark = np.zeros((30, 84, 84, 3), dtype=np.uint8)
    occluded = perturb(dark, OCCLUDE, np.random.default_rng(0))
    side = int(0.25 * 84)
    corners = set()
    for image in occluded:
        rows, cols = np.nonzero(image[..., 0] == 1.0)
        assert len(rows) == side * side and (image == 1.0).sum() == side * side * 3
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
        corners.add((rows.min(), cols.min()))
    assert len(corners) > 20  # the position is random
    untouched = perturb(dark, Perturbation(), np.random.default_rng(0))
    assert not untouched.any()


def test_noise_is_seeded_by_data_seed_and_parameters():
    images = np.full((3, 84, 84, 3), 100, dtype=np.uint8)

    def noisy(p, seed, label):
        return perturb(images, p, class_generator(p, seed, label))

    np.testing.assert_array_equal(noisy(GAUSS, 0, 5), noisy(GAUSS, 0, 5))
    assert not np.array_equal(noisy(GAUSS, 0, 5), noisy(GAUSS, 1, 5))
    assert not np.array_equal(noisy(GAUSS, 0, 5), noisy(GAUSS, 0, 6))
    assert not np.array_equal(noisy(GAUSS, 0, 5), noisy(replace(GAUSS, sig=0.3), 0, 5))
    # Fields that do not apply to the kind do not change the images.
    np.testing.assert_array_equal(noisy(GAUSS, 0, 5), noisy(replace(GAUSS, occlusion_factor=0.9), 0, 5))


# --- cache ---------------------------------------------------------------------------------------


def test_second_build_reuses_the_cache_without_data_or_backbone(small_root, tmp_path, counters):
    cfg = make_cfg(small_root, tmp_path)
    start = time.perf_counter()
    first = build(cfg)
    first_s = time.perf_counter() - start
    assert counters == {"extract": 3, "pickle": 3, "backbone": 1}
    assert len(list(tmp_path.glob("*.npy"))) == 3 and len(list(tmp_path.glob("*.json"))) == 3
    assert not list(tmp_path.glob("*.tmp"))
    start = time.perf_counter()
    second = build(cfg)
    second_s = time.perf_counter() - start
    assert counters == {"extract": 3, "pickle": 3, "backbone": 1}
    assert second_s < first_s
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])


def test_cache_entries_are_invalidated_per_changed_option(small_root, tmp_path, counters):
    none_only = make_cfg(small_root, tmp_path, perturbations=[Perturbation()])
    build(none_only)
    assert counters["extract"] == 1
    build(replace(none_only, image_size=36))
    assert counters["extract"] == 2
    build(replace(none_only, perturbations=[Perturbation(), GAUSS]))  # only the new perturbation
    assert counters["extract"] == 3
    build(replace(none_only, perturbations=[Perturbation(), replace(GAUSS, sig=0.3)]))
    assert counters["extract"] == 4
    build(replace(none_only, perturbations=[GAUSS, Perturbation()]))  # reordering reuses both
    assert counters["extract"] == 4
    build(replace(none_only, data_seed=1))
    assert counters["extract"] == 5


def test_default_cache_folder_is_under_root(tmp_path):
    write_layout(tmp_path / "root", per_class=10, counts=(2, 1, 1), class_dict=True)
    cfg = make_cfg(tmp_path / "root", tmp_path, perturbations=[Perturbation()], cache_dir=None)
    build(cfg)
    assert len(list((tmp_path / "root" / "features_cache").glob("resnet18-*.npy"))) == 1


def test_a_cache_record_with_another_key_is_an_error_naming_it(small_root, tmp_path):
    cfg = make_cfg(small_root, tmp_path, perturbations=[Perturbation()])
    build(cfg)
    (record_path,) = tmp_path.glob("*.json")
    record = json.loads(record_path.read_text())
    record["key"]["image_size"] = 99
    record_path.write_text(json.dumps(record))
    with pytest.raises(ConfigError, match=str(record_path.name)):
        build(cfg)


# --- errors --------------------------------------------------------------------------------------


def test_missing_root_is_reported_by_check():
    message = (
        "benchmark.root is required for ns_imagenet: a folder with mini-imagenet-cache-{train,val,test}.pkl"
    )
    with pytest.raises(ConfigError) as err:
        ns_imagenet.check(ns_imagenet.Config())
    assert str(err.value) == message
    composed = compose_config(["benchmark=ns_imagenet"])
    with pytest.raises(ConfigError, match="benchmark.root is required"):
        ns_imagenet.check(composed.benchmark)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"image_size": 16}, "benchmark.image_size"),
        ({"batch_size": 0}, "benchmark.batch_size"),
        ({"val_fraction": 0.0}, "benchmark.val_fraction"),
        ({"samples_per_class": 5}, "benchmark.samples_per_class"),
        ({"data_seed": -1}, "benchmark.data_seed"),
        ({"weights": "IMAGENET9K"}, "benchmark.weights='IMAGENET9K' is unknown"),
        ({"perturbations": []}, "benchmark.perturbations must list"),
        ({"perturbations": [{"kind": "blur"}]}, r"benchmark.perturbations\[0\].kind='blur'"),
        ({"perturbations": [{}, {"kind": "gaussian", "sig": -1}]}, r"benchmark.perturbations\[1\].sig"),
        ({"perturbations": [{"kind": "occlusion", "occlusion_factor": 1.5}]}, "occlusion_factor"),
    ],
)
def test_check_rejects_invalid_options(changes, match):
    cfg = replace(ns_imagenet.Config(root="/data"), **changes)
    with pytest.raises(ConfigError, match=match):
        ns_imagenet.check(cfg)


def test_composed_preset_passes_check_and_reads_enum_kinds():
    cfg = compose_config(["experiment=ns_imagenet_mh", "benchmark.root=/data"])
    ns_imagenet.check(cfg.benchmark)
    kinds = [as_perturbation(p, "p").kind for p in cfg.benchmark.perturbations]
    assert kinds == [PerturbationKind.none, PerturbationKind.gaussian, PerturbationKind.gaussian]
    assert cfg.model.key_mem_units == 100 and cfg.model.distance.name == "cosine"
    assert cfg.optimizer.lr == pytest.approx(1e-4)


def test_benchmark_yaml_lists_every_field_with_its_default():
    text = OmegaConf.load(REPO / "conf" / "benchmark" / "ns_imagenet.yaml")
    assert "ns_imagenet" in text.defaults[0] and text.defaults[-1] == "_self_"  # the schema, then the values
    values = OmegaConf.to_container(text)
    values.pop("defaults")
    defaults = asdict(ns_imagenet.Config())
    assert set(values) == set(defaults)
    merged = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ns_imagenet.Config), values))
    assert merged == ns_imagenet.Config()


def test_missing_folder_and_files(tmp_path):
    with pytest.raises(ConfigError, match="is not a folder"):
        build(make_cfg(tmp_path / "nowhere", tmp_path))
    (tmp_path / "mini-imagenet-cache-train.pkl").write_bytes(b"")
    with pytest.raises(ConfigError) as err:
        build(make_cfg(tmp_path, tmp_path))
    assert "lacks mini-imagenet-cache-val.pkl, mini-imagenet-cache-test.pkl" in str(err.value)
    assert "expected mini-imagenet-cache-train.pkl" in str(err.value)


@pytest.mark.parametrize(
    "content, match",
    [
        ({"images": np.zeros((64, 84, 84, 3), np.uint8)}, "expected a pickled dict with 'image_data'"),
        ({"image_data": np.zeros((64, 84, 84, 3), np.float32)}, "must be a uint8 numpy array"),
        ({"image_data": np.zeros((64, 84, 84), np.uint8)}, r"must have shape \(N, H, H, 3\)"),
        ({"image_data": np.zeros((650, 84, 84, 3), np.uint8)}, "do not split evenly into the 64 classes"),
        ({"image_data": np.zeros((64 * 8, 84, 84, 3), np.uint8)}, "has 8 images; at least 10"),
        ({"image_data": np.zeros((640, 84, 84, 3), np.uint8), "class_dict": {"a": [0, 700]}}, "outside"),
    ],
)
def test_wrong_layout_names_the_file(layout, tmp_path, content, match):
    for name in ns_imagenet.SPLIT_FILES:
        (tmp_path / name).symlink_to(layout[0] / name)
    train = tmp_path / "mini-imagenet-cache-train.pkl"
    train.unlink()
    with open(train, "wb") as handle:
        pickle.dump(content, handle)
    with pytest.raises(ConfigError, match=match) as err:
        build(make_cfg(tmp_path, tmp_path / "cache", perturbations=[Perturbation()]))
    assert "mini-imagenet-cache-train.pkl" in str(err.value)


def test_samples_per_class_larger_than_a_class(layout, tmp_path):
    with pytest.raises(ConfigError, match="benchmark.samples_per_class=11 exceeds the 10 images"):
        build(make_cfg(layout[0], tmp_path, samples_per_class=11))


def test_named_weights_offline_error_says_where_to_put_the_file(layout, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(ConfigError) as err:
        build(
            make_cfg(layout[0], tmp_path / "cache", weights="IMAGENET1K_V1", perturbations=[Perturbation()])
        )
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message
    assert "benchmark.weights=/path/to/file.pth" in message


def test_named_weights_load_from_torch_hub_checkpoint_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    source = backbone.build_backbone("resnet18", None, device="cpu", init_seed=7)
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.save(source.state_dict(), checkpoints / "resnet18-f37072fd.pth")  # no fc: it is optional
    named = backbone.build_backbone("resnet18", "DEFAULT", device="cpu")
    torch.save(source.state_dict(), tmp_path / "local.pth")
    local = backbone.build_backbone("resnet18", str(tmp_path / "local.pth"), device="cpu")
    for model in (named, local):
        for (key, expected), actual in zip(source.state_dict().items(), model.state_dict().values()):
            torch.testing.assert_close(actual, expected, msg=key)
    assert backbone.weights_identity("DEFAULT") == "IMAGENET1K_V1"
    assert backbone.weights_identity(str(tmp_path / "local.pth")).startswith("sha256:")


def test_weight_files_that_cannot_be_used(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        backbone.build_backbone("resnet18", str(tmp_path / "missing.pth"), device="cpu")
    torch.save({"layer9.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ConfigError, match="not a ResNet-18 state dict"):
        backbone.build_backbone("resnet18", str(tmp_path / "other.pth"), device="cpu")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot read a state dict"):
        backbone.build_backbone("resnet18", str(tmp_path / "junk.pth"), device="cpu")


# --- extract_features CLI ------------------------------------------------------------------------


def write_image_folder(root: Path, classes: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in classes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)  # not square: resized
            Image.fromarray(pixels).save(root / name / f"img{i:02d}.png")


CLI_ARGS = [
    "--weights",
    "none",
    "--image-size",
    "32",
    "--device",
    "cpu",
    "--batch-size",
    "8",
    "--no-progress",
]


def test_extract_features_cli_splits_one_folder_70_10_20(tmp_path, capsys):
    write_image_folder(tmp_path / "images", {"cat": 10, "dog": 12, "owl": 10})
    out = tmp_path / "stream.npz"
    assert extract_features.main(["--images", str(tmp_path / "images"), "--out", str(out), *CLI_ARGS]) == 0
    assert "wrote" in capsys.readouterr().out
    arrays = load_npz(out)
    validate_arrays(arrays, str(out))
    # 12 images: 8 train, 1 val, 3 test.
    np.testing.assert_array_equal(arrays["y_train"], np.repeat([0, 1, 2], [7, 8, 7]))
    np.testing.assert_array_equal(arrays["y_val"], [0, 1, 2])
    np.testing.assert_array_equal(arrays["y_test"], np.repeat([0, 1, 2], [2, 3, 2]))
    for split in ("train", "val", "test"):
        assert arrays[f"X_{split}"].shape == (len(arrays[f"y_{split}"]), 512)
        np.testing.assert_array_equal(arrays[f"distributions_{split}"], arrays[f"y_{split}"])
        assert not arrays[f"domain_{split}"].any()


def test_extract_features_cli_with_split_folders(tmp_path):
    for split, seed in (("train", 0), ("val", 1), ("test", 2)):
        write_image_folder(tmp_path / "images" / split, {"a": 3, "b": 2}, seed=seed)
    out = tmp_path / "split.npz"
    assert extract_features.main(["--images", str(tmp_path / "images"), "--out", str(out), *CLI_ARGS]) == 0
    arrays = load_npz(out)
    validate_arrays(arrays, str(out))
    np.testing.assert_array_equal(arrays["y_val"], [0, 0, 0, 1, 1])
    assert arrays["X_test"].shape == (5, 512)


def test_extract_features_cli_errors(tmp_path, capsys):
    (tmp_path / "images" / "train").mkdir(parents=True)
    assert (
        extract_features.main(
            ["--images", str(tmp_path / "images"), "--out", str(tmp_path / "x.npz"), *CLI_ARGS]
        )
        == 2
    )
    assert "lacks val, test/" in capsys.readouterr().err
    write_image_folder(tmp_path / "few", {"a": 4})
    assert (
        extract_features.main(
            ["--images", str(tmp_path / "few"), "--out", str(tmp_path / "x.npz"), *CLI_ARGS]
        )
        == 2
    )
    assert "has 4 images; at least 10" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


class _WritesAFile:
    """A pickle payload that would create a file when unpickled by pickle.load."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_cache_pickles_are_loaded_without_running_code(tmp_path):
    import pickle

    from data.ns_imagenet import _read_pickle
    from memhead.registry import ConfigError

    target = tmp_path / "pwned"
    evil = tmp_path / "mini-imagenet-cache-train.pkl"
    evil.write_bytes(pickle.dumps({"image_data": _WritesAFile(target)}))
    with pytest.raises(ConfigError, match="refused global io.open"):
        _read_pickle(evil)
    assert not target.exists()
    # The format's own content still loads: arrays in a dict of lists.
    good = tmp_path / "good.pkl"
    images = np.arange(2 * 84 * 84 * 3, dtype=np.uint8).reshape(2, 84, 84, 3)
    good.write_bytes(pickle.dumps({"image_data": images, "class_dict": {"n01": [0, 1]}}))
    loaded = _read_pickle(good)
    assert np.array_equal(loaded["image_data"], images) and loaded["class_dict"] == {"n01": [0, 1]}
