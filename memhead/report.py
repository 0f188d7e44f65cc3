"""Tables of a sweep: every configuration's metrics over seeds, and the best configuration per method.

Usage::

    python -m memhead.report SWEEP_DIR [--select val] [--metric avg_accuracy] [--out DIR]

A *run* is a directory holding ``metrics.json`` (written by :func:`memhead.runner.run`) or Hydra's
``.hydra/overrides.yaml``. Runs whose overrides differ only by ``seed`` form one *configuration*; a
*method* is a (benchmark, model, competitor) triple. For every configuration the report gives the
mean ± sample standard deviation over seeds of each split's final metrics, and for every method it
marks the configuration with the best mean of the selection split's metric (the paper selects on
the validation ``avg_accuracy`` and reports test metrics). Runs without usable metrics (failed,
still running, never started: a job of ``multirun.yaml``'s sweep without a run directory) are
listed, never dropped silently.

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

SPLITS = ("train", "val", "test")
METRICS = ("avg_accuracy", "avg_forgetting", "backward_transfer", "forward_transfer")
# Selecting on forgetting means the lowest is best; every other metric is better when higher.
LOWER_IS_BETTER = frozenset({"avg_forgetting"})
# Overrides shown in their own columns, hence left out of the configuration label.
METHOD_KEYS = frozenset({"model", "competitor", "benchmark", "benchmark.order"})
SEED_KEY = "seed"


class ReportError(Exception):
    """Input the report cannot work with (no runs, a missing directory); one line for the user."""


@dataclass
class Run:
    """One run directory (or one job of a sweep that never got a directory).

    Attributes:
        path: the run directory, or the sweep directory for a job that never started.
        overrides: Hydra's task overrides of the run, normalised (``key=value``).
        record: the parsed ``metrics.json``; ``None`` when there is none or it cannot be read.
        problem: why ``record`` is ``None`` (for the list of runs without metrics).
    """

    path: Path
    overrides: tuple[str, ...]
    record: dict | None = None
    problem: str | None = None

    @property
    def seed(self) -> int | None:
        if self.record is not None and "seed" in self.record:
            return int(self.record["seed"])
        return None

    def metric(self, split: str, name: str) -> float:
        value = self.record.get("final", {}).get(split, {}).get(name) if self.record else None
        return float(value) if value is not None else math.nan


@dataclass
class Configuration:
    """Runs of one method whose overrides differ only by the seed.

    Attributes:
        method: (benchmark label, model, competitor), read from the runs' recorded configuration.
        overrides: the runs' overrides without the seed.
        runs: the runs with metrics.
        label: the overrides that vary across the report, for the tables.
        selected: whether it is its method's best on the selection metric.
    """

    method: tuple[str, str, str]
    overrides: tuple[str, ...]
    runs: list[Run] = field(default_factory=list)
    label: str = ""
    selected: bool = False

    @property
    def seeds(self) -> list[int | None]:
        return [run.seed for run in self.runs]

    def values(self, split: str, name: str) -> list[float]:
        return [v for v in (run.metric(split, name) for run in self.runs) if not math.isnan(v)]

    def mean_std(self, split: str, name: str) -> tuple[float, float]:
        """Mean and sample standard deviation (NaN with fewer than two values) over the seeds."""
        values = self.values(split, name)
        mean = statistics.fmean(values) if values else math.nan
        std = statistics.stdev(values) if len(values) > 1 else math.nan
        return mean, std


@dataclass
class Report:
    """What the tables show: configurations (sorted), runs without metrics, the selection rule."""

    configurations: list[Configuration]
    without_metrics: list[Run]
    select_split: str
    select_metric: str
    root: Path

    @property
    def selected(self) -> list[Configuration]:
        return [c for c in self.configurations if c.selected]


# --- finding runs ---------------------------------------------------------------------------------


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


def _read_overrides(run_dir: Path) -> tuple[str, ...]:
    from hydra.errors import HydraException
    from omegaconf import OmegaConf

    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ()
    lines = [str(line) for line in OmegaConf.to_container(OmegaConf.load(path)) or []]
    try:
        return normalise_overrides(lines)
    except (HydraException, ReportError):  # not Hydra's own output: compare the text as it is
        return tuple(sorted(lines))


def _read_run(run_dir: Path) -> Run:
    overrides = _read_overrides(run_dir)
    metrics = run_dir / "metrics.json"
    if not metrics.is_file():
        logs = sorted(p.name for p in run_dir.glob("*.log"))
        hint = f"; log: {logs[0]}" if logs else ""
        return Run(run_dir, overrides, problem=f"no metrics.json (failed or still running{hint})")
    try:
        record = json.loads(metrics.read_text())
        if not isinstance(record.get("final"), dict):
            raise ValueError("no 'final' metrics")
    except (OSError, ValueError) as err:
        return Run(run_dir, overrides, problem=f"unreadable metrics.json ({err})")
    return Run(run_dir, overrides, record=record)


def _is_run_dir(path: Path) -> bool:
    return (path / "metrics.json").is_file() or (path / ".hydra" / "overrides.yaml").is_file()


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


def expected_jobs(sweep_dir: Path) -> list[tuple[str, ...]] | None:
    """The overrides of every job of the sweep recorded in ``multirun.yaml`` (basic sweeper only).

    Returns ``None`` when the sweep cannot be expanded here (another sweeper, an unreadable file).
    """
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        hydra = OmegaConf.load(sweep_dir / "multirun.yaml").hydra
        if not str(hydra.sweeper.get("_target_", "")).endswith(".BasicSweeper"):
            return None
        # As BasicSweeper.sweep: the sweep config's params first, then the command line's overrides.
        params = OmegaConf.to_container(hydra.sweeper.get("params") or {})
        lines = [f"{key}={value}" for key, value in params.items()]
        lines += [str(line) for line in hydra.overrides.task]
        batches = BasicSweeper.split_arguments(_parse_overrides(lines), None)
        return [normalise_overrides(job) for batch in batches for job in batch]
    except (OSError, HydraException, OmegaConfBaseException, ReportError, ValueError):
        return None


def jobs_without_a_run(sweep_dir: Path, runs: Sequence[Run]) -> list[Run]:
    """Jobs of the sweep in ``sweep_dir`` that have no run directory under it."""
    expected = expected_jobs(sweep_dir)
    if expected is None:
        return []
    present = {run.overrides for run in runs if sweep_dir in run.path.parents}
    hint = "; submitit logs: .submitit/" if (sweep_dir / ".submitit").is_dir() else ""
    return [
        Run(sweep_dir, job, problem=f"no run directory (not started, or failed before Hydra made it{hint})")
        for job in expected
        if job not in present
    ]


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


def group_runs(runs: Iterable[Run]) -> list[Configuration]:
    """Configurations: runs of one method with the same overrides once the seed is left out."""
    groups: dict[tuple, Configuration] = {}
    for run in runs:
        overrides = tuple(o for o in run.overrides if override_key(o) != SEED_KEY)
        key = (method_of(run), overrides)
        groups.setdefault(key, Configuration(method=key[0], overrides=overrides)).runs.append(run)
    configurations = list(groups.values())
    # Label each by what varies across the report: constant overrides and the method columns add nothing.
    counts: dict[str, int] = {}
    for configuration in configurations:
        for override in configuration.overrides:
            counts[override] = counts.get(override, 0) + 1
    for configuration in configurations:
        shown = [
            o
            for o in configuration.overrides
            if counts[o] < len(configurations) and override_key(o) not in METHOD_KEYS
        ]
        configuration.label = " ".join(shown) or "(nothing varied)"
    return sorted(configurations, key=lambda c: (c.method, c.label))


def select_best(configurations: Sequence[Configuration], split: str, metric: str) -> None:
    """Mark, per method, the configuration with the best mean of ``split``'s ``metric``.

    Ties go to the configuration with more seeds, then to the first label; a configuration without
    the metric (e.g. no ``val`` split) is never selected.
    """
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    best: dict[tuple, Configuration] = {}
    for configuration in configurations:
        configuration.selected = False
        mean, _ = configuration.mean_std(split, metric)
        if math.isnan(mean):
            continue
        current = best.get(configuration.method)
        if current is None:
            best[configuration.method] = configuration
            continue
        score, current_score = sign * mean, sign * current.mean_std(split, metric)[0]
        if (score, len(configuration.runs)) > (current_score, len(current.runs)):
            best[configuration.method] = configuration
    for configuration in best.values():
        configuration.selected = True


def build_report(root: str | Path, select_split: str = "val", select_metric: str = "avg_accuracy") -> Report:
    """Read every run under ``root``, group them, select the best per method.

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
    missing = [job for sweep in sweeps for job in jobs_without_a_run(sweep, runs)]
    if not runs and not missing:
        raise ReportError(f"no runs under {root} (no metrics.json nor .hydra/overrides.yaml)")
    configurations = group_runs(run for run in runs if run.record is not None)
    select_best(configurations, select_split, select_metric)
    without = [run for run in runs if run.record is None] + missing
    return Report(configurations, without, select_split, select_metric, root)


# --- output ---------------------------------------------------------------------------------------


def _fmt(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.4f}" if math.isnan(std) else f"{mean:.4f} ± {std:.4f}"


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


def to_markdown(report: Report) -> str:
    split, metric = report.select_split, report.select_metric
    selection = f"{split} {metric}"
    header = [
        "benchmark",
        "model",
        "competitor",
        "configuration",
        "seeds",
        selection,
        *(f"test {m}" for m in METRICS),
    ]

    def row(c: Configuration) -> list[str]:
        return [
            *c.method,
            c.label,
            str(len(c.runs)),
            _fmt(*c.mean_std(split, metric)),
            *(_fmt(*c.mean_std("test", m)) for m in METRICS),
        ]

    n_runs = sum(len(c.runs) for c in report.configurations)
    lines = [
        f"# Sweep report: {report.root}",
        "",
        f"{n_runs} runs with metrics in {len(report.configurations)} configurations; "
        f"{len(report.without_metrics)} runs without metrics. Values are mean ± sample std over seeds "
        f"of the final metrics; per benchmark, model and competitor the configuration with the best "
        f"mean {selection} is selected.",
        "",
        f"## Selected configurations (best {selection})",
        "",
        *_table(header, (row(c) for c in report.selected)),
        "",
        "## All configurations",
        "",
        *_table([*header, "selected"], ([*row(c), "*" if c.selected else ""] for c in report.configurations)),
    ]
    if report.without_metrics:
        lines += ["", f"## Runs without metrics ({len(report.without_metrics)})", ""]
        lines += _table(
            ["run", "overrides", "status"],
            (
                [_relative(r.path, report.root), " ".join(r.overrides), r.problem or ""]
                for r in report.without_metrics
            ),
        )
    return "\n".join(lines) + "\n"


def write_csv(report: Report, path: Path) -> None:
    """One row per configuration: method, overrides, seeds, selection flag, every split × metric."""
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(prog="python -m memhead.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="a sweep directory (hydra.sweep.dir), or any folder of runs")
    parser.add_argument("--select", default="val", choices=SPLITS, help="split of the model selection")
    parser.add_argument(
        "--metric",
        default="avg_accuracy",
        choices=METRICS,
        help="metric of the model selection (avg_forgetting: lowest is best)",
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
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(report), end="")
    print(f"wrote {csv_path} and {md_path}", file=sys.stderr)
    if report.without_metrics:
        n = len(report.without_metrics)
        print(f"warning: {n} runs without metrics (listed at the end of the report)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
