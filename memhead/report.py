"""Tables of a sweep: every configuration's metrics over seeds, and the best configuration per method.

Usage::

    python -m memhead.report SWEEP_DIR [--select val] [--metric avg_accuracy] [--out DIR]

A *run* is a directory holding ``metrics.json`` (written by :func:`memhead.runner.run`) or Hydra's
``.hydra/overrides.yaml``. Only *complete* runs count (``"complete": true`` in ``metrics.json``); the
others are listed with their state: partial (stopped, killed or still running), failed (with the
reason the run recorded), without metrics, unreadable, and jobs of ``multirun.yaml``'s sweep that never
got a run directory. A run's identity is the configuration it recorded in ``metrics.json``, never
Hydra's ``.hydra/overrides.yaml`` (which a later, refused launch may have rewritten). Complete runs
whose recorded configurations differ only by ``seed`` form one *configuration*; a *method* is a
(benchmark, model, competitor) triple. For every configuration the report gives the mean ± sample
standard deviation over seeds of each split's final metrics (NaN when any seed's value is NaN or
missing, and it says how many), and for every method it marks the configuration with the best mean of
the selection split's metric (the paper selects on the validation ``avg_accuracy`` and reports test
metrics).

Ties: means within 1e-9 of the best are tied; the report says so, lists the tied configurations and
breaks the tie by, in order, the selection split's other criterion (``avg_forgetting``, lowest, or
``avg_accuracy`` when selecting on forgetting), then the same two on ``val`` or ``train`` (whichever
is not the selection split; ``train`` after ``val``), then the most seeds, then the first label. Test
metrics are never read unless ``--select test``.

Writes ``report.csv`` (every configuration, every split and metric) and ``report.md`` into ``--out``
(default: ``SWEEP_DIR``) and prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from memhead.metrics import ALL_METRICS, LOWER_IS_BETTER
from memhead.metrics import METRICS as PAPER_METRICS

SPLITS = ("train", "val", "test")
METRICS = ALL_METRICS
# Recorded options shown in their own columns, hence left out of the configuration label.
METHOD_KEYS = frozenset({"model.name", "competitor.name", "benchmark.name", "benchmark.order"})
SEED_KEY = "seed"
# Means closer than this are the same number written two ways (summation order), hence tied.
TIE_TOLERANCE = 1e-9
FAILED_FILE = "failed.json"


class ReportError(Exception):
    """Input the report cannot work with (no runs, a missing directory); one line for the user."""


def _one_line(err: BaseException | str) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@dataclass
class Run:
    """One run directory (or one job of a sweep that never got a directory).

    Attributes:
        path: the run directory, or the sweep directory for a job that never started.
        overrides: Hydra's task overrides of the run (``key=value``, normalised), with every value the
            run recorded in ``metrics.json`` in place of what ``.hydra/overrides.yaml`` says.
        record: the parsed ``metrics.json`` of a complete run; ``None`` for every other state.
        state: ``complete``, ``partial``, ``failed``, ``no metrics``, ``unreadable`` or ``not started``.
        problem: why the run does not count (for the list of runs not counted).
        notes: what the reader should know about a run that counts (shown in the report's notes).
    """

    path: Path
    overrides: tuple[str, ...]
    record: dict | None = None
    state: str = "complete"
    problem: str | None = None
    notes: list[str] = field(default_factory=list)
    # Overrides whose value came from the record: the launch that ran may not have given them at all.
    corrected: frozenset[str] = frozenset()

    @property
    def seed(self) -> int | None:
        if self.record is not None and "seed" in self.record:
            return int(self.record["seed"])
        return None

    def metric(self, split: str, name: str) -> float | None:
        """The final ``split`` ``name``; ``None`` when the run did not record it."""
        value = self.record.get("final", {}).get(split, {}).get(name) if self.record else None
        return None if value is None else float(value)


@dataclass
class Configuration:
    """Complete runs of one method whose recorded configurations differ only by the seed.

    Attributes:
        method: (benchmark label, model, competitor), read from the runs' recorded configuration.
        identity: the recorded configuration without seed and volatile options, flattened.
        overrides: the overrides (without the seed) that all its runs share.
        runs: its complete runs.
        label: the recorded options that vary across the report, for the tables.
        selected: whether it is its method's best on the selection metric.
        tied: for the selected one, the other configurations tied with it on the selection metric.
        decided_by: for a selected one with ties, the criterion that broke the tie.
    """

    method: tuple[str, str, str]
    identity: tuple = ()
    overrides: tuple[str, ...] = ()
    runs: list[Run] = field(default_factory=list)
    label: str = ""
    selected: bool = False
    tied: list[Configuration] = field(default_factory=list)
    decided_by: str | None = None

    @property
    def seeds(self) -> list[int | None]:
        return [run.seed for run in self.runs]

    def values(self, split: str, name: str) -> list[float | None]:
        return [run.metric(split, name) for run in self.runs]

    def incomplete(self, split: str, name: str) -> int:
        """How many seeds lack a number for the metric (NaN or not recorded) while others have one."""
        values = self.values(split, name)
        if all(v is None for v in values):
            return 0
        return sum(v is None or math.isnan(v) for v in values)

    def mean_std(self, split: str, name: str) -> tuple[float, float]:
        """Mean and sample standard deviation (NaN with fewer than two values) over the seeds.

        NaN as soon as one seed's value is NaN or missing: a mean over the other seeds would look
        like a result of every seed.
        """
        values = self.values(split, name)
        if not values or any(v is None or math.isnan(v) for v in values):
            return math.nan, math.nan
        mean = statistics.fmean(values)
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return mean, std


@dataclass
class Report:
    """What the tables show: configurations (sorted), runs not counted, the selection rule, notes."""

    configurations: list[Configuration]
    without_metrics: list[Run]
    select_split: str
    select_metric: str
    root: Path
    notes: list[str] = field(default_factory=list)

    @property
    def selected(self) -> list[Configuration]:
        return [c for c in self.configurations if c.selected]


# --- reading runs ---------------------------------------------------------------------------------


def _natural_key(path: Path) -> list:
    """Sort ``2`` before ``10`` (Hydra numbers the jobs of a sweep)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def _parse_overrides(lines: Iterable[str]) -> list:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_overrides([str(line) for line in lines])


def normalise_overrides(lines: Iterable[str]) -> tuple[str, ...]:
    """``key=value`` strings as Hydra re-renders them (``1.0e-4`` and ``0.0001`` compare equal), sorted."""
    rendered = []
    for override in _parse_overrides(lines):
        if override.is_sweep_override():
            raise ReportError(f"a run's overrides hold a sweep: {override.input_line}")
        rendered.append(f"{override.get_key_element()}={override.get_value_element_as_str()}")
    return tuple(sorted(rendered))


def override_key(override: str) -> str:
    """The option an override sets, without Hydra's ``+``/``++``/``~`` prefix."""
    return override.split("=", 1)[0].lstrip("+~")


def _read_overrides(run_dir: Path) -> tuple[tuple[str, ...], str | None]:
    """The run's overrides and, when ``.hydra/overrides.yaml`` cannot be read, why (one line)."""
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return (), None
    try:
        content = OmegaConf.to_container(OmegaConf.load(path))
        if content is not None and not isinstance(content, list):
            raise ValueError("not a list of overrides")
        lines = [str(line) for line in content or []]
    except Exception as err:  # YAML, OmegaConf and OS errors alike: the run is listed, never a traceback
        return (), f"unreadable .hydra/overrides.yaml ({_one_line(err)})"
    try:
        return normalise_overrides(lines), None
    except (HydraException, ReportError):  # not Hydra's own output: compare the text as it is
        return tuple(sorted(lines)), None


def _lookup(config: dict, dotted: str) -> tuple[bool, object]:
    node: object = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _same_value(given, recorded) -> bool:
    if isinstance(given, bool) or isinstance(recorded, bool):
        return type(given) is type(recorded) and given == recorded
    if isinstance(given, (int, float)) and isinstance(recorded, (int, float)):
        return given == recorded or math.isclose(given, recorded, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(given, (list, tuple)) and isinstance(recorded, (list, tuple)):
        return len(given) == len(recorded) and all(map(_same_value, given, recorded))
    if isinstance(given, str) and isinstance(recorded, str) and not os.path.isabs(given):
        # A relative path the run resolved against its working directory.
        if os.path.isabs(recorded) and recorded.endswith(os.sep + os.path.normpath(given)):
            return True
    return given == recorded


def _render(value) -> str:
    """A recorded value as a Hydra override value."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_render(v) for v in value) + "]"
    if isinstance(value, str) and not re.fullmatch(r"[\w./:-]*", value):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(value)


def reconcile(overrides: Sequence[str], config: dict) -> tuple[tuple[str, ...], list[str]]:
    """Overrides with the run's recorded value for every option it recorded, and the disagreements.

    Only options that are plain values of the recorded configuration can be checked (a config group
    such as ``model=lp`` or ``+sweep=smoke`` is not); a negative seed means "time-based", never a
    disagreement with the seed drawn.
    """
    from hydra.errors import HydraException

    corrected, disagreements = [], []
    for line in overrides:
        key = override_key(line)
        found, recorded = _lookup(config, key)
        if line.startswith("~") or not found or isinstance(recorded, dict):
            corrected.append(line)
            continue
        try:
            (parsed,) = _parse_overrides([line])
            given = parsed.value()
        except HydraException:
            corrected.append(line)
            continue
        if (key == SEED_KEY and isinstance(given, int) and given < 0) or _same_value(given, recorded):
            corrected.append(line)
            continue
        disagreements.append(f"{key}={parsed.get_value_element_as_str()} there, {_render(recorded)} recorded")
        corrected.append(f"{line.split('=', 1)[0]}={_render(recorded)}")
    try:
        return normalise_overrides(corrected), disagreements
    except (HydraException, ReportError):
        return tuple(sorted(corrected)), disagreements


def _check_record(record) -> None:
    """A complete record the tables can use; raises ValueError with a one-line reason otherwise."""
    if not isinstance(record.get("config"), dict):
        raise ValueError("no recorded 'config'")
    final = record.get("final")
    if not isinstance(final, dict) or not all(isinstance(v, dict) for v in final.values()):
        raise ValueError("no 'final' metrics")
    for split, values in final.items():
        for name, value in values.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"final.{split}.{name} is not a number ({value!r})")
    if "seed" in record and (isinstance(record["seed"], bool) or not isinstance(record["seed"], int)):
        raise ValueError(f"seed is not an integer ({record['seed']!r})")


def _failure_reason(run_dir: Path) -> str | None:
    """The one-line reason in ``failed.json`` (a job that failed alone in a multirun), if there is one."""
    path = run_dir / FAILED_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        error = record.get("error") if isinstance(record, dict) else None
    except (OSError, ValueError) as err:
        return f"{FAILED_FILE} unreadable ({_one_line(err)})"
    return _one_line(str(error)) if error else "no reason recorded"


def _log_hint(run_dir: Path) -> str:
    logs = sorted(p.name for p in run_dir.glob("*.log"))
    return f"; log: {logs[0]}" if logs else ""


def _read_run(run_dir: Path) -> Run:
    overrides, overrides_problem = _read_overrides(run_dir)
    failure = _failure_reason(run_dir)
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        if failure is not None:
            return Run(run_dir, overrides, state="failed", problem=failure)
        if overrides_problem is not None:
            return Run(run_dir, overrides, state="unreadable", problem=overrides_problem)
        problem = f"no metrics.json (failed, not started, or before its first boundary{_log_hint(run_dir)})"
        return Run(run_dir, overrides, state="no metrics", problem=problem)
    try:
        record = json.loads(metrics.read_text())
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        return Run(
            run_dir, overrides, state="unreadable", problem=f"unreadable metrics.json ({_one_line(err)})"
        )
    notes, corrected = [], frozenset()
    if isinstance(record.get("config"), dict):
        before = set(overrides)
        overrides, disagreements = reconcile(overrides, record["config"])
        corrected = frozenset(set(overrides) - before)
        if disagreements:
            notes.append(
                ".hydra/overrides.yaml disagrees with metrics.json ("
                + "; ".join(disagreements)
                + "): shown as recorded"
            )
    if record.get("failed") or (record.get("error") and record.get("complete") is not True):
        reason = _one_line(str(record.get("error") or "no reason recorded"))
        return Run(run_dir, overrides, state="failed", problem=reason, notes=notes, corrected=corrected)
    if record.get("complete") is not True:
        done = len(record.get("boundaries") or [])
        problem = (
            f"partial: {done} boundaries recorded (stopped, killed or still running{_log_hint(run_dir)})"
        )
        if failure is not None:
            return Run(run_dir, overrides, state="failed", problem=failure, notes=notes, corrected=corrected)
        return Run(run_dir, overrides, state="partial", problem=problem, notes=notes, corrected=corrected)
    try:
        _check_record(record)
    except ValueError as err:
        problem = f"unreadable metrics.json ({err})"
        return Run(run_dir, overrides, state="unreadable", problem=problem, corrected=corrected)
    if overrides_problem is not None:
        notes.append(f"{overrides_problem}: grouped by its recorded configuration")
    if failure is not None:
        notes.append(f"complete, but {FAILED_FILE} says a later launch failed ({failure})")
    return Run(run_dir, overrides, record=record, notes=notes, corrected=corrected)


def _is_run_dir(path: Path) -> bool:
    return any(
        (path / name).is_file()
        for name in ("metrics.json", FAILED_FILE, os.path.join(".hydra", "overrides.yaml"))
    )


def find_runs(root: Path) -> tuple[list[Run], list[Path]]:
    """Every run directory under ``root`` and every sweep directory (holding ``multirun.yaml``).

    Hidden folders (``.submitit``, ``.hydra``) are not searched; nor is the inside of a run.
    """
    runs, sweeps = [], []
    for current, dirs, _files in os.walk(root):
        here = Path(current)
        if _is_run_dir(here):
            runs.append(_read_run(here))
            dirs[:] = []
            continue
        if (here / "multirun.yaml").is_file():
            sweeps.append(here)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    return sorted(runs, key=lambda r: _natural_key(r.path)), sweeps


def expected_jobs(sweep_dir: Path) -> tuple[list[tuple[str, ...]] | None, str | None]:
    """The overrides of every job of the sweep recorded in ``multirun.yaml`` (basic sweeper only).

    Returns ``(jobs, None)``, or ``(None, why)`` when the sweep cannot be expanded here (another
    sweeper, an unreadable file): the report then says that jobs which never started are not listed.
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from omegaconf import OmegaConf

    try:
        hydra = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
        target = str(hydra.sweeper.get("_target_", ""))
        if not target.endswith(".BasicSweeper"):
            return None, f"sweeper {target or '?'}: its jobs cannot be listed from multirun.yaml"
        # As BasicSweeper.sweep: the sweep config's params first (none on a command-line sweep), then
        # the command line's task overrides.
        params = hydra.sweeper.get("params")
        params = OmegaConf.to_container(params) if params is not None else {}
        lines = [f"{key}={value}" for key, value in params.items()]
        lines += [str(line) for line in hydra.overrides.task or []]
        batches = BasicSweeper.split_arguments(_parse_overrides(lines), None)
        return [normalise_overrides(job) for batch in batches for job in batch], None
    except Exception as err:  # whatever the file holds: one line in the report, never a traceback
        return None, f"multirun.yaml cannot be expanded ({_one_line(err)})"


def jobs_without_a_run(sweep_dir: Path, runs: Sequence[Run]) -> tuple[list[Run], str | None]:
    """Jobs of the sweep in ``sweep_dir`` that no run under it ran, and why they cannot be listed."""
    expected, why = expected_jobs(sweep_dir)
    if expected is None:
        return [], why
    present = [run for run in runs if sweep_dir in run.path.parents]
    hint = "; submitit logs: .submitit/" if (sweep_dir / ".submitit").is_dir() else ""
    missing = []
    for job in expected:
        # A corrected override may not have been part of the job (a refused launch added it).
        answer = next(
            (
                r
                for r in present
                if job in (r.overrides, tuple(o for o in r.overrides if o not in r.corrected))
            ),
            None,
        )
        if answer is not None:
            present.remove(answer)  # each run answers for one job
        else:
            problem = (
                f"no run of this job (not started, refused, or failed before Hydra made its directory{hint})"
            )
            missing.append(Run(sweep_dir, job, state="not started", problem=problem))
    return missing, None


# --- grouping and selection ------------------------------------------------------------------------


def benchmark_label(config: dict) -> str:
    """``modes-CDI``, ``moons-CI``, ``ns_imagenet``, ``features:bi-modals_CDI`` ..."""
    bench = config.get("benchmark", {})
    name = str(bench.get("name", "?"))
    if name == "features" and bench.get("path"):
        return f"features:{Path(str(bench['path'])).stem}"
    return f"{name}-{bench['order']}" if bench.get("order") else name


def method_of(run: Run) -> tuple[str, str, str]:
    config = run.record.get("config", {}) if run.record else {}
    return (
        benchmark_label(config),
        str(config.get("model", {}).get("name", "?")),
        str(config.get("competitor", {}).get("name", "none")),
    )


def _flatten(config: dict, prefix: str = "") -> dict[str, object]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity_of(config: dict) -> dict[str, object]:
    """The recorded options that make a configuration: all but the seed and the volatile ones."""
    from memhead.checkpoint import VOLATILE

    kept = {k: v for k, v in config.items() if k != SEED_KEY and k not in VOLATILE}
    return _flatten(kept)


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True)


def group_runs(runs: Iterable[Run]) -> list[Configuration]:
    """Configurations: complete runs of one method with the same recorded configuration but the seed."""
    groups: dict[tuple, Configuration] = {}
    options: dict[tuple, dict[str, object]] = {}
    for run in runs:
        flat = identity_of(run.record["config"])
        identity = tuple(sorted((k, _canonical(v)) for k, v in flat.items()))
        key = (method_of(run), identity)
        if key not in groups:
            groups[key] = Configuration(method=key[0], identity=identity)
            options[key] = flat
        groups[key].runs.append(run)
    for configuration in groups.values():
        shared = set.intersection(
            *(set(o for o in run.overrides if override_key(o) != SEED_KEY) for run in configuration.runs)
        )
        configuration.overrides = tuple(sorted(shared))
    _label(groups, options)
    return sorted(groups.values(), key=lambda c: (c.method, c.label))


def _label(groups: dict[tuple, Configuration], options: dict[tuple, dict[str, object]]) -> None:
    """Label each configuration by the recorded options that vary: within its method (an absent option
    counts as a value), or across the whole report when every configuration has the option."""
    keys = sorted({k for flat in options.values() for k in flat} - METHOD_KEYS)
    varying_in: dict[tuple, set[str]] = {}
    for key in keys:
        everywhere = all(key in flat for flat in options.values())
        if everywhere and len({_canonical(flat[key]) for flat in options.values()}) > 1:
            for group in groups:
                varying_in.setdefault(group, set()).add(key)
            continue
        by_method: dict[tuple, set[str]] = {}
        for group, flat in options.items():
            by_method.setdefault(group[0], set()).add(_canonical(flat.get(key, "<absent>")))
        for group in groups:
            if len(by_method[group[0]]) > 1:
                varying_in.setdefault(group, set()).add(key)
    for group, configuration in groups.items():
        flat = options[group]
        shown = [f"{k}={_render(flat[k])}" for k in keys if k in varying_in.get(group, ()) and k in flat]
        configuration.label = " ".join(shown) or "(nothing varied)"


def tie_break_criteria(split: str, metric: str) -> list[tuple[str, str]]:
    """The selection criterion, then what breaks its ties; ``test`` only when selecting on test."""
    splits = [split] + [s for s in ("val", "train") if s != split]
    metrics = [metric] + [m for m in ("avg_accuracy", "avg_forgetting") if m != metric]
    return [(s, m) for s in splits for m in metrics]


def _score(configuration: Configuration, split: str, metric: str) -> float:
    """Higher is better; a configuration without the number ranks last."""
    mean, _ = configuration.mean_std(split, metric)
    if math.isnan(mean):
        return -math.inf
    return -mean if metric in LOWER_IS_BETTER else mean


def _best(candidates: list[Configuration], split: str, metric: str) -> list[Configuration]:
    top = max(_score(c, split, metric) for c in candidates)
    if top == -math.inf:
        return candidates
    return [c for c in candidates if _score(c, split, metric) >= top - TIE_TOLERANCE]


def select_best(configurations: Sequence[Configuration], split: str, metric: str) -> None:
    """Mark, per method, the configuration with the best mean of ``split``'s ``metric``.

    Ties (within ``TIE_TOLERANCE``) are recorded on the winner (``tied``) and broken by
    :func:`tie_break_criteria`, then by the most seeds, then by the first label. A configuration
    without the metric (e.g. no ``val`` split, or a NaN seed) is never selected.
    """
    by_method: dict[tuple, list[Configuration]] = {}
    for configuration in configurations:
        configuration.selected, configuration.tied, configuration.decided_by = False, [], None
        if not math.isnan(configuration.mean_std(split, metric)[0]):
            by_method.setdefault(configuration.method, []).append(configuration)
    for candidates in by_method.values():
        criteria = tie_break_criteria(split, metric)
        tied = _best(candidates, *criteria[0])
        remaining, decided_by = tied, None
        for criterion in criteria[1:]:
            if len(remaining) == 1:
                break
            narrowed = _best(remaining, *criterion)
            if len(narrowed) < len(remaining):
                decided_by = " ".join(criterion)
            remaining = narrowed
        if len(remaining) > 1:
            most = max(len(c.runs) for c in remaining)
            narrowed = [c for c in remaining if len(c.runs) == most]
            if len(narrowed) < len(remaining):
                decided_by = "most seeds"
            remaining = narrowed
        if len(remaining) > 1:
            remaining = sorted(remaining, key=lambda c: c.label)
            decided_by = "first label (tied on every criterion)"
        winner = remaining[0]
        winner.selected = True
        if len(tied) > 1:
            winner.tied = [c for c in tied if c is not winner]
            winner.decided_by = decided_by


def _nan_notes(configurations: Sequence[Configuration], root: Path) -> list[str]:
    notes = []
    for configuration in configurations:
        for run in configuration.runs:
            bad = [
                f"{s}.{m}"
                for s in SPLITS
                for m in METRICS
                if (v := run.metric(s, m)) is not None and math.isnan(v)
            ]
            if bad:
                notes.append(
                    f"{_relative(run.path, root)}: NaN in {', '.join(bad)}; those means of its "
                    f"configuration are NaN (never selected)"
                )
    return notes


def build_report(root: str | Path, select_split: str = "val", select_metric: str = "avg_accuracy") -> Report:
    """Read every run under ``root``, group the complete ones, select the best per method.

    Raises:
        ReportError: ``root`` is not a directory, holds no runs, or the selection is unknown.
    """
    root = Path(root)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory")
    if select_split not in SPLITS:
        raise ReportError(f"--select must be one of {', '.join(SPLITS)} (got {select_split!r})")
    if select_metric not in METRICS:
        raise ReportError(f"--metric must be one of {', '.join(METRICS)} (got {select_metric!r})")
    runs, sweeps = find_runs(root)
    missing, notes = [], []
    for sweep in sweeps:
        jobs, why = jobs_without_a_run(sweep, runs)
        missing += jobs
        if why:
            notes.append(f"{_relative(sweep, root)}: {why}; jobs that never started are not listed")
    if not runs and not missing:
        raise ReportError(f"no runs under {root} (no metrics.json nor .hydra/overrides.yaml)")
    complete = [run for run in runs if run.record is not None]
    configurations = group_runs(complete)
    select_best(configurations, select_split, select_metric)
    notes += [f"{_relative(run.path, root)}: {note}" for run in runs for note in run.notes]
    notes += _nan_notes(configurations, root)
    without = [run for run in runs if run.record is None] + missing
    return Report(configurations, without, select_split, select_metric, root, notes)


# --- output ---------------------------------------------------------------------------------------


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


def _cell(configuration: Configuration, split: str, metric: str) -> str:
    """Mean ± std, or ``NaN (k of n seeds)`` when some seeds have no number for it."""
    bad = configuration.incomplete(split, metric)
    if bad:
        return f"NaN ({bad} of {len(configuration.runs)} seeds)"
    return _fmt(*configuration.mean_std(split, metric))


def _seeds(configuration: Configuration) -> str:
    return " ".join("?" if s is None else str(s) for s in configuration.seeds)


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root)) or "."
    except ValueError:
        return str(path)


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def _tie_text(configuration: Configuration, selection: str) -> str:
    if not configuration.tied:
        return ""
    return f"tied with {len(configuration.tied)} on {selection}; broken by {configuration.decided_by}"


def _ties_section(report: Report) -> list[str]:
    criteria = tie_break_criteria(report.select_split, report.select_metric)
    lines = []
    for winner in report.selected:
        if not winner.tied:
            continue
        tied = sorted([winner, *winner.tied], key=lambda c: not c.selected)
        lines += [
            "",
            f"{'/'.join(winner.method)}: {len(tied)} configurations tie on "
            f"{' '.join(criteria[0])}; broken by {winner.decided_by}.",
            "",
            *_table(
                ["configuration", "seeds", *(" ".join(c) for c in criteria), "selected"],
                (
                    [c.label, str(len(c.runs)), *(_cell(c, *k) for k in criteria), "*" if c.selected else ""]
                    for c in tied
                ),
            ),
        ]
    if lines:
        rule = ", then ".join(" ".join(c) for c in criteria[1:])
        lines = [
            "",
            "## Ties in the selection",
            "",
            f"Means within {TIE_TOLERANCE:g} tie; ties are broken by {rule}, then the most seeds, "
            "then the first label (lowest forgetting, highest otherwise).",
            *lines,
        ]
    return lines


def to_markdown(report: Report) -> str:
    split, metric = report.select_split, report.select_metric
    selection = f"{split} {metric}"
    shown = [*PAPER_METRICS, *([metric] if metric not in PAPER_METRICS else [])]
    header = [
        "benchmark",
        "model",
        "competitor",
        "configuration",
        "seeds",
        selection,
        *(f"test {m}" for m in shown),
    ]

    def row(c: Configuration) -> list[str]:
        return [
            *c.method,
            c.label,
            str(len(c.runs)),
            _cell(c, split, metric),
            *(_cell(c, "test", m) for m in shown),
        ]

    n_runs = sum(len(c.runs) for c in report.configurations)
    lines = [
        f"# Sweep report: {report.root}",
        "",
        f"{n_runs} complete runs in {len(report.configurations)} configurations; "
        f"{len(report.without_metrics)} runs not counted. Values are mean ± sample std over seeds "
        f"of the final metrics of complete runs; per benchmark, model and competitor the configuration "
        f"with the best mean {selection} is selected.",
        "",
        f"## Selected configurations (best {selection})",
        "",
        *_table([*header, "tie"], ([*row(c), _tie_text(c, selection)] for c in report.selected)),
        *_ties_section(report),
        "",
        "## All configurations",
        "",
        *_table([*header, "selected"], ([*row(c), "*" if c.selected else ""] for c in report.configurations)),
    ]
    if report.without_metrics:
        lines += ["", f"## Runs not counted ({len(report.without_metrics)})", ""]
        lines += _table(
            ["run", "state", "overrides", "reason"],
            (
                [_relative(r.path, report.root), r.state, " ".join(r.overrides), r.problem or ""]
                for r in report.without_metrics
            ),
        )
    if report.notes:
        lines += ["", f"## Notes ({len(report.notes)})", "", *(f"* {note}" for note in report.notes)]
    return "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    """One row per configuration: method, options, seeds, selection flag, every split × metric."""
    stats = [(s, m) for s in SPLITS for m in METRICS]
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            [
                "benchmark",
                "model",
                "competitor",
                "configuration",
                "overrides",
                "n_seeds",
                "seeds",
                "selected",
                "tied_with",
                "runs",
                *(f"{s}.{m}.{k}" for s, m in stats for k in ("mean", "std")),
            ]
        )
        for c in report.configurations:
            values = []
            for s, m in stats:
                values += ["" if math.isnan(v) else repr(v) for v in c.mean_std(s, m)]
            run_dirs = " ".join(_relative(r.path, report.root) for r in c.runs)
            writer.writerow(
                [
                    *c.method,
                    c.label,
                    " ".join(c.overrides),
                    len(c.runs),
                    _seeds(c),
                    int(c.selected),
                    len(c.tied),
                    run_dirs,
                    *values,
                ]
            )


def write_report(report: Report, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``report.csv`` and ``report.md`` into ``out_dir``; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "report.csv", out_dir / "report.md"
    write_csv(report, csv_path)
    md_path.write_text(to_markdown(report))
    return csv_path, md_path


def write_curves(
    report: Report, path: Path, metric: str = "avg_accuracy", *, only_selected: bool = True
) -> Path:
    """Draw the test ``metric`` after each boundary (mean ± std over seeds) of the report's configurations."""
    from memhead.plots import sweep_curves

    chosen = report.selected if only_selected else report.configurations
    series = {
        " ".join(filter(None, ("/".join(c.method), c.label))): [run.record["boundaries"] for run in c.runs]
        for c in chosen
        if c.runs
    }
    if not series:
        raise ReportError("no configuration with metrics to draw")
    return sweep_curves(series, path, split="test", metric=metric)


# --- command line ---------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit status 2, as every memhead command
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


TIE_HELP = (
    "Ties: means within 1e-9 of the best tie; the report lists them and breaks them by the selection "
    "split's avg_forgetting (lowest; avg_accuracy when selecting on forgetting), then the same two "
    "criteria on val or train (train after val), then the most seeds, then the first label. Test is "
    "never read unless --select test."
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="python -m memhead.report",
        description=__doc__.split("\n\n")[0],
        epilog="Only complete runs count; the others are listed with their state. " + TIE_HELP,
    )
    parser.add_argument("sweep_dir", help="a sweep directory (hydra.sweep.dir), or any folder of runs")
    parser.add_argument("--select", default="val", choices=SPLITS, help="split of the model selection")
    parser.add_argument(
        "--metric",
        default="avg_accuracy",
        choices=METRICS,
        metavar="NAME",
        help=f"metric of the model selection, one of {', '.join(METRICS)} (forgetting: lowest is best; "
        "*_gem: GEM's convention, see the README)",
    )
    parser.add_argument("--out", default=None, help="where report.csv and report.md go (default: SWEEP_DIR)")
    parser.add_argument(
        "--curves",
        choices=("selected", "all"),
        default=None,
        help="also draw curves.png: test --metric after each boundary, mean ± std over seeds, "
        "for the selected configurations or all of them",
    )
    args = parser.parse_args(argv)
    try:
        report = build_report(args.sweep_dir, args.select, args.metric)
        csv_path, md_path = write_report(report, args.out or args.sweep_dir)
        if args.curves:
            curves = write_curves(
                report,
                Path(args.out or args.sweep_dir) / "curves.png",
                args.metric,
                only_selected=args.curves == "selected",
            )
            print(f"wrote {curves}", file=sys.stderr)
    except (ReportError, OSError) as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    print(to_markdown(report), end="")
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)
    if report.without_metrics:
        counts: dict[str, int] = {}
        for run in report.without_metrics:
            counts[run.state] = counts.get(run.state, 0) + 1
        states = ", ".join(f"{n} {state}" for state, n in counts.items())
        print(
            f"warning: {len(report.without_metrics)} runs not counted ({states}; listed in the report)",
            file=sys.stderr,
        )
    for winner in report.selected:
        if winner.tied:
            print(
                f"warning: the selection of {'/'.join(winner.method)} is tied ({len(winner.tied) + 1} "
                f"configurations on {args.select} {args.metric}); broken by {winner.decided_by}",
                file=sys.stderr,
            )
    if report.notes:
        print(f"warning: {len(report.notes)} note(s) at the end of the report", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
