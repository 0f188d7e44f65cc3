"""Memory Head outputs from the selected units without per-sample weights.

A Memory Head's output is linear in the blended weights, ``(Σ_k α_k W_k) x̃ = Σ_k α_k (W_k x̃)``, so
each selected unit can be applied to the samples that selected it and the *outputs* blended: that
needs ``b × δ × out`` floats where blending the weights needs ``b × δ × u``.

* Evaluation (no gradient): :func:`evaluate`. One key set: :func:`shared_unit_outputs` picks, by
  a rough cost model, the *grouped* strategy (pairs sorted by unit, one batched product over every
  unit padded to a common number of rows, a second one over the few crowded units) or the *dense*
  one (every unit applied to every sample: ``m / δ`` times the arithmetic; small layers and GPUs).
* Per-neuron key sets: every unit applied to every sample (:func:`per_neuron_outputs_dense`, few
  units), or only the selected (sample, unit) dot products (:func:`per_neuron_outputs_sampled`, a
  sampled sparse product; CPU), or the selected rows blended by one embedding-bag call per slice of
  the batch (layer norm, other devices).
* Top-δ (:func:`top`): the reference's exact values and picks, ties included, by cheaper means for
  the ``b × q`` rows of per-neuron keys. (Attention stays the reference's softmax: a softmax along a
  leading dimension is ~10x cheaper there, but rounds differently.)
* Training: :class:`SelectedUnits`, an autograd function with the gradients of blending the weights,
  whose memory gradient reuses the previous step's tensor (:class:`GradientRecycler`). (With layer
  norm the gains multiply the weights; training then blends weights, :func:`memhead.reference.output`.)
* :class:`cpu_threads`: small CPU work on one thread, large products on the whole team.
"""

from __future__ import annotations

import bisect
import math
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from memhead import reference

# Multiply-adds a device performs in the time of the grouped strategy's overhead per unit (sorting,
# padding, gathering; about a library call): its exchange rate with the dense strategy's arithmetic.
_MACS_PER_CALL = {"cpu": 2e5}
_MACS_PER_CALL_ACCELERATOR = 2e8
# Multiply-adds in the time of gathering one float of a selected unit (memory-bound): measured alike
# on a 2-core CPU and estimated for GPUs from their arithmetic and memory speeds.
MACS_PER_GATHERED_FLOAT = 16
# Dense multiply-adds in the time of one of a sampled product's (its dot products read rows one by
# one, a dense product reuses them from registers): measured on a 2-core CPU, 8 at 512 inputs
# (more below: a per-product overhead), e.g. 13 at 64.
MACS_PER_SAMPLED_MAC = 8
# Floats of one intermediate slice: small enough to stay in cache; larger batches go slice by slice.
SLICE_FLOATS = 1 << 20


# Multiply-adds from which one product is worth the intra-op team's barrier.
PARALLEL_MACS = 1 << 22
# The thread count outside the outermost :func:`cpu_threads` section (a stack for nesting).
_full_team: list[int] = []


class cpu_threads:  # noqa: N801 (used like a function: ``with cpu_threads(...)``)
    """Run the enclosed CPU work on the whole intra-op team (``parallel``) or on the calling thread.

    Every parallel CPU operation ends at a barrier of the team. For a row-sized tensor the second
    thread saves microseconds, but when other processes keep the cores busy, a descheduled team
    member stalls the barrier for a scheduler time slice (milliseconds), and a Memory Head forward has
    dozens of small operations. So the layer runs on one thread and hands only its large products to
    the team. The thread count is process-wide; it is restored on exit. (A class, not a generator:
    it is entered several times per online step.)
    """

    __slots__ = ("_active", "_parallel", "_restore")

    def __init__(self, device: torch.device, parallel: bool):
        self._active = device.type == "cpu"
        self._parallel = parallel
        self._restore = 0

    def __enter__(self) -> None:
        if self._active:
            current = torch.get_num_threads()
            full = _full_team[-1] if _full_team else current
            wanted = full if self._parallel else 1
            _full_team.append(full)
            if wanted != current:
                torch.set_num_threads(wanted)
                self._restore = current

    def __exit__(self, *exc) -> None:
        if self._active:
            if self._restore:
                torch.set_num_threads(self._restore)
            _full_team.pop()


def _macs_per_call(device: torch.device) -> float:
    return _MACS_PER_CALL.get(device.type, _MACS_PER_CALL_ACCELERATOR)


def prefer_dense(
    batch: int, units: int, delta: int, unit_macs: int, device: torch.device, alternative: str = "grouped"
) -> bool:
    """Whether applying all ``units`` to every sample beats the work on the ``delta`` selected ones.

    Args:
        batch: samples.
        units: ``m``, units to choose from.
        delta: ``δ``, units selected per sample.
        unit_macs: multiply-adds of one unit (of every key set) applied to one sample.
        device: where the work runs.
        alternative: ``'grouped'`` (products grouped by unit, an overhead per unit), ``'gathered'``
            (the selected units' floats are gathered and blended per sample) or ``'sampled'`` (only
            the selected products, :func:`per_neuron_outputs_sampled`).

    Returns:
        ``True`` when the dense strategy's extra arithmetic costs less than the alternative's overhead.
    """
    if alternative == "gathered":
        return units * unit_macs <= delta * unit_macs * MACS_PER_GATHERED_FLOAT
    if alternative == "sampled":
        return units * unit_macs <= delta * unit_macs * MACS_PER_SAMPLED_MAC
    extra_macs = batch * (units - delta) * unit_macs
    calls = min(units, batch * delta)
    return extra_macs <= calls * _macs_per_call(device)


# Top-δ by maxima (:func:`top`), measured on a 2-core CPU: a max pass over ``m`` scores per row
# costs ``m`` units, ``torch.topk`` about ``8 m`` below its partial-sort regime (``m >= 64 δ``) and
# about ``1.5 m`` in it; for ``δ = 1`` topk is a max pass itself. Few rows: topk's one call wins.
MAXIMA_DELTAS = range(2, 5)
MAXIMA_MIN_ROWS = 1 << 10


def prefer_maxima(rows: int, m: int, delta: int, device: torch.device) -> bool:
    """Whether :func:`top` takes ``δ`` max passes and one ``amax`` rather than one ``torch.topk``.

    CPU only: a GPU's topk is one fast kernel, and the passes would need a host sync for the rows
    with ties.
    """
    return device.type == "cpu" and delta in MAXIMA_DELTAS and m < 64 * delta and rows >= MAXIMA_MIN_ROWS


def top(scores: torch.Tensor, delta: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`memhead.reference.top`'s values and indices, exactly, ties included.

    Where the ``δ`` best scores of a row are distinct and above all others, the answer is unique:
    ``δ`` max passes (each maximum masked to ``-inf`` for the next) find it, and one more checks that
    the ``δ``-th is above the rest. Where it is not (exact ties, NaN, ``-inf`` selected), the order
    among equal scores is ``torch.topk``'s own, so those rows alone go through ``torch.topk``.
    ``scores`` (no gradient) is consumed: its best ``δ`` per row are left masked.

    Args:
        scores: ``(..., m)``.
        delta: ``δ <= m``.
    """
    m = scores.shape[-1]
    flat = scores.view(-1, m) if scores.is_contiguous() else scores.reshape(-1, m)
    if scores.requires_grad or not prefer_maxima(len(flat), m, delta, scores.device):
        return reference.top(scores, delta)
    values, indices = [], []
    for _ in range(delta):
        value, index = flat.max(dim=1, keepdim=True)
        values.append(value)
        indices.append(index)
        flat.scatter_(1, index, float("-inf"))
    # The best of the rest (-inf when there is none: the δ-th must then beat the masks).
    values.append(flat.amax(dim=1, keepdim=True) if delta < m else torch.full_like(values[0], -math.inf))
    values, indices = torch.cat(values, dim=1), torch.cat(indices, dim=1)
    # A NaN anywhere in a row is its first maximum (max and topk both put NaN first).
    tied = (values[:, :-1] <= values[:, 1:]).any(dim=1) | values[:, 0].isnan()
    tied = tied.nonzero().squeeze(1)
    values = values[:, :delta].contiguous()
    if len(tied):
        rows, ranks = flat.index_select(0, tied), indices.index_select(0, tied)
        for rank in reversed(range(delta)):  # the rows as they were (a rank after -inf saw a mask)
            rows.scatter_(1, ranks[:, rank : rank + 1], values[tied, rank : rank + 1])
        values[tied], indices[tied] = reference.top(rows, delta)
    shape = (*scores.shape[:-1], delta)
    return values.view(shape), indices.view(shape)


def evaluate(head, alpha: torch.Tensor, top_indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """:func:`memhead.reference.output`'s values ``(b, out)`` without per-sample weights in memory.

    Only for forwards that need no gradient (the runners-up of ``upd_m=WTA`` are not detached here).
    """
    n_cols = head.in_features + int(head.bias)
    if head.shared_keys:
        memories, inputs = head.memories[0], x
        if head.layer_norm:
            inputs = _layer_norm_inputs(head, memories, alpha[:, 0], top_indices[:, 0], x)
        units = memories[:, : head.weight_size].view(head.key_mem_units, head.out_features, n_cols)
        return shared_unit_outputs(inputs, units, top_indices[:, 0], alpha[:, 0], head.bias)
    batch, q, delta = top_indices.shape
    if not head.layer_norm:
        inputs = F.pad(x, (0, 1), value=1.0) if head.bias else x
        units = head.memories[..., :n_cols]
        sampled = sampled_products_apply(x)
        alternative = "sampled" if sampled else "gathered"
        if prefer_dense(batch, head.key_mem_units, delta, q * n_cols, x.device, alternative):
            return per_neuron_outputs_dense(inputs, units, top_indices, alpha)
        if sampled:
            return per_neuron_outputs_sampled(inputs, units, top_indices, alpha)
    # Per-neuron units are single rows: one embedding-bag call blends them (no gathered copies), in
    # slices of the batch that stay in cache. (With layer norm the gains multiply each row.)
    table = head.memories.view(q * head.key_mem_units, head.unit_size)
    unit_rows = reference.rows(head, top_indices, dim=1).reshape(-1, delta)
    weights = alpha.reshape(-1, delta)
    output = x.new_empty(batch, head.out_features)
    step = max(1, SLICE_FLOATS // (q * head.unit_size))
    for lo in range(0, batch, step):
        hi = min(lo + step, batch)
        with cpu_threads(x.device, parallel=(hi - lo) * q * delta * head.unit_size >= (1 << 20)):
            pairs = slice(lo * q, hi * q)
            blended = F.embedding_bag(unit_rows[pairs], table, per_sample_weights=weights[pairs], mode="sum")
            output[lo:hi] = reference.apply_units(head, blended.view(hi - lo, q, -1), x[lo:hi])
    return output


def _layer_norm_inputs(head, memories, alpha, indices, x):
    """``G ⊙ (norm(x) + B)`` per sample, from the blended gains ``G`` and shifts ``B`` (one key set).

    ``(G ⊙ W) n + Σ_i (G ⊙ W)_i B_i = W (G ⊙ (n + B))``: the layer-norm output is the blended ``W``
    applied to this vector, so only the ``2 * in_features`` gains and shifts are blended per sample.
    """
    batch, delta = indices.shape
    scales = memories[:, head.weight_size :].index_select(0, indices.reshape(-1)).view(batch, delta, -1)
    blended = torch.bmm(alpha[:, None, :], scales).squeeze(1)
    n_in = head.in_features
    return blended[:, :n_in] * (reference.normalise(x) + blended[:, n_in:])


def shared_unit_outputs(
    features: torch.Tensor, units: torch.Tensor, indices: torch.Tensor, attention: torch.Tensor, bias: bool
) -> torch.Tensor:
    """``out[b] = Σ_k attention[b, k] · units[indices[b, k]] @ [features[b]; 1]`` (one key set).

    Args:
        features: ``(b, in)`` per-sample input vectors.
        units: ``(m, out, in + bias)`` weight matrices, the bias (if any) as the last column.
        indices: ``(b, δ)`` selected unit indices.
        attention: ``(b, δ)`` blending weights.
        bias: whether the units carry a bias column.

    Returns:
        ``(b, out)``.
    """
    batch, delta = indices.shape
    m, out, n = units.shape
    if prefer_dense(batch, m, delta, out * n, features.device):
        inputs = torch.cat([features, features.new_ones(batch, 1)], dim=1) if bias else features
        return _dense_shared(inputs, units, indices, attention)
    return _grouped_shared(features, units, bias, indices, attention)


def _dense_shared(inputs, units, indices, attention):
    batch, delta = indices.shape
    m, out, n = units.shape
    result = inputs.new_empty(batch, out)
    for lo, hi, every in _every_unit_output(inputs, units.reshape(m * out, n)):
        chosen = every.view(hi - lo, m, out).gather(1, indices[lo:hi, :, None].expand(-1, -1, out))
        result[lo:hi] = (attention[lo:hi, :, None] * chosen).sum(dim=1)
    return result


def _every_unit_output(inputs: torch.Tensor, flat_units: torch.Tensor):
    """Yield ``(lo, hi, inputs[lo:hi] @ flat_units.T)`` over slices of the batch that bound memory."""
    rows, n = flat_units.shape
    step = max(1, SLICE_FLOATS // rows)
    for lo in range(0, inputs.shape[0], step):
        hi = min(lo + step, inputs.shape[0])
        with cpu_threads(inputs.device, parallel=(hi - lo) * rows * n >= PARALLEL_MACS):
            every = inputs[lo:hi] @ flat_units.T
        yield lo, hi, every  # the caller's blending runs outside the thread setting, as before


def _unit_parts(units: torch.Tensor, n_in: int, bias: bool):
    """``(m, in, out)`` transposed weights and ``(m, 1, out)`` biases (or ``None``) of ``(m, out, n)``
    units, as strided views."""
    return units[:, :, :n_in].transpose(1, 2), (units[:, None, :, n_in] if bias else None)


def _grouped_shared(features, units, bias, indices, attention):
    """:func:`shared_unit_outputs` grouped by unit."""
    batch, delta = indices.shape
    m, out, _ = units.shape
    device = features.device
    flat = indices.reshape(-1)
    # Pairs sorted by unit; ``position`` is a pair's place within its unit's block.
    sorted_units, order = torch.sort(flat, stable=True)
    counts = torch.bincount(flat, minlength=m)
    starts = counts.cumsum(0) - counts
    position = torch.arange(len(flat), device=device) - starts.index_select(0, sorted_units)
    samples = order // delta
    host_counts = counts.tolist()
    cap = padding_cap(host_counts)
    heavy = [unit for unit, count in enumerate(host_counts) if count > cap]
    extra = max(host_counts) - cap if heavy else 0
    # Both products write into one result tensor; every pair's row in it (-1: not in this product).
    every = features.new_empty(m * cap + len(heavy) * extra, out)
    result_rows = torch.where(position < cap, sorted_units * cap + position, -1)
    n_in = features.shape[1]
    if cap:
        weights_t, biases = _unit_parts(units, n_in, bias)
        _padded_product(features, weights_t, biases, samples, result_rows, every[: m * cap])
    if heavy:
        # The few crowded units, gathered, take the pairs beyond ``cap`` in a second product.
        heavy_units = torch.tensor(heavy, device=device)
        rank = torch.full((m,), -1, dtype=torch.long, device=device)
        rank[heavy_units] = torch.arange(len(heavy), device=device)
        second_rows = rank.index_select(0, sorted_units) * extra + (position - cap)
        overflow = position >= cap
        second_rows = torch.where(overflow, second_rows, -1)
        # Whole units are contiguous blocks: gathering them is a plain copy.
        heavy_t, heavy_biases = _unit_parts(units.index_select(0, heavy_units), n_in, bias)
        _padded_product(features, heavy_t, heavy_biases, samples, second_rows, every[m * cap :])
        result_rows = torch.where(overflow, second_rows + m * cap, result_rows)
    # Back to (sample, rank) order, then blended by attention.
    pair_rows = torch.empty_like(result_rows).index_copy_(0, order, result_rows)
    chosen = every.index_select(0, pair_rows).view(batch, delta, out)
    return (attention[:, :, None] * chosen).sum(dim=1)


# Costs of the second product in rows pushed through a unit (measured on a 2-core CPU): gathering
# one unit's weights, and the fixed cost of the round (its index work and library calls).
_UNIT_GATHER_ROWS = 6
_SECOND_ROUND_ROWS = 100


def padding_cap(counts: list[int]) -> int:
    """Rows per unit of the first padded product, which spans every unit (all padded to the cap).

    The rows beyond it go to a second product over the gathered units that have them, padded to the
    largest overflow. The cap minimises the padded rows plus the cost of gathering units.

    Args:
        counts: selected pairs per unit.
    """
    ascending = sorted(counts)
    m, largest = len(ascending), ascending[-1]
    best_cap, best_cost = largest, m * largest
    for cap in set(ascending):
        over = m - bisect.bisect_right(ascending, cap)
        cost = m * cap + over * (largest - cap + _UNIT_GATHER_ROWS) + (_SECOND_ROUND_ROWS if over else 0)
        if cost < best_cost or (cost == best_cost and cap > best_cap):
            best_cap, best_cost = cap, cost
    return best_cap


def _padded_product(features, weights_t, biases, samples, rows, result):
    """One batched product ``(groups, cap, in) @ weights_t (+ biases)`` into ``result``
    ``(groups * cap, out)``: ``rows[i] = g * cap + place`` (or -1: not here) puts sample
    ``samples[i]`` in place ``place`` of group ``g``'s block. Padding places repeat sample 0; their
    results are never read."""
    groups, n_in, out = weights_t.shape
    cap = result.shape[0] // groups
    source = torch.zeros(groups * cap, dtype=torch.long, device=samples.device)
    inside = rows >= 0
    source.index_copy_(0, rows[inside], samples[inside])
    with cpu_threads(features.device, parallel=groups * cap * n_in * out >= PARALLEL_MACS):
        padded = features.index_select(0, source).view(groups, cap, n_in)
        target = result.view(groups, cap, out)
        if biases is None:
            torch.bmm(padded, weights_t, out=target)
        else:
            torch.baddbmm(biases, padded, weights_t, out=target)


def per_neuron_outputs_dense(
    inputs: torch.Tensor, units: torch.Tensor, indices: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """``out[b, i] = Σ_k attention[b, i, k] · units[i, indices[b, i, k]] · inputs[b]`` (a key set per
    output), applying every unit to every sample.

    Args:
        inputs: ``(b, n)`` per-sample input vectors (the bias entry included).
        units: ``(q, m, n)``, one weight row per unit of each key set.
        indices: ``(b, q, δ)`` selected unit indices.
        attention: ``(b, q, δ)`` blending weights.

    Returns:
        ``(b, q)``.
    """
    batch = inputs.shape[0]
    q, m, n = units.shape
    result = inputs.new_empty(batch, q)
    for lo, hi, every in _every_unit_output(inputs, units.reshape(q * m, n)):
        result[lo:hi] = (every.view(hi - lo, q, m).gather(2, indices[lo:hi]) * attention[lo:hi]).sum(dim=-1)
    return result


def sampled_products_apply(x: torch.Tensor) -> bool:
    """Whether :func:`per_neuron_outputs_sampled` serves ``x``: torch's sampled product is measured
    here on the CPU only, and takes single and double precision only."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)


def per_neuron_outputs_sampled(
    inputs: torch.Tensor, units: torch.Tensor, indices: torch.Tensor, attention: torch.Tensor
) -> torch.Tensor:
    """:func:`per_neuron_outputs_dense`'s values from only the ``b × q × δ`` selected dot products.

    ``inputs @ units.view(q * m, n).T`` sampled where a sample selected a unit (a sparse pattern:
    ``torch.sparse.sampled_addmm``), then blended by attention: ``δ / m`` of the dense arithmetic,
    no gathered copy of the units, and only ``b × q × δ`` values in memory. Arguments and result as
    :func:`per_neuron_outputs_dense`'s.
    """
    batch, q, delta = indices.shape
    m, n = units.shape[1:]
    # Column indices of a sparse row must increase: sorted within each key set, whose blocks of m
    # columns already are in order.
    columns, order = indices.sort(dim=-1)
    columns = columns + torch.arange(q, device=columns.device)[:, None] * m
    row_starts = torch.arange(0, batch * q * delta + 1, q * delta, device=columns.device)
    # Zero values: sampled_addmm scales them by beta = 0, and 0 × garbage may be NaN.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        pattern = torch.sparse_csr_tensor(
            row_starts,
            columns.view(-1),
            inputs.new_zeros(batch * q * delta),
            size=(batch, q * m),
            check_invariants=False,
        )
    with cpu_threads(inputs.device, parallel=batch * q * delta * n >= PARALLEL_MACS):
        products = torch.sparse.sampled_addmm(pattern, inputs, units.reshape(q * m, n).T, beta=0.0)
    products = products.values().view(batch, q, delta)
    return (products * attention.gather(-1, order)).sum(dim=-1)


class GradientRecycler:
    """Hands the previous step's memory gradient back to the next backward, zeroed where it was written.

    A memory gradient is zero outside the rows of the selected units, so the tensor the last backward
    produced can serve again once those rows are zeroed — provided nobody can see it any more. Public
    means tell: a post-accumulate-grad hook on the parameter records the gradient tensor autograd
    adopted (a weak reference) and its version. The tensor is reused only when that gradient and every
    view of it are gone (``zero_grad(set_to_none=True)`` dropped it and nobody kept it) and it was not
    changed in place. Otherwise (gradients accumulated, a gradient kept or edited, one returned by
    ``torch.autograd.grad``) a fresh zero tensor is used, as autograd would. That spares a full-size
    allocation and zero fill per online step. One thing it cannot see: an alias made with
    ``.detach()``, ``.data`` or ``.numpy()`` and kept past ``zero_grad``; keep ``.clone()`` instead.
    """

    def __init__(self, parameter: torch.Tensor | None = None) -> None:
        self._buffer: torch.Tensor | None = None  # our alias of the storage last handed out
        self._rows: torch.Tensor | None = None
        self._adopted: weakref.ref | None = None
        self._version = -1
        if parameter is not None:
            parameter.register_post_accumulate_grad_hook(self._adopt)

    def __deepcopy__(self, memo) -> GradientRecycler:
        return GradientRecycler()  # a copy's parameter has no hook: its gradients are always fresh

    def __getstate__(self) -> dict:
        return GradientRecycler().__dict__

    def _adopt(self, parameter: torch.Tensor) -> None:
        grad, buffer = parameter.grad, self._buffer
        if buffer is not None and grad is not None and grad.data_ptr() == buffer.data_ptr():
            self._adopted, self._version = weakref.ref(grad), grad._version
        else:  # added into an existing gradient, or copied: not ours to reuse
            self._adopted, self._buffer = None, None

    def acquire(self, parameter: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A gradient tensor shaped like ``parameter`` and the rows of it that are not zero yet.

        Returns:
            ``(tensor, stale)``: ``stale`` is ``None`` for a fresh zero tensor, else the rows (of
            ``tensor.view(-1, u)``) the caller must zero or overwrite; all other rows are zero.
        """
        buffer, adopted = self._buffer, self._adopted
        self._adopted = None  # handed out again: unknown until adopted
        if (
            buffer is not None
            and adopted is not None
            and adopted() is None
            and buffer._version == self._version
            and parameter.grad is None
            and buffer.shape == parameter.shape
        ):
            return buffer.detach(), self._rows  # a new tensor object: autograd can adopt it
        fresh = torch.zeros_like(parameter, memory_format=torch.contiguous_format)
        self._buffer = fresh.detach()
        return fresh, None

    def remember(self, rows: torch.Tensor) -> None:
        """After writing ``rows`` (of the gradient's ``view(-1, u)``), the only rows that are not zero."""
        self._rows = rows


class SelectedUnits(torch.autograd.Function):
    """``out[b, s·R + r] = Σ_k α[b, s, k] · (memories[s, j_bsk] viewed (R, n))[r] · inputs[b]``, with the
    gradients of blending the weights first, in a few batched products.

    The memory gradient reaches only the first ``trainable`` ranks (``δ`` for ``upd_m='vanilla'``,
    1 for ``WTA``); the attention and input gradients use every rank, as in the blend of weights.

    Args (of ``apply``):
        memories: ``(q, m, R * n)``, units without layer-norm parts; ``R`` rows of ``n`` inputs.
        rows: ``(b, q, δ)`` long, the selected units as rows of ``memories.view(q * m, -1)``.
        attention: ``(b, q, δ)``.
        inputs: ``(b, n)``, the inputs with their bias entry.
        trainable: how many leading ranks pass a gradient to the memories.
        recycler: the layer's :class:`GradientRecycler`.

    Returns:
        ``(b, q * R)``.
    """

    @staticmethod
    def forward(ctx, memories, rows, attention, inputs, trainable, recycler):
        batch, q, delta = rows.shape
        needs = ctx.needs_input_grad
        flat = memories.view(-1, memories.shape[-1])
        if batch * q == 1 and inputs.device.type == "cpu" and not needs[3]:
            # One sample (an online step): each unit read in place, no gathered copy.
            n, units = inputs.shape[1], None
            selected = rows.view(-1).tolist()
            products = torch.stack([torch.mv(flat[row].view(-1, n), inputs[0]) for row in selected])
            products = products.view(1, delta, -1)
            output = torch.mm(attention.view(1, delta), products[0])
        else:
            with cpu_threads(inputs.device, parallel=rows.numel() * memories.shape[-1] >= PARALLEL_MACS):
                units = flat.index_select(0, rows.view(-1)).view(batch, -1, inputs.shape[1])  # (b, q·δ·R, n)
                products = torch.bmm(units, inputs[:, :, None]).view(batch * q, delta, -1)
                output = torch.bmm(attention.view(batch * q, 1, delta), products).view(batch, -1)
        # Only what the requested gradients read: usually the rows, attention and inputs.
        ctx.save_for_backward(
            rows, attention, inputs, units if needs[3] else None, products if needs[2] else None
        )
        ctx.trainable, ctx.recycler, ctx.memories = trainable, recycler, memories
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        rows, attention, inputs, units, products = ctx.saved_tensors
        with cpu_threads(grad_output.device, parallel=rows.numel() * ctx.memories.shape[-1] >= PARALLEL_MACS):
            batch, q, delta = rows.shape
            grad_output = grad_output.view(batch, q, 1, -1)
            grad_memories = grad_attention = grad_inputs = None
            if ctx.needs_input_grad[0]:
                grad_memories = _memory_gradient(ctx, rows, attention, inputs, grad_output)
            if ctx.needs_input_grad[2]:
                grad_attention = (products.view(batch, q, delta, -1) * grad_output).sum(dim=-1)
            if ctx.needs_input_grad[3]:
                grad_products = (attention[..., None] * grad_output).reshape(batch, -1, 1)
                grad_inputs = torch.bmm(units.transpose(1, 2), grad_products).squeeze(-1)
        return grad_memories, None, grad_attention, grad_inputs, None, None


def _memory_gradient(ctx, rows, attention, inputs, grad_output):
    """``Σ α · grad ⊗ input`` into the selected rows of a zero tensor (recycled when possible)."""
    grad, stale = ctx.recycler.acquire(ctx.memories)
    flat = grad.view(-1, grad.shape[-1])
    trainable = ctx.trainable
    if rows.shape[0] * rows.shape[1] * trainable == 1 and grad.device.type == "cpu":
        # One row (an online step): written in place; reading indices is free on the CPU.
        kept_rows = rows.view(-1)[:1]
        row = int(kept_rows)
        if stale is not None and not (len(stale) == 1 and int(stale) == row):
            flat.index_fill_(0, stale, 0)
        target = flat[row].view(-1, inputs.shape[1])
        torch.outer(grad_output.view(-1) * attention.view(-1)[0], inputs.view(-1), out=target)
    else:
        batch = rows.shape[0]
        kept_rows = rows[:, :, :trainable].reshape(-1)
        kept = attention[:, :, :trainable, None] * grad_output  # (b, q, δ', R)
        if stale is not None:
            flat.index_fill_(0, stale, 0)
        outer = torch.bmm(kept.reshape(batch, -1, 1), inputs[:, None, :])  # (b, q·δ'·R, n)
        flat.index_add_(0, kept_rows, outer.view(-1, flat.shape[1]))
    ctx.recycler.remember(kept_rows)
    return grad
