"""The population launcher's forked workers (``hydra_plugins/memhead_population/workers.py``)."""

import os

from hydra_plugins.memhead_population.workers import run_units, usable_cpus


def test_every_unit_runs_once_and_a_dead_worker_fails_only_its_unit():
    parent = os.getpid()

    def work(unit):
        if unit == 2:
            os._exit(7)  # a worker killed mid-unit (out of memory, say)
        return unit * 10, os.getpid() != parent  # ran in a worker process

    outcomes = dict(run_units(work, 6, 2))
    assert outcomes[2] == ("lost", 7)
    assert {unit: outcome for unit, outcome in outcomes.items() if unit != 2} == {
        unit: ("done", (unit * 10, True)) for unit in (0, 1, 3, 4, 5)
    }


def test_no_more_workers_than_units():
    pids = dict(run_units(lambda unit: os.getpid(), 1, 4))
    assert list(pids) == [0] and pids[0][1] != os.getpid()


def test_usable_cpus_is_the_affinity_mask():
    assert usable_cpus() == len(os.sched_getaffinity(0)) >= 1
