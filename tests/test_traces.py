"""Replay the paper implementation's reference traces (shared/reference-traces/README.md) step by step."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memhead.layer import MemoryHead

# shared/ sits beside the checkout (or one level further up, beside a folder of worktrees).
TRACES = next(
    (p / "shared" / "reference-traces" for p in Path(__file__).resolve().parents[1:4]
     if (p / "shared" / "reference-traces").is_dir()),
    Path(__file__).resolve().parents[2] / "shared" / "reference-traces",
)  # fmt: skip
TRACE_FILES = sorted(TRACES.glob("*.npz")) if TRACES.is_dir() else []
TOLERANCE = 1e-4
# Entries of config_json that describe the training loop, not the layer.
LOOP_KEYS = ("in_features", "out_features", "optimizer", "lr", "weight_decay", "batch_size", "loss")


@pytest.mark.skipif(not TRACE_FILES, reason=f"reference traces not found in {TRACES}")
@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("path", TRACE_FILES, ids=lambda p: p.stem)
def test_trace_replays(path: Path, impl: str) -> None:
    trace = np.load(path)
    config = json.loads(str(trace["config_json"]))
    assert config["optimizer"] == "adam" and config["loss"] == "cross_entropy"
    options = {name: value for name, value in config.items() if name not in LOOP_KEYS}
    layer = MemoryHead(config["in_features"], config["out_features"], **options, impl=impl)
    initial = {name[5:]: torch.from_numpy(trace[name]) for name in trace.files if name.startswith("init_")}
    # strict load: the trace's state names are exactly the layer's state_dict.
    layer.load_state_dict(initial)
    optimizer = torch.optim.Adam(layer.parameters(), lr=config["lr"], weight_decay=config["weight_decay"])

    inputs, targets = torch.from_numpy(trace["X"]), torch.from_numpy(trace["y"])
    batch_size = config["batch_size"]
    layer.train()
    for step in range(trace["logits"].shape[0]):
        batch = slice(step * batch_size, (step + 1) * batch_size)
        logits = layer(inputs[batch])
        winners = layer.last_top_indices[..., 0]
        np.testing.assert_array_equal(winners.numpy(), trace["top1"][step], err_msg=f"winners at step {step}")
        np.testing.assert_allclose(
            logits.detach().numpy(), trace["logits"][step], atol=TOLERANCE, rtol=0, err_msg=f"step {step}"
        )
        loss = F.cross_entropy(logits, targets[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    state = layer.state_dict()
    finals = [name for name in trace.files if name.startswith("final_")]
    assert sorted(name[6:] for name in finals) == sorted(state)
    for name in finals:
        np.testing.assert_allclose(state[name[6:]].numpy(), trace[name], atol=TOLERANCE, rtol=0, err_msg=name)

    layer.eval()
    with torch.no_grad():
        probe_logits = layer(torch.from_numpy(trace["probe"]))
    np.testing.assert_allclose(probe_logits.numpy(), trace["probe_logits"], atol=TOLERANCE, rtol=0)
