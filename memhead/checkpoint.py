"""Checkpoints in the run directory, so that a killed or requeued run continues where it stopped.

A checkpoint is written atomically at distribution boundaries and holds everything the rest of the
run depends on: model, optimizer, competitor, the metrics so far, the stream position, the timers and
every random number generator. Resuming from it gives the same final metrics as an uninterrupted run.
Files are loaded with ``weights_only=True``: tensors and plain containers only, no pickled objects.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import random
import tempfile
from pathlib import Path

import numpy as np
import torch

from memhead.registry import ConfigError

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the checkpoint before the newest, in case the newest is damaged
# A file is this line, the sha256 of the rest in hex and a newline, then torch.save's bytes: torch does
# not check its zip records' CRCs, so a flipped byte inside a tensor would load silently.
MAGIC = b"memhead-checkpoint sha256\n"
# Temporary files a kill during a write can leave behind (see save and runner.write_json_atomic).
STALE = (".checkpoint.pt.*.tmp", ".metrics.json.*.tmp")

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
    model_state: dict,
    optimizer_state: dict | None,
    competitor_state: dict,
    state,
    timer,
    elapsed_s: float,
    rng: dict,
) -> dict:
    """Everything a run needs to continue after the boundary it has just finished (the optimizer's
    state ``None``: nothing to train)."""
    return {
        "config": config,
        "seed": seed,
        "model": model_state,
        "optimizer": optimizer_state,
        "competitor": competitor_state,
        "protocol": state.state_dict(),
        "timer": {"seconds": dict(timer.seconds), "samples": dict(timer.samples), "elapsed_s": elapsed_s},
        "rng": rng,
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
    """Write ``payload`` with its checksum through a temporary file in the same folder (a kill never
    leaves half a file); the checkpoint it replaces becomes ``checkpoint.prev.pt``."""
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    data = buffer.getbuffer()
    digest = hashlib.sha256(data).hexdigest().encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(MAGIC + digest + b"\n")
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DamagedCheckpoint(Exception):
    """A checkpoint file that cannot be trusted (empty, truncated, altered, not memhead's)."""


def load(path: Path) -> dict:
    """The payload of ``path`` after its checksum is verified; raises :class:`DamagedCheckpoint`."""
    raw = path.read_bytes()
    head_len = len(MAGIC) + 64 + 1
    if not raw.startswith(MAGIC) or len(raw) < head_len:
        raise DamagedCheckpoint("empty, truncated or not a memhead checkpoint")
    digest, data = raw[len(MAGIC) : head_len - 1], memoryview(raw)[head_len:]
    if hashlib.sha256(data).hexdigest().encode() != digest:
        raise DamagedCheckpoint("checksum mismatch")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable payload is damaged
        raise DamagedCheckpoint(f"unreadable ({type(err).__name__})") from err


def load_usable(run_dir: Path) -> dict | None:
    """The newest checkpoint of ``run_dir`` that verifies (the previous one if the newest fails), or
    None; each failure is said in one line."""
    newest, previous = run_dir / CHECKPOINT, run_dir / PREVIOUS
    for path, fallback in ((newest, previous), (previous, None)):
        if not path.is_file():
            continue
        try:
            return load(path)
        except (DamagedCheckpoint, OSError) as err:
            then = f"falling back to {fallback.name}" if fallback and fallback.is_file() else "starting over"
            log.warning("%s is unusable (%s); %s", path, err, then)
    return None


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files of writes a kill interrupted (they are never read)."""
    for pattern in STALE:
        for path in run_dir.glob(pattern):
            path.unlink(missing_ok=True)


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
