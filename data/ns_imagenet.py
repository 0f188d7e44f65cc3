"""NS-ImageNet: 100 mini-ImageNet classes seen under several perturbations, on a frozen ResNet-18.

Following Mai et al. (2022), "Online continual learning in image classification: an empirical survey",
as used by the Memory Head paper (Tiezzi et al., CoLLAs 2024). The stream:

* images: the mini-ImageNet "cache" pickles in ``root`` (``mini-imagenet-cache-{train,val,test}.pkl``,
  each a dict with ``image_data`` ``uint8 (N, 84, 84, 3)`` and optionally ``class_dict``
  ``{name: [indices]}``), stacked train, val, test; classes keep their file order (by first index
  when ``class_dict`` is present, else an even split of each file into 64, 16 and 20 classes);
* each perturbation (see :mod:`data.perturbations`) yields one copy of every image, embedded by the
  backbone (see :mod:`data.backbone`) into 512-d features;
* per class, images ``[0, 7n//10)`` go to train, ``[7n//10, 8n//10)`` to val and the rest to test
  (for 600 images: 420 / 60 / 120; rounding leaves the remainder to test);
* distribution ``= perturbation_index * n_classes + class``, streamed perturbation-major, then class,
  then image; ``domain`` is the perturbation index; val keeps the distributions below
  ``floor(val_fraction * n_distributions)`` (the first 150 of 300 by default).

Features are cached per perturbation in ``cache_dir`` (default ``<root>/features_cache``), keyed by
backbone, weights, image size, the perturbation's parameters, ``data_seed``, ``samples_per_class`` and
a fingerprint of the pickles; a warm cache is served without unpickling the images or building the
backbone. Features are computed on the run's device, so a cache filled on a GPU holds GPU numerics.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data import backbone as backbone_lib
from data import feature_cache
from data.perturbations import (
    Perturbation,
    as_perturbation,
    class_generator,
    describe,
    paper_perturbations,
    perturb,
)
from memhead.registry import ConfigError

SPLIT_FILES = ("mini-imagenet-cache-train.pkl", "mini-imagenet-cache-val.pkl", "mini-imagenet-cache-test.pkl")
LAYOUT_CLASS_COUNTS = (64, 16, 20)  # classes per file in the standard layout (used without class_dict)
MIN_IMAGES_PER_CLASS = 10  # the least that leaves every class at least one val and one test image
BACKBONE = "resnet18"
ROOT_HELP = "a folder with mini-imagenet-cache-{train,val,test}.pkl"


@dataclass
class Config:
    name: str = "ns_imagenet"
    root: str | None = None
    perturbations: list[Perturbation] = field(default_factory=paper_perturbations)
    weights: str | None = "IMAGENET1K_V1"
    image_size: int = 224
    cache_dir: str | None = None
    batch_size: int = 64
    val_fraction: float = 0.5
    samples_per_class: int | None = None
    data_seed: int = 0


def input_features(cfg: Any) -> int:
    """Width of the feature vectors the model receives."""
    return backbone_lib.FEATURE_DIM


def _option(cfg: Any, name: str) -> Any:
    if isinstance(cfg, Mapping):
        return cfg.get(name, getattr(Config, name, None))
    return getattr(cfg, name)


def _perturbations(cfg: Any) -> list[Perturbation]:
    items = _option(cfg, "perturbations")
    if items is None or len(items) == 0:
        raise ConfigError("benchmark.perturbations must list at least one perturbation")
    return [as_perturbation(item, f"benchmark.perturbations[{i}]") for i, item in enumerate(items)]


def _integer(cfg: Any, name: str, minimum: int, optional: bool = False) -> int | None:
    value = _option(cfg, name)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"benchmark.{name}={value!r} must be an integer >= {minimum}")
    return value


def check(cfg: Any) -> None:
    """Validate the options that need no data.

    Raises:
        ConfigError: the first invalid option, by name.
    """
    if not _option(cfg, "root"):
        raise ConfigError(f"benchmark.root is required for ns_imagenet: {ROOT_HELP}")
    _perturbations(cfg)
    backbone_lib.check_weights(_option(cfg, "weights"))
    # ResNet-18 downsamples by 32: smaller inputs collapse to a single pixel before pooling.
    _integer(cfg, "image_size", 32)
    _integer(cfg, "batch_size", 1)
    _integer(cfg, "samples_per_class", MIN_IMAGES_PER_CLASS, optional=True)
    _integer(cfg, "data_seed", 0)
    val_fraction = _option(cfg, "val_fraction")
    if (
        isinstance(val_fraction, bool)
        or not isinstance(val_fraction, (int, float))
        or not 0 < val_fraction <= 1
    ):
        raise ConfigError(f"benchmark.val_fraction={val_fraction!r} must be in (0, 1]")


def split_bounds(n_images: int) -> tuple[int, int]:
    """Ends of the train and val parts of a class of ``n_images`` (70% / 10% / the remaining ~20%)."""
    return 7 * n_images // 10, 8 * n_images // 10


# --- images --------------------------------------------------------------------------------------


def locate_files(root: str | None) -> list[Path]:
    """The three pickles under ``root``.

    Raises:
        ConfigError: ``root`` unset, not a folder, or missing a file.
    """
    if not root:
        raise ConfigError(f"benchmark.root is required for ns_imagenet: {ROOT_HELP}")
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"benchmark.root={root} is not a folder; expected {ROOT_HELP}")
    paths = [folder / name for name in SPLIT_FILES]
    missing = [path.name for path in paths if not path.is_file()]
    if missing:
        raise ConfigError(
            f"benchmark.root={folder} lacks {', '.join(missing)}; expected {', '.join(SPLIT_FILES)}"
        )
    return paths


# What the mini-ImageNet cache pickles hold: numpy arrays (and their dtypes) in builtin containers.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("builtins", "dict"),
    ("builtins", "list"),
    ("builtins", "tuple"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "str"),
    ("builtins", "bytes"),
    ("builtins", "int"),
    ("builtins", "float"),
    ("_codecs", "encode"),  # how Python 2 pickles of numpy arrays carry their bytes
}


class UnsafePickle(ValueError):
    """A pickle that names a global the cache format never uses (it could run code)."""


class ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays in builtin containers, and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickle(f"refused global {module}.{name} (only numpy arrays and builtin containers)")
        return super().find_class(module, name)


def _read_pickle(path: Path) -> Any:
    try:
        with open(path, "rb") as handle:
            # latin1: the widely shared files may come from Python 2 pickles of numpy arrays.
            return ArrayUnpickler(handle, encoding="latin1").load()
    except UnsafePickle as err:
        raise ConfigError(f"{path}: not a mini-ImageNet cache pickle: {err}") from None
    except Exception as err:
        raise ConfigError(f"{path}: cannot unpickle ({type(err).__name__}: {err})") from err


def _class_indices(path: Path, content: Mapping, n_images: int, layout_classes: int) -> list[np.ndarray]:
    """Indices into ``image_data`` of each class of one file, in class order."""
    class_dict = content.get("class_dict")
    if class_dict is None:
        if n_images % layout_classes:
            raise ConfigError(
                f"{path}: {n_images} images do not split evenly into the {layout_classes} classes of the "
                "mini-ImageNet layout, and there is no class_dict saying which image is which class"
            )
        return list(np.arange(n_images).reshape(layout_classes, -1))
    if not isinstance(class_dict, Mapping) or not class_dict:
        raise ConfigError(f"{path}: class_dict must be a non-empty dict {{class_name: [image indices]}}")
    classes = []
    for name, indices in class_dict.items():
        indices = np.asarray(indices)
        if indices.ndim != 1 or indices.size == 0 or indices.dtype.kind not in "iu":
            raise ConfigError(f"{path}: class_dict[{name!r}] must be a non-empty list of image indices")
        if indices.min() < 0 or indices.max() >= n_images:
            raise ConfigError(f"{path}: class_dict[{name!r}] has indices outside [0, {n_images})")
        classes.append(indices.astype(np.int64))
    return sorted(classes, key=lambda indices: int(indices.min()))


def load_classes(paths: Sequence[Path], samples_per_class: int | None) -> list[np.ndarray]:
    """The images of every class, in class order: ``uint8 (n_c, H, W, 3)`` each.

    Raises:
        ConfigError: a file without ``image_data``, with the wrong dtype/shape, classes of fewer than
            ``MIN_IMAGES_PER_CLASS`` (or ``samples_per_class``) images.
    """
    classes: list[np.ndarray] = []
    image_shape: tuple[int, ...] | None = None
    for path, layout_classes in zip(paths, LAYOUT_CLASS_COUNTS):
        content = _read_pickle(path)
        if not isinstance(content, Mapping) or "image_data" not in content:
            raise ConfigError(
                f"{path}: expected a pickled dict with 'image_data' (uint8 array (N, 84, 84, 3))"
            )
        images = content["image_data"]
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
            kind = images.dtype if isinstance(images, np.ndarray) else type(images).__name__
            raise ConfigError(f"{path}: image_data must be a uint8 numpy array (N, 84, 84, 3), got {kind}")
        if images.ndim != 4 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
            raise ConfigError(
                f"{path}: image_data must have shape (N, H, H, 3) like (N, 84, 84, 3), got {images.shape}"
            )
        if image_shape is not None and images.shape[1:] != image_shape:
            raise ConfigError(f"{path}: images are {images.shape[1:]}, the other files' are {image_shape}")
        image_shape = images.shape[1:]
        for indices in _class_indices(path, content, len(images), layout_classes):
            if samples_per_class is not None:
                if len(indices) < samples_per_class:
                    raise ConfigError(
                        f"benchmark.samples_per_class={samples_per_class} exceeds the {len(indices)} images "
                        f"of class {len(classes)} ({path.name})"
                    )
                indices = indices[:samples_per_class]
            if len(indices) < MIN_IMAGES_PER_CLASS:
                raise ConfigError(
                    f"{path}: class {len(classes)} has {len(indices)} images; "
                    f"at least {MIN_IMAGES_PER_CLASS} are needed for a 70/10/20 split"
                )
            contiguous = np.array_equal(indices, np.arange(indices[0], indices[0] + len(indices)))
            # A slice is a view; only scattered classes are copied.
            classes.append(images[indices[0] : indices[0] + len(indices)] if contiguous else images[indices])
    return classes


def _perturbed_classes(
    classes: Sequence[np.ndarray], perturbation: Perturbation, data_seed: int
) -> Iterator[np.ndarray]:
    for class_index, images in enumerate(classes):
        yield perturb(images, perturbation, class_generator(perturbation, data_seed, class_index))


# --- features ------------------------------------------------------------------------------------


def _cache_key(cfg: Any, perturbation: Perturbation, weights_id: str, fingerprint: list) -> dict[str, Any]:
    return {
        "format": feature_cache.CACHE_FORMAT,
        "backbone": BACKBONE,
        "weights": weights_id,
        "image_size": _option(cfg, "image_size"),
        "preprocess": "bilinear-antialias, imagenet mean/std",
        "perturbation": describe(perturbation),
        "data_seed": _option(cfg, "data_seed"),
        "samples_per_class": _option(cfg, "samples_per_class"),
        "data": fingerprint,
    }


def cache_folder(cfg: Any) -> Path:
    """Where the features are cached: ``cache_dir``, else ``<root>/features_cache``."""
    cache_dir = _option(cfg, "cache_dir")
    return (
        Path(cache_dir).expanduser()
        if cache_dir
        else Path(_option(cfg, "root")).expanduser() / "features_cache"
    )


def _perturbation_features(
    cfg: Any, *, device: torch.device, progress: bool
) -> tuple[list[np.ndarray], list[int]]:
    """Features of every image under every perturbation (class-major rows), and the class sizes."""
    check(cfg)
    paths = locate_files(_option(cfg, "root"))
    perturbations = _perturbations(cfg)
    weights_id = backbone_lib.weights_identity(_option(cfg, "weights"))
    fingerprint = feature_cache.data_fingerprint(paths)
    folder = cache_folder(cfg)
    keys = [_cache_key(cfg, p, weights_id, fingerprint) for p in perturbations]

    features: list[np.ndarray | None] = [None] * len(perturbations)
    class_sizes: list[int] | None = None
    for index, key in enumerate(keys):
        entry = feature_cache.load(folder, key, BACKBONE)
        if entry is not None:
            features[index] = entry[0]
            sizes = [int(size) for size in entry[1].get("class_sizes", [])]
            if class_sizes is not None and sizes != class_sizes:
                raise ConfigError(
                    f"feature cache {folder}: entries disagree on the class sizes; delete the folder"
                )
            class_sizes = sizes
    missing = [index for index, array in enumerate(features) if array is None]
    if missing:
        classes = load_classes(paths, _option(cfg, "samples_per_class"))
        sizes = [len(images) for images in classes]
        if class_sizes is not None and sizes != class_sizes:
            raise ConfigError(
                f"feature cache {folder}: entries disagree with the data's class sizes; delete it"
            )
        class_sizes = sizes
        model = backbone_lib.build_backbone(
            BACKBONE,
            _option(cfg, "weights"),
            device=device,
            init_seed=_option(cfg, "data_seed"),
            progress=progress,
        )
        for index in missing:
            perturbation = perturbations[index]
            array = backbone_lib.extract_features(
                model,
                _perturbed_classes(classes, perturbation, _option(cfg, "data_seed")),
                total=sum(sizes),
                image_size=_option(cfg, "image_size"),
                batch_size=_option(cfg, "batch_size"),
                device=device,
                progress=progress,
                desc=f"ns_imagenet features, perturbation {index} ({perturbation.kind.value})",
            )
            feature_cache.save(folder, keys[index], BACKBONE, array, {"class_sizes": sizes})
            features[index] = array
    for array in features:
        if array.shape != (sum(class_sizes), backbone_lib.FEATURE_DIM):
            raise ConfigError(f"feature cache {folder}: an entry has shape {array.shape}; delete the folder")
    return features, class_sizes


def build(cfg: Any, *, device: torch.device, progress: bool) -> dict[str, np.ndarray]:
    """The NS-ImageNet stream as arrays.

    Args:
        cfg: a :class:`Config` (dataclass, DictConfig or mapping).
        device: where the backbone runs.
        progress: show a tqdm bar per perturbation being extracted.

    Returns:
        ``X_{train,val,test}`` ``float32 (N, 512)``; ``y_*``, ``distributions_*``, ``domain_*`` ``int64``.

    Raises:
        ConfigError: invalid options, missing or malformed data, unloadable weights, a bad cache entry.
    """
    features, class_sizes = _perturbation_features(cfg, device=torch.device(device), progress=progress)
    n_classes = len(class_sizes)
    starts = np.concatenate([[0], np.cumsum(class_sizes)])
    parts: dict[str, list[tuple[int, int, np.ndarray]]] = {"train": [], "val": [], "test": []}
    for domain, array in enumerate(features):
        for label, size in enumerate(class_sizes):
            train_end, val_end = split_bounds(size)
            rows = array[starts[label] : starts[label] + size]
            for split, block in (
                ("train", rows[:train_end]),
                ("val", rows[train_end:val_end]),
                ("test", rows[val_end:]),
            ):
                parts[split].append((domain, label, block))

    n_distributions = len(features) * n_classes
    # Small epsilon: 0.29 * 100 must keep 29 distributions, not 28.
    val_distributions = max(1, math.floor(_option(cfg, "val_fraction") * n_distributions + 1e-9))
    stream: dict[str, np.ndarray] = {}
    for split, blocks in parts.items():
        if split == "val":
            blocks = [b for b in blocks if b[0] * n_classes + b[1] < val_distributions]
        lengths = [len(block) for _, _, block in blocks]
        stream[f"X_{split}"] = np.concatenate([block for _, _, block in blocks]).astype(
            np.float32, copy=False
        )
        stream[f"y_{split}"] = np.repeat([label for _, label, _ in blocks], lengths).astype(np.int64)
        stream[f"domain_{split}"] = np.repeat([domain for domain, _, _ in blocks], lengths).astype(np.int64)
        stream[f"distributions_{split}"] = stream[f"domain_{split}"] * n_classes + stream[f"y_{split}"]
    return stream
