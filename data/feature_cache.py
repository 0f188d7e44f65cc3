"""A small on-disk cache of feature arrays, without pickle.

An entry is ``<prefix>-<hash>.npy`` (the array) plus ``<prefix>-<hash>.json`` (its key, shape and
metadata), where ``<hash>`` is a digest of the key. Both are written atomically (a temporary file in
the same folder, then ``os.replace``), the ``.json`` last: an entry exists once its record does.

A record whose key differs from the one its name was derived from, or an array whose shape differs
from its record, is an error naming the file rather than a silent recomputation: it means the folder
was edited or mixed by hand, and overwriting it could hide that.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

from memhead.registry import ConfigError

CACHE_FORMAT = 1
_SAMPLE_BYTES = 1 << 20


def _canonical(value: Any) -> Any:
    """The value as it reads back from JSON (tuples become lists), so keys compare equal."""
    return json.loads(json.dumps(value, sort_keys=True))


def entry_stem(key: dict[str, Any], prefix: str) -> str:
    """The file name (without suffix) of the entry for ``key``."""
    digest = hashlib.sha256(json.dumps(_canonical(key), sort_keys=True).encode()).hexdigest()
    return f"{prefix}-{digest[:20]}"


def data_fingerprint(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """A cheap identity of data files: name, size and a hash of three 1 MiB samples of each.

    Sizes and sampled bytes (not mtimes) so that copying the data elsewhere keeps the cache valid.
    """
    prints = []
    for path in paths:
        size = os.path.getsize(path)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for offset in sorted({0, max(0, size // 2 - _SAMPLE_BYTES // 2), max(0, size - _SAMPLE_BYTES)}):
                handle.seek(offset)
                digest.update(handle.read(_SAMPLE_BYTES))
        prints.append({"name": Path(path).name, "size": size, "sample_sha256": digest.hexdigest()})
    return prints


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` through ``write(handle)`` so readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    try:
        with handle:
            write(handle)
        os.replace(handle.name, path)
    except BaseException:
        os.unlink(handle.name)
        raise


def load(cache_dir: Path, key: dict[str, Any], prefix: str) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The cached array and metadata for ``key``, or ``None`` when there is no complete entry.

    Raises:
        ConfigError: the entry exists but does not match its key or record (see the module docstring).
    """
    stem = entry_stem(key, prefix)
    record_path, array_path = cache_dir / f"{stem}.json", cache_dir / f"{stem}.npy"
    if not record_path.is_file() or not array_path.is_file():
        return None
    hint = "delete it and its .npy/.json twin to recompute"
    try:
        record = json.loads(record_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"feature cache {record_path}: unreadable record ({err}); {hint}") from err
    if not isinstance(record, dict) or record.get("key") != _canonical(key):
        raise ConfigError(
            f"feature cache {record_path}: its recorded key differs from the expected one; {hint}"
        )
    try:
        array = np.load(array_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ConfigError(f"feature cache {array_path}: unreadable array ({err}); {hint}") from err
    if list(array.shape) != record.get("shape") or str(array.dtype) != record.get("dtype"):
        raise ConfigError(
            f"feature cache {array_path}: shape {list(array.shape)} {array.dtype} differs from its record "
            f"{record.get('shape')} {record.get('dtype')}; {hint}"
        )
    return array, record.get("meta", {})


def save(cache_dir: Path, key: dict[str, Any], prefix: str, array: np.ndarray, meta: dict[str, Any]) -> Path:
    """Store ``array`` under ``key`` with JSON-serialisable ``meta``; returns the array's path."""
    stem = entry_stem(key, prefix)
    array_path = cache_dir / f"{stem}.npy"
    atomic_write(array_path, lambda handle: np.save(handle, array, allow_pickle=False))
    record = {
        "format": CACHE_FORMAT,
        "key": _canonical(key),
        "shape": list(array.shape),
        "dtype": str(array.dtype),
        "meta": _canonical(meta),
    }
    text = json.dumps(record, indent=1, sort_keys=True)
    atomic_write(cache_dir / f"{stem}.json", lambda handle: handle.write(text.encode()))
    return array_path
