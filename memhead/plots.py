"""Pictures of a run: the decision surface of a 2-D model with its Memory Head keys, the continual
confusion matrices and the metric curves, written as PNG files into ``<run dir>/plots/``.

Figures are drawn on ``matplotlib.figure.Figure`` with the Agg canvas directly: nothing here selects a
backend or imports ``pyplot``, so plotting never touches matplotlib's global state. matplotlib itself is
imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from memhead.metrics import METRICS

DPI = 120
GRID_RESOLUTION = 300
# Points evaluated per forward on the surface grid; bounds memory on any device.
GRID_CHUNK = 32768
# Above this many training points the scatter is subsampled (evenly, deterministically) to stay legible.
MAX_SCATTER_POINTS = 5000
# Matrices up to this size get their values written in the cells (the console prints them up to 20, too).
MAX_ANNOTATED = 20
# Filled stars in this colour mark the final shared keys; no class colour or tint comes close to it.
FINAL_KEY_COLOUR = "#ffd700"
INITIAL_KEY_COLOUR = "#000000"
UNMEASURED_COLOUR = "#d0d0d0"
UNSEEN_POINT_COLOUR = "#9a9a9a"
# How much of a class colour is kept in the region tint (the rest is white), so points stay visible.
REGION_TINT = 0.35
SPLITS = ("train", "val", "test")
SPLIT_COLOURS = {"train": "#1f77b4", "val": "#ff7f0e", "test": "#2ca02c"}
METRIC_TITLES = {
    "avg_accuracy": "average accuracy",
    "avg_forgetting": "average forgetting",
    "backward_transfer": "backward transfer",
    "forward_transfer": "forward transfer",
}

KeySets = torch.Tensor | Sequence[torch.Tensor] | None


# --- Memory Heads --------------------------------------------------------------------------------


def named_memory_heads(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, head)`` of every :class:`memhead.layer.MemoryHead` inside ``model``, in module order.

    The model itself is named ``"head"`` when it is a Memory Head.
    """
    from memhead.layer import MemoryHead

    return [(name or "head", m) for name, m in model.named_modules() if isinstance(m, MemoryHead)]


def find_memory_heads(model: nn.Module) -> list[nn.Module]:
    """Every :class:`memhead.layer.MemoryHead` inside ``model`` (the model included), in module order."""
    return [head for _, head in named_memory_heads(model)]


def snapshot_keys(model: nn.Module) -> list[torch.Tensor]:
    """A CPU copy of the keys ``(q, m, d)`` of each Memory Head of ``model`` (``find_memory_heads`` order)."""
    return [head.keys.detach().to("cpu", copy=True) for head in find_memory_heads(model)]


def scramble_counts(model: nn.Module) -> dict[str, list[int]]:
    """Scrambles so far of each key set, per Memory Head name; heads without scrambling are left out."""
    return {
        name: [int(v) for v in head.scramble_count.tolist()]
        for name, head in named_memory_heads(model)
        if head.scramble_count is not None
    }


def heads_keyed_on_input(model: nn.Module, probe: torch.Tensor) -> list[bool]:
    """Whether each Memory Head scores the model's own input against its keys, so that its keys are
    points of the input plane (no layer below it, ``psi='identity'``).

    Args:
        model: the model, evaluated once on ``probe`` (eval mode, no gradient, state untouched).
        probe: a few input samples ``(b, in_features)`` on the model's device.
    """
    heads = find_memory_heads(model)
    seen: dict[int, torch.Tensor] = {}

    def recorder(i: int):
        def record(module: nn.Module, args: tuple) -> None:
            seen.setdefault(i, args[0].detach())

        return record

    hooks = [head.register_forward_pre_hook(recorder(i)) for i, head in enumerate(heads)]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(probe)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return [
        head.psi == "identity" and i in seen and seen[i].shape == probe.shape and torch.equal(seen[i], probe)
        for i, head in enumerate(heads)
    ]


# --- drawing helpers -----------------------------------------------------------------------------


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI)
    return path


def class_colours(num_classes: int) -> np.ndarray:
    """``(num_classes, 4)`` RGBA colours: tab10, tab20 beyond 10 classes, a hue wheel beyond 20."""
    from matplotlib import colormaps

    if num_classes <= 10:
        return colormaps["tab10"](np.arange(num_classes))
    if num_classes <= 20:
        return colormaps["tab20"](np.arange(num_classes))
    return colormaps["hsv"](np.linspace(0, 1, num_classes, endpoint=False))


def _as_key_list(keys: KeySets) -> list[torch.Tensor]:
    if keys is None:
        return []
    if isinstance(keys, torch.Tensor):
        return [keys]
    return list(keys)


def _planar_key_sets(keys: KeySets) -> list[np.ndarray]:
    """Each head's keys as a ``(q, m, 2)`` array; keys of other sizes are not points of the plane."""
    arrays = []
    for tensor in _as_key_list(keys):
        array = tensor.detach().float().cpu().numpy()
        array = array.reshape(1, *array.shape) if array.ndim == 2 else array
        if array.shape[-1] == 2:
            arrays.append(array)
    return arrays


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else fallback


def predict_grid(model: nn.Module, xs: np.ndarray, ys: np.ndarray, dtype: torch.dtype, device: torch.device):
    """Predicted class ``(len(ys), len(xs))`` at every grid point, and the number of classes."""
    gx, gy = np.meshgrid(xs, ys)
    points = torch.as_tensor(np.stack([gx.ravel(), gy.ravel()], axis=1), dtype=dtype, device=device)
    predictions, num_classes = [], 0
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            for start in range(0, len(points), GRID_CHUNK):
                logits = model(points[start : start + GRID_CHUNK])
                num_classes = logits.shape[-1]
                predictions.append(logits.argmax(dim=-1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(predictions).numpy().reshape(gy.shape), num_classes


def _plane_bounds(points: list[np.ndarray]) -> tuple[float, float, float, float]:
    """``[-1, 1]²`` grown to hold every point, with a small margin so that edge points stay whole."""
    lows, highs = [np.array([-1.0, -1.0])], [np.array([1.0, 1.0])]
    for p in points:
        if len(p):
            lows.append(p.min(axis=0))
            highs.append(p.max(axis=0))
    low, high = np.min(lows, axis=0), np.max(highs, axis=0)
    margin = 0.04 * (high - low)
    low, high = low - margin, high + margin
    return float(low[0]), float(high[0]), float(low[1]), float(high[1])


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if len(x) <= MAX_SCATTER_POINTS:
        return x, y
    rows = np.linspace(0, len(x) - 1, MAX_SCATTER_POINTS).astype(int)
    return x[rows], y[rows]


# --- the three pictures --------------------------------------------------------------------------


def decision_surface(
    model: nn.Module,
    x_train: torch.Tensor,
    y_train: torch.Tensor,
    *,
    keys_initial: KeySets = None,
    keys_final: KeySets = None,
    title: str = "",
    path: str | Path,
    x_unseen: torch.Tensor | None = None,
) -> Path:
    """Draw the class a 2-D model predicts over the plane, the training points and the keys.

    The model is evaluated on a ``GRID_RESOLUTION``² grid over ``[-1, 1]²`` (grown to hold every point)
    in eval mode, without gradient, ``GRID_CHUNK`` points at a time on its own device; its training
    state is restored afterwards and nothing it holds changes.

    Args:
        model: maps ``(b, 2)`` inputs to ``(b, num_classes)`` logits.
        x_train: ``(n, 2)`` training points, drawn coloured by class.
        y_train: ``(n,)`` their labels.
        keys_initial: keys ``(q, m, d)`` (or a list of them, one per Memory Head) before training: hollow
            circles. Only ``d == 2`` key sets are drawn; the caller leaves out keys that are not points of
            the input plane (see :func:`heads_keyed_on_input`).
        keys_final: the same for the current keys: filled stars (gold for shared keys, the neuron's class
            colour for per-neuron key sets).
        title: the figure title.
        path: where the PNG goes (folders are created).
        x_unseen: ``(k, 2)`` training points not seen yet, drawn as small grey dots.

    Returns:
        ``path``.

    Raises:
        ValueError: the inputs are not 2-D points.
    """
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.lines import Line2D

    if x_train.ndim != 2 or x_train.shape[1] != 2:
        raise ValueError(f"decision_surface needs (n, 2) inputs, got {tuple(x_train.shape)}")
    points = x_train.detach().float().cpu().numpy()
    labels = y_train.detach().cpu().numpy().astype(int)
    unseen = np.zeros((0, 2)) if x_unseen is None else x_unseen.detach().float().cpu().numpy()
    initial, final = _planar_key_sets(keys_initial), _planar_key_sets(keys_final)
    x0, x1, y0, y1 = _plane_bounds([points, unseen, *(k.reshape(-1, 2) for k in initial + final)])
    xs = np.linspace(x0, x1, GRID_RESOLUTION)
    ys = np.linspace(y0, y1, GRID_RESOLUTION)
    device = _model_device(model, x_train.device)
    predicted, num_classes = predict_grid(model, xs, ys, x_train.dtype, device)
    num_classes = max(num_classes, int(labels.max(initial=-1)) + 1)

    colours = class_colours(num_classes)
    tints = REGION_TINT * colours[:, :3] + (1 - REGION_TINT)
    norm = BoundaryNorm(np.arange(num_classes + 1) - 0.5, num_classes)

    figure = _new_figure(7.2, 6.6)
    axis = figure.add_subplot()
    axis.imshow(
        predicted,
        origin="lower",
        extent=(x0, x1, y0, y1),
        cmap=ListedColormap(tints),
        norm=norm,
        interpolation="nearest",
        aspect="equal",
    )
    handles = []
    if len(unseen):
        axis.scatter(unseen[:, 0], unseen[:, 1], s=3, color=UNSEEN_POINT_COLOUR, linewidths=0)
        handles.append(
            Line2D([], [], ls="", marker="o", ms=3, color=UNSEEN_POINT_COLOUR, label="not seen yet")
        )
    shown, shown_labels = _thin(points, labels)
    axis.scatter(shown[:, 0], shown[:, 1], s=9, c=colours[shown_labels], edgecolors="white", linewidths=0.3)
    handles.append(
        Line2D(
            [],
            [],
            ls="",
            marker="o",
            ms=4,
            color="#555555",
            label="seen so far" if len(unseen) else "training points",
        )
    )

    per_neuron = any(k.shape[0] > 1 for k in initial + final)
    for keys in initial:
        for k, key_set in enumerate(keys):
            edge = colours[k % num_classes] if keys.shape[0] > 1 else INITIAL_KEY_COLOUR
            axis.scatter(
                key_set[:, 0], key_set[:, 1], s=55, facecolors="none", edgecolors=[edge], linewidths=1.4
            )
    for keys in final:
        for k, key_set in enumerate(keys):
            fill = colours[k % num_classes] if keys.shape[0] > 1 else FINAL_KEY_COLOUR
            axis.scatter(
                key_set[:, 0],
                key_set[:, 1],
                s=190,
                marker="*",
                color=[fill],
                edgecolors="black",
                linewidths=0.8,
                zorder=4,
            )
    # Per-neuron keys take their class colour: the legend then shows the marker shapes only.
    if initial:
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="o",
                ms=7,
                mfc="none",
                mew=1.4,
                label="initial keys",
                mec="#777777" if per_neuron else INITIAL_KEY_COLOUR,
            )
        )
    if final:
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="*",
                ms=13,
                mec="black",
                mew=0.8,
                mfc="white" if per_neuron else FINAL_KEY_COLOUR,
                label="current keys" if x_unseen is not None and len(unseen) else "final keys",
            )
        )

    axis.set_xlim(x0, x1)
    axis.set_ylim(y0, y1)
    axis.set_xlabel("x[0]")
    axis.set_ylabel("x[1]")
    figure.suptitle(title or "decision surface")
    legend_title = "key colour: the neuron's class" if per_neuron else None
    axis.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.1),
        ncol=len(handles),
        fontsize=8,
        title=legend_title,
        title_fontsize=8,
        frameon=False,
    )

    from matplotlib.cm import ScalarMappable

    legend = ScalarMappable(norm=norm, cmap=ListedColormap(colours))
    bar = figure.colorbar(legend, ax=axis, shrink=0.8, pad=0.02, label="predicted region / point class")
    step = max(1, math.ceil(num_classes / 20))
    bar.set_ticks(np.arange(0, num_classes, step))
    bar.set_ticklabels([f"class {c}" for c in range(0, num_classes, step)])
    bar.ax.tick_params(length=0, labelsize=8)
    return _save(figure, path)


def _matrix(rows: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else float(v) for v in row] for row in rows], dtype=float).reshape(
        len(rows), -1
    )


def confusion_matrices(
    ccm: dict[str, list[list[float | None]]], path: str | Path, *, title: str = ""
) -> Path:
    """Heatmaps of the continual confusion matrices of each split, side by side.

    Args:
        ccm: ``{split: rows}`` as ``metrics.json``'s ``ccm``: ``rows[i][j]`` is the accuracy on
            distribution ``j`` after distribution ``i``; ``None`` or NaN where not measured (grey).
        path: where the PNG goes.
        title: the figure title.

    Returns:
        ``path``.
    """
    from matplotlib import colormaps
    from matplotlib.ticker import MaxNLocator

    splits = [s for s in SPLITS if s in ccm] + [s for s in ccm if s not in SPLITS]
    matrices = {s: _matrix(ccm[s]) for s in splits}
    cmap = colormaps["viridis"].with_extremes(bad=UNMEASURED_COLOUR)
    # Panels as wide as their matrices, so that a cell has one size across splits.
    columns = [max(matrices[s].shape[1], 1) for s in splits]
    widths = [0.9 + 4.0 * c / max(columns) for c in columns]
    figure = _new_figure(sum(widths) + 1.2, 4.9)
    axes = figure.subplots(1, len(splits), squeeze=False, width_ratios=widths)[0]
    image = None
    for axis, split in zip(axes, splits):
        matrix = matrices[split]
        n = len(matrix)
        # 1-based, as the console's "boundary i/N".
        extent = (-0.5, matrix.shape[1] - 0.5, n - 0.5, -0.5)  # distributions 0..n-1
        image = axis.imshow(
            np.ma.masked_invalid(matrix),
            cmap=cmap,
            vmin=0.0,
            vmax=1.0,
            extent=extent,
            interpolation="nearest",
            aspect="equal",
        )
        if max(matrix.shape) <= MAX_ANNOTATED:
            size = 8 if max(matrix.shape) <= 8 else 6 if max(matrix.shape) <= 12 else 4.5
            for (i, j), value in np.ndenumerate(matrix):
                if np.isfinite(value):
                    axis.text(
                        j,
                        i,
                        f"{value:.2f}",
                        ha="center",
                        va="center",
                        fontsize=size,
                        color="black" if value > 0.55 else "white",
                    )
        for ticks in (axis.xaxis, axis.yaxis):
            ticks.set_major_locator(MaxNLocator(nbins=min(n, 10), integer=True))
        axis.set_title(f"{split} ({n} distributions)")
        axis.set_xlabel("accuracy on distribution j")
        axis.set_ylabel("after distribution i")
    figure.colorbar(image, ax=list(axes), shrink=0.85, label="accuracy (grey: not measured)")
    figure.suptitle(title or "continual confusion matrices")
    return _save(figure, path)


def metric_curves(boundaries: list[dict], path: str | Path, *, title: str = "") -> Path:
    """The four metrics after each boundary, one line per split.

    A split's value is drawn only at the boundaries where it was measured (val and test may cover fewer
    distributions than train and then keep their last values, which are not drawn again).

    Args:
        boundaries: ``metrics.json``'s ``boundaries``: ``{"index": i, split: {"boundary": b, metric: v}}``.
        path: where the PNG goes.
        title: the figure title.

    Returns:
        ``path``.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(11.0, 7.4)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    markers = len(boundaries) <= 30
    for axis, metric in zip(axes, METRICS):
        for split in SPLITS:
            measured = [
                (entry["index"], entry[split][metric])
                for entry in boundaries
                if metric in entry.get(split, {}) and entry[split].get("boundary") == entry["index"]
            ]
            if not measured:
                continue
            xs, values = zip(*measured)
            axis.plot(
                xs,
                values,
                marker="o" if markers else None,
                ms=4,
                lw=1.6,
                color=SPLIT_COLOURS[split],
                label=split,
            )
        axis.set_title(METRIC_TITLES[metric])
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "avg_accuracy":
            axis.set_ylim(-0.02, 1.02)
    for axis in axes[2:]:
        axis.set_xlabel("after distribution")
    axes[0].legend(fontsize=9)
    figure.suptitle(title or "metrics after each distribution")
    return _save(figure, path)


def sweep_curves(
    series: dict[str, list[list[dict]]],
    path: str | Path,
    *,
    split: str = "test",
    metric: str = "avg_accuracy",
    title: str = "",
) -> Path:
    """Mean ± standard deviation over seeds of one metric after each boundary, a line per configuration.

    Args:
        series: configuration label -> the ``boundaries`` of each of its runs (one list per seed).
        path: where the PNG goes.
        split: the split whose metric is drawn.
        metric: one of ``memhead.metrics.METRICS``.
        title: the figure title.

    Returns:
        ``path``.
    """
    from matplotlib.ticker import MaxNLocator

    figure = _new_figure(9.0, 5.5)
    axis = figure.subplots()
    palette = class_colours(max(len(series), 1))
    for colour, (label, runs) in zip(palette, series.items()):
        length = min(len(boundaries) for boundaries in runs)
        values = np.array(
            [[b[split][metric] for b in boundaries[:length]] for boundaries in runs], dtype=float
        )
        xs = np.arange(length)  # boundary i: after distribution i (0-based)
        mean = values.mean(axis=0)
        std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros_like(mean)
        axis.plot(xs, mean, lw=1.6, color=colour, label=f"{label} (n={len(runs)})")
        axis.fill_between(xs, mean - std, mean + std, color=colour, alpha=0.2, lw=0)
    axis.set_xlabel("after distribution")
    axis.set_ylabel(f"{split} {METRIC_TITLES[metric]}")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    if metric == "avg_accuracy":
        axis.set_ylim(-0.02, 1.02)
    axis.legend(fontsize=8, loc="best")
    figure.suptitle(title or f"{split} {METRIC_TITLES[metric]}: mean ± std over seeds")
    return _save(figure, path)


# --- a run's pictures ----------------------------------------------------------------------------


def has_planar_inputs(stream) -> bool:
    """Whether the stream's samples are 2-D points (the decision surface needs them)."""
    return stream.train.x.ndim == 2 and stream.train.x.shape[1] == 2


def _describe_model(model: nn.Module) -> str:
    heads = find_memory_heads(model)
    if heads:
        return "Memory Head" if len(heads) == 1 else f"{len(heads)} Memory Heads"
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return "linear" if len(linear) == 1 else "MLP" if len(linear) == 2 else type(model).__name__


def _keys_to_draw(model: nn.Module, stream, initial_keys: Sequence[torch.Tensor] | None):
    """The initial and current keys of the heads whose keys are points of the input plane."""
    heads = find_memory_heads(model)
    if not heads:
        return None, None
    on_input = heads_keyed_on_input(model, stream.train.x[:8])
    final = [head.keys for head, keep in zip(heads, on_input) if keep]
    initial = None
    if initial_keys is not None and len(initial_keys) == len(heads):
        initial = [keys for keys, keep in zip(initial_keys, on_input) if keep]
    return initial, final


def _plots_dir(out_dir: str | Path) -> Path:
    folder = Path(out_dir) / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def save_boundary_plot(
    out_dir: str | Path, index: int, model: nn.Module, stream, initial_keys: Sequence[torch.Tensor] | None
) -> Path:
    """The decision surface after distribution ``index``: ``out_dir/plots/surface_boundary_{index:03d}.png``.

    Points of the distributions seen so far are coloured by class, later ones grey.

    Args:
        out_dir: the run directory.
        index: the boundary (0-based, as ``metrics.json``).
        model: the model as it is now.
        stream: a :class:`data.stream.Stream` with 2-D inputs.
        initial_keys: :func:`snapshot_keys` of the model before training (or None).

    Raises:
        ValueError: the stream's inputs are not 2-D.
    """
    if not has_planar_inputs(stream):
        raise ValueError("the decision surface needs 2-D inputs")
    train = stream.train
    seen = train.dist <= index
    initial, final = _keys_to_draw(model, stream, initial_keys)
    title = f"{_describe_model(model)} after distribution {index} (0..{stream.num_distributions - 1})"
    return decision_surface(
        model,
        train.x[seen],
        train.y[seen],
        keys_initial=initial,
        keys_final=final,
        title=title,
        path=_plots_dir(out_dir) / f"surface_boundary_{index:03d}.png",
        x_unseen=train.x[~seen],
    )


def _run_title(record: dict, model: nn.Module) -> str:
    config = record.get("config", {})
    benchmark = config.get("benchmark", {})
    name = benchmark.get("name", "")
    order = benchmark.get("order")
    stream = f"{name} {order}" if order else name
    competitor = config.get("competitor", {}).get("name")
    model_name = _describe_model(model) + (f" + {competitor}" if competitor not in (None, "none") else "")
    return f"{model_name} on {stream}".strip() if stream else model_name


def save_run_plots(
    out_dir: str | Path, record: dict, model: nn.Module, stream, initial_keys: Sequence[torch.Tensor] | None
) -> list[Path]:
    """A finished run's pictures in ``out_dir/plots/``: ``surface.png`` (2-D inputs only), ``ccm.png``,
    ``curves.png``.

    Args:
        out_dir: the run directory.
        record: the run's ``metrics.json`` record (``ccm``, ``boundaries``, ``final``, ``config``).
        model: the trained model.
        stream: the run's :class:`data.stream.Stream`.
        initial_keys: :func:`snapshot_keys` of the model before training (or None).

    Returns:
        The paths written, in that order.
    """
    folder = _plots_dir(out_dir)
    title = _run_title(record, model)
    paths = []
    if has_planar_inputs(stream):
        initial, final = _keys_to_draw(model, stream, initial_keys)
        accuracy = record.get("final", {}).get("test", {}).get("avg_accuracy")
        suffix = f" (test avg. accuracy {accuracy:.3f})" if accuracy is not None else ""
        surface_title = f"{title}: after all {stream.num_distributions} distributions{suffix}"
        paths.append(
            decision_surface(
                model,
                stream.train.x,
                stream.train.y,
                keys_initial=initial,
                keys_final=final,
                title=surface_title,
                path=folder / "surface.png",
            )
        )
    matrices_title = f"{title}: continual confusion matrices"
    paths.append(confusion_matrices(record["ccm"], folder / "ccm.png", title=matrices_title))
    paths.append(metric_curves(record["boundaries"], folder / "curves.png", title=title))
    return paths
