"""Checkpoints in the run directory, so that a killed or requeued run continues where it stopped.

A checkpoint is written atomically at distribution boundaries and holds everything the rest of the
run depends on: model, optimizer, competitor, the metrics so far, the stream position, the timers and
every random number generator. Resuming from it gives the same final metrics as an uninterrupted run.
Files are loaded with ``weights_only=True``: tensors and plain containers only, no pickled objects.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from memhead.registry import ConfigError

CHECKPOINT = "checkpoint.pt"

# Options that may change between the interrupted run and its continuation.
VOLATILE = ("progress", "logger", "checkpoint", "plots")


def rng_state(generator: torch.Generator) -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    return {
        "python": [version, list(internal), gauss_py],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generator": generator.get_state(),
    }


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    version, internal, gauss_py = state["python"]
    random.setstate((version, tuple(internal), gauss_py))
    np_state = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    generator.set_state(state["generator"])


def capture(
    *,
    config: dict,
    seed: int,
    model,
    optimizer,
    competitor,
    state,
    timer,
    elapsed_s: float,
    generator: torch.Generator,
) -> dict:
    """Everything a run needs to continue after the boundary it has just finished."""
    return {
        "config": config,
        "seed": seed,
        "model": model.state_dict(),
        "optimizer": None if optimizer is None else optimizer.state_dict(),  # None: nothing to train
        "competitor": competitor.state_dict(),
        "protocol": state.state_dict(),
        "timer": {"seconds": dict(timer.seconds), "samples": dict(timer.samples), "elapsed_s": elapsed_s},
        "rng": rng_state(generator),
    }


def restore(saved: dict, *, model, optimizer, competitor, timer, generator: torch.Generator):
    """Load what :func:`capture` saved into freshly built objects; returns (protocol state, elapsed s)."""
    from memhead.protocol import ProtocolState

    model.load_state_dict(saved["model"])
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    competitor.load_state_dict(saved["competitor"])
    timer.seconds.update(saved["timer"]["seconds"])
    timer.samples.update(saved["timer"]["samples"])
    set_rng_state(saved["rng"], generator)
    return ProtocolState.from_state_dict(saved["protocol"]), saved["timer"]["elapsed_s"]


def save(path: Path, payload: dict) -> None:
    """``torch.save`` through a temporary file in the same folder, so a kill never leaves half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def comparable(config: dict) -> dict:
    return {key: value for key, value in config.items() if key not in VOLATILE}


def first_difference(old, new, prefix: str = "") -> str | None:
    """The first option whose value differs, as ``key: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            found = first_difference(old.get(key), new.get(key), f"{prefix}{key}.")
            if found:
                return found
        return None
    return None if old == new else f"{prefix.rstrip('.')}: {old!r} -> {new!r}"


def check_same_run(run_dir: Path, saved: dict, current: dict) -> None:
    """Refuse to continue a run directory that holds another configuration's run."""
    diff = first_difference(comparable(saved), comparable(current))
    if diff:
        raise ConfigError(
            f"{run_dir} holds a run with another configuration ({diff}); choose another hydra.run.dir"
        )
