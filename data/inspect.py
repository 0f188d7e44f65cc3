"""Describe, validate and plot a benchmark file (``X_*``, ``y_*``, ``distributions_*``, ``domain_*``).

``domain_*`` is optional (zeros when absent).

Usage::

    python -m data.inspect FILE [--out DIR]

For each split it prints the size, the classes with their counts, the domains and the distributions
(each with its classes, domains and size, in stream order), checks the schema, and saves a scatter
plot ``DIR/<file-stem>_<split>.png`` with three panels coloured by class, domain and distribution
(default ``DIR``: the file's folder). Plots need 2-D inputs; wider files are described but not plotted.
The file is read with ``np.load`` and pickles are refused; the checks are those of ``run.py``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

SPLITS = ("train", "val", "test")


class SchemaError(ValueError):
    """The file does not follow the benchmark-file schema."""


def load_splits(path: Path) -> dict[str, dict[str, np.ndarray]]:
    """Read ``path`` and return ``{split: {"X", "y", "domain", "distributions"}}`` after checking it.

    The checks are ``run.py``'s (:func:`data.stream.validate_arrays`): a file valid here runs there.
    A missing ``domain_<split>`` is filled with zeros (the schema makes it optional).

    Raises:
        SchemaError: A key is missing, an array has the wrong shape, type or values, or lengths disagree.
    """
    from data.stream import load_npz, validate_arrays
    from memhead.registry import ConfigError

    try:
        arrays = load_npz(path, option="FILE")
        validate_arrays(arrays, source=str(path))
    except ConfigError as err:
        # The file is named once, by main; keep the rule.
        raise SchemaError(str(err).replace(f"{path}: ", "").replace(f"FILE={str(path)!r}: ", "")) from None
    splits = {}
    for split in SPLITS:
        x = arrays[f"X_{split}"]
        columns = {"X": x.reshape(len(x), -1)}
        for name in ("y", "domain", "distributions"):
            key = f"{name}_{split}"
            columns[name] = arrays[key] if key in arrays else np.zeros(len(x), dtype=np.int64)
        splits[split] = columns
    return splits


def _counts(values: np.ndarray) -> str:
    labels, counts = np.unique(values, return_counts=True)
    return ", ".join(f"{label}: {count}" for label, count in zip(labels, counts))


def _runs(distributions: np.ndarray) -> list[tuple[int, int, int]]:
    """``(distribution, start, stop)`` of each maximal block of equal distribution ids, in stream order."""
    if len(distributions) == 0:
        return []
    edges = np.flatnonzero(distributions[1:] != distributions[:-1]) + 1
    starts = np.concatenate(([0], edges))
    stops = np.concatenate((edges, [len(distributions)]))
    return [(int(distributions[a]), int(a), int(b)) for a, b in zip(starts, stops)]


def describe(split: str, columns: dict[str, np.ndarray]) -> list[str]:
    """Lines describing one split: size, classes, domains, distributions in stream order."""
    x, y, domain, distributions = (columns[name] for name in ("X", "y", "domain", "distributions"))
    runs = _runs(distributions)
    ids = np.unique(distributions)
    lines = [
        f"[{split}] {len(y)} samples, {x.shape[1]} features",
        f"  classes ({len(np.unique(y))}): {_counts(y)}",
        f"  domains ({len(np.unique(domain))}): {_counts(domain)}",
        f"  distributions ({len(ids)}, {len(runs)} contiguous blocks in stream order):",
    ]
    for distribution, start, stop in runs:
        classes = ",".join(map(str, np.unique(y[start:stop])))
        domains = ",".join(map(str, np.unique(domain[start:stop])))
        rows = f"rows {start}-{stop - 1} ({stop - start})"
        lines.append(f"    {distribution}: {rows}, class {classes}, domain {domains}")
    return lines


def plot_split(path: Path, title: str, columns: dict[str, np.ndarray]) -> None:
    """Save a three-panel scatter plot (by class, domain, distribution) of a 2-D split to ``path``."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    x = columns["X"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    for axis, name in zip(axes[:2], ("y", "domain")):
        values = columns[name]
        for value in np.unique(values):
            rows = values == value
            label = f"{'class' if name == 'y' else 'domain'} {value}"
            axis.scatter(x[rows, 0], x[rows, 1], s=6, label=label, color=plt.cm.tab10(int(value) % 10))
        axis.legend(fontsize=7, markerscale=2, loc="best")
    distributions = columns["distributions"]
    points = axes[2].scatter(x[:, 0], x[:, 1], s=6, c=distributions, cmap="viridis")
    figure.colorbar(points, ax=axes[2], label="distribution", ticks=MaxNLocator(integer=True))
    for axis, what in zip(axes, ("class", "domain", "distribution")):
        axis.set_title(f"by {what}")
        axis.set_xlabel("x[0]")
        axis.set_ylabel("x[1]")
    figure.suptitle(title)
    figure.savefig(path, dpi=90)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m data.inspect", description="Describe, validate and plot a benchmark .npz file."
    )
    parser.add_argument("file", type=Path, help="benchmark file (.npz with X_*, y_*, distributions_*)")
    parser.add_argument("--out", type=Path, default=None, help="folder for the plots (default: the file's)")
    args = parser.parse_args(argv)
    if not args.file.is_file():
        parser.error(f"FILE {args.file} does not exist")
    try:
        splits = load_splits(args.file)
    except (ValueError, OSError) as error:  # SchemaError, pickled or unreadable content
        print(f"invalid: {args.file}: {error}", file=sys.stderr)
        sys.exit(1)

    out = args.out if args.out is not None else args.file.parent
    out.mkdir(parents=True, exist_ok=True)
    print(f"{args.file}: valid benchmark file")
    for split, columns in splits.items():
        print("\n".join(describe(split, columns)))
        if columns["X"].shape[1] != 2:
            print(f"  plot skipped: X_{split} has {columns['X'].shape[1]} features, plots need 2")
            continue
        png = out / f"{args.file.stem}_{split}.png"
        plot_split(png, f"{args.file.stem} [{split}]", columns)
        print(f"  plot: {png}")


if __name__ == "__main__":
    main()
