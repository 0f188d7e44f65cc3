"""The paper's 2-D benchmarks MODES (``bi-modals``) and MOONS (``bi-moons``).

Each class is drawn from two *domains* (two separate modes in the plane). :func:`generate_modes` and
:func:`generate_moons` draw the points, scale them to ``[-1, 1]`` and split them into shuffled
train/val/test splits; :func:`apply_order` turns those splits into one of the four streams ``IID``,
``CI``, ``CDI``, ``CDID``. With the default parameters the result equals the paper's published files
(see ``shared/spec/benchmarks.md``, section MODES and MOONS).

Every function is pure: randomness comes from explicit seeds (``random_state`` of scikit-learn and a
private :class:`numpy.random.RandomState`), never from numpy's global generator.

Example::

    splits = make_2d("modes", "CDID")
    splits["X_train"].shape  # (1000, 2)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from memhead.registry import ConfigError

SPLITS = ("train", "val", "test")
ORDERS = ("IID", "CI", "CDI", "CDID")
KINDS = ("modes", "moons")
NUM_DOMAINS = 2
MIN_N = 8
# Seeds go to numpy's legacy RandomState, which accepts exactly this range.
MAX_SEED = 2**32 - 1
RATIO_SUM_TOLERANCE = 1e-6

MODES_DEFAULTS: dict[str, Any] = {
    "n": 1000,
    "ratios": (0.2, 0.4, 0.1, 0.3),
    # Per domain, then per class.
    "centers": (
        ((0.25, 0.25), (0.6, 0.65), (0.15, 0.5), (0.85, 0.3)),
        ((0.2, 0.75), (1.0, 0.1), (1.15, 0.75), (0.3, 0.5)),
    ),
    "stds": ((0.02, 0.08, 0.015, 0.03), (0.04, 0.02, 0.06, 0.015)),
    "seeds": ((1234, 5678, 9101112, 13141516), (1, 5, 9, 13)),
    "shuffle_seed": 1234,
}

MOONS_DEFAULTS: dict[str, Any] = {
    "n": 1000,
    "ratios": (0.4, 0.1, 0.3, 0.2),
    # Per domain, then per pair of classes (2p, 2p + 1).
    "offsets": (((0, 0), (-3, 1)), ((2, 1), (3, -1))),
    "noise": ((0.08, 0.06), (0.04, 0.03)),
    "seeds": ((1234, 5678), (1, 5)),
    "shuffle_seed": 1234,
}


# --------------------------------------------------------------------------- parameter checks


def _plain(value: Any) -> Any:
    """Turn nested lists/tuples/OmegaConf ListConfigs/arrays into nested Python lists."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(item) for item in value]
    return value


def _real_array(name: str, value: Any, shape: tuple[int, ...], described: str) -> np.ndarray:
    """``value`` as a float array of exactly ``shape``; ``described`` spells the shape for the error."""
    message = f"benchmark.{name} must have {described}"
    try:
        array = np.asarray(_plain(value), dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"{message} (got {value!r})") from None
    if array.shape != shape:
        raise ConfigError(f"{message} (got shape {array.shape})")
    if not np.all(np.isfinite(array)):
        raise ConfigError(f"benchmark.{name} must be finite numbers (got {value!r})")
    return array


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"benchmark.{name} must be an integer (got {value!r})")
    if value < low:
        raise ConfigError(f"benchmark.{name} must be >= {low} (got {value})")
    if high is not None and value > high:
        raise ConfigError(f"benchmark.{name} must be <= {high} (got {value})")
    return int(value)


def _check_seeds(name: str, value: Any, shape: tuple[int, int], described: str) -> list[list[int]]:
    _real_array(name, value, shape, described)
    return [[_check_int(name, seed, 0, MAX_SEED) for seed in row] for row in _plain(value)]


def _check_ratios(ratios: Any, num_classes_multiple: int) -> np.ndarray:
    try:
        array = np.asarray(_plain(ratios), dtype=np.float64)
    except (TypeError, ValueError):
        raise ConfigError(f"benchmark.ratios must be a list of numbers (got {ratios!r})") from None
    if array.ndim != 1 or len(array) == 0 or len(array) % num_classes_multiple:
        what = "an even number of" if num_classes_multiple == 2 else "at least one"
        raise ConfigError(f"benchmark.ratios must be a list of {what} class ratios (got {ratios!r})")
    if not np.all(np.isfinite(array)) or np.any(array <= 0):
        raise ConfigError(f"benchmark.ratios must all be > 0 (got {ratios!r})")
    total = float(array.sum())
    if abs(total - 1.0) > RATIO_SUM_TOLERANCE:
        raise ConfigError(f"benchmark.ratios must sum to 1 (got {total:g})")
    return array


def _class_sizes(n: int, ratios: np.ndarray) -> list[int]:
    """``int(2n * ratio)`` points per class; the last class takes the remainder so the total is ``2n``."""
    total = 2 * n
    sizes = [int(total * float(ratio)) for ratio in ratios[:-1]]
    sizes.append(total - sum(sizes))
    for label, size in enumerate(sizes):
        # Both domains of every class need at least one point.
        if size < NUM_DOMAINS:
            raise ConfigError(
                f"benchmark.ratios give class {label} {size} of 2n={total} points; "
                f"each class needs >= {NUM_DOMAINS} (raise benchmark.n or the ratio)"
            )
    return sizes


# --------------------------------------------------------------------------- generation


def _scale_to_unit_box(points: np.ndarray) -> np.ndarray:
    """Min-max scale every coordinate to ``[-1, 1]`` over all points."""
    low, high = points.min(axis=0), points.max(axis=0)
    return (points - low) / (high - low) * 2 - 1


def _split_and_shuffle(
    point_blocks: list[np.ndarray],
    label_blocks: list[np.ndarray],
    domain_blocks: list[np.ndarray],
    shuffle_seed: int,
) -> dict[str, np.ndarray]:
    """Concatenate the blocks and scale them, split by position, then shuffle each split.

    Even positions go to train, odd ones to a pool whose even positions go to val and odd ones to test.
    """
    points = _scale_to_unit_box(np.concatenate(point_blocks))
    labels, domains = np.concatenate(label_blocks), np.concatenate(domain_blocks)
    pool = slice(1, None, 2)
    by_split = {
        "train": (points[0::2], labels[0::2], domains[0::2]),
        "val": (points[pool][0::2], labels[pool][0::2], domains[pool][0::2]),
        "test": (points[pool][1::2], labels[pool][1::2], domains[pool][1::2]),
    }
    splits: dict[str, np.ndarray] = {}
    for split, (x, y, domain) in by_split.items():
        perm = np.random.RandomState(shuffle_seed).permutation(len(y))
        splits[f"X_{split}"] = np.ascontiguousarray(x[perm], dtype=np.float64)
        splits[f"y_{split}"] = y[perm].astype(np.int64)
        splits[f"domain_{split}"] = domain[perm].astype(np.int64)
        splits[f"distributions_{split}"] = np.zeros(len(y), dtype=np.int64)
    return splits


def generate_modes(
    *,
    n: int = MODES_DEFAULTS["n"],
    ratios: Sequence[float] = MODES_DEFAULTS["ratios"],
    centers: Sequence = MODES_DEFAULTS["centers"],
    stds: Sequence = MODES_DEFAULTS["stds"],
    seeds: Sequence = MODES_DEFAULTS["seeds"],
    shuffle_seed: int = MODES_DEFAULTS["shuffle_seed"],
) -> dict[str, np.ndarray]:
    """Draw MODES: every class is two isotropic Gaussian blobs, one per domain.

    Class ``i`` gets ``int(2n * ratios[i])`` points (the last class the remainder), ``nc // 2`` of them
    from domain 0 and the rest from domain 1.

    Args:
        n: Training samples; ``2n`` points are drawn in all (val and test get ``n`` together).
        ratios: Fraction of points per class; its length is the number of classes.
        centers: Blob centres, ``[domain][class] -> [x, y]``.
        stds: Blob standard deviations, ``[domain][class]``.
        seeds: ``random_state`` of every blob, ``[domain][class]``.
        shuffle_seed: Seed of the permutation applied to each split.

    Returns:
        The shuffled splits in the benchmark-file schema (``X_<split>`` float64 ``(m, 2)``,
        ``y_<split>``, ``domain_<split>``, ``distributions_<split>`` int64; distributions all 0 until
        :func:`apply_order` assigns them). Val is not truncated yet.

    Raises:
        ConfigError: A parameter has the wrong shape or value.
    """
    from sklearn.datasets import make_blobs  # lazy: scikit-learn is slow to import

    n = _check_int("n", n, MIN_N)
    shuffle_seed = _check_int("shuffle_seed", shuffle_seed, 0, MAX_SEED)
    ratio_array = _check_ratios(ratios, 1)
    num_classes = len(ratio_array)
    classes_shape = (NUM_DOMAINS, num_classes)
    classes_text = f"{NUM_DOMAINS} domains x {num_classes} classes"
    center_array = _real_array("centers", centers, (*classes_shape, 2), f"{classes_text} x 2 coordinates")
    std_array = _real_array("stds", stds, classes_shape, classes_text)
    if np.any(std_array <= 0):
        raise ConfigError(f"benchmark.stds must all be > 0 (got {std_array.tolist()})")
    seed_table = _check_seeds("seeds", seeds, classes_shape, classes_text)

    points, labels, domains = [], [], []
    for label, size in enumerate(_class_sizes(n, ratio_array)):
        per_domain = (size // 2, size - size // 2)
        for domain, count in enumerate(per_domain):
            blob, _ = make_blobs(
                n_samples=count,
                n_features=2,
                centers=[center_array[domain, label]],
                cluster_std=float(std_array[domain, label]),
                shuffle=False,
                random_state=seed_table[domain][label],
            )
            points.append(blob)
            labels.append(np.full(count, label))
            domains.append(np.full(count, domain))
    return _split_and_shuffle(points, labels, domains, shuffle_seed)


def generate_moons(
    *,
    n: int = MOONS_DEFAULTS["n"],
    ratios: Sequence[float] = MOONS_DEFAULTS["ratios"],
    offsets: Sequence = MOONS_DEFAULTS["offsets"],
    noise: Sequence = MOONS_DEFAULTS["noise"],
    seeds: Sequence = MOONS_DEFAULTS["seeds"],
    shuffle_seed: int = MOONS_DEFAULTS["shuffle_seed"],
) -> dict[str, np.ndarray]:
    """Draw MOONS: classes ``(2p, 2p + 1)`` are a pair of interleaved half-moons, twice (one per domain).

    Class ``c`` gets ``int(2n * ratios[c])`` points (the last class the remainder, which changes
    nothing when the ratios divide ``2n`` exactly, as the defaults do); domain 0 draws half of each
    class (rounded down) and domain 1 the rest, each a shifted ``make_moons``.

    Args:
        n: Training samples; ``2n`` points are drawn in all.
        ratios: Fraction of points per class; an even number of classes (pairs of moons).
        offsets: Shift added to each pair, ``[domain][pair] -> [x, y]``.
        noise: ``make_moons`` noise, ``[domain][pair]``.
        seeds: ``random_state`` of every pair, ``[domain][pair]``.
        shuffle_seed: Seed of the permutation applied to each split.

    Returns:
        The shuffled splits in the benchmark-file schema, as :func:`generate_modes`.

    Raises:
        ConfigError: A parameter has the wrong shape or value.
    """
    from sklearn.datasets import make_moons  # lazy: scikit-learn is slow to import

    n = _check_int("n", n, MIN_N)
    shuffle_seed = _check_int("shuffle_seed", shuffle_seed, 0, MAX_SEED)
    ratio_array = _check_ratios(ratios, 2)
    num_pairs = len(ratio_array) // 2
    pairs_shape = (NUM_DOMAINS, num_pairs)
    pairs_text = f"{NUM_DOMAINS} domains x {num_pairs} class pairs"
    offset_array = _real_array("offsets", offsets, (*pairs_shape, 2), f"{pairs_text} x 2 coordinates")
    noise_array = _real_array("noise", noise, pairs_shape, pairs_text)
    if np.any(noise_array < 0):
        raise ConfigError(f"benchmark.noise must all be >= 0 (got {noise_array.tolist()})")
    seed_table = _check_seeds("seeds", seeds, pairs_shape, pairs_text)

    sizes = _class_sizes(n, ratio_array)
    points, labels, domains = [], [], []
    for pair in range(num_pairs):
        first, second = sizes[2 * pair], sizes[2 * pair + 1]
        per_domain = ((first // 2, second // 2), (first - first // 2, second - second // 2))
        for domain, counts in enumerate(per_domain):
            moons, moon_index = make_moons(
                n_samples=counts,
                noise=float(noise_array[domain, pair]),
                shuffle=False,
                random_state=seed_table[domain][pair],
            )
            points.append(moons + offset_array[domain, pair])
            labels.append(moon_index + 2 * pair)
            domains.append(np.full(len(moon_index), domain))
    return _split_and_shuffle(points, labels, domains, shuffle_seed)


# --------------------------------------------------------------------------- stream orders


def _stable_order(*keys: np.ndarray) -> np.ndarray:
    """Indices sorting by ``keys[0]``, ties by ``keys[1]``, ...; stable: remaining ties keep their order."""
    order = np.arange(len(keys[0]))
    for key in reversed(keys):
        order = order[np.argsort(key[order], kind="stable")]
    return order


def _run_index(*keys: np.ndarray) -> np.ndarray:
    """0, 1, 2, ...: a new index wherever any key changes from the previous row."""
    if len(keys[0]) == 0:
        return np.zeros(0, dtype=np.int64)
    changed = np.zeros(len(keys[0]) - 1, dtype=bool)
    for key in keys:
        changed |= key[1:] != key[:-1]
    return np.concatenate(([0], np.cumsum(changed))).astype(np.int64)


def _order_split(x: np.ndarray, y: np.ndarray, domain: np.ndarray, order: str, shuffle_seed: int):
    """One split reordered for ``order``: ``(x, y, domain, distributions)``."""
    if order == "IID":
        perm = np.random.RandomState(shuffle_seed).permutation(len(y))
        zeros = np.zeros(len(y), dtype=np.int64)
        return x[perm], y[perm], zeros, zeros.copy()
    if order == "CI":
        rows = _stable_order(y)
        return x[rows], y[rows], np.zeros(len(y), dtype=np.int64), _run_index(y[rows])
    rows = _stable_order(domain, y)
    distributions = _run_index(domain[rows], y[rows])
    if order == "CDID":
        # Sorting by the first coordinate inside a distribution makes a temporally correlated stream.
        rows = rows[_stable_order(distributions, x[rows, 0])]
    return x[rows], y[rows], domain[rows], distributions


def _truncate_val(parts: tuple[np.ndarray, ...], order: str) -> tuple[np.ndarray, ...]:
    """IID val keeps its first half; the other orders keep distributions ``< count // 2``."""
    distributions = parts[3]
    if order == "IID":
        keep = np.arange(len(distributions)) < len(distributions) // 2
    else:
        count = int(distributions.max()) + 1 if len(distributions) else 0
        keep = distributions < count // 2
    return tuple(part[keep] for part in parts)


def apply_order(
    splits: Mapping[str, np.ndarray], order: str, *, shuffle_seed: int = 1234
) -> dict[str, np.ndarray]:
    """Arrange the splits of :func:`generate_modes` / :func:`generate_moons` as one stream order.

    * ``IID``: each split permuted once more with the ``shuffle_seed`` permutation; domain and
      distribution 0 everywhere; val keeps its first half.
    * ``CI``: stable sort by class; domain 0; a new distribution whenever the class changes.
    * ``CDI``: stable sort by domain, then class; a new distribution whenever either changes.
    * ``CDID``: as ``CDI``, then inside each distribution a stable sort by the first coordinate.
    * ``CI``/``CDI``/``CDID``: val keeps the distributions with index ``< count // 2``.

    Args:
        splits: ``X_<split>``, ``y_<split>``, ``domain_<split>`` for train, val and test (other keys,
            such as ``distributions_<split>``, are ignored and recomputed).
        order: One of ``IID``, ``CI``, ``CDI``, ``CDID`` (case-insensitive).
        shuffle_seed: Seed of the extra ``IID`` permutation (the generator's ``shuffle_seed``).

    Returns:
        New arrays in the benchmark-file schema; ``splits`` is not modified.

    Raises:
        ConfigError: ``order`` is not one of the four.
        ValueError: ``splits`` lacks a key or its arrays disagree in length.
    """
    key = str(order).strip().upper()
    if key not in ORDERS:
        raise ConfigError(f"benchmark.order={order!r} is not allowed; allowed: {', '.join(ORDERS)}")
    shuffle_seed = _check_int("shuffle_seed", shuffle_seed, 0, MAX_SEED)
    ordered: dict[str, np.ndarray] = {}
    for split in SPLITS:
        names = (f"X_{split}", f"y_{split}", f"domain_{split}")
        missing = [name for name in names if name not in splits]
        if missing:
            raise ValueError(f"splits lack {', '.join(missing)}; need X_, y_, domain_ for train, val, test")
        x, y, domain = (np.asarray(splits[name]) for name in names)
        if not len(x) == len(y) == len(domain):
            raise ValueError(f"splits: X_{split}, y_{split}, domain_{split} differ in length")
        parts = _order_split(x, y, domain, key, shuffle_seed)
        if split == "val":
            parts = _truncate_val(parts, key)
        x, y, domain, distributions = parts
        ordered[f"X_{split}"] = np.ascontiguousarray(x, dtype=np.float64)
        ordered[f"y_{split}"] = y.astype(np.int64)
        ordered[f"domain_{split}"] = domain.astype(np.int64)
        ordered[f"distributions_{split}"] = distributions.astype(np.int64)
    return ordered


_GENERATORS = {"modes": (generate_modes, MODES_DEFAULTS), "moons": (generate_moons, MOONS_DEFAULTS)}


def make_2d(kind: str, order: str, **params: Any) -> dict[str, np.ndarray]:
    """Generate a 2-D benchmark and arrange it as a stream: ``apply_order(generate_<kind>(...), order)``.

    Args:
        kind: ``modes`` or ``moons`` (case-insensitive).
        order: ``IID``, ``CI``, ``CDI`` or ``CDID``.
        **params: Generation parameters overriding :data:`MODES_DEFAULTS` / :data:`MOONS_DEFAULTS`.

    Returns:
        The benchmark in the file schema (``X_*``, ``y_*``, ``domain_*``, ``distributions_*``).

    Raises:
        ConfigError: Unknown kind, order or parameter, or a bad parameter value.
    """
    name = str(kind).strip().lower()
    if name not in _GENERATORS:
        raise ConfigError(f"benchmark.kind={kind!r} is not allowed; allowed: {', '.join(KINDS)}")
    generate, defaults = _GENERATORS[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ConfigError(
            f"benchmark.{unknown[0]} is not a parameter of {name}; allowed: {', '.join(defaults)}"
        )
    # Validate the order before the (slower) generation.
    if str(order).strip().upper() not in ORDERS:
        raise ConfigError(f"benchmark.order={order!r} is not allowed; allowed: {', '.join(ORDERS)}")
    splits = generate(**params)
    return apply_order(splits, order, shuffle_seed=params.get("shuffle_seed", defaults["shuffle_seed"]))
