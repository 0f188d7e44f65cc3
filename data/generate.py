"""Write the 2-D benchmark files (``bi-modals_<ORDER>.npz``, ``bi-moons_<ORDER>.npz``).

Usage::

    python -m data.generate --out DIR [--n N] [--kinds modes moons] [--orders IID CI CDI CDID]
                            [--shuffle-seed S]

The files have the paper's names and schema (``X_*``, ``y_*``, ``domain_*``, ``distributions_*`` for
train, val and test) and are written with :func:`numpy.savez` (no pickle). Other generation parameters
keep the defaults of :mod:`data.two_d`.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from data.two_d import (
    KINDS,
    MODES_DEFAULTS,
    MOONS_DEFAULTS,
    ORDERS,
    apply_order,
    generate_modes,
    generate_moons,
)
from memhead.registry import ConfigError

# The paper's file-name stem for each kind.
FILE_STEMS = {"modes": "bi-modals", "moons": "bi-moons"}
_GENERATORS = {"modes": (generate_modes, MODES_DEFAULTS), "moons": (generate_moons, MOONS_DEFAULTS)}
SPLITS = ("train", "val", "test")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.generate", description="Write the 2-D MODES/MOONS benchmark files (.npz)."
    )
    parser.add_argument("--out", type=Path, required=True, help="folder to write into (created if missing)")
    parser.add_argument("--n", type=int, default=None, help="training samples per file (default 1000)")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="benchmarks to write")
    parser.add_argument(
        "--orders", nargs="+", choices=ORDERS, default=list(ORDERS), help="stream orders to write"
    )
    parser.add_argument(
        "--shuffle-seed", type=int, default=None, help="seed of the split permutation (default 1234)"
    )
    return parser


def write_files(out: Path, kinds: list[str], orders: list[str], **params: int) -> list[Path]:
    """Generate every ``kind`` once and write one file per order, printing each; returns the paths.

    Args:
        out: Folder to write into (created if missing).
        kinds: ``modes`` and/or ``moons``.
        orders: Any of ``IID``, ``CI``, ``CDI``, ``CDID``.
        **params: Generation parameters (``n``, ``shuffle_seed``) overriding the defaults.

    Raises:
        ConfigError: A generation parameter is invalid.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in dict.fromkeys(kinds):  # de-duplicated, order kept
        generate, defaults = _GENERATORS[kind]
        splits = generate(**params)
        for order in dict.fromkeys(orders):
            path = out / f"{FILE_STEMS[kind]}_{order}.npz"
            shuffle_seed = params.get("shuffle_seed", defaults["shuffle_seed"])
            stream = apply_order(splits, order, shuffle_seed=shuffle_seed)
            np.savez(path, **stream)
            written.append(path)
            sizes = ", ".join(f"{split} {len(stream[f'y_{split}'])}" for split in SPLITS)
            print(f"wrote {path} ({sizes})")
    return written


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    params = {"n": args.n, "shuffle_seed": args.shuffle_seed}
    params = {name: value for name, value in params.items() if value is not None}
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a folder")
    try:
        write_files(args.out, args.kinds, args.orders, **params)
    except ConfigError as error:
        # Name the command-line option rather than the config key.
        message = re.sub(r"benchmark\.n\b", "--n", str(error))
        parser.error(message.replace("benchmark.shuffle_seed", "--shuffle-seed"))


if __name__ == "__main__":
    main()
