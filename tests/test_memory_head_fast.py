"""The Memory Head's fast path (impl="fast") against its reference (impl="reference", the
specification's steps in memhead.reference): outputs, winners, gradients and state on every option
combination; exact ties; autograd's view of the in-place state changes; the recycled gradient."""

from __future__ import annotations

import copy
import itertools
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from memhead import blending, layer, reference
from memhead.layer import MemoryHead

REPO = Path(__file__).resolve().parents[1]
IN, OUT, UNITS, DELTA = 6, 4, 5, 2


def make_head(dtype=torch.float32, **options) -> MemoryHead:
    options = {"key_mem_units": UNITS, "delta": DELTA, "scramble": False, **options}
    torch.manual_seed(3)
    head = MemoryHead(IN, OUT, dtype=dtype, **options)
    with torch.no_grad():  # layer-norm gains and shifts away from 1 and 0, so that they matter
        head.memories.add_(0.3 * torch.randn_like(head.memories))
    return head


def as_reference(head: MemoryHead) -> MemoryHead:
    """A copy of ``head`` (same state) that runs the reference implementation."""
    twin = copy.deepcopy(head)
    twin.impl = "reference"
    return twin


def reference_forward(head: MemoryHead, x: torch.Tensor):
    """The reference's output and top-δ indices for ``head``'s state (``head`` unchanged)."""
    twin = as_reference(head)
    output = twin(x)
    return output, twin.last_top_indices


def tolerance(dtype) -> dict:
    return {"atol": 1e-5, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 1e-10, "rtol": 1e-9}


AXES = {
    "distance": ("cosine", "euclidean", "dot_scaled"),
    "shared_keys": (True, False),
    "upd_m": ("vanilla", "WTA"),
    "upd_k": ("ad_hoc_WTA", "grad_WTA", "grad_not_WTA"),
    "layer_norm": (False, True),
}
CONFIGS = [dict(zip(AXES, values)) for values in itertools.product(*AXES.values())]


def config_id(config: dict) -> str:
    return "-".join(str(v) if not isinstance(v, bool) else f"{k}={v}" for k, v in config.items())


@pytest.fixture(params=["grouped", "dense"])
def strategy(request, monkeypatch):
    """Force one of the two no-gradient strategies of memhead.blending."""
    monkeypatch.setattr(blending, "prefer_dense", lambda *args, **kwargs: request.param == "dense")
    return request.param


@pytest.fixture(params=["topk", "maxima"])
def top_rule(request, monkeypatch):
    """Force the fast path's top-δ search: torch.topk, or max passes (with topk for tied rows) on
    however few rows."""
    maxima = request.param == "maxima"
    monkeypatch.setattr(blending, "prefer_maxima", lambda rows, m, delta, device: maxima and delta <= m)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_evaluation_equals_the_reference(config, batch, dtype, strategy, top_rule):
    head = make_head(dtype, **config).eval()
    x = torch.randn(batch, IN, dtype=dtype)
    with torch.no_grad():
        expected, indices = reference_forward(head, x)
    with torch.inference_mode():
        output = head(x)
    torch.testing.assert_close(output, expected, **tolerance(dtype))
    assert torch.equal(head.last_top_indices, indices)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("batch", [1, 7])
@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_training_step_equals_the_reference(config, batch, dtype):
    """Output, winners, every gradient (memories, gradient-trained keys, input) and the state after
    the step's key update."""
    head = make_head(dtype, **config).train()
    twin = as_reference(head)
    x = torch.randn(batch, IN, dtype=dtype)
    x_head, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    upstream = torch.randn(batch, OUT, dtype=dtype)

    output, expected = head(x_head), twin(x_ref)
    torch.testing.assert_close(output, expected, **tolerance(dtype))
    assert torch.equal(head.last_top_indices, twin.last_top_indices)

    (expected * upstream).sum().backward()
    (output * upstream).sum().backward()
    torch.testing.assert_close(head.memories.grad, twin.memories.grad, **tolerance(dtype))
    if head.upd_k != "ad_hoc_WTA":
        torch.testing.assert_close(head.keys.grad, twin.keys.grad, **tolerance(dtype))
    torch.testing.assert_close(x_head.grad, x_ref.grad, **tolerance(dtype))
    for name, value in twin.state_dict().items():
        torch.testing.assert_close(head.state_dict()[name], value, **tolerance(dtype), msg=name)


@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("distance", ["cosine", "euclidean", "dot_scaled"])
def test_a_scrambling_stream_equals_the_reference(distance, shared_keys, top_rule):
    """Many steps of batches 1 and 3 with scrambling and Adam: the same winners and state throughout."""
    options = {"distance": distance, "shared_keys": shared_keys, "scramble": True, "tau_eta": 3, "tau_mu": 2}
    options["tau_alpha"] = 0.9 if distance == "euclidean" else 0.5
    head = make_head(torch.float64, **options).train()
    twin = as_reference(head)
    optimizers = [torch.optim.Adam(h.parameters(), lr=1e-2) for h in (head, twin)]
    stream = torch.randn(80, IN, dtype=torch.float64) * 2
    targets = torch.randint(0, OUT, (80,))
    for step in range(40):
        batch = slice(step * 2, step * 2 + 1 + 2 * (step % 2))
        for h, optimizer in zip((head, twin), optimizers):
            loss = F.cross_entropy(h(stream[batch]), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        assert torch.equal(head.last_top_indices, twin.last_top_indices), step
        for name, value in twin.state_dict().items():
            torch.testing.assert_close(head.state_dict()[name], value, msg=name)
    assert head.scramble_count.sum() > 0


# --- exact ties: torch.topk's choice on the paper's score formula --------------------------------


def papers_top_indices(head: MemoryHead, x: torch.Tensor) -> torch.Tensor:
    """What the paper's code selects: per key set, ``exp(-cdist(z, K)^2 / (sqrt(d) sigma))`` or
    ``z K^T / sqrt(d)``, then ``torch.topk``."""
    z = torch.sign(x) if head.psi == "sign" else x
    if head.distance == "cosine":
        z = F.normalize(z, dim=-1)
    d, selected = head.key_size, []
    for keys in head.keys.detach():
        if head.distance == "euclidean":
            scores = torch.exp(-torch.cdist(z, keys).pow(2) / (math.sqrt(d) * head.sigma_eu))
        else:
            scores = z @ keys.T / math.sqrt(d)
        selected.append(scores.topk(head.delta, dim=-1).indices)
    return torch.stack(selected, dim=1)


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_exact_ties_pick_what_topk_picks_on_the_papers_scores(distance, shared_keys, impl, top_rule):
    """Sign queries against keys drawn from a few sign patterns: whole groups of keys score exactly
    alike, in training (batches of 1 and 40, scrambling) and in evaluation."""
    torch.manual_seed(0)
    head = MemoryHead(
        8, 3, key_mem_units=12, delta=3, distance=distance, psi="sign", shared_keys=shared_keys,
        tau_alpha=0.9 if distance == "euclidean" else 0.3, tau_mu=3, tau_eta=5, impl=impl,
    )  # fmt: skip
    patterns = torch.sign(torch.randn(3, 8))
    with torch.no_grad():
        head.keys.copy_(patterns[torch.randint(0, 3, head.keys.shape[:2])])
        if distance == "cosine":
            head.keys.copy_(F.normalize(head.keys, dim=-1))
    stream = torch.randn(200, 8)
    not_lowest_index = 0
    for step, batch in enumerate([slice(i, i + 1) for i in range(60)] + [slice(60, 100), slice(100, 140)]):
        x = stream[batch]
        expected = papers_top_indices(head, x)
        head.train()(x)
        assert torch.equal(head.last_top_indices, expected), step
        lowest = torch.sort(expected, dim=-1).values
        not_lowest_index += int((expected != lowest).any())
    head.eval()
    with torch.no_grad():
        expected = papers_top_indices(head, stream[140:])
        head(stream[140:])
    assert torch.equal(head.last_top_indices, expected)
    assert not_lowest_index > 0  # ties that "lowest index first" would have broken otherwise


@pytest.mark.parametrize(
    ("psi", "key_size", "shape"),
    [("identity", None, (40, IN)), ("sign", None, (40, IN)), ("resize1d", 3, (40, IN)),
     ("resize2d", 4, (40, 1, 2, 3))],
)  # fmt: skip
@pytest.mark.parametrize("distance", ["cosine", "euclidean", "dot_scaled"])
def test_per_neuron_evaluation_on_every_psi(distance, psi, key_size, shape, top_rule, monkeypatch):
    """Per-neuron keys through the fast path (its top-δ rule, score buffer, sampled products) on every
    query map, keys drawn from a few patterns so that scores tie: the reference's outputs, and the
    paper's topk choice where its score formula is at hand (identity and sign queries)."""
    monkeypatch.setattr(layer, "SCORE_BUFFER_MIN_FLOATS", 0)
    options = {"distance": distance, "psi": psi, "key_size": key_size, "key_mem_units": 12, "delta": 3}
    head = make_head(shared_keys=False, **options).eval()
    torch.manual_seed(4)
    patterns = torch.sign(torch.randn(3, head.key_size))
    with torch.no_grad():
        head.keys.copy_(patterns[torch.randint(0, 3, head.keys.shape[:2])])
        if distance == "cosine":
            head.keys.copy_(F.normalize(head.keys, dim=-1))
    x = torch.randn(shape)
    with torch.no_grad():
        expected, indices = reference_forward(head, x)
    with torch.inference_mode():
        output = head(x)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(head.last_top_indices, indices)
    if psi in ("identity", "sign"):
        assert torch.equal(head.last_top_indices, papers_top_indices(head, x.view(len(x), -1)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize(("m", "delta"), [(2, 2), (3, 2), (5, 3), (12, 4), (100, 2)])
def test_top_by_maxima_returns_what_topk_returns(m, delta, dtype, monkeypatch):
    """Scores from a few values (ties everywhere), with NaN and -inf: the same values and indices as
    torch.topk, row by row, and also for δ = m (no score left to compare the δ-th with)."""
    monkeypatch.setattr(blending, "MAXIMA_MIN_ROWS", 1)
    assert blending.prefer_maxima(900, m, delta, torch.device("cpu"))
    torch.manual_seed(m * delta)
    inf, nan = float("inf"), float("nan")
    crafted = [[5, -inf], [-inf, -inf], [nan, 1], [1, nan], [2, 2], [3, 1], [1, 3], [-inf, 4], [nan, nan]]
    for trial in range(10):
        scores = torch.randint(-3, 3, (300, 3, m)).to(dtype)
        scores[scores == -3] = -inf
        scores[torch.rand_like(scores) < 0.02] = nan
        if trial == 0 and m == 2:
            scores[: len(crafted), 0] = torch.tensor(crafted, dtype=dtype)
        if trial == 1:
            scores = torch.randn(300, 3, m, dtype=dtype)  # no ties: the max passes alone
        expected = scores.topk(delta, dim=-1)
        values, indices = blending.top(scores.clone(), delta)
        assert torch.equal(indices, expected.indices)
        torch.testing.assert_close(values, expected.values, rtol=0, atol=0, equal_nan=True)


def test_top_by_maxima_is_chosen_where_it_pays():
    cpu = torch.device("cpu")
    # The NS-ImageNet per-neuron head's chunk: 1000 samples x 100 key sets of m = 100, δ = 2.
    assert blending.prefer_maxima(1000 * 100, 100, 2, cpu)
    assert not blending.prefer_maxima(1000 * 100, 100, 1, cpu)  # topk's δ = 1 is one max pass itself
    assert not blending.prefer_maxima(1000 * 100, 1000, 2, cpu)  # topk's partial sort is cheaper
    assert not blending.prefer_maxima(100, 100, 2, cpu)  # an online step: one call beats several
    assert not blending.prefer_maxima(1000 * 100, 100, 2, torch.device("cuda"))


# --- autograd sees the key update's in-place changes -----------------------------------------------


@pytest.mark.parametrize("impl", ["fast", "reference"])
@pytest.mark.parametrize("batch", [1, 3])
def test_a_graph_that_saved_memories_before_a_scramble_refuses_to_backpropagate(batch, impl):
    head = make_head(scramble=True, tau_alpha=1.0, tau_eta=0, impl=impl).train()  # every key weak
    saved = (head.memories**2).sum()  # pow saves the memories
    keys_before = head.keys.clone()
    output = head(torch.randn(batch, IN))
    assert head.scramble_count.item() == 1 and not torch.equal(head.keys, keys_before)
    output.sum().backward()  # the forward's own graph stays valid
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("upd_m", ["vanilla", "WTA"])
def test_units_without_bias(upd_m, shared_keys, layer_norm, strategy):
    head = make_head(torch.float64, bias=False, upd_m=upd_m, shared_keys=shared_keys, layer_norm=layer_norm)
    x = torch.randn(6, IN, dtype=torch.float64)
    with torch.no_grad():
        expected, _ = reference_forward(head.eval(), x)
        torch.testing.assert_close(head(x), expected, **tolerance(torch.float64))
    twin = as_reference(head.train())
    twin(x).sum().backward()
    head(x).sum().backward()
    torch.testing.assert_close(head.memories.grad, twin.memories.grad, **tolerance(torch.float64))


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


@CUDA
@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize(
    ("upd_m", "upd_k"), [("WTA", "ad_hoc_WTA"), ("vanilla", "grad_not_WTA"), ("WTA", "grad_WTA")]
)
def test_cuda_paths_equal_the_reference(upd_m, upd_k, shared_keys, layer_norm, strategy):
    """Evaluation (a chunk large enough for the GPU's strategy) and a training step's gradients."""
    options = {"upd_m": upd_m, "upd_k": upd_k, "shared_keys": shared_keys, "layer_norm": layer_norm}
    head = make_head(**options).cuda().eval()
    x = torch.randn(300, IN, device="cuda")
    with torch.no_grad():
        expected, indices = reference_forward(head, x)
    with torch.inference_mode():
        torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-4)
    assert torch.equal(head.last_top_indices, indices)
    twin = as_reference(head.train())
    twin(x[:3]).sum().backward()
    head(x[:3]).sum().backward()
    torch.testing.assert_close(head.memories.grad, twin.memories.grad, atol=1e-5, rtol=1e-4)


def test_wta_gradient_reaches_only_the_winner_rows():
    head = make_head(upd_m="WTA", key_mem_units=8, delta=3).train()
    output = head(torch.randn(1, IN))
    output.sum().backward()
    winner = head.last_top_indices[0, 0, 0].item()
    touched = head.memories.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    assert touched == [winner]


@pytest.mark.parametrize("shared_keys", [True, False])
def test_evaluation_with_gradients_on_but_nothing_to_learn(shared_keys):
    """A frozen head under autograd takes the no-gradient path, with the same values."""
    head = make_head(shared_keys=shared_keys).eval()
    head.memories.requires_grad_(False)
    x = torch.randn(5, IN)
    expected, _ = reference_forward(head, x)
    torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_shared_keys_evaluation_never_blends_weights(layer_norm, monkeypatch):
    head = make_head(layer_norm=layer_norm).eval()

    def forbidden(*args, **kwargs):
        raise AssertionError("per-sample weights were built")

    monkeypatch.setattr(reference, "blend", forbidden)
    with torch.no_grad():
        head(torch.randn(9, IN))


def test_per_neuron_evaluation_in_slices(monkeypatch):
    """Per-neuron units blended in slices of the batch (a tiny slice bound forces several)."""
    head = make_head(shared_keys=False, layer_norm=True).eval()
    x = torch.randn(11, IN)
    with torch.no_grad():
        expected, _ = reference_forward(head, x)
        monkeypatch.setattr(blending, "SLICE_FLOATS", 1)
        torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("distance", ["cosine", "dot_scaled"])
def test_evaluation_chunks_share_one_score_buffer(distance, monkeypatch):
    """Chunks of changing sizes, under inference mode and no_grad, score into one buffer (as large as
    the largest chunk so far) with the reference's results; train() releases it."""
    monkeypatch.setattr(layer, "SCORE_BUFFER_MIN_FLOATS", 0)
    head = make_head(shared_keys=False, distance=distance).eval()
    pointers = []
    for size, context in [(7, torch.inference_mode), (7, torch.inference_mode), (3, torch.inference_mode),
                          (5, torch.no_grad), (11, torch.no_grad), (4, torch.no_grad)]:  # fmt: skip
        x = torch.randn(size, IN)
        with torch.no_grad():
            expected, indices = reference_forward(head, x)
        with context():
            output = head(x)
        torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)
        assert torch.equal(head.last_top_indices, indices)
        pointers.append(head._score_buffer.data_ptr())
    assert pointers[0] == pointers[1] == pointers[2]  # the first size is the largest until 11
    assert pointers[3] != pointers[2] and pointers[4] != pointers[3] and pointers[5] == pointers[4]
    head.train()
    assert head._score_buffer is None
    head(torch.randn(3, IN)).sum().backward()  # training scores by autograd, without the buffer
    assert head._score_buffer is None


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_per_neuron_evaluation_without_the_sampled_product(distance, bias, monkeypatch):
    """The embedding-bag blend that serves other devices and dtypes, on the CPU."""
    head = make_head(torch.float64, shared_keys=False, distance=distance, bias=bias).eval()
    x = torch.randn(11, IN, dtype=torch.float64)
    with torch.no_grad():
        expected, _ = reference_forward(head, x)
        monkeypatch.setattr(blending, "prefer_dense", lambda *args, **kwargs: False)
        monkeypatch.setattr(blending, "sampled_products_apply", lambda x: False)
        torch.testing.assert_close(head(x), expected, **tolerance(torch.float64))


def test_sampled_products_equal_the_blend_of_weights():
    """Every (sample, key set) selecting units in an order that is not sorted: the sparse pattern
    sorts them, the attention follows."""
    torch.manual_seed(2)
    units = torch.randn(4, 7, 5, dtype=torch.float64)
    inputs = torch.randn(9, 5, dtype=torch.float64)
    indices = torch.stack([torch.randperm(7)[:3] for _ in range(9 * 4)]).view(9, 4, 3)
    attention = torch.softmax(torch.randn(9, 4, 3, dtype=torch.float64), dim=-1)
    chosen = units[torch.arange(4)[None, :, None], indices]  # (b, q, δ, n)
    expected = torch.einsum("bqk,bqkn,bn->bq", attention, chosen, inputs)
    sampled = blending.per_neuron_outputs_sampled(inputs, units, indices, attention)
    torch.testing.assert_close(sampled, expected)


@pytest.mark.parametrize("shared_keys", [True, False])
def test_dense_strategy_in_slices(shared_keys, monkeypatch):
    head = make_head(shared_keys=shared_keys).eval()
    x = torch.randn(13, IN)
    with torch.no_grad():
        expected, _ = reference_forward(head, x)
        monkeypatch.setattr(blending, "prefer_dense", lambda *args, **kwargs: True)
        monkeypatch.setattr(blending, "SLICE_FLOATS", 3 * UNITS * OUT)
        torch.testing.assert_close(head(x), expected, atol=1e-5, rtol=1e-4)


def test_grouped_strategy_with_unused_and_crowded_units():
    """Every sample selecting the same two units leaves the others' blocks empty."""
    units = torch.randn(6, 3, 4, dtype=torch.float64)
    inputs = torch.randn(10, 4, dtype=torch.float64)
    indices = torch.tensor([[4, 1]] * 10)
    attention = torch.softmax(torch.randn(10, 2, dtype=torch.float64), dim=-1)
    expected = torch.einsum("bk,bkoi,bi->bo", attention, units[indices], inputs)
    grouped = blending._grouped_shared(inputs, units, False, indices, attention)
    torch.testing.assert_close(grouped, expected)
    torch.testing.assert_close(blending._dense_shared(inputs, units, indices, attention), expected)


def test_grouped_strategy_with_a_second_round_for_crowded_units():
    """Unit 0 is in every sample: the others are padded to a small cap, unit 0's extra rows (and
    those of any unit above the cap) go to a second product over the gathered crowded units."""
    others = [unit for unit in range(1, 10) for _ in range(5 if unit <= 4 else 4)]
    counts = [40] + [others.count(unit) for unit in range(1, 10)]
    cap = blending.padding_cap(counts)
    assert 0 < cap < 40
    torch.manual_seed(1)
    indices = torch.stack([torch.zeros(40, dtype=torch.long), torch.tensor(others)], dim=1)
    swap = torch.rand(40) < 0.5  # unit 0 at either rank
    indices[swap] = indices[swap].flip(1)
    units = torch.randn(10, 3, 4, dtype=torch.float64)
    inputs = torch.randn(40, 4, dtype=torch.float64)
    attention = torch.softmax(torch.randn(40, 2, dtype=torch.float64), dim=-1)
    expected = torch.einsum("bk,bkoi,bi->bo", attention, units[indices], inputs)
    grouped = blending._grouped_shared(inputs, units, False, indices, attention)
    torch.testing.assert_close(grouped, expected)


def test_cost_model_picks_grouping_for_large_heads_and_dense_for_small_ones():
    cpu = torch.device("cpu")
    # The paper's NS-ImageNet head: 100 units of 100 x 513 weights, a chunk of 1000 samples.
    assert not blending.prefer_dense(1000, 100, 2, 100 * 513, cpu)
    # The paper's 2-D head: 10 units of 2 x 3 weights.
    assert blending.prefer_dense(1000, 10, 2, 2 * 3, cpu)
    # Per-neuron keys at NS-ImageNet's shape: the sampled products; with few units, all of them.
    assert not blending.prefer_dense(1000, 100, 2, 100 * 513, cpu, "sampled")
    assert blending.prefer_dense(1000, 10, 2, 100 * 513, cpu, "sampled")


# --- the memory gradient's storage, reused from step to step ----------------------------------------


def online_step(head, optimizer, x, y, set_to_none=True):
    loss = F.cross_entropy(head(x), y)
    optimizer.zero_grad(set_to_none=set_to_none)
    loss.backward()
    optimizer.step()


def twin_heads(**options):
    options = {"distance": "cosine", "scramble": True, "tau_eta": 3, "tau_alpha": 1.0, **options}
    torch.manual_seed(5)
    head = MemoryHead(IN, OUT, key_mem_units=UNITS, delta=DELTA, **options)
    return head, copy.deepcopy(head)


@pytest.mark.parametrize("shared_keys", [True, False])
@pytest.mark.parametrize("upd_m", ["vanilla", "WTA"])
def test_reused_gradient_storage_gives_the_fresh_gradients(shared_keys, upd_m):
    """``set_to_none=True`` (storage reused) and ``False`` (autograd adds into a zeroed tensor) agree."""
    reused, fresh = twin_heads(shared_keys=shared_keys, upd_m=upd_m)
    opt_reused = torch.optim.SGD(reused.parameters(), lr=0.1, weight_decay=0.01)
    opt_fresh = torch.optim.SGD(fresh.parameters(), lr=0.1, weight_decay=0.01)
    pointers = set()
    for step in range(12):
        x, y = torch.randn(1 + step % 3, IN), torch.randint(0, OUT, (1 + step % 3,))
        online_step(reused, opt_reused, x, y)
        online_step(fresh, opt_fresh, x, y, set_to_none=False)
        torch.testing.assert_close(reused.memories.grad, fresh.memories.grad, atol=1e-7, rtol=1e-6)
        pointers.add(reused.memories.grad.data_ptr())
    assert reused.scramble_count.sum() > 0
    assert len(pointers) == 1  # one storage served every step
    for name, value in fresh.state_dict().items():
        torch.testing.assert_close(reused.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_a_kept_gradient_is_left_alone():
    head, _ = twin_heads()
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    online_step(head, optimizer, torch.randn(1, IN), torch.tensor([1]))
    kept = head.memories.grad
    view = head.memories.grad.view(-1)[:3]
    kept_before, view_before = kept.clone(), view.clone()
    for _ in range(3):
        online_step(head, optimizer, torch.randn(1, IN), torch.tensor([2]))
        assert head.memories.grad.data_ptr() != kept.data_ptr()
    assert torch.equal(kept, kept_before) and torch.equal(view, view_before)
    del kept
    online_step(head, optimizer, torch.randn(1, IN), torch.tensor([2]))
    assert view.data_ptr() != head.memories.grad.data_ptr() and torch.equal(view, view_before)


def test_a_gradient_edited_in_place_is_not_reused_as_zero():
    """A competitor rewriting the whole gradient (A-GEM's projection) leaves no stale rows behind."""
    head, _ = twin_heads(scramble=False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    online_step(head, optimizer, torch.randn(1, IN), torch.tensor([1]))
    head.memories.grad.add_(1.0)
    online_step(head, optimizer, torch.randn(1, IN), torch.tensor([0]))
    winner = head.last_top_indices[0, 0, 0].item()
    nonzero_rows = head.memories.grad[0].abs().sum(-1).nonzero().flatten().tolist()
    assert nonzero_rows == [winner]


def test_gradients_accumulate_without_zero_grad():
    head, twin = twin_heads(scramble=False)
    x1, x2 = torch.randn(1, IN), torch.randn(1, IN)
    head.eval()  # state frozen: both forwards see the same keys and memories
    twin.eval()
    head(x1).sum().backward()
    first = head.memories.grad.clone()
    head(x2).sum().backward()
    twin(x2).sum().backward()
    torch.testing.assert_close(head.memories.grad, first + twin.memories.grad)


def test_gradients_returned_by_autograd_grad_stay_valid():
    head, _ = twin_heads(scramble=False)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    (returned,) = torch.autograd.grad(head(torch.randn(1, IN)).sum(), [head.memories])
    before = returned.clone()
    for _ in range(3):
        online_step(head, optimizer, torch.randn(1, IN), torch.tensor([3]))
    assert torch.equal(returned, before)


def test_fused_adam_matches_plain_adam_on_a_memory_head():
    """The runner's optimizer (fused where torch offers it) follows torch.optim.Adam's trajectory."""
    pytest.importorskip("omegaconf")
    from memhead.runner import make_optimizer_factory

    cfg = SimpleNamespace(name="adam", lr=1e-2, weight_decay=1e-3, momentum=0.0)
    options = {"distance": "cosine", "key_mem_units": UNITS, "delta": DELTA, "scramble": True, "tau_eta": 3}
    torch.manual_seed(0)
    plain = MemoryHead(IN, OUT, **options)
    fused = copy.deepcopy(plain)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    fused_opt = make_optimizer_factory(cfg)(fused)
    assert fused_opt.defaults["fused"]
    xs, ys = torch.randn(30, IN), torch.randint(0, OUT, (30,))
    for x, y in zip(xs, ys):
        for head, opt in ((plain, plain_opt), (fused, fused_opt)):
            loss = F.cross_entropy(head(x[None]), y[None])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[name], value, atol=1e-6, rtol=1e-5, msg=name)


def test_bench_quick_prints_the_table():
    command = [sys.executable, "-m", "memhead.bench", "--quick"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("measure"))
    names = [line.split("  ")[0] for line in lines[header + 1 : header + 5]]
    assert names[0].startswith("floor: fused Adam") and names[1] == "online step, batch 1"
    assert names[2].startswith("nn.Linear eval") and names[3].startswith("Memory Head eval")
    for line in lines[header + 1 : header + 5]:
        cells = re.split(r"\s{2,}", line)
        assert float(cells[1]) > 0 and float(cells[3]) > 0, line
    assert all(re.search(r"<=\S+\s+(pass|FAIL)", line) for line in (lines[header + 2], lines[header + 4]))
    assert any(line.startswith("stream (") for line in lines)


def test_gradients_of_two_backwards_before_a_step_add_up_as_for_replay():
    """ER-style steps (incoming + replay backward, then the step) with the recycled gradient buffer."""
    torch.manual_seed(0)
    head = MemoryHead(
        16,
        5,
        key_mem_units=6,
        delta=2,
        distance="cosine",
        gamma_alpha=5.0,
        beta_k=1e-2,
        tau_alpha=0.7,
        tau_mu=5,
        tau_eta=5,
    )
    optimizer = torch.optim.Adam(head.parameters(), 1e-2)
    x, y = torch.randn(40, 16), torch.randint(0, 5, (40,))
    for step in range(12):
        incoming, replay = slice(step, step + 1), slice(20 + step, 24 + step)
        first = copy.deepcopy(head)
        F.cross_entropy(first(x[incoming]), y[incoming]).backward()
        second = copy.deepcopy(first)  # keys as moved by the incoming sample's forward
        second.memories.grad = None
        F.cross_entropy(second(x[replay]), y[replay]).backward()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(head(x[incoming]), y[incoming]).backward()
        F.cross_entropy(head(x[replay]), y[replay]).backward()
        torch.testing.assert_close(head.memories.grad, first.memories.grad + second.memories.grad)
        optimizer.step()


def test_per_neuron_euclidean_evaluation_equals_the_reference():
    torch.manual_seed(1)
    head = MemoryHead(48, 10, key_mem_units=30, delta=3, distance="euclidean", shared_keys=False)
    head.eval()
    x = torch.randn(40, 48)
    with torch.no_grad():
        output = head(x)
        expected, indices = reference_forward(head, x)
    assert torch.equal(head.last_top_indices, indices)
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=1e-4)
