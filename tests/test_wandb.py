"""logger=wandb: an offline run read back from its .wandb file, and W&B failures that only warn."""

import json
import struct
import sys
import time
import types
import warnings

import pytest
import torch
import wandb
from matplotlib.image import imread
from omegaconf import OmegaConf

from memhead import loggers
from memhead.layer import MemoryHead
from memhead.runner import run

# The .wandb file: a 7-byte header, then records in 32 KiB blocks, each record (or fragment) behind a
# 7-byte header (crc32, length, type: 1 whole, 2 first, 3 middle, 4 last), as LevelDB's log format.
BLOCK = 32768


def wandb_records(path):
    """The protobuf records of an offline run's ``.wandb`` file."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, fragments = 7, []
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if room < 7 or (length == 0 and kind == 0):  # block padding
            pos += room
            continue
        if pos + 7 + length > len(data):  # still being written
            return
        fragments.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(fragments))
            fragments = []
            yield record


def finished_records(path, timeout_s=30.0):
    """The records once the run's exit record is on disk: W&B's service process writes the file and may
    still be flushing it when ``finish`` returns."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def items(updates):
    return {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in updates}


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    # Not WANDB_DIR: set, it would win over the run directory (W&B's convention, memhead.loggers).
    for name in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


def test_offline_run_records_config_metrics_images_and_scrambles(offline, tiny_cfg, tmp_path):
    out = tmp_path / "run"
    cfg = tiny_cfg(
        "model=mh", "logger=wandb", "logger.watch=true", "plots.enabled=true", "plots.every_boundary=true"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = run(cfg, out, group="model=mh")
    assert not [w for w in caught if "logger=wandb" in str(w.message)]

    (run_folder,) = (out / "wandb").glob("offline-run-*")
    (log_file,) = run_folder.glob("run-*.wandb")
    records = finished_records(log_file)
    (start,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = items(start.config.update)
    assert (config["model"]["name"], config["seed"], config["plots"]["every_boundary"]) == ("mh", 1, True)
    assert (start.run_group, start.display_name) == ("model=mh", "run")

    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = items(r.history.item)
            rows.setdefault(row["_step"], {}).update(row)
    assert sorted(rows) == list(range(8))
    scrambles = []
    for i, boundary in enumerate(record["boundaries"]):
        row = rows[i]
        assert row["boundary"] == i
        for split in ("train", "val", "test"):
            for metric, value in boundary[split].items():
                if metric != "boundary":
                    assert row[f"{split}/{metric}"] == pytest.approx(value)
        image = imread(run_folder / "files" / row["plots/surface_boundary/path"])
        assert image.shape[:2] == (row["plots/surface_boundary/height"], row["plots/surface_boundary/width"])
        scrambles.append(row["scramble_count/head"])
    # Scrambling counts only grow, and the paper's CDI stream makes this head scramble.
    assert scrambles == sorted(scrambles) and scrambles[-1] > 0

    last = rows[7]
    for name in ("surface", "ccm", "curves"):
        assert (run_folder / "files" / last[f"plots/{name}/path"]).is_file()
    table = json.loads((run_folder / "files" / last["ccm/train/path"]).read_text())
    assert [row[1:] for row in table["data"]] == record["ccm"]["train"]
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    assert summary["final/test/avg_accuracy"] == pytest.approx(record["final"]["test"]["avg_accuracy"])
    assert summary["final/val/boundary"] == record["final_boundary"]["val"] == 3


def test_failing_wandb_init_only_warns(offline, tiny_cfg, tmp_path, monkeypatch):
    def refuse(**kwargs):
        raise wandb.errors.CommError("network unreachable")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.warns(UserWarning, match="logger=wandb disabled.*network unreachable"):
        record = run(tiny_cfg("model=lp", "logger=wandb", "plots.enabled=true"), tmp_path)
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk["complete"] and on_disk["final"] == record["final"]


class FakeRun:
    """Records what the logger hands to W&B; ``log`` raises when told to."""

    def __init__(self, fail=False):
        self.fail, self.logged, self.summary, self.watched, self.finished = fail, [], {}, [], False

    def log(self, values, step=None):
        if self.fail:
            raise ConnectionError("upload refused")
        self.logged.append((step, values))

    def watch(self, model, **kwargs):
        self.watched.append(model)

    def finish(self):
        self.finished = True


def fake_wandb(monkeypatch, fake_run):
    module = types.SimpleNamespace(
        init=lambda **kwargs: fake_run,
        Image=lambda path: ("image", path),
        Table=lambda columns, data: ("table", columns, data),
    )
    monkeypatch.setitem(sys.modules, "wandb", module)


def wandb_cfg(**overrides):
    values = {
        "name": "wandb",
        "project": "p",
        "entity": None,
        "mode": "offline",
        "group": None,
        "tags": [],
        "watch": False,
        **overrides,
    }
    return OmegaConf.create(values)


def test_failing_calls_after_start_only_warn(tiny_cfg, tmp_path, monkeypatch):
    fake = FakeRun(fail=True)
    fake_wandb(monkeypatch, fake)
    with pytest.warns(UserWarning, match="logging failed.*upload refused"):
        run(tiny_cfg("model=lp", "logger=wandb"), tmp_path)
    assert json.loads((tmp_path / "metrics.json").read_text())["complete"]
    assert fake.finished


def test_boundary_values_handed_to_wandb(tmp_path, monkeypatch):
    fake = FakeRun()
    fake_wandb(monkeypatch, fake)
    head = MemoryHead(2, 3, shared_keys=False)
    head.scramble_count += torch.tensor([2, 0, 5])
    tracker = loggers.make_logger(wandb_cfg(watch=True), {"seed": 1}, run_dir=str(tmp_path), model=head)
    assert fake.watched == [head]
    row = {"train": {"boundary": 2, "avg_accuracy": 0.75}, "val": {"boundary": 1, "avg_accuracy": 0.5}}
    picture = tmp_path / "plots" / "surface_boundary_002.png"
    tracker.log_boundary(2, row, model=head, images=[picture])
    assert fake.logged == [
        (
            2,
            {
                "boundary": 2,
                "train/avg_accuracy": 0.75,
                "val/avg_accuracy": 0.5,
                "scramble_count/head": 7,
                "scramble_count/head/0": 2,
                "scramble_count/head/1": 0,
                "scramble_count/head/2": 5,
                "plots/surface_boundary": ("image", str(picture)),
            },
        )
    ]
    record = {
        "final": {"train": {"avg_accuracy": 0.7}},
        "final_boundary": {"train": 2},
        "timing": {"eval_s": 1.0},
        "ccm": {"train": [[1.0, None], [0.5, 0.75]]},
        "boundaries": [{}, {}, {}],
    }
    tracker.log_final(record, images=[tmp_path / "plots" / "ccm.png"])
    step, final = fake.logged[-1]
    assert step == 2 and final["plots/ccm"] == ("image", str(tmp_path / "plots" / "ccm.png"))
    assert final["ccm/train"] == ("table", ["after", "d0", "d1"], [["d0", 1.0, None], ["d1", 0.5, 0.75]])
    assert fake.summary == {"final/train/avg_accuracy": 0.7, "final/train/boundary": 2, "timing/eval_s": 1.0}
    tracker.close()
    assert fake.finished
