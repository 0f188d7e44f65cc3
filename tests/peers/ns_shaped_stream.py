"""A stand-in for NS-ImageNet's features with class structure: 100 classes x 3 perturbations = 300
distributions of 512-d non-negative features (as a ResNet's after its ReLU), streamed
perturbation-major like ``data.ns_imagenet``; 10/2/4 train/val/test samples per distribution and val on
the first half of the distributions, as ``memhead.bench``'s stream. The classes differ by small shifts
along their prototypes, hidden by a strong shared low-rank nuisance, and each perturbation moves and
rescales every feature: a stream on which the learners differ, unlike pure noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np

FEATURES, CLASSES, PERTURBATIONS = 512, 100, 3
PER_DISTRIBUTION = {"train": 10, "val": 2, "test": 4}


def make_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    prototypes = 0.12 * rng.standard_normal((CLASSES, FEATURES))
    nuisance = rng.standard_normal((24, FEATURES)) / np.sqrt(FEATURES) * 3.0  # shared, strong
    shifts = 0.3 * rng.standard_normal((PERTURBATIONS, FEATURES))
    scales = 1.0 + 0.2 * np.arange(PERTURBATIONS)
    distributions = PERTURBATIONS * CLASSES
    arrays = {}
    for split, per in PER_DISTRIBUTION.items():
        count = distributions // 2 if split == "val" else distributions
        dist = np.repeat(np.arange(count), per)
        y, domain = dist % CLASSES, dist // CLASSES
        noise = rng.standard_normal((len(dist), FEATURES)) * 0.5
        hidden = rng.standard_normal((len(dist), len(nuisance))) @ nuisance
        x = scales[domain, None] * (1.0 + prototypes[y] + shifts[domain] + hidden + noise)
        arrays[f"X_{split}"] = np.maximum(x, 0).astype(np.float32)
        arrays[f"y_{split}"] = y.astype(np.int64)
        arrays[f"distributions_{split}"] = dist.astype(np.int64)
        arrays[f"domain_{split}"] = domain.astype(np.int64)
    return arrays


def write_stream(path: str | Path, seed: int = 0) -> Path:
    """Write the stream as an ``.npz`` for ``benchmark=features``; returns the path."""
    np.savez(path, **make_arrays(seed))
    return Path(path)


if __name__ == "__main__":
    import sys

    print(write_stream(sys.argv[1] if len(sys.argv) > 1 else "ns_shaped.npz"))
