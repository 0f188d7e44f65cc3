"""Who owns a run directory, and when a run must stop early.

* :func:`lock` takes an exclusive lock on ``<run dir>/.lock`` for the run's lifetime, so two processes never
  write into one directory; the second is refused with one line.
* :class:`Preemption` turns the signals a cluster sends before it kills a job (SIGTERM; SIGUSR2, which
  submitit and SLURM send ahead of a time limit) into a request that the run honours at its next boundary:
  checkpoint, then stop, so that the requeued job resumes there.
"""

from __future__ import annotations

import fcntl
import signal
import threading
from pathlib import Path

from memhead.registry import ConfigError

LOCK = ".lock"


def lock(run_dir: Path):
    """An open file holding the directory's exclusive lock (released when closed or the process ends)."""
    # Empty and never written: a refused launch leaves every file of the directory as it was.
    handle = open(run_dir / LOCK, "a")  # noqa: SIM115 (held for the run's lifetime)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"{run_dir} is in use by another memhead process; wait for it to finish or choose another "
            "hydra.run.dir"
        ) from None
    return handle


class Preempted(Exception):
    """The run stopped at a boundary on a preemption signal, its checkpoint written."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


PREEMPTION_SIGNALS = (signal.SIGTERM, signal.SIGUSR2)


class Preemption:
    """``with Preemption() as p``: while inside, the signals only set ``p.signum``; the run polls it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, object] = {}

    def _note(self, signum, frame) -> None:
        self.signum = signum

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for sig in PREEMPTION_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def hand_on(self) -> None:
        """After the checkpoint: let an earlier handler (submitit's requeue) act on the signal."""
        handler = self.previous.get(self.signum)
        if callable(handler):
            handler(self.signum, None)
