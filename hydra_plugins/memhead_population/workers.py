"""``hydra.launcher.workers``: populations trained side by side in forked worker processes.

The launcher composes and groups the sweep in its own process, then forks the workers: they inherit
the imported modules and the composed configs, so a worker starts in milliseconds (no second import
of torch, nothing pickled on the way in but a unit's number). Each worker trains one population at a
time and sends back what the launcher settles: plain lists of directories, flags and records.

* A worker dies with its launcher (Linux: ``PR_SET_PDEATHSIG``), so a launcher killed with ``kill -9``
  leaves no process training on in the run directories a relaunch resumes.
* A preemption signal (``SIGTERM``, ``SIGUSR2``) to the launcher reaches every busy worker: each stops
  at its next boundary with its checkpoints written, as an inline population does; no unit starts
  after it. A worker signalled while idle starts nothing more.
"""

from __future__ import annotations

import ctypes
import gc
import multiprocessing
import os
import signal
import sys
from collections.abc import Callable, Iterator
from multiprocessing.connection import wait

from memhead.run_dir import PREEMPTION_SIGNALS, Preempted

PR_SET_PDEATHSIG = 1  # linux/prctl.h


def usable_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _die_with(parent: int) -> None:
    """The kernel kills this process when its parent dies (Linux); a parent gone already: exit."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def _serve(connection, work: Callable[[int], object], parent: int, threads: int) -> None:
    """A worker's life: run ``work(unit)`` for each unit number received, until ``None``."""
    import torch

    _die_with(parent)
    noted: list[int] = []
    for sig in PREEMPTION_SIGNALS:  # between units; a population's own handler takes over inside one
        signal.signal(sig, lambda signum, frame: noted.append(signum))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the launcher's to handle
    torch.set_num_threads(threads)  # a run that sets its own threads (config `threads`) still does
    try:
        while (unit := connection.recv()) is not None:
            if noted:
                connection.send(("preempted", noted[0], f"stopped by signal {noted[0]} before it started"))
                continue
            try:
                connection.send(("done", work(unit)))
            except Preempted as err:
                connection.send(("preempted", err.signum, str(err)))
    finally:
        connection.close()
        os._exit(0)  # the launcher's exit handlers (Hydra's, logging's) are not the worker's to run


def run_units(work: Callable[[int], object], units: int, workers: int) -> Iterator[tuple[int, tuple]]:
    """``work(0) .. work(units - 1)`` in ``workers`` forked processes; yields ``(unit, outcome)`` as each
    ends: ``("done", value)``, ``("preempted", signum, message)`` or ``("lost", exit code)`` (its worker
    died). After a preemption signal no unit starts; nor on a worker that died: a unit that no live
    worker is left to run is not yielded either."""
    context = multiprocessing.get_context("fork")
    threads = max(1, usable_cpus() // workers)
    gc.freeze()  # the forked workers share the launcher's objects without the collector touching them
    pool: dict = {}  # connection -> process
    busy: dict = {}  # connection -> unit
    signalled: list[int] = []

    def forward(signum, frame) -> None:
        signalled.append(signum)
        for connection in busy:
            os.kill(pool[connection].pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in PREEMPTION_SIGNALS}
    pending = iter(range(units))
    try:
        for _ in range(min(workers, units)):
            mine, theirs = context.Pipe()
            process = context.Process(target=_serve, args=(theirs, work, os.getpid(), threads), daemon=True)
            process.start()
            theirs.close()
            pool[mine] = process
            busy[mine] = next(pending)
            mine.send(busy[mine])
        while busy:
            for connection in wait(list(busy)):
                try:
                    outcome = connection.recv()
                except EOFError:  # the worker died (killed, out of memory)
                    pool[connection].join()
                    outcome = ("lost", pool[connection].exitcode)
                yield busy.pop(connection), outcome
                unit = None if signalled or outcome[0] == "lost" else next(pending, None)
                if unit is not None:
                    connection.send(unit)
                    busy[connection] = unit
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for connection, process in pool.items():
            if connection in busy:  # the launcher is leaving early (an exception, Ctrl-C)
                process.kill()
            else:
                try:
                    connection.send(None)
                except OSError:
                    pass
            process.join()
            connection.close()
        gc.unfreeze()
