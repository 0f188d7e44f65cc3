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


def validate_arrays(arrays: dict[str, np.ndarray], source: str = "stream") -> None:
    """Check the schema and the distribution rules; raise :class:`ConfigError` naming what is wrong."""
    for split in SPLITS:
        for key in (f"X_{split}", f"y_{split}", f"distributions_{split}"):
            if key not in arrays:
                raise ConfigError(
                    f"{source}: missing array {key!r} (needs X_*, y_*, distributions_* for {SPLITS})"
                )
        n = len(arrays[f"X_{split}"])
        for key in (f"y_{split}", f"distributions_{split}", f"domain_{split}"):
            if key in arrays and np.shape(arrays[key]) != (n,):
                raise ConfigError(f"{source}: {key} has shape {np.shape(arrays[key])}, expected ({n},)")
        if n == 0:
            raise ConfigError(f"{source}: split {split!r} is empty")
        dist = np.asarray(arrays[f"distributions_{split}"])
        if (
            not np.issubdtype(dist.dtype, np.integer)
            or dist[0] != 0
            or np.any(np.diff(dist) < 0)
            or np.any(np.diff(dist) > 1)
        ):
            raise ConfigError(
                f"{source}: distributions_{split} must be integers starting at 0, "
                "contiguous and non-decreasing"
            )
        y = np.asarray(arrays[f"y_{split}"])
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
            raise ConfigError(f"{source}: y_{split} must hold non-negative integer class labels")
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
            x=torch.as_tensor(np.asarray(arrays[f"X_{name}"]), dtype=torch.float32, device=device),
            y=torch.as_tensor(np.asarray(arrays[f"y_{name}"]), dtype=torch.long, device=device),
            dist=dist,
            num_distributions=int(dist[-1].item()) + 1,
        )

    return Stream(train=split("train"), val=split("val"), test=split("test"), num_classes=num_classes)


def load_npz(path: str | Path, option: str = "benchmark.path") -> dict[str, np.ndarray]:
    """Load a stream file (no pickle) into a dict of arrays."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{option}={str(path)!r}: no such file (an .npz with X_*, y_*, distributions_*)")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {key: data[key] for key in data.files}
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{option}={str(path)!r}: not a readable .npz stream file ({err})") from None


def npz_feature_count(path: str | Path, option: str = "benchmark.path") -> int:
    """The flattened feature size of ``X_train`` in an .npz, read from its header only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{option}={str(path)!r}: no such file (an .npz with X_*, y_*, distributions_*)")
    try:
        with zipfile.ZipFile(path) as zf, zf.open("X_train.npy") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape = read_header(fh)[0]
    except KeyError:
        raise ConfigError(f"{option}={str(path)!r}: has no X_train array") from None
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        raise ConfigError(f"{option}={str(path)!r}: not a readable .npz stream file ({err})") from None
    return int(np.prod(shape[1:]))
