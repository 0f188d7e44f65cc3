"""A benchmark stream: three splits of ``(x, y, distribution)``, validated as ``protocol.md`` requires.

Every benchmark produces the same array schema (the one of the paper's ``.npz`` files):
``X_<split>`` (N, ...) features, ``y_<split>`` (N,) labels, ``distributions_<split>`` (N,) distribution
indices and optionally ``domain_<split>``, for ``split`` in train, val, test.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from memhead.registry import ConfigError

SPLITS = ("train", "val", "test")


@dataclass
class Split:
    """One split on the run's device. ``num_distributions`` counts the distributions it covers."""

    x: torch.Tensor
    y: torch.Tensor
    dist: torch.Tensor
    num_distributions: int

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Stream:
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def in_features(self) -> int:
        return int(np.prod(self.train.x.shape[1:]))

    @property
    def num_distributions(self) -> int:
        return self.train.num_distributions

    def splits(self) -> dict[str, Split]:
        return {"train": self.train, "val": self.val, "test": self.test}


# Labels above this are a corrupt file, not a classification task (one output per class).
MAX_CLASSES = 1_000_000


def _first_bad_row(x: np.ndarray) -> int | None:
    """Index of the first row of ``x`` holding NaN or Inf, or None."""
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    rows = np.flatnonzero(bad)
    return int(rows[0]) if len(rows) else None


def _check_split(arrays: dict[str, np.ndarray], split: str, source: str) -> None:
    for key in (f"X_{split}", f"y_{split}", f"distributions_{split}"):
        if key not in arrays:
            raise ConfigError(
                f"{source}: missing array {key!r} (needs X_*, y_*, distributions_* for {SPLITS})"
            )
    x = np.asarray(arrays[f"X_{split}"])
    if x.ndim < 2:
        raise ConfigError(f"{source}: X_{split} has shape {x.shape}; expected (samples, features...)")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ConfigError(f"{source}: X_{split} must hold numbers (got dtype {x.dtype})")
    n = len(x)
    if n == 0:
        raise ConfigError(f"{source}: split {split!r} is empty")
    for key in (f"y_{split}", f"distributions_{split}", f"domain_{split}"):
        if key not in arrays:
            continue
        column = np.asarray(arrays[key])
        if column.shape != (n,):
            raise ConfigError(f"{source}: {key} has shape {column.shape}, expected ({n},)")
        if not np.issubdtype(column.dtype, np.integer):
            raise ConfigError(f"{source}: {key} must hold integers (got dtype {column.dtype})")
        if column.min() < 0:
            raise ConfigError(f"{source}: {key} has negative values (row {int(np.argmax(column < 0))})")
    if np.issubdtype(x.dtype, np.inexact):
        row = _first_bad_row(x)
        if row is not None:
            raise ConfigError(f"{source}: X_{split} has a non-finite value (NaN or Inf) in row {row}")
    dist = np.asarray(arrays[f"distributions_{split}"])
    steps = np.diff(dist)
    if dist[0] != 0 or np.any(steps < 0) or np.any(steps > 1):
        raise ConfigError(
            f"{source}: distributions_{split} must be integers starting at 0, contiguous and non-decreasing"
        )
    top = int(np.max(arrays[f"y_{split}"]))
    if top >= MAX_CLASSES:
        raise ConfigError(f"{source}: y_{split} has label {top}; labels must be below {MAX_CLASSES}")


def validate_arrays(arrays: dict[str, np.ndarray], source: str = "stream") -> None:
    """Check the schema and the distribution rules; raise :class:`ConfigError` naming what is wrong.

    The one validator of stream arrays: ``run.py`` (every benchmark) and ``python -m data.inspect`` use it.
    """
    for split in SPLITS:
        _check_split(arrays, split, source)
    shapes = {split: np.shape(arrays[f"X_{split}"])[1:] for split in SPLITS}
    if len(set(shapes.values())) != 1:
        raise ConfigError(f"{source}: X_* feature shapes differ across splits: {shapes}")
    n_train = int(arrays["distributions_train"][-1]) + 1
    for split in ("val", "test"):
        n_split = int(arrays[f"distributions_{split}"][-1]) + 1
        if n_split > n_train:
            raise ConfigError(
                f"{source}: {split} has {n_split} distributions but train only {n_train}; "
                f"{split} must cover a prefix of train's distributions"
            )


def to_stream(arrays: dict[str, np.ndarray], device: torch.device, source: str = "stream") -> Stream:
    """Validate ``arrays`` and move them to ``device`` (features as float32)."""
    validate_arrays(arrays, source)
    num_classes = int(max(np.max(arrays[f"y_{s}"]) for s in SPLITS)) + 1

    def split(name: str) -> Split:
        dist = torch.as_tensor(np.asarray(arrays[f"distributions_{name}"]), dtype=torch.long, device=device)
        return Split(
            # Models take flat features: (N, a, b) images or maps become (N, a * b).
            x=torch.as_tensor(
                np.asarray(arrays[f"X_{name}"]).reshape(len(arrays[f"X_{name}"]), -1),
                dtype=torch.float32,
                device=device,
            ),
            y=torch.as_tensor(np.asarray(arrays[f"y_{name}"]), dtype=torch.long, device=device),
            dist=dist,
            num_distributions=int(dist[-1].item()) + 1,
        )

    return Stream(train=split("train"), val=split("val"), test=split("test"), num_classes=num_classes)


def load_npz(path: str | Path, option: str = "benchmark.path") -> dict[str, np.ndarray]:
    """Load a stream file (no pickle) into a dict of arrays, after checking that it fits in memory."""
    path = check_npz_fits(path, option)
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"{option}={str(path)!r}: not a readable .npz stream file ({err})") from None


def check_npz_fits(path: str | Path, option: str = "benchmark.path") -> Path:
    """Refuse a file whose array headers claim more memory than is available (nothing is loaded)."""
    from memhead.limits import refuse_if_too_big

    path = _existing(path, option)
    headers = npz_headers(path, option)
    needed = sum(int(np.prod(shape)) * dtype.itemsize for shape, dtype in headers.values())
    refuse_if_too_big(f"{option}={str(path)!r}", needed, "loading its arrays")
    return path


def _existing(path: str | Path, option: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{option}={str(path)!r}: no such file (an .npz with X_*, y_*, distributions_*)")
    return path


def npz_headers(path: str | Path, option: str = "benchmark.path") -> dict[str, tuple[tuple, np.dtype]]:
    """``{array name: (shape, dtype)}`` of an .npz, read from the array headers only."""
    path = _existing(path, option)
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for member in zf.namelist():
                if not member.endswith(".npy"):
                    continue
                with zf.open(member) as fh:
                    version = np.lib.format.read_magic(fh)
                    read_header = (
                        np.lib.format.read_array_header_1_0
                        if version == (1, 0)
                        else np.lib.format.read_array_header_2_0
                    )
                    shape, _, dtype = read_header(fh)
                out[member[: -len(".npy")]] = (tuple(shape), dtype)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as err:
        raise ConfigError(f"{option}={str(path)!r}: not a readable .npz stream file ({err})") from None
    return out


def npz_feature_count(path: str | Path, option: str = "benchmark.path") -> int:
    """The flattened feature size of ``X_train`` in an .npz, read from its header only."""
    headers = npz_headers(path, option)
    if "X_train" not in headers:
        raise ConfigError(f"{option}={str(Path(path).expanduser())!r}: has no X_train array")
    shape = headers["X_train"][0]
    if len(shape) < 2:
        raise ConfigError(f"{option}: X_train has shape {shape}; expected (samples, features...)")
    return int(np.prod(shape[1:]))
