"""Unit tests of the Memory Head layer against hand-computed numbers from shared/spec/memory-head.md."""

from __future__ import annotations

import copy
import enum
import math

import pytest
import torch
import torch.nn.functional as F

from memhead.layer import MemoryHead, MemoryHeadOptionError, check_options
from memhead.psi import apply_psi

SQRT2 = math.sqrt(2.0)


@pytest.fixture(autouse=True, params=["fast", "reference"])
def impl(request, monkeypatch):
    """Every hand-computed test runs on both implementations (the default ``impl`` switched)."""
    monkeypatch.setitem(MemoryHead.__init__.__kwdefaults__, "impl", request.param)
    return request.param


def make_head(in_features=2, out_features=1, **options) -> MemoryHead:
    options = {"scramble": False, **options}
    return MemoryHead(in_features, out_features, **options)


def set_state(head: MemoryHead, **tensors) -> None:
    with torch.no_grad():
        for name, value in tensors.items():
            getattr(head, name).copy_(torch.as_tensor(value, dtype=getattr(head, name).dtype))


def snapshot(head: MemoryHead) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in head.state_dict().items()}


def constant_units(head: MemoryHead, constants) -> None:
    """Units with zero weights and a bias of ``constants[j]``: the output is the attention-weighted
    sum of the constants, which exposes the attention weights."""
    memories = torch.zeros_like(head.memories)
    memories[..., -1] = torch.as_tensor(constants, dtype=memories.dtype)
    set_state(head, memories=memories)


# --- shapes and the plain linear case --------------------------------------------------------------


@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("shared_keys", [True, False])
def test_output_and_state_shapes(batch, shared_keys):
    head = make_head(4, 3, key_mem_units=6, delta=2, shared_keys=shared_keys)
    q = 1 if shared_keys else 3
    assert head.keys.shape == (q, 6, 4)
    assert head.memories.shape == (q, 6, 3 * 5 if shared_keys else 5)
    out = head(torch.randn(batch, 4))
    assert out.shape == (batch, 3)
    assert head.last_top_indices.shape == (batch, q, 2) and head.last_top_indices.dtype == torch.long
    assert not head.last_top_indices.requires_grad


def test_unit_sizes_without_bias_and_with_layer_norm():
    assert make_head(4, 3, bias=False).memories.shape == (1, 10, 12)
    assert make_head(4, 3, bias=False, shared_keys=False).memories.shape == (3, 10, 4)
    assert make_head(4, 3, layer_norm=True).memories.shape == (1, 10, 15 + 8)
    assert make_head(4, 3, layer_norm=True, shared_keys=False).memories.shape == (3, 10, 5 + 8)


def test_state_names_follow_the_options():
    full = {"keys", "memories", "usage", "age", "scramble_count"}
    assert set(make_head(scramble=True).state_dict()) == full
    plain = make_head()
    assert set(plain.state_dict()) == {"keys", "memories"} and plain.usage is None
    assert [name for name, _ in plain.named_parameters()] == ["memories"]
    graded = make_head(upd_k="grad_WTA")
    assert {name for name, _ in graded.named_parameters()} == {"memories", "keys"}
    counters = make_head(key_mem_units=4, scramble=True, tau_eta=7)
    assert counters.usage.dtype == torch.float32 and counters.scramble_count.dtype == torch.int64
    assert counters.age.tolist() == [[7.0] * 4] and counters.usage.sum() == 0
    assert counters.scramble_count.item() == 0


def test_initialisation_ranges():
    torch.manual_seed(0)
    head = make_head(8, 4, key_mem_units=50, distance="euclidean")
    assert head.memories.abs().max() <= 1 / math.sqrt(36) and head.keys.abs().max() <= 1 / math.sqrt(8)
    cosine = make_head(8, 4, key_mem_units=50, distance="cosine")
    torch.testing.assert_close(cosine.keys.norm(dim=-1), torch.ones(1, 50))
    norm = make_head(3, 2, layer_norm=True)
    assert torch.all(norm.memories[..., 8:11] == 1) and torch.all(norm.memories[..., 11:] == 0)


@pytest.mark.parametrize("shared_keys", [True, False])
def test_single_unit_is_a_linear_layer(shared_keys):
    # m = 1, delta = 1: the attention weight is 1 and the layer is x -> W x + b, gradient included.
    torch.manual_seed(1)
    head = make_head(3, 2, key_mem_units=1, delta=1, shared_keys=shared_keys)
    linear = torch.nn.Linear(3, 2)
    units = torch.cat([linear.weight, linear.bias[:, None]], dim=1).detach()
    set_state(head, memories=units.reshape(1, 1, 8) if shared_keys else units.reshape(2, 1, 4))
    x = torch.randn(4, 3, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    torch.testing.assert_close(head(x), linear(x_ref))
    head(x).sum().backward()
    linear(x_ref).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)


def test_multi_dimensional_input_is_flattened():
    torch.manual_seed(2)
    head = make_head(12, 3, key_mem_units=4, psi="resize1d", key_size=5).eval()
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(head(x), head(x.reshape(2, 12)))
    with pytest.raises(ValueError, match="12 values per sample"):
        head(torch.randn(2, 11))


# --- scores, attention, blending ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "distance, expected_scores",
    [
        # z = (3, 4), keys (1, 0) and (0, 1), d = 2.
        ("dot_scaled", (3 / SQRT2, 4 / SQRT2)),
        ("cosine", (0.6 / SQRT2, 0.8 / SQRT2)),  # z is normalised to (0.6, 0.8)
        ("euclidean", (math.exp(-20 / (SQRT2 * 2.0)), math.exp(-18 / (SQRT2 * 2.0)))),  # sigma_eu = 2
    ],
)
def test_attention_follows_the_distance(distance, expected_scores):
    gamma = 3.0
    head = make_head(2, 1, key_mem_units=2, delta=2, distance=distance, sigma_eu=2.0, gamma_alpha=gamma)
    set_state(head, keys=[[[1.0, 0.0], [0.0, 1.0]]])
    constant_units(head, [[1.0, 0.0]])
    head.eval()
    out = head(torch.tensor([[3.0, 4.0]]))
    r0, r1 = expected_scores
    weight_of_unit0 = 1 / (1 + math.exp(-gamma * (r0 - r1)))
    assert out.item() == pytest.approx(weight_of_unit0, rel=1e-5)
    assert head.last_top_indices.tolist() == [[[1, 0]]]  # unit 1 scores higher in every case


def test_blend_of_two_units_by_hand():
    # dot_scaled, z = (2, 1): scores (2, 1)/sqrt(2); gamma = 1.
    head = make_head(2, 1, key_mem_units=3, delta=2, distance="dot_scaled", gamma_alpha=1.0)
    set_state(
        head,
        keys=[[[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]],
        memories=[[[1.0, 2.0, 0.5], [-1.0, 3.0, 0.0], [9.0, 9.0, 9.0]]],
    )
    out = head.eval()(torch.tensor([[2.0, 1.0]]))
    a0 = 1 / (1 + math.exp(-(2 - 1) / SQRT2))
    expected = a0 * (2 + 2 + 0.5) + (1 - a0) * (-2 + 3 + 0)
    assert out.item() == pytest.approx(expected, rel=1e-6)


def test_per_neuron_keys_pick_units_independently():
    # Neuron 0 reads unit 0 of its key set, neuron 1 unit 1 of its own (delta = 1).
    head = make_head(2, 2, key_mem_units=2, delta=1, distance="dot_scaled", shared_keys=False)
    set_state(
        head,
        keys=[[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]],
        memories=[[[1.0, 0.0, 0.0], [5.0, 5.0, 5.0]], [[7.0, 7.0, 7.0], [0.0, 2.0, 1.0]]],
    )
    out = head.eval()(torch.tensor([[3.0, 0.5]]))
    assert head.last_top_indices.tolist() == [[[0], [1]]]
    assert out.tolist() == [[3.0, 2.0]]


def test_layer_norm_formula_by_hand():
    head = make_head(3, 1, key_mem_units=1, delta=1, layer_norm=True, dtype=torch.float64)
    # weights, bias | gains | shifts
    set_state(head, memories=[[[1.0, 2.0, 3.0, 0.5, 2.0, 1.0, 0.5, 0.1, -0.2, 0.3]]])
    out = head.eval()(torch.tensor([[1.0, 2.0, 6.0]], dtype=torch.float64))
    # mean 3, unbiased variance 7; G*W = (2, 2, 1.5); sum(G*W*shift) = 0.25.
    expected = (2 * -2 + 2 * -1 + 1.5 * 3) / (7 + 1e-5) + 0.25 + 0.5
    assert out.item() == pytest.approx(expected, abs=1e-12)


# --- psi ---------------------------------------------------------------------------------------------


def test_psi_by_hand():
    x = torch.tensor([[-3.0, 0.0, 0.5, 2.0]])
    assert apply_psi("sign", x, 4).tolist() == [[-1.0, 0.0, 1.0, 1.0]]
    assert apply_psi("identity", x.reshape(1, 2, 2), 4).tolist() == x.tolist()
    ramp = torch.tensor([[0.0, 2.0, 4.0, 6.0]])
    assert apply_psi("resize1d", ramp, 2).tolist() == [[1.0, 5.0]]  # half-pixel centres: pair means
    assert apply_psi("resize1d", ramp, 4).tolist() == ramp.tolist()
    image = torch.arange(16.0).reshape(1, 1, 4, 4)
    # d = 4: s = 4, w' = round(sqrt(4/16) * 4) = 2, h' = 2 -> means of the 2x2 blocks.
    assert apply_psi("resize2d", image, 4).tolist() == [[2.5, 4.5, 10.5, 12.5]]
    two_channels = torch.tensor([[[[1.0, 3.0], [5.0, 7.0]], [[0.0, 2.0], [4.0, 8.0]]]])
    # d = 5: s = 2, w' = round(sqrt(2/4) * 2) = 1, h' = 2 -> row means, then one zero of padding.
    assert apply_psi("resize2d", two_channels, 5).tolist() == [[2.0, 6.0, 1.0, 6.0, 0.0]]
    with pytest.raises(ValueError, match=r"\(b, C, H, W\)"):
        apply_psi("resize2d", ramp, 2)


@pytest.mark.parametrize(
    "psi, key_size, shape", [("identity", None, (2, 6)), ("sign", 6, (2, 6)), ("resize1d", 3, (2, 6)),
                             ("resize2d", 4, (2, 1, 2, 3))]
)  # fmt: skip
def test_each_psi_runs_in_the_layer(psi, key_size, shape):
    head = make_head(6, 2, key_mem_units=3, psi=psi, key_size=key_size, distance="euclidean", scramble=True)
    assert head.keys.shape[-1] == (key_size or 6)
    x = torch.randn(shape)
    out = head(x)
    out.sum().backward()
    assert out.shape == (2, 2) and head.memories.grad.abs().sum() > 0


# --- key update and scrambling -----------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["euclidean", "cosine", "dot_scaled"])
def test_winning_key_step_equals_the_formula(distance):
    beta, sigma = 0.5, 2.0
    head = make_head(2, 1, key_mem_units=2, delta=1, distance=distance, beta_k=beta, sigma_eu=sigma)
    keys = torch.tensor([[[0.0, 1.0], [0.6, 0.8]]])
    set_state(head, keys=keys)
    x = torch.tensor([[0.8, 0.6]])
    head(x).sum().backward()
    assert head.last_top_indices.tolist() == [[[1]]]
    k, z = keys[0, 1], x[0]
    if distance == "euclidean":
        r = math.exp(-((z - k) ** 2).sum().item() / (SQRT2 * sigma))
        expected = k + beta / (SQRT2 * sigma) * r * (z - k)
    elif distance == "dot_scaled":
        expected = k + beta / SQRT2 * z
    else:
        expected = F.normalize(k + beta * z, dim=0)
    torch.testing.assert_close(head.keys[0, 1], expected)
    torch.testing.assert_close(head.keys[0, 0], keys[0, 0])  # losers stay


def test_euclidean_steps_of_a_shared_winner_add_up():
    beta = 0.3
    head = make_head(2, 1, key_mem_units=2, delta=1, distance="euclidean", beta_k=beta)
    set_state(head, keys=[[[5.0, 5.0], [1.0, 1.0]]])
    x = torch.tensor([[0.8, 0.6], [1.2, 1.0]])
    head(x)
    k = torch.tensor([1.0, 1.0])
    expected = k.clone()
    for z in x:  # both variations from the key as it was before the step
        r = math.exp(-((z - k) ** 2).sum().item() / SQRT2)
        expected += beta / SQRT2 * r * (z - k)
    torch.testing.assert_close(head.keys[0, 1], expected)


def scramble_head(**options) -> MemoryHead:
    """m = 3 euclidean keys at (0, 0), (1, 0), (0, 1); key 1 heavily used; tau = (0.5, 2, 5)."""
    settings = dict(key_mem_units=3, delta=1, distance="euclidean", beta_k=0.1, scramble=True,
                    tau_alpha=0.5, tau_mu=2, tau_eta=5)  # fmt: skip
    head = make_head(2, 1, **{**settings, **options})
    keys = [[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]
    set_state(head, keys=keys, usage=[[0.0, 5.0, 0.0]], age=[[7.0, 9.0, 7.0]])
    return head


def test_scramble_when_all_three_conditions_hold():
    head = scramble_head()
    before = snapshot(head)
    memories = head.memories
    x = torch.tensor([[3.0, 4.0]])  # winner: key 2, r = exp(-18 / sqrt 2) ~ 3e-6 < tau_alpha
    out = head(x)
    out.sum().backward()  # the in-place writes leave this step's graph intact
    assert head.last_top_indices.tolist() == [[[2]]]
    # weak keys: 0 and 2 (age 7 each, usage 0); ties go to the first index -> slot 0.
    assert head.scramble_count.tolist() == [1]
    torch.testing.assert_close(head.keys[0, 0], x[0])
    torch.testing.assert_close(head.memories[0, 0], before["memories"][0, 2])  # copy of the winner's unit
    torch.testing.assert_close(head.memories[0, 1:], before["memories"][0, 1:])
    r = math.exp(-18 / SQRT2)
    expected_key2 = torch.tensor([0.0, 1.0]) + 0.1 / SQRT2 * r * torch.tensor([3.0, 3.0])
    torch.testing.assert_close(head.keys[0, 2], expected_key2)
    # b = 1: the forward's winner (key 2) is credited, not the new slot; slot usage reset, age kept.
    assert head.usage.tolist() == [[0.0, 5.0, 1.0]]
    assert head.age.tolist() == [[8.0, 10.0, 1.0]]
    assert head.memories is memories and head.memories.grad is not None


@pytest.mark.parametrize(
    "change",
    [
        {"tau_alpha": 1e-6},  # the winning score (~3e-6) is not below tau_alpha
        {"usage": [[2.0, 5.0, 2.0]]},  # nobody below tau_mu
        {"age": [[4.0, 9.0, 4.0]]},  # the rarely used keys are too young; the old one is used
    ],
)
def test_no_scramble_when_one_condition_fails(change):
    change = dict(change)
    counters = {name: change.pop(name) for name in ("usage", "age") if name in change}
    head = scramble_head(**change)
    set_state(head, **counters)
    before = snapshot(head)
    head(torch.tensor([[3.0, 4.0]]))
    assert head.scramble_count.tolist() == [0]
    torch.testing.assert_close(head.keys[0, :2], before["keys"][0, :2])
    torch.testing.assert_close(head.memories, before["memories"])
    assert head.usage[0, 2] == before["usage"][0, 2] + 1 and head.age[0, 2] == 1


def test_batch_scramble_once_and_counters_from_updated_keys():
    head = make_head(2, 1, key_mem_units=3, delta=1, distance="euclidean", beta_k=0.1, scramble=True,
                     tau_alpha=0.5, tau_mu=2, tau_eta=5)  # fmt: skip
    keys = [[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]]
    set_state(head, keys=keys, usage=[[5.0, 0.0, 0.0]], age=[[9.0, 3.0, 8.0]])
    before = snapshot(head)
    # Sample 0 is far from everything (winner 0, tiny score); sample 1 sits on key 1.
    head(torch.tensor([[-5.0, -5.0], [9.9, 0.0]]))
    assert head.last_top_indices[..., 0].tolist() == [[0], [1]]
    # Only key 2 is weak (key 0 used, key 1 young): it takes sample 0's query and key 0's memory.
    assert head.scramble_count.tolist() == [1]
    torch.testing.assert_close(head.keys[0, 2], torch.tensor([-5.0, -5.0]))
    torch.testing.assert_close(head.memories[0, 2], before["memories"][0, 0])
    # b > 1: winners recomputed from the updated keys -> sample 0 now wins key 2.
    assert head.usage.tolist() == [[5.0, 1.0, 1.0]]
    assert head.age.tolist() == [[11.0, 2.0, 2.0]]


def test_random_memories_give_a_fresh_unit():
    torch.manual_seed(3)
    head = scramble_head(random_memories=True, layer_norm=True)
    before = snapshot(head)
    head(torch.tensor([[3.0, 4.0]]))
    assert head.scramble_count.tolist() == [1]
    fresh = head.memories[0, 0].detach()
    assert not torch.equal(fresh, before["memories"][0, 0])
    assert not torch.equal(fresh, before["memories"][0, 2])
    assert fresh[:3].abs().max() <= 1 / math.sqrt(7)
    assert fresh[3:5].tolist() == [1.0, 1.0] and fresh[5:].tolist() == [0.0, 0.0]


def test_per_neuron_scrambling_is_decided_per_key_set():
    head = make_head(2, 2, key_mem_units=2, delta=1, distance="euclidean", shared_keys=False, scramble=True,
                     tau_alpha=0.5, tau_mu=2, tau_eta=5)  # fmt: skip
    keys = [[[0.0, 0.0], [1.0, 0.0]], [[3.0, 4.0], [1.0, 0.0]]]
    set_state(head, keys=keys, usage=[[0.0, 0.0], [0.0, 0.0]], age=[[5.0, 6.0], [5.0, 6.0]])
    head(torch.tensor([[3.0, 4.0]]))
    # Key set 0 matches poorly and scrambles its oldest weak key (1); key set 1 already has z.
    assert head.scramble_count.tolist() == [1, 0]
    torch.testing.assert_close(head.keys[0, 1], torch.tensor([3.0, 4.0]))


# --- gradients ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("upd_m, rows_with_gradient", [("WTA", {1}), ("vanilla", {1, 2})])
def test_only_the_winner_unit_learns_with_wta(upd_m, rows_with_gradient):
    head = make_head(2, 2, key_mem_units=4, delta=2, distance="dot_scaled", upd_m=upd_m, gamma_alpha=1.0)
    set_state(head, keys=[[[0.0, 1.0], [1.0, 0.0], [0.7, 0.7], [-1.0, 0.0]]])
    head(torch.tensor([[2.0, 0.5]])).sum().backward()
    assert head.last_top_indices.tolist() == [[[1, 2]]]
    rows = {j for j in range(4) if head.memories.grad[0, j].abs().sum() > 0}
    assert rows == rows_with_gradient


def test_grad_wta_keys_learn_through_the_winner_weight_only():
    # Output = a1 * c1 + a2 * c2 with constant units; with grad_WTA a2 is a constant, so
    # d out / d r2 = c1 * d a1 / d r2 = -gamma * a1 * a2 * c1 (the grad_not_WTA value would add c2's term).
    gamma, c1, c2 = 2.0, 3.0, -1.0
    head = make_head(2, 1, key_mem_units=2, delta=2, distance="dot_scaled", upd_k="grad_WTA",
                     gamma_alpha=gamma)  # fmt: skip
    set_state(head, keys=[[[1.0, 0.0], [0.0, 1.0]]])
    constant_units(head, [[c1, c2]])
    z = torch.tensor([2.0, 1.0])
    head(z[None]).sum().backward()
    a1 = 1 / (1 + math.exp(-gamma * (2 - 1) / SQRT2))
    a2 = 1 - a1
    torch.testing.assert_close(head.keys.grad[0, 1], -gamma * a1 * a2 * c1 * z / SQRT2)
    torch.testing.assert_close(head.keys.grad[0, 0], gamma * a1 * a2 * c1 * z / SQRT2)


def test_cosine_gradient_keys_are_renormalised_and_pass_gradient_to_the_input():
    head = make_head(2, 1, key_mem_units=2, delta=2, distance="cosine", upd_k="grad_not_WTA", upd_m="vanilla")
    set_state(head, keys=[[[3.0, 0.0], [0.0, 0.5]]], memories=[[[1.0, -2.0, 0.5], [3.0, 1.0, -1.0]]])
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    with torch.no_grad():
        head(x)
    assert head.keys[0].tolist() == [[3.0, 0.0], [0.0, 0.5]]  # untouched outside training
    head(x).sum().backward()
    torch.testing.assert_close(head.keys.detach(), torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]))
    # The input gradient also flows through the query: o = sum_k a_k(x / |x|) * (M_k . [x; 1]).
    units = head.memories.detach()[0]
    x_ref = x.detach()[0].clone().requires_grad_(True)
    scores = (x_ref / x_ref.norm()) @ torch.eye(2) / SQRT2
    attention = torch.softmax(head.gamma_alpha * scores, dim=0)
    (attention * (units[:, :2] @ x_ref + units[:, 2])).sum().backward()
    torch.testing.assert_close(x.grad[0], x_ref.grad)
    weights_only = (attention.detach()[:, None] * units[:, :2]).sum(0)
    assert not torch.allclose(x.grad[0], weights_only, atol=1e-3)


def test_ad_hoc_queries_are_detached():
    head = make_head(2, 1, key_mem_units=2, delta=2, distance="cosine", upd_m="vanilla", gamma_alpha=1.0)
    set_state(head, keys=[[[1.0, 0.0], [0.0, 1.0]]])
    x = torch.tensor([[1.0, 2.0]], requires_grad=True)
    head.eval()(x).sum().backward()
    r = torch.tensor([1.0, 2.0]) / math.sqrt(5) / SQRT2
    attention = torch.softmax(r, dim=0)
    torch.testing.assert_close(x.grad[0], (attention[:, None] * head.memories.detach()[0, :, :2]).sum(0))


# --- when the state may change -----------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["eval", "no_grad", "inference_mode"])
def test_state_frozen_outside_training_forwards(mode):
    torch.manual_seed(4)
    head = make_head(2, 3, key_mem_units=4, distance="euclidean", scramble=True, tau_alpha=1.0, tau_eta=0)
    before = snapshot(head)
    x = torch.randn(6, 2) * 5
    if mode == "eval":
        head.eval()(x)
    elif mode == "no_grad":
        with torch.no_grad():
            head(x)
    else:
        with torch.inference_mode():
            head(x)
    assert head.last_top_indices.shape == (6, 1, 2)
    for name, value in head.state_dict().items():
        assert torch.equal(value, before[name]), name
    head.train()(x)  # the same batch does change it in a training forward
    assert not torch.equal(head.keys, before["keys"]) and head.scramble_count.item() == 1


def run_steps(head, optimizer, inputs, targets):
    outputs = []
    for x, y in zip(inputs, targets):
        out = head(x)
        outputs.append(out.detach())
        optimizer.zero_grad()
        F.cross_entropy(out, y).backward()
        optimizer.step()
    return torch.stack(outputs)


def test_state_dict_round_trip_mid_stream():
    torch.manual_seed(5)
    options = dict(key_mem_units=5, delta=2, distance="euclidean", scramble=True, tau_alpha=0.9, tau_mu=3,
                   tau_eta=4)  # fmt: skip
    inputs, targets = torch.randn(16, 3, 2) * 2, torch.randint(0, 3, (16, 3))
    first = make_head(2, 3, **options)
    first_opt = torch.optim.Adam(first.parameters(), lr=0.05)
    run_steps(first, first_opt, inputs[:8], targets[:8])
    second = make_head(2, 3, **options)
    second_opt = torch.optim.Adam(second.parameters(), lr=0.05)
    second.load_state_dict(first.state_dict())
    # deepcopy: Adam's load_state_dict keeps the very tensors when device and dtype already match.
    second_opt.load_state_dict(copy.deepcopy(first_opt.state_dict()))
    expected = run_steps(first, first_opt, inputs[8:], targets[8:])
    assert torch.equal(run_steps(second, second_opt, inputs[8:], targets[8:]), expected)
    for name, value in first.state_dict().items():
        assert torch.equal(second.state_dict()[name], value), name
    assert first.scramble_count.item() > 0


# --- dtypes and devices ------------------------------------------------------------------------------


def test_float64():
    head = make_head(3, 2, key_mem_units=4, distance="euclidean", scramble=True, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for n, t in head.state_dict().items() if n != "scramble_count")
    out = head(torch.randn(5, 3, dtype=torch.float64))
    out.sum().backward()
    assert out.dtype == torch.float64 and head.memories.grad.dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize(
    "shared_keys, upd_k, scramble", [(True, "ad_hoc_WTA", True), (False, "grad_WTA", False)]
)
def test_cuda_matches_cpu(shared_keys, upd_k, scramble):
    torch.manual_seed(6)
    options = dict(key_mem_units=6, delta=2, distance="euclidean", shared_keys=shared_keys, upd_k=upd_k,
                   scramble=scramble, tau_alpha=0.9, tau_mu=3, tau_eta=4)  # fmt: skip
    inputs, targets = torch.randn(12, 4, 5), torch.randint(0, 3, (12, 4))
    cpu = make_head(5, 3, **options)
    cuda = make_head(5, 3, **options, device="cuda")
    cuda.load_state_dict(cpu.state_dict())
    cpu_out = run_steps(cpu, torch.optim.Adam(cpu.parameters(), lr=0.01), inputs, targets)
    cuda_out = run_steps(cuda, torch.optim.Adam(cuda.parameters(), lr=0.01), inputs.cuda(), targets.cuda())
    torch.testing.assert_close(cuda_out.cpu(), cpu_out, atol=1e-5, rtol=1e-5)
    for name, value in cpu.state_dict().items():
        torch.testing.assert_close(cuda.state_dict()[name].cpu(), value, atol=1e-5, rtol=1e-5)


# --- configuration -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"upd_k": "foo"}, "upd_k='foo' is not allowed; allowed: ad_hoc_WTA, grad_WTA, grad_not_WTA"),
        ({"upd_m": "all"}, "upd_m='all' is not allowed; allowed: vanilla, WTA"),
        ({"distance": "l1"}, "distance='l1' is not allowed; allowed: cosine, euclidean, dot_scaled"),
        ({"psi": "pca"}, "psi='pca' is not allowed; allowed: identity, sign, resize1d, resize2d"),
        ({"impl": "cuda"}, "impl='cuda' is not allowed; allowed: auto, reference, fast"),
        ({"upd_k": "grad_WTA"}, "scramble=true requires upd_k=ad_hoc_WTA"),
        ({"tau_mu": None}, "tau_mu=null is not allowed with scramble=true; allowed: a number"),
        ({"beta_k": None}, "beta_k=null is not allowed with upd_k=ad_hoc_WTA; allowed: a number"),
        ({"beta_k": -0.1}, "beta_k=-0.1 is not allowed; allowed: a number >= 0"),
        ({"gamma_alpha": 0}, "gamma_alpha=0 is not allowed; allowed: a number > 0"),
        ({"gamma_alpha": -2.0}, "gamma_alpha=-2.0 is not allowed; allowed: a number > 0"),
        (
            {"distance": "euclidean", "tau_alpha": 1.5},
            "tau_alpha=1.5 is not allowed with distance=euclidean; allowed: a number > 0 and <= 1",
        ),
        (
            {"distance": "euclidean", "tau_alpha": 0.0},
            "tau_alpha=0.0 is not allowed with distance=euclidean; allowed: a number > 0 and <= 1",
        ),
        # Cosine scores lie in [-1/sqrt(d), 1/sqrt(d)] = [-0.5, 0.5] for d = 4.
        (
            {"distance": "cosine", "tau_alpha": -0.5},
            "tau_alpha=-0.5 is not allowed with distance=cosine; allowed: a number > -0.5 and <= 1",
        ),
        ({"distance": "cosine", "tau_alpha": 1.2}, "tau_alpha=1.2 is not allowed with distance=cosine"),
        ({"key_mem_units": 0}, "key_mem_units=0 is not allowed; allowed: an integer >= 1"),
        ({"delta": 0}, "delta=0 is not allowed; allowed: an integer >= 1"),
        ({"key_size": 3}, "key_size=3 cannot be produced by psi=identity; allowed: null or 4"),
        ({"psi": "sign", "key_size": 2}, "key_size=2 cannot be produced by psi=sign; allowed: null or 4"),
        ({"scramble": "maybe"}, "scramble='maybe' is not allowed; allowed: true, false"),
        ({"colour": 1}, "colour is not a Memory Head option"),
    ],
)
def test_check_options_rejects(options, message):
    with pytest.raises(MemoryHeadOptionError) as error:
        check_options(4, 2, **options)
    assert str(error.value).startswith(message) and "\n" not in str(error.value)
    assert isinstance(error.value, ValueError)
    if "colour" not in options:  # (an unknown keyword is a TypeError for the constructor)
        with pytest.raises(MemoryHeadOptionError):
            MemoryHead(4, 2, **options)


def test_option_errors_name_config_paths_when_asked():
    with pytest.raises(MemoryHeadOptionError) as error:
        check_options(4, 2, upd_k="grad_WTA")
    assert error.value.option_message("model.") == "model.scramble=true requires model.upd_k=ad_hoc_WTA"


@pytest.mark.parametrize(
    "options",
    [
        {"distance": "cosine", "tau_alpha": 0.7},  # the paper's NS-ImageNet value: above 1/sqrt(d)
        {"distance": "euclidean", "tau_alpha": 1.0},
        {"distance": "dot_scaled", "tau_alpha": -30.0},  # dot_scaled scores are unbounded
        {"distance": "euclidean", "tau_alpha": 7.0, "scramble": False},  # not read without scrambling
        {"beta_k": 0.0},
    ],
)
def test_check_options_accepts_thresholds_the_scores_can_cross(options):
    assert check_options(4, 2, **options)["tau_alpha"] == options.get("tau_alpha", 0.95)


def test_check_options_normalises():
    class UpdK(enum.Enum):
        grad_not_WTA = "grad_not_WTA"

    opts = check_options(4, 2, upd_k=UpdK.grad_not_WTA, scramble="false", beta_k=None, tau_alpha=None,
                         psi="resize1d", key_size=9)  # fmt: skip
    assert opts["upd_k"] == "grad_not_WTA" and opts["scramble"] is False and opts["key_size"] == 9
    assert check_options(4, 2)["key_size"] == 4
    with pytest.warns(UserWarning, match="delta=7 is above key_mem_units=3"):
        assert check_options(4, 2, key_mem_units=3, delta=7)["delta"] == 3
    with pytest.warns(UserWarning):
        head = MemoryHead(4, 2, key_mem_units=3, delta=7)
    assert head.delta == 3 and head(torch.randn(2, 4)).shape == (2, 2)
    assert head.last_top_indices.shape == (2, 1, 3)


def test_repr_shows_the_options():
    text = repr(make_head(4, 2, key_mem_units=3, impl="auto"))
    assert "in_features=4, out_features=2, bias=True, key_mem_units=3, delta=2" in text
    assert "impl" not in text and "impl=reference" in repr(make_head(4, 2, impl="reference"))
