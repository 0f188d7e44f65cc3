"""The Memory Head's steps as ``shared/spec/memory-head.md`` states them, written once with torch ops.

``MemoryHead(impl="reference")`` runs every function here. The fast path (``impl="fast"``, the
default) runs the same query, scores and key update, and computes the output (and its gradient)
differently, the top-δ and attention by cheaper means with the same values (:mod:`memhead.blending`);
the tests hold it to the functions here on every option combination, and both replay the paper
code's reference traces.

``head`` is a :class:`memhead.layer.MemoryHead`: its options, and for :func:`key_update` its state.
Shapes: ``b`` samples, ``q`` key sets, ``m`` keys per set, ``d`` key size, ``u`` unit size, ``δ``.

Tie rule: where scores are exactly equal, the top-δ are what ``torch.topk`` returns on the scores
computed as the paper's code computes them (euclidean: ``torch.cdist(z, K).pow(2)``, then the scaled
``exp(-·)``); every path shares :func:`scores`, and the fast path's top-δ hands every row with
equal scores among its best to :func:`top`, so every path picks the same keys.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memhead.psi import apply_psi

LAYER_NORM_EPS = 1e-5


def queries(head, x: torch.Tensor) -> torch.Tensor:
    """Step 1: ``z = ψ(x)`` ``(b, d)``, unit-norm for cosine; detached unless cosine keys learn by
    gradient (then the gradient reaches lower layers through the query)."""
    through_query = head.distance == "cosine" and head.upd_k != "ad_hoc_WTA"
    z = apply_psi(head.psi, x if through_query else x.detach(), head.key_size)
    return F.normalize(z, dim=-1) if head.distance == "cosine" else z


def scores(head, z: torch.Tensor, keys: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Step 2: scores ``(b, q, m)`` of queries ``(b, d)`` against keys ``(q, m, d)`` (cosine and
    dot_scaled: written into ``out`` ``(b, q * m)`` if given)."""
    q, d = keys.shape[0], keys.shape[-1]
    if head.distance == "euclidean":
        distances, width = key_distances(z, keys), math.sqrt(d) * head.sigma_eu
        if distances.requires_grad:
            return torch.exp(-distances.pow(2) / width).view(len(z), q, -1)
        # The same operations in place: no temporaries of b × q × m floats (per-neuron keys: tens of MB).
        return distances.pow_(2).neg_().div_(width).exp_().view(len(z), q, -1)
    # The paper's z @ K.T, with every key set's keys as columns of one product (scaled in place: the
    # same values without a second (b, q, m) tensor).
    return torch.mm(z, keys.reshape(-1, d).T, out=out).div_(math.sqrt(d)).view(len(z), q, -1)


def key_distances(z: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """The paper's ``torch.cdist(z, K)`` of queries ``(..., b, d)`` against every key set
    ``(..., q, m, d)``: ``(..., b, q * m)``, no ``(b, m, d)`` tensor.

    One cdist over all key sets' keys (a batch of ``q`` would copy the queries ``q`` times), in the
    mode cdist picks for one key set alone: its matmul expansion from 25 queries or keys on.
    """
    *lead, q, m, d = keys.shape
    mode = "use_mm_for_euclid_dist" if max(z.shape[-2], m) > 25 else "donot_use_mm_for_euclid_dist"
    return torch.cdist(z, keys.reshape(*lead, q * m, d), compute_mode=mode)


def top(scores: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: the ``delta`` best scores per sample and key set, decreasing, and their key indices
    (exact ties: ``torch.topk``'s choice, as in the paper's code)."""
    return scores.topk(delta, dim=-1)


def attention(head, top_scores: torch.Tensor) -> torch.Tensor:
    """Step 4: ``α = softmax(γ_α r_top)`` over the δ selected scores."""
    return torch.softmax(head.gamma_alpha * top_scores, dim=-1)


def rows(head, indices: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Rows of ``state.view(q * m, ·)`` that per-key-set indices point to (key sets along ``dim``)."""
    if head.num_key_sets == 1:
        return indices
    offsets = torch.arange(head.num_key_sets, device=indices.device) * head.key_mem_units
    return indices + offsets.view(-1, *[1] * (indices.dim() - 1 - dim % indices.dim()))


def blend(head, memories: torch.Tensor, alpha: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
    """Step 5: ``W = Σ_k α_k memories[i_k]`` ``(b, q, u)``. With ``upd_m=WTA`` the runners-up are
    constants (and with ``grad_WTA`` their attention weights too): only the winner learns."""
    batch, q, delta = top_indices.shape
    flat = memories.view(q * head.key_mem_units, head.unit_size)
    # index_select: its backward (index_add) stays fast in deterministic mode.
    units = flat.index_select(0, rows(head, top_indices, dim=1).reshape(-1)).view(batch, q, delta, -1)
    if head.upd_m == "WTA":
        runners = flat.detach().index_select(0, rows(head, top_indices[..., 1:], dim=1).reshape(-1))
        units = torch.cat([units[:, :, :1], runners.view(batch, q, delta - 1, head.unit_size)], dim=2)
        if head.upd_k == "grad_WTA":
            alpha = torch.cat([alpha[..., :1], alpha[..., 1:].detach()], dim=-1)
    return torch.einsum("bqk,bqku->bqu", alpha, units)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """The layer-norm input: divided by the variance itself, not its square root (as specified)."""
    return (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + LAYER_NORM_EPS)


def apply_units(head, blended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Step 6: the per-sample blended units ``(b, q, u)`` applied to the flat input ``(b, in)``."""
    batch, n_in = x.shape[0], head.in_features
    weights = blended[..., : head.weight_size].reshape(batch, head.out_features, n_in + int(head.bias))
    matrix, inputs = weights[..., :n_in], x
    bias = weights[..., n_in] if head.bias else 0.0
    if head.layer_norm:
        # q is 1 or out_features: both broadcast against the (b, out, in) weight matrix.
        gains = blended[..., head.weight_size : head.weight_size + n_in]
        shifts = blended[..., head.weight_size + n_in :]
        matrix = gains * matrix
        bias = bias + (matrix * shifts).sum(dim=-1)
        inputs = normalise(x)
    return torch.bmm(matrix, inputs.unsqueeze(-1)).squeeze(-1) + bias


def output(head, memories: torch.Tensor, alpha: torch.Tensor, top_indices: torch.Tensor, x: torch.Tensor):
    """Steps 5-6: the output ``(b, out)``."""
    return apply_units(head, blend(head, memories, alpha, top_indices), x)


def fresh_units(head, shape: tuple[int, ...]) -> torch.Tensor:
    """New memory units: uniform in ``±1/sqrt(u)``; with layer norm, gains 1 and shifts 0."""
    memories = head.memories
    units = torch.empty((*shape, head.unit_size), device=memories.device, dtype=memories.dtype)
    nn.init.uniform_(units, -1.0 / math.sqrt(head.unit_size), 1.0 / math.sqrt(head.unit_size))
    if head.layer_norm:
        units[..., head.weight_size : head.weight_size + head.in_features] = 1.0
        units[..., head.weight_size + head.in_features :] = 0.0
    return units


@torch.no_grad()
def key_update(head, z: torch.Tensor, winner_scores: torch.Tensor, winners: torch.Tensor) -> None:
    """The ``ad_hoc_WTA`` step on ``head``'s state, in place: scrambling, winners toward their
    inputs, then the counters.

    Args:
        z: ``(b, d)``, this forward's queries.
        winner_scores: ``(b, q)``, this forward's winning scores.
        winners: ``(b, q)``, this forward's winning key indices.
    """
    if head.scramble:
        scramble(head, z, winner_scores, winners)
    move_winners(head, z, winner_scores, winners)
    if head.scramble:
        count_wins(head, z, winners)


def scramble(head, z: torch.Tensor, winner_scores: torch.Tensor, winners: torch.Tensor) -> None:
    """Per key set: the batch's worst-matched sample takes over the oldest weak key, if any.

    Written unconditionally (a slot keeps its values where no scramble happens): no host sync.
    """
    weak = (head.usage < head.tau_mu) & (head.age >= head.tau_eta)
    weakest = winner_scores.argmin(dim=0, keepdim=True)  # (1, q)
    weakest_score = winner_scores.gather(0, weakest)[0]
    scrambling = (weakest_score < head.tau_alpha) & weak.any(dim=-1)  # (q,)
    slots = rows(head, torch.where(weak, head.age, float("-inf")).argmax(dim=-1))  # oldest; first on ties
    keys, units, usage = head.keys.view(-1, head.key_size), head.memories.view(-1, head.unit_size), head.usage
    keys.index_copy_(0, slots, torch.where(scrambling[:, None], z[weakest[0]], keys.index_select(0, slots)))
    if head.random_memories:
        chosen = slots[scrambling]
        units[chosen] = fresh_units(head, (len(chosen),))
    else:
        sources = torch.where(scrambling, rows(head, winners.gather(0, weakest)[0]), slots)
        units.index_copy_(0, slots, units.index_select(0, sources))
    usage.view(-1).index_copy_(0, slots, usage.view(-1).index_select(0, slots).masked_fill(scrambling, 0.0))
    head.scramble_count += scrambling


def move_winners(head, z: torch.Tensor, winner_scores: torch.Tensor, winners: torch.Tensor) -> None:
    """Each sample's winning key moves toward its query; shared winners add up their steps."""
    batch, q, d = z.shape[0], head.num_key_sets, head.key_size
    keys = head.keys.view(-1, d)
    winner_rows = rows(head, winners).reshape(-1)
    inputs = z[:, None, :].expand(batch, q, d).reshape(-1, d)
    if head.distance == "cosine":
        steps = head.beta_k * inputs
    elif head.distance == "dot_scaled":
        steps = (head.beta_k / math.sqrt(d)) * inputs
    else:  # the key as it is after scrambling, the score of the forward pass
        rate = head.beta_k / (math.sqrt(d) * head.sigma_eu)
        steps = rate * winner_scores.reshape(-1, 1) * (inputs - keys.index_select(0, winner_rows))
    keys.index_add_(0, winner_rows, steps)
    if head.distance == "cosine":
        if batch == 1:
            keys.index_copy_(0, winner_rows, F.normalize(keys.index_select(0, winner_rows), dim=-1))
        else:
            head.keys.copy_(F.normalize(head.keys, dim=-1))


def count_wins(head, z: torch.Tensor, winners: torch.Tensor) -> None:
    """Winners' age to 0, one use each, then every key ages by ``b`` (with ``b > 1`` the winners are
    first found again among the updated keys)."""
    batch = z.shape[0]
    if batch > 1:
        winners = top(scores(head, z, head.keys), 1)[1][..., 0]
    winner_rows = rows(head, winners).reshape(-1)
    head.age.view(-1).index_fill_(0, winner_rows, 0.0)
    head.usage.view(-1).index_add_(0, winner_rows, torch.ones_like(winner_rows, dtype=head.usage.dtype))
    head.age += batch
