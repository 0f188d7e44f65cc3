"""Pictures of a run: files, sizes and content (regions, points, keys, matrices, curves)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from memhead import plots
from memhead.layer import MemoryHead
from memhead.runner import run

# Figure sizes in inches times plots.DPI.
SURFACE_SHAPE = (792, 864)
CURVES_SHAPE = (888, 1320)


def rgb(path):
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    return image[..., :3]


def count_colour(image, colour, tol=0.02):
    """Pixels within ``tol`` of ``colour`` on every channel."""
    return int(np.all(np.abs(image - np.asarray(to_rgb(colour))) <= tol, axis=-1).sum())


def count_solid(image, colour, tol=0.02, radius=2):
    """Pixels of ``colour`` whose whole (2 radius + 1)² neighbourhood has it too: filled areas, not the
    anti-aliased edges of text, which pass through every grey."""
    mask = np.all(np.abs(image - np.asarray(to_rgb(colour))) <= tol, axis=-1)
    height, width = mask.shape
    solid = mask[radius : height - radius, radius : width - radius].copy()
    for dy in range(-radius, radius + 1):
        for dx in range(-radius, radius + 1):
            solid &= mask[radius + dy : height - radius + dy, radius + dx : width - radius + dx]
    return int(solid.sum())


def distinct_colours(image):
    return len(np.unique((image * 255).round().astype(np.uint8).reshape(-1, 3), axis=0))


def test_memory_head_run_draws_every_picture_and_the_same_run(tiny_cfg, tmp_path):
    plain = run(tiny_cfg("model=mh"), tmp_path / "plain")
    record = run(tiny_cfg("model=mh", "plots.enabled=true", "plots.every_boundary=true"), tmp_path)
    # Drawing evaluates the model on a grid: nothing it learns or counts may change.
    assert record["ccm"] == plain["ccm"]
    assert not (tmp_path / "plain" / "plots").exists()
    folder = tmp_path / "plots"
    boundary_files = [f"surface_boundary_{i:03d}.png" for i in range(8)]
    expected = ["ccm.png", "curves.png", "surface.png", *boundary_files]
    assert sorted(p.name for p in folder.iterdir()) == sorted(expected)

    surface = rgb(folder / "surface.png")
    assert surface.shape[:2] == SURFACE_SHAPE
    assert distinct_colours(surface) > 50
    # The final shared keys are gold stars; nothing else in the picture is gold.
    assert count_colour(surface, plots.FINAL_KEY_COLOUR) > 100
    # Every class has points (full colour) and the regions (tints) of at least two classes show.
    colours = plots.class_colours(4)[:, :3]
    assert all(count_colour(surface, c, tol=0.03) > 20 for c in colours)
    tints = plots.REGION_TINT * colours + (1 - plots.REGION_TINT)
    assert sum(count_colour(surface, t, tol=0.01) > 5000 for t in tints) >= 2

    first = rgb(folder / "surface_boundary_000.png")
    assert first.shape[:2] == SURFACE_SHAPE

    # After the first distribution only its points are in class colours; the later ones are grey.
    def class_pixels(image):
        return sum(count_colour(image, c, tol=0.03) for c in colours)

    last = rgb(folder / "surface_boundary_007.png")
    # Left of the colour bar, which shows every class colour in both.
    assert class_pixels(first[:, :740]) < class_pixels(last[:, :740]) / 2

    curves = rgb(folder / "curves.png")
    assert curves.shape[:2] == CURVES_SHAPE
    assert all(count_colour(curves, plots.SPLIT_COLOURS[s], tol=0.03) > 100 for s in ("train", "val", "test"))
    matrices = rgb(folder / "ccm.png")
    assert matrices.shape[0] == 588 and matrices.shape[1] > 3 * matrices.shape[0] // 2
    assert distinct_colours(matrices) > 30
    assert json.loads((tmp_path / "metrics.json").read_text())["final"] == record["final"]


def test_mlp_surface_has_regions_and_no_keys(tiny_cfg, tmp_path):
    run(tiny_cfg("model=mlp", "plots.enabled=true"), tmp_path)
    surface = rgb(tmp_path / "plots" / "surface.png")
    assert surface.shape[:2] == SURFACE_SHAPE
    assert count_colour(surface, plots.FINAL_KEY_COLOUR) == 0
    assert distinct_colours(surface) > 50
    assert not list((tmp_path / "plots").glob("surface_boundary_*"))


def test_keys_below_a_hidden_layer_are_not_drawn(tiny_cfg, tmp_path):
    # model.hidden=2 gives 2-D keys, but in the hidden space: they are not points of the input plane.
    run(tiny_cfg("model=mh", "model.hidden=2", "plots.enabled=true"), tmp_path)
    assert count_colour(rgb(tmp_path / "plots" / "surface.png"), plots.FINAL_KEY_COLOUR) == 0


def test_heads_keyed_on_input():
    head = MemoryHead(2, 3, distance="euclidean")
    below = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Tanh(), MemoryHead(2, 3))
    probe = torch.rand(4, 2)
    assert plots.heads_keyed_on_input(head, probe) == [True]
    assert plots.heads_keyed_on_input(below, probe) == [False]
    assert len(plots.find_memory_heads(below)) == 1 and plots.find_memory_heads(torch.nn.Linear(2, 3)) == []


def test_per_neuron_keys_are_drawn_in_their_class_colour(tmp_path):
    head = MemoryHead(2, 3, distance="euclidean", shared_keys=False, key_mem_units=4)
    with torch.no_grad():
        head.keys.copy_(torch.linspace(-0.8, 0.8, 3 * 4 * 2).reshape(3, 4, 2).flip(-1))
    x, y = torch.tensor([[0.9, -0.9]]), torch.tensor([0])
    bare = rgb(plots.decision_surface(head, x, y, path=tmp_path / "bare.png"))
    keyed = rgb(
        plots.decision_surface(
            head, x, y, keys_initial=head.keys + 0.1, keys_final=head.keys, path=tmp_path / "keyed.png"
        )
    )
    assert bare.shape == keyed.shape
    for colour in plots.class_colours(3)[:, :3]:
        assert count_colour(keyed, colour) - count_colour(bare, colour) > 60
    assert count_colour(keyed, plots.FINAL_KEY_COLOUR) == 0


def test_surface_rejects_inputs_that_are_not_points_of_the_plane(tmp_path):
    with pytest.raises(ValueError, match="2"):
        plots.decision_surface(
            torch.nn.Linear(3, 2),
            torch.zeros(5, 3),
            torch.zeros(5, dtype=torch.long),
            path=tmp_path / "x.png",
        )


def test_wider_features_get_matrices_and_curves_only(tiny_cfg, tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 30), ("test", 30)):
        arrays[f"X_{split}"] = rng.normal(size=(n, 5)).astype(np.float32)
        arrays[f"y_{split}"] = np.repeat([0, 1, 2], n // 3)
        arrays[f"distributions_{split}"] = np.repeat([0, 1, 2], n // 3)
    np.savez(tmp_path / "five.npz", **arrays)
    out = tmp_path / "run"
    run(
        tiny_cfg(
            "model=mh",
            "benchmark=features",
            f"benchmark.path={tmp_path / 'five.npz'}",
            "plots.enabled=true",
            "plots.every_boundary=true",
        ),
        out,
    )
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["ccm.png", "curves.png"]


def test_unmeasured_cells_are_grey(tmp_path):
    filled = [[1.0, 0.5], [0.25, 0.75]]
    grey = plots.UNMEASURED_COLOUR
    assert count_solid(rgb(plots.confusion_matrices({"train": filled}, tmp_path / "a.png")), grey) == 0
    partial = {"train": [[1.0, None], [0.25, 0.75]], "test": [[float("nan"), 0.1], [0.2, 0.3]]}
    image = rgb(plots.confusion_matrices(partial, tmp_path / "b.png"))
    # Two grey cells of a 2 x 2 matrix in panels about 450 pixels wide: tens of thousands of pixels.
    assert count_solid(image, grey) > 20000
    # 25 distributions: not annotated, still drawn.
    big = rgb(plots.confusion_matrices({"train": np.eye(25).tolist()}, tmp_path / "c.png"))
    assert distinct_colours(big) > 10


def test_curves_skip_values_kept_from_an_earlier_boundary(tmp_path):
    def split(b, acc):
        return {
            "boundary": b,
            "avg_accuracy": acc,
            "avg_forgetting": 0.0,
            "backward_transfer": 0.0,
            "forward_transfer": 0.0,
        }

    # Val covers one distribution: after boundaries 1 and 2 it keeps its value from boundary 0.
    boundaries = [{"index": i, "train": split(i, 1.0 - 0.1 * i), "val": split(0, 0.5)} for i in range(3)]
    with_val = rgb(plots.metric_curves(boundaries, tmp_path / "a.png"))
    train_only = rgb(plots.metric_curves([{**b, "val": {}} for b in boundaries], tmp_path / "b.png"))
    val = plots.SPLIT_COLOURS["val"]
    # Val was measured once: a marker and a legend entry, but no line across the kept values.
    assert 0 < count_colour(with_val, val, tol=0.03) < 600
    assert count_colour(train_only, val, tol=0.03) == 0
    assert count_colour(with_val, plots.SPLIT_COLOURS["train"], tol=0.03) > 600


def test_scramble_counts_of_every_head():
    heads = [MemoryHead(2, 3, shared_keys=False), MemoryHead(2, 3, scramble=False, upd_k="grad_WTA")]
    model = torch.nn.ModuleDict({"a": heads[0], "b": heads[1]})
    heads[0].scramble_count += torch.tensor([1, 0, 2])
    assert plots.scramble_counts(model) == {"a": [1, 0, 2]}
    assert plots.find_memory_heads(model) == heads
    assert [k.shape for k in plots.snapshot_keys(model)] == [(3, 10, 2), (1, 10, 2)]


def test_plots_true_on_the_command_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "run"
    subprocess.run(
        [
            sys.executable,
            "run.py",
            "model=lp",
            "plots=true",
            "benchmark.n=80",
            "progress=false",
            f"hydra.run.dir={out}",
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["ccm.png", "curves.png", "surface.png"]
    config = json.loads((out / "metrics.json").read_text())["config"]
    assert config["plots"] == {"enabled": True, "every_boundary": False}
