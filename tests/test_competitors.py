"""Competitors: buffer policies, the replay rules, GDumb's retraining, the ensemble, checks and resume.

Hooks are driven by ``drive``, a tiny loop in the order of the ``competitors.base`` docstring.
"""

from __future__ import annotations

import copy
import io
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from competitors import COMPETITORS, build_competitor, check_competitor
from competitors.agem import project
from competitors.base import Competitor, reinitialise
from competitors.buffer import ReplayBuffer
from competitors.ensemble import MeanOfMembers
from competitors.er import ERRandom
from competitors.mir import interference_scores
from memhead.registry import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf" / "competitor"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
ALL_NAMES = ["none", "er_reservoir", "er_random", "mir", "agem", "gdumb", "ensemble"]


def sgd(lr: float):
    return lambda module: torch.optim.SGD(module.parameters(), lr=lr)


def make(name: str, num_classes: int = 3, device: str = "cpu", seed: int = 0, lr: float = 0.1, **options):
    return build_competitor(
        {"name": name, **options}, loss_fn=F.cross_entropy, make_optimizer=sgd(lr),
        num_classes=num_classes, device=torch.device(device), generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def drive(competitor: Competitor, model: nn.Module, optimizer, x, y, batch_size: int = 1, boundary=True):
    """The online loop of the base docstring over one distribution ``(x, y)``; returns (model, optimizer)."""
    for lo in range(0, len(y), batch_size):
        xb, yb = x[lo : lo + batch_size], y[lo : lo + batch_size]
        if competitor.trains_on_stream:
            model.train()
            loss = competitor.loss_fn(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            competitor.after_backward(model, optimizer, xb, yb)
            optimizer.step()
        competitor.after_step(xb, yb)
    if boundary:
        replaced = competitor.at_boundary(model, optimizer)
        if replaced is not None:
            model, optimizer = replaced
    return model, optimizer


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


def memory_head(in_features: int = 2, num_classes: int = 3):
    from memhead import MemoryHead

    return MemoryHead(
        in_features, num_classes, key_mem_units=4, delta=2, distance="euclidean", tau_mu=1, tau_eta=1
    )


# --- configuration -------------------------------------------------------------------------------


def test_registry_holds_every_competitor_by_name():
    assert COMPETITORS.names() == sorted(ALL_NAMES)
    assert COMPETITORS.get("none") is Competitor
    assert type(make("er-Random")) is ERRandom
    with pytest.raises(ConfigError, match="competitor='ewc' is unknown; known: agem"):
        make("ewc")


@pytest.mark.parametrize("name", ALL_NAMES)
def test_composed_option_matches_its_config_defaults(name, tiny_cfg):
    cls = COMPETITORS.get(name)
    node = tiny_cfg(f"competitor={name}").competitor
    check_competitor(node)
    assert cls.parse(node) == cls.Config()  # the YAML shows the defaults, it does not change them
    assert cls.Config().name == name and next(iter(cls.Config.__dataclass_fields__)) == "name"
    assert OmegaConf.load(CONF / f"{name}.yaml").name == name
    built = build_competitor(
        node, loss_fn=F.cross_entropy, make_optimizer=sgd(0.1), num_classes=2,
        device=torch.device("cpu"), generator=torch.Generator(),
    )  # fmt: skip
    assert type(built) is cls


@pytest.mark.parametrize(
    "options, message",
    [
        ({"name": "er_reservoir", "buffer_size": 0}, r"^competitor.buffer_size must be >= 1 \(got 0\)$"),
        ({"name": "er_random", "buffer_batch_size": 0}, r"competitor.buffer_batch_size must be >= 1 \(got 0"),
        ({"name": "agem", "buffer_size": 2.5}, r"competitor.buffer_size must be an integer >= 1 \(got 2.5\)"),
        (
            {"name": "mir", "candidates": 8, "buffer_batch_size": 8},
            r"^competitor.candidates \(8\) must be > competitor.buffer_batch_size \(8\) for mir$",
        ),
        ({"name": "mir", "buffer_size": -1}, r"competitor.buffer_size must be >= 1 \(got -1\)"),
        ({"name": "gdumb", "epochs": 0}, r"competitor.epochs must be >= 1 \(got 0\)"),
        ({"name": "gdumb", "clip": 0.0}, r"competitor.clip must be a number > 0 or null \(got 0.0\)"),
        ({"name": "gdumb", "buffer_batch_size": 0}, r"competitor.buffer_batch_size must be >= 1"),
        ({"name": "ensemble", "members": 0}, r"competitor.members must be >= 1 \(got 0\)"),
        ({"name": "ensemble", "buffer_size": 8}, r"buffer_size is not an option of competitor=ensemble"),
        ({"name": "none", "members": 2}, r"members is not an option of competitor=none; allowed: name$"),
    ],
)
def test_check_rejects_invalid_options_in_one_line(options, message):
    with pytest.raises(ConfigError, match=message) as error:
        check_competitor(options)
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError):  # construction checks too, before any data is read
        make(**options)


# --- buffer --------------------------------------------------------------------------------------


def test_reservoir_keeps_each_of_n_samples_with_probability_m_over_n():
    size, n, repeats = 5, 20, 2000
    generator = torch.Generator().manual_seed(1)
    kept = torch.zeros(n)
    for _ in range(repeats):
        buffer = ReplayBuffer(size, "cpu", "reservoir")
        for i in range(n):
            buffer.add(torch.tensor([[float(i)]]), torch.tensor([0]), generator)
        kept[buffer.contents()[0].flatten().long()] += 1
    # Each count is Binomial(2000, 1/4): standard deviation sqrt(2000 * 0.25 * 0.75) / 2000 ~ 0.0097
    # in frequency, so 0.04 is ~4 standard deviations (all 20 within it with probability > 0.99).
    assert torch.allclose(kept / repeats, torch.full((n,), size / n), atol=0.04)
    assert kept.sum() == size * repeats


def test_random_policy_fills_then_keeps_half_of_the_newcomers():
    buffer = ReplayBuffer(4, "cpu", "random")
    generator = torch.Generator().manual_seed(2)
    kept, offered = 0, 2000
    for i in range(offered + 4):
        buffer.add(torch.tensor([[float(i)]]), torch.tensor([0]), generator)
        kept += i >= 4 and float(i) in buffer.contents()[0].flatten().tolist()
    # Binomial(2000, 1/2): frequency standard deviation ~0.011; 0.05 is ~4.5 of them.
    assert abs(kept / offered - 0.5) < 0.05
    assert buffer.seen == offered + 4 and buffer.filled == 4


@pytest.mark.parametrize("policy", ["reservoir", "random", "class_balanced"])
def test_buffer_never_exceeds_its_size_and_retrieval_returns_distinct_slots(policy):
    buffer = ReplayBuffer(7, "cpu", policy)
    generator = torch.Generator().manual_seed(3)
    assert len(buffer.sample_slots(4, generator)) == 0  # nothing while empty
    for step in range(40):
        b = 1 + step % 3
        x, y = torch.randn(b, 2, generator=generator), torch.randint(3, (b,), generator=generator)
        buffer.add(x, y, generator)
        assert buffer.filled <= 7 and buffer.inputs.shape == (7, 2)
        for n in (1, 5, 7, 20):
            slots = buffer.sample_slots(n, generator)
            assert len(slots) == min(n, buffer.filled) == len(set(slots.tolist()))
            assert 0 <= slots.min() and slots.max() < buffer.filled
    assert buffer.seen == sum(1 + s % 3 for s in range(40))
    assert sum(buffer.class_counts(3)) == buffer.filled


def test_class_balanced_memory_shares_slots_equally_among_seen_classes():
    buffer = ReplayBuffer(12, "cpu", "class_balanced")
    generator = torch.Generator().manual_seed(4)
    for label, expected in [(0, [12, 0, 0]), (1, [6, 6, 0]), (2, [4, 4, 4])]:
        for _ in range(30):
            buffer.add(torch.zeros(1, 2), torch.tensor([label]), generator)
        assert buffer.class_counts(3) == expected
    # An unbalanced interleaved stream: once full, the largest class never grows, and the memory
    # ends balanced to within one sample.
    buffer = ReplayBuffer(10, "cpu", "class_balanced")
    labels = torch.multinomial(torch.tensor([0.7, 0.2, 0.1]), 300, replacement=True, generator=generator)
    largest = 10
    for label in labels:
        buffer.add(torch.zeros(1, 2), label.view(1), generator)
        if buffer.is_full:
            assert max(buffer.class_counts(3)) <= largest
            largest = max(buffer.class_counts(3))
    assert sorted(buffer.class_counts(3)) == [3, 3, 4]


# --- ER ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_er_gradient_is_incoming_mean_plus_replay_mean(device):
    torch.manual_seed(0)
    er = make("er_reservoir", device=device, buffer_size=10, buffer_batch_size=4)
    data = torch.randn(12, 3, device=device)
    labels = torch.arange(12, device=device) % 3
    er.after_step(data[:10], labels[:10])
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(device)
    reference = copy.deepcopy(model)
    x, y = data[10:], labels[10:]

    replay_generator = torch.Generator().set_state(er.generator.get_state())
    bx, by = er.buffer.get(er.buffer.sample_slots(4, replay_generator))
    (F.cross_entropy(reference(x), y) + F.cross_entropy(reference(bx), by)).backward()

    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    er.after_backward(model, None, x, y)
    for got, want in zip(grads(model), grads(reference)):
        torch.testing.assert_close(got, want)
    assert er.replayed == 4 and er.buffer.seen == 10


def test_er_never_replays_the_incoming_sample_in_its_own_step():
    er = make("er_reservoir", buffer_size=4, buffer_batch_size=2)
    model = nn.Linear(2, 3)
    x, y = torch.ones(1, 2), torch.tensor([1])
    F.cross_entropy(model(x), y).backward()
    before = grads(model)
    er.after_backward(model, None, x, y)  # empty buffer: the incoming sample is not there yet
    assert all(torch.equal(a, b) for a, b in zip(before, grads(model)))
    assert er.replayed == 0
    er.after_step(x, y)
    assert er.buffer.filled == 1 and er.summary()["buffer_per_class"] == [0, 1, 0]


# --- MIR -----------------------------------------------------------------------------------------


def _mir_case():
    """Zero 2x2 weights, SGD lr 1, incoming x=[1,0] of class 0: its step is W' = [[.5, 0], [-.5, 0]]."""
    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    # a: hurt (class 1 along x), b: orthogonal, c: helped (class 0), d: hurt twice as hard.
    stored_x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]])
    stored_y = torch.tensor([1, 1, 0, 1])
    return model, stored_x, stored_y, torch.tensor([[1.0, 0.0]]), torch.tensor([0])


def test_mir_scores_are_the_loss_increase_after_a_virtual_sgd_step():
    model, sx, sy, x, y = _mir_case()
    F.cross_entropy(model(x), y).backward()
    scores = interference_scores(model, 1.0, sx, sy)
    log2 = math.log(2)
    expected = [math.log1p(math.e) - log2, 0.0, math.log1p(math.exp(-1)) - log2, math.log1p(math.e**2) - log2]
    torch.testing.assert_close(scores, torch.tensor(expected))
    assert torch.equal(model.weight, torch.zeros(2, 2))  # the virtual step is virtual


def test_mir_replays_the_most_interfered_candidates():
    model, sx, sy, x, y = _mir_case()
    mir = make("mir", num_classes=2, buffer_size=4, buffer_batch_size=2, candidates=4)
    mir.after_step(sx, sy)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    reference = copy.deepcopy(model)
    (F.cross_entropy(reference(x), y) + F.cross_entropy(reference(sx[[0, 3]]), sy[[0, 3]])).backward()

    F.cross_entropy(model(x), y).backward()
    mir.after_backward(model, optimizer, x, y)
    torch.testing.assert_close(model.weight.grad, reference.weight.grad)
    assert mir.replayed == 2


def test_mir_scoring_changes_nothing_in_the_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 3))
    model.train()
    model[2].eval()  # a submodule deliberately in eval mode keeps its own flag
    F.cross_entropy(model(torch.randn(5, 2)), torch.tensor([0, 1, 2, 0, 1])).backward()
    state = copy.deepcopy(model.state_dict())
    interference_scores(model, 0.1, torch.randn(6, 2), torch.tensor([0, 1, 2, 0, 1, 2]))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert [m.training for m in model.modules()] == [True, True, True, False, True]


def test_mir_scoring_leaves_a_memory_heads_keys_and_counters_alone():
    torch.manual_seed(0)
    head = memory_head()
    head.train()
    F.cross_entropy(head(torch.randn(1, 2)), torch.tensor([1])).backward()
    state = copy.deepcopy(head.state_dict())
    interference_scores(head, 0.5, torch.randn(8, 2), torch.randint(3, (8,)))
    for name in ("keys", "memories", "usage", "age", "scramble_count"):
        assert torch.equal(head.state_dict()[name], state[name]), name


# --- A-GEM ---------------------------------------------------------------------------------------


def test_project_removes_the_conflicting_component_and_keeps_agreeing_gradients():
    g, g_ref = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    torch.testing.assert_close(project(g, g_ref), torch.tensor([0.5, 0.5]))
    agreeing = torch.tensor([1.0, 2.0])
    assert project(agreeing, g_ref) is agreeing


@pytest.mark.parametrize(
    "stored_x, stored_y, expected_grad, projections",
    [
        # g = [[-.5, 0], [.5, 0]], g_ref = [[.5, .5], [-.5, -.5]]: g·g_ref = -.5, |g_ref|² = 1.
        ([[1.0, 1.0]], [1], [[-0.25, 0.25], [0.25, -0.25]], 1),
        ([[1.0, 0.0]], [0], [[-0.5, 0.0], [0.5, 0.0]], 0),  # g_ref = g: unchanged
    ],
)
def test_agem_projects_a_hand_computed_gradient(stored_x, stored_y, expected_grad, projections):
    agem = make("agem", num_classes=2, buffer_size=4, buffer_batch_size=1)
    agem.after_step(torch.tensor(stored_x), torch.tensor(stored_y))
    model = nn.Linear(2, 2, bias=False)
    nn.init.zeros_(model.weight)
    F.cross_entropy(model(torch.tensor([[1.0, 0.0]])), torch.tensor([0])).backward()
    agem.after_backward(model, None, torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
    torch.testing.assert_close(model.weight.grad, torch.tensor(expected_grad))
    assert agem.summary()["projections"] == projections and agem.replayed == 1


def test_agem_step_never_conflicts_with_the_reference_gradient():
    torch.manual_seed(0)
    agem = make("agem", buffer_size=16, buffer_batch_size=4)
    agem.after_step(torch.randn(16, 2), torch.randint(3, (16,)))
    conflicts = 0
    for _ in range(30):
        model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3))
        x, y = torch.randn(1, 2), torch.randint(3, (1,))
        generator = torch.Generator().set_state(agem.generator.get_state())
        bx, by = agem.buffer.get(agem.buffer.sample_slots(4, generator))
        g_ref = torch.cat(
            [
                g.flatten()
                for g in torch.autograd.grad(F.cross_entropy(model(bx), by), list(model.parameters()))
            ]
        )
        F.cross_entropy(model(x), y).backward()
        g = torch.cat([p.grad.flatten() for p in model.parameters()])
        agem.after_backward(model, None, x, y)
        projected = torch.cat([p.grad.flatten() for p in model.parameters()])
        assert torch.dot(projected, g_ref) >= -1e-6
        if torch.dot(g, g_ref) >= 0:
            assert torch.equal(projected, g)
        conflicts += bool(torch.dot(g, g_ref) < 0)
    assert 0 < conflicts == agem.projections < 30  # both branches were exercised


# --- GDumb ---------------------------------------------------------------------------------------


def test_gdumb_reinitialises_the_model_at_every_boundary():
    gdumb = make("gdumb", lr=0.0, buffer_size=6, buffer_batch_size=4, epochs=2)  # lr 0: reset only
    assert not gdumb.trains_on_stream
    model = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    previous = [p.detach().clone() for p in model.parameters()]
    for label in range(3):
        drive(gdumb, model, optimizer, torch.randn(5, 2), torch.full((5,), label), boundary=False)
        fresh = copy.deepcopy(model)
        reinitialise(fresh, torch.Generator().set_state(gdumb.generator.get_state()))
        new_model, new_optimizer = gdumb.at_boundary(model, optimizer)
        assert new_model is model and new_optimizer is not optimizer
        assert new_optimizer.param_groups[0]["params"][0] is model[0].weight
        for p, before, want in zip(model.parameters(), previous, fresh.parameters()):
            assert not torch.equal(p, before)
            assert torch.equal(p, want)
        previous = [p.detach().clone() for p in model.parameters()]
        optimizer = new_optimizer
    assert gdumb.buffer.class_counts(3) == [2, 2, 2]
    # 3 retrainings, 2 epochs each, over 5, then 6, then 6 stored samples.
    assert gdumb.summary() == {
        "buffer_per_class": [2, 2, 2],
        "stream_samples_seen": 15,
        "replayed_samples": 2 * (5 + 6 + 6),
        "retrainings": 3,
    }


def test_gdumb_learns_its_memory_and_clips_gradients():
    norms = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            norms.append(torch.cat([p.grad.flatten() for p in self.param_groups[0]["params"]]).norm())
            return super().step(closure)

    gdumb = build_competitor(
        {"name": "gdumb", "buffer_size": 20, "buffer_batch_size": 4, "epochs": 30, "clip": 0.5},
        loss_fn=F.cross_entropy, make_optimizer=lambda m: RecordingSGD(m.parameters(), lr=0.5),
        num_classes=2, device=torch.device("cpu"), generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    torch.manual_seed(0)
    x = torch.cat([torch.randn(10, 2) + 3, torch.randn(10, 2) - 3])
    y = torch.cat([torch.zeros(10, dtype=torch.long), torch.ones(10, dtype=torch.long)])
    model, _ = drive(gdumb, nn.Linear(2, 2), None, x, y)
    assert (model(x).argmax(1) == y).all()
    assert len(norms) == 30 * 5 and max(norms) <= 0.5 + 1e-5


def test_gdumb_resets_a_memory_head_state():
    torch.manual_seed(0)
    head = memory_head()
    head.train()
    for _ in range(5):
        head(torch.randn(1, 2))
    assert head.usage.sum() > 0 and (head.age != 1).any()  # tau_eta = 1 is the initial age
    gdumb = make("gdumb", lr=0.0)  # empty memory: the boundary only resets
    fresh = copy.deepcopy(head)
    reinitialise(fresh, torch.Generator().set_state(gdumb.generator.get_state()))
    assert not torch.equal(fresh.keys, head.keys)
    gdumb.at_boundary(head, None)
    assert torch.equal(head.keys, fresh.keys) and torch.equal(head.memories, fresh.memories)
    assert torch.equal(head.usage, torch.zeros_like(head.usage))
    assert torch.equal(head.age, torch.ones_like(head.age))  # tau_eta = 1
    assert torch.equal(head.scramble_count, torch.zeros_like(head.scramble_count))


# --- ensemble ------------------------------------------------------------------------------------


def test_ensemble_outputs_the_mean_of_reinitialised_members():
    ensemble = make("ensemble", members=3)
    model = nn.Linear(2, 3)
    original = copy.deepcopy(model.state_dict())
    wrapped = ensemble.wrap(model)
    assert isinstance(wrapped, MeanOfMembers) and len(wrapped.members) == 3
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())  # input untouched
    weights = [m.weight for m in wrapped.members] + [model.weight]
    assert all(not torch.equal(a, b) for i, a in enumerate(weights) for b in weights[i + 1 :])
    x = torch.randn(4, 2)
    manual = sum(x @ m.weight.T + m.bias for m in wrapped.members) / 3
    torch.testing.assert_close(wrapped(x), manual)
    F.cross_entropy(wrapped(x), torch.tensor([0, 1, 2, 0])).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in wrapped.parameters())
    assert ensemble.summary() == {"members": 3}


# --- every competitor: the loop, summaries, resume -------------------------------------------------


def _stream(seed: int, n: int = 24, device: str = "cpu"):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 2, generator=generator), torch.randint(3, (n,), generator=generator)
    return x.to(device), y.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ALL_NAMES)
@pytest.mark.parametrize("use_memory_head", [False, True])
def test_every_competitor_runs_the_loop_with_batches(name, device, use_memory_head):
    torch.manual_seed(0)
    options = {"mir": {"buffer_size": 10, "buffer_batch_size": 3, "candidates": 6}}.get(name, {})
    if name in ("er_reservoir", "er_random", "agem", "gdumb"):
        options = {"buffer_size": 10, "buffer_batch_size": 3}
    competitor = make(name, device=device, **options)
    base = memory_head() if use_memory_head else nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 3))
    model = competitor.wrap(base).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for seed in range(2):
        model, optimizer = drive(competitor, model, optimizer, *_stream(seed, device=device), batch_size=4)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    summary = competitor.summary()
    if "buffer_per_class" in summary:
        assert len(summary["buffer_per_class"]) == 3 and sum(summary["buffer_per_class"]) == 10
        assert summary["stream_samples_seen"] == 48
        assert competitor.buffer.inputs.device.type == device
    if name in ("er_reservoir", "er_random", "mir", "agem"):
        # Each batch of 4 replays min(3, filled before it): 0 for the first, 3 for the other 11.
        assert summary["replayed_samples"] == 33


@pytest.mark.parametrize("name", ["er_reservoir", "er_random", "mir", "agem", "gdumb"])
def test_state_dict_resumes_buffers_and_counters(name):
    options = {"buffer_size": 8, "buffer_batch_size": 2, **({"candidates": 4} if name == "mir" else {})}
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    first = make(name, **options)
    drive(first, model, torch.optim.SGD(model.parameters(), lr=0.1), *_stream(0), boundary=False)
    saved = io.BytesIO()
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    second = make(name, **options)
    second.load_state_dict(torch.load(saved))
    second.generator.set_state(first.generator.get_state())
    assert second.summary() == first.summary()
    for competitor in (first, second):
        clone = copy.deepcopy(model)
        drive(competitor, clone, torch.optim.SGD(clone.parameters(), lr=0.1), *_stream(1))
    assert torch.equal(first.buffer.inputs, second.buffer.inputs)
    assert first.summary() == second.summary()
