"""Population models: ``P`` independent copies of a model with a leading *member* dimension.

A population model maps inputs ``(P, b, *shape)`` (one batch per member) to logits
``(P, b, num_classes)``; member ``p`` computes what the run alone computes with member ``p``'s state
and scalar options. Every tensor of the state leads with ``P``; :meth:`PopulationModule.load_members`
stacks the state dicts of the runs' own models, :meth:`PopulationModule.member_state` gives one back.

The Memory Head follows ``shared/spec/memory-head.md`` (every option of ``memhead.layer``) with the
scalar options ``beta_k``, ``gamma_alpha``, ``tau_alpha``, ``tau_mu``, ``tau_eta`` and ``sigma_eu``
per member: a Python number when all members share it (the very scalar arithmetic of the layer), a
``(P,)`` tensor otherwise.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from memhead import blending, reference
from memhead.psi import apply_psi

# The Memory Head's per-member scalar options.
MH_MEMBER_OPTIONS = ("beta_k", "gamma_alpha", "tau_alpha", "tau_mu", "tau_eta", "sigma_eu")
_LAYER_NORM_EPS = 1e-5
# Up to this many selected keys the top-δ search is repeated maxima (ties to the lower index).
_MAX_PASSES = 4
# From this many floats of weights per sample (key sets x unit size), evaluation applies each member's
# units as its run alone does (memhead.blending.evaluate) instead of gathering the selected units.
MEMBER_EVALUATION_FLOATS = 4096

Scalar = float | torch.Tensor


def member_scalar(values: list, dtype: torch.dtype, device) -> Scalar | None:
    """One number when every member has it (or ``None`` for an unset option), else a ``(P,)`` tensor."""
    if all(v is None for v in values):
        return None
    if len(set(values)) == 1:
        return float(values[0])
    return torch.tensor([float(v) for v in values], dtype=dtype, device=device)


def _along(value: Scalar, ndim: int) -> Scalar:
    """A per-member tensor shaped ``(P, 1, ...)`` to broadcast against ``ndim``-dim tensors."""
    return value.view(-1, *[1] * (ndim - 1)) if isinstance(value, torch.Tensor) else value


class PopulationModule(nn.Module):
    """Shared by every population model: ``size`` members, and the names of the run alone's state."""

    size: int
    #: population state name -> the state dict key of the run alone's model.
    single_names: dict[str, str]

    def load_members(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Stack the run-alone state dicts, one per member, into this population's state."""
        if len(states) != self.size:
            raise ValueError(f"{len(states)} member states for a population of {self.size}")
        own = self.state_dict()
        with torch.no_grad():
            for name, key in self.single_names.items():
                own[name].copy_(torch.stack([state[key] for state in states]))

    def member_state(self, p: int) -> dict[str, torch.Tensor]:
        """Member ``p``'s state, keyed as the run alone's model state dict."""
        own = self.state_dict()
        return {key: own[name][p] for name, key in self.single_names.items()}


class PopulationLinear(PopulationModule):
    """``nn.Linear`` per member: ``(P, b, in) -> (P, b, out)``."""

    def __init__(self, size: int, in_features: int, out_features: int, bias: bool = True, prefix: str = ""):
        super().__init__()
        self.size = size
        self.weight = nn.Parameter(torch.empty(size, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(size, out_features)) if bias else None
        self.single_names = {"weight": f"{prefix}weight"}
        if bias:
            self.single_names["bias"] = f"{prefix}bias"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias[:, None, :], x, self.weight.transpose(1, 2))


class PopulationSequential(PopulationModule):
    """Population modules (and plain functions) in a row, named as the run alone's ``nn.Sequential``."""

    def __init__(self, layers: list[tuple[int, nn.Module]]):
        super().__init__()
        self.size = next(layer.size for _, layer in layers if isinstance(layer, PopulationModule))
        self.layers = nn.ModuleList([layer for _, layer in layers])
        self.single_names = {}
        for (index, layer), i in zip(layers, range(len(layers))):
            if isinstance(layer, PopulationModule):
                for name, key in layer.single_names.items():
                    self.single_names[f"layers.{i}.{name}"] = f"{index}.{key}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest scores on the last dimension, decreasing, ties to the lower index."""
    if k > _MAX_PASSES:
        return scores.topk(k, dim=-1)
    values, indices = scores.max(dim=-1, keepdim=True)
    found_values, found_indices, rest = [values], [indices], scores
    for _ in range(k - 1):
        rest = rest.scatter(-1, indices, float("-inf"))
        values, indices = rest.max(dim=-1, keepdim=True)
        found_values.append(values)
        found_indices.append(indices)
    return torch.cat(found_values, dim=-1), torch.cat(found_indices, dim=-1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # Divides by the variance itself, as the specification says.
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred / (x.var(dim=-1, keepdim=True) + _LAYER_NORM_EPS)


class _GatheredRows(torch.autograd.Function):
    """``memories.view(-1, u).index_select(0, rows)``, whose gradient reuses the previous step's tensor.

    The memory gradient is ``index_add`` of the rows' gradients into zeros, as ``index_select``'s own
    backward computes it, but into the tensor of the last step with its written rows zeroed
    (:class:`memhead.blending.GradientRecycler`, as the layer does): at the NS-ImageNet shape a fresh
    ``(P, 1, 100, 51300)`` zero tensor per step (330 MB for 16 members) cost four times the members'
    optimizer step in allocation and page faults.
    """

    @staticmethod
    def forward(ctx, memories: torch.Tensor, rows: torch.Tensor, recycler) -> torch.Tensor:
        ctx.save_for_backward(rows)
        ctx.recycler, ctx.memories = recycler, memories
        return memories.view(-1, memories.shape[-1]).index_select(0, rows)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_rows: torch.Tensor):
        (rows,) = ctx.saved_tensors
        grad, stale = ctx.recycler.acquire(ctx.memories)
        flat = grad.view(-1, grad.shape[-1])
        if stale is not None:
            flat.index_fill_(0, stale, 0.0)
        flat.index_add_(0, rows, grad_rows)
        ctx.recycler.remember(rows)
        return grad, None, None


class PopulationMemoryHead(PopulationModule):
    """``P`` Memory Heads with one set of structural options and per-member scalar options.

    Args:
        size: ``P``.
        options: the normalised options of :func:`memhead.layer.check_options` (scalars ignored).
        scalars: per member, its ``MH_MEMBER_OPTIONS`` (normalised as ``check_options`` returns them).
        generators: per member, the generator of its fresh memory units (``random_memories``): the run
            alone draws them from the global RNG, seeded with its seed; ``None`` otherwise.
    """

    def __init__(self, size: int, options: dict, scalars: list[dict], generators=None, prefix: str = ""):
        super().__init__()
        self.size = size
        o = options
        self.in_features, self.out_features, self.bias = o["in_features"], o["out_features"], o["bias"]
        self.key_mem_units, self.delta, self.distance = o["key_mem_units"], o["delta"], o["distance"]
        self.psi, self.key_size, self.upd_m, self.upd_k = o["psi"], o["key_size"], o["upd_m"], o["upd_k"]
        self.scramble, self.shared_keys = o["scramble"], o["shared_keys"]
        self.layer_norm, self.random_memories = o["layer_norm"], o["random_memories"]
        self.generators = generators
        self.num_key_sets = q = 1 if self.shared_keys else self.out_features
        rows_per_unit = self.out_features if self.shared_keys else 1
        self.n_cols = self.in_features + int(self.bias)
        self.weight_size = rows_per_unit * self.n_cols
        self.unit_size = self.weight_size + (2 * self.in_features if self.layer_norm else 0)
        m = self.key_mem_units
        self.memories = nn.Parameter(torch.empty(size, q, m, self.unit_size))
        keys = torch.empty(size, q, m, self.key_size)
        if self.upd_k == "ad_hoc_WTA":
            self.register_buffer("keys", keys)
        else:
            self.keys = nn.Parameter(keys)
        names = ["memories", "keys"]
        if self.scramble:
            self.register_buffer("usage", torch.empty(size, q, m))
            self.register_buffer("age", torch.empty(size, q, m))
            self.register_buffer("scramble_count", torch.empty(size, q, dtype=torch.long))
            names += ["usage", "age", "scramble_count"]
        self.single_names = {name: f"{prefix}{name}" for name in names}
        self._recycler = blending.GradientRecycler(self.memories)
        self.scalar_values = {name: [s[name] for s in scalars] for name in MH_MEMBER_OPTIONS}
        self._set_scalars(torch.float32, torch.device("cpu"))

    def _set_scalars(self, dtype, device) -> None:
        values = self.scalar_values
        for name, member_values in values.items():
            setattr(self, name, member_scalar(member_values, dtype, device))

        def derived(function, *names):  # computed once per member in double, rounded as the layer rounds
            if any(v is None for name in names for v in values[name]):
                return None
            return member_scalar([function(*row) for row in zip(*(values[n] for n in names))], dtype, device)

        root = math.sqrt(self.key_size)
        self.score_width = derived(lambda s: root * s, "sigma_eu")  # euclidean scores exp(-|q-k|^2 / width)
        self.dot_step = derived(lambda b: b / root, "beta_k")  # dot_scaled key step
        self.euclidean_step = derived(lambda b, s: b / (root * s), "beta_k", "sigma_eu")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self._set_scalars(self.memories.dtype, self.memories.device)  # follow .to(device, dtype)
        return self

    # ----------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(P, b, *shape)``; returns ``(P, b, out_features)``."""
        size, batch = x.shape[:2]
        flat = x.reshape(size, batch, -1)
        learning = self.training and torch.is_grad_enabled()
        keys = self._keys_for_scoring(learning)
        queries = self._queries(x)
        scores = self._scores(queries, keys)  # (P, b, q, m)
        top_scores, top_indices = _top(scores, self.delta)
        attention = torch.softmax(_along(self.gamma_alpha, 4) * top_scores, dim=-1)
        output = self._output(attention, top_indices, flat)
        self.last_top_indices = top_indices.detach()
        if learning and self.upd_k == "ad_hoc_WTA":
            self._online_key_update(queries.detach(), top_scores[..., 0].detach(), top_indices[..., 0])
        return output

    def _keys_for_scoring(self, learning: bool) -> torch.Tensor:
        if self.distance != "cosine" or self.upd_k == "ad_hoc_WTA":
            return self.keys
        if learning:  # gradient-trained cosine keys drift off the sphere after each step
            with torch.no_grad():
                self.keys.copy_(F.normalize(self.keys, dim=-1))
            return self.keys
        return self.keys / self.keys.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        through_query = self.distance == "cosine" and self.upd_k != "ad_hoc_WTA"
        size, batch = x.shape[:2]
        source = (x if through_query else x.detach()).reshape(size * batch, *x.shape[2:])
        queries = apply_psi(self.psi, source, self.key_size).view(size, batch, self.key_size)
        if self.distance == "cosine":
            queries = F.normalize(queries, dim=-1)
        return queries

    def _scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scores ``(P, b, q, m)`` of queries ``(P, b, d)`` against keys ``(P, q, m, d)``."""
        scale = math.sqrt(self.key_size)
        if self.distance == "euclidean":
            # The layer's (and the paper's) formula: the layer's one cdist call, batched over members.
            distances = reference.key_distances(queries, keys).view(*queries.shape[:2], *keys.shape[1:3])
            return torch.exp(-distances.pow(2) / _along(self.score_width, 4))
        return torch.einsum("pbd,pqmd->pbqm", queries, keys) / scale

    def _selected_units(self, top_indices: torch.Tensor) -> torch.Tensor:
        """The selected units ``(P, b, q, δ, u)``; with ``WTA`` only the winner's carry a gradient."""
        size, batch, q, delta = top_indices.shape
        # index_select: its backward is an index_add (fast in deterministic mode).
        table = self.memories.view(-1, self.unit_size)
        rows = self._rows_per_set(top_indices)
        recycled = torch.is_grad_enabled() and self.memories.requires_grad

        def gather(selected: torch.Tensor) -> torch.Tensor:
            if recycled:
                return _GatheredRows.apply(self.memories, selected, self._recycler)
            return table.index_select(0, selected)

        if self.upd_m == "vanilla" or delta == 1:
            return gather(rows.reshape(-1)).view(size, batch, q, delta, -1)
        winner = gather(rows[..., 0].reshape(-1)).view(size, batch, q, 1, -1)
        runners = table.detach().index_select(0, rows[..., 1:].reshape(-1))
        return torch.cat([winner, runners.view(size, batch, q, delta - 1, -1)], dim=3)

    def _rows_per_set(self, top_indices: torch.Tensor) -> torch.Tensor:
        """Rows of ``(P, q, m, ·)`` state viewed flat, for indices ``(P, b, q, δ)`` into each key set."""
        q, m = self.num_key_sets, self.key_mem_units
        member = torch.arange(self.size, device=top_indices.device).view(-1, 1, 1, 1) * (q * m)
        key_set = torch.arange(q, device=top_indices.device).view(1, 1, -1, 1) * m
        return top_indices + member + key_set

    @property
    def evaluates_per_member(self) -> bool:
        """Whether an evaluation forward goes member by member through the layer's own evaluation.

        The batched path gathers every selected unit, ``P·b·q·δ·u`` floats: at the NS-ImageNet shape
        (u = 100 x 513) 200 kB per sample and member, which made a 16-member population's evaluation
        ten times slower than its 16 runs alone. The layer's evaluation applies each unit to the
        samples that selected it without copying it. Small units (the 2-D heads) stay batched.
        """
        return self.num_key_sets * self.weight_size >= MEMBER_EVALUATION_FLOATS

    def _output(self, attention: torch.Tensor, top_indices: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        size, batch = flat.shape[:2]
        if not torch.is_grad_enabled() and self.evaluates_per_member:
            return torch.stack(
                [
                    blending.evaluate(self._member_layer(p), attention[p], top_indices[p], flat[p])
                    for p in range(size)
                ]
            )
        if self.upd_m == "WTA" and self.upd_k == "grad_WTA" and attention.requires_grad:
            attention = torch.cat([attention[..., :1], attention[..., 1:].detach()], dim=-1)
        units = self._selected_units(top_indices)  # (P, b, q, δ, u)
        if not self.layer_norm:
            # Output linear in the units: apply each selected unit, then blend the outputs.
            inputs = F.pad(flat, (0, 1), value=1.0) if self.bias else flat
            rows = units.view(*units.shape[:4], -1, self.n_cols)  # (P, b, q, δ, R, n)
            products = torch.einsum("pbqkrn,pbn->pbqkr", rows, inputs)
            return torch.einsum("pbqk,pbqkr->pbqr", attention, products).reshape(size, batch, -1)
        blended = torch.einsum("pbqk,pbqku->pbqu", attention, units)
        n_in = self.in_features
        weights = blended[..., : self.weight_size].reshape(size, batch, self.out_features, self.n_cols)
        gains = blended[..., self.weight_size : self.weight_size + n_in]
        shifts = blended[..., self.weight_size + n_in :]
        scaled = gains * weights[..., :n_in]
        output = (scaled @ _normalise(flat)[..., None]).squeeze(-1) + (scaled * shifts).sum(dim=-1)
        if self.bias:
            output = output + weights[..., n_in]
        return output

    def _member_layer(self, p: int):
        """Member ``p`` as :func:`memhead.blending.evaluate` reads a layer: its options and memories."""
        names = ("in_features", "out_features", "bias", "shared_keys", "layer_norm", "key_mem_units",
                 "num_key_sets", "weight_size", "unit_size")  # fmt: skip
        return SimpleNamespace(memories=self.memories[p], **{name: getattr(self, name) for name in names})

    # ----------------------------------------------------------------------------------- key updates
    @torch.no_grad()
    def _online_key_update(self, queries, winner_scores, winners) -> None:
        """The ``ad_hoc_WTA`` step of every member: scrambling, winners toward inputs, counters.

        Args:
            queries: ``(P, b, d)``; winner_scores: ``(P, b, q)``; winners: ``(P, b, q)``.
        """
        if self.scramble:
            self._scramble(queries, winner_scores, winners)
        size, batch, q = winners.shape
        d = self.key_size
        flat_keys = self.keys.view(-1, d)
        rows = self._flat_rows(winners)  # (P * b * q,)
        inputs = queries[:, :, None, :].expand(size, batch, q, d)
        if self.distance == "cosine":
            steps = _along(self.beta_k, 4) * inputs
        elif self.distance == "dot_scaled":
            steps = _along(self.dot_step, 4) * inputs
        else:
            rate = self.euclidean_step
            current = flat_keys.index_select(0, rows).view(size, batch, q, d)
            steps = (_along(rate, 3) * winner_scores)[..., None] * (inputs - current)
        flat_keys.index_add_(0, rows, steps.reshape(-1, d))
        if self.distance == "cosine":
            if batch == 1:
                flat_keys.index_copy_(0, rows, F.normalize(flat_keys.index_select(0, rows), dim=-1))
            else:
                self.keys.copy_(F.normalize(self.keys, dim=-1))
        if self.scramble:
            self._count_wins(queries, winners)

    def _flat_rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Flat rows of ``(P, q, m, ·)`` state for per-key-set indices ``(P, b, q)``."""
        return self._rows_per_set(indices[..., None]).reshape(-1)

    def _scramble(self, queries, winner_scores, winners) -> None:
        # Per member and key set: the batch's worst-matched sample takes over the oldest weak key.
        size, batch, q = winners.shape
        weak = (self.usage < _along(self.tau_mu, 3)) & (self.age >= _along(self.tau_eta, 3))  # (P, q, m)
        if batch == 1:
            weakest_score, weakest_winners = winner_scores[:, 0], winners[:, 0]  # (P, q)
            weakest_queries = queries[:, 0, None, :].expand(size, q, self.key_size)
        else:
            weakest = winner_scores.argmin(dim=1, keepdim=True)  # (P, 1, q)
            weakest_score = winner_scores.gather(1, weakest)[:, 0]
            weakest_winners = winners.gather(1, weakest)[:, 0]
            weakest_queries = queries.gather(1, weakest[:, 0, :, None].expand(size, q, self.key_size))
        scrambling = (weakest_score < _along(self.tau_alpha, 2)) & weak.any(dim=-1)  # (P, q)
        if queries.device.type == "cpu" and not bool(scrambling.any()):
            return
        slots = torch.where(weak, self.age, float("-inf")).argmax(dim=-1)  # (P, q)
        slot_rows = self._rows_per_set(slots[:, None, :, None]).reshape(-1)
        flat_keys, flat_usage = self.keys.view(-1, self.key_size), self.usage.view(-1)
        chosen = scrambling.reshape(-1)
        kept = flat_keys.index_select(0, slot_rows)
        flat_keys.index_copy_(
            0, slot_rows, torch.where(chosen[:, None], weakest_queries.reshape(-1, self.key_size), kept)
        )
        flat_units = self.memories.view(-1, self.unit_size)
        if self.random_memories:
            for flat_index in chosen.nonzero().flatten().tolist():
                member = flat_index // q
                flat_units[slot_rows[flat_index]] = self._fresh_unit(member)
        else:
            winner_rows = self._rows_per_set(weakest_winners[:, None, :, None]).reshape(-1)
            sources = torch.where(chosen, winner_rows, slot_rows)
            flat_units.index_copy_(0, slot_rows, flat_units.index_select(0, sources))
        flat_usage.index_copy_(0, slot_rows, flat_usage.index_select(0, slot_rows).masked_fill(chosen, 0.0))
        self.scramble_count += scrambling

    def _fresh_unit(self, member: int) -> torch.Tensor:
        # As the layer draws it, from the member's own copy of the global RNG.
        unit = torch.empty(self.unit_size, device=self.memories.device, dtype=self.memories.dtype)
        bound = 1.0 / math.sqrt(self.unit_size)
        unit.uniform_(-bound, bound, generator=self.generators[member])
        if self.layer_norm:
            unit[self.weight_size : self.weight_size + self.in_features] = 1.0
            unit[self.weight_size + self.in_features :] = 0.0
        return unit

    def _count_wins(self, queries, winners) -> None:
        batch = queries.shape[1]
        if batch > 1:
            winners = self._scores(queries, self.keys).argmax(dim=-1)
        rows = self._flat_rows(winners)
        self.age.view(-1).index_fill_(0, rows, 0.0)
        self.usage.view(-1).index_add_(0, rows, torch.ones_like(rows, dtype=self.usage.dtype))
        self.age += batch


class PopulationEnsemble(PopulationModule):
    """``competitor=ensemble``: each member is the mean of ``k`` models; ``base`` holds all ``P * k``."""

    def __init__(self, base: PopulationModule, k: int):
        super().__init__()
        self.base, self.k = base, k
        self.size = base.size // k
        self.single_names = {f"base.{name}": key for name, key in base.single_names.items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size, batch = x.shape[:2]
        every = x[:, None].expand(size, self.k, *x.shape[1:]).reshape(size * self.k, *x.shape[1:])
        return self.base(every).view(size, self.k, batch, -1).mean(dim=1)

    def load_members(self, states):
        self.base.load_members(
            [
                {key: s[f"members.{i}.{key}"] for key in self.base.single_names.values()}
                for s in states
                for i in range(self.k)
            ]
        )

    def member_state(self, p: int) -> dict:
        return {
            f"members.{i}.{key}": value
            for i in range(self.k)
            for key, value in self.base.member_state(p * self.k + i).items()
        }
