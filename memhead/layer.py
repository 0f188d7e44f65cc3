"""The Memory Head layer: a drop-in for ``nn.Linear`` whose weights are blended, per sample, from
key-indexed memory units (behaviour: ``shared/spec/memory-head.md``)."""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memhead import blending
from memhead.psi import PSI_NAMES, apply_psi, query_size
from memhead.registry import ConfigError

CHOICES = {
    "distance": ("cosine", "euclidean", "dot_scaled"),
    "psi": PSI_NAMES,
    "upd_m": ("vanilla", "WTA"),
    "upd_k": ("ad_hoc_WTA", "grad_WTA", "grad_not_WTA"),
}

# The constructor's keyword defaults; check_options fills missing options from here.
DEFAULT_OPTIONS: dict[str, Any] = {
    "bias": True,
    "key_mem_units": 10,
    "delta": 2,
    "distance": "cosine",
    "sigma_eu": 1.0,
    "psi": "identity",
    "key_size": None,
    "upd_m": "WTA",
    "upd_k": "ad_hoc_WTA",
    "beta_k": 0.01,
    "gamma_alpha": 25.0,
    "tau_alpha": 0.95,
    "tau_mu": 50,
    "tau_eta": 50,
    "scramble": True,
    "shared_keys": True,
    "layer_norm": False,
    "random_memories": False,
}

_FLAGS = ("bias", "scramble", "shared_keys", "layer_norm", "random_memories")
_LAYER_NORM_EPS = 1e-5


def _show(value: Any) -> str:
    # YAML spelling, so that the message reads like the override the user typed.
    if isinstance(value, bool):
        return str(value).lower()
    return "null" if value is None else repr(value) if isinstance(value, str) else str(value)


def _choice(name: str, value: Any) -> str:
    text = str(getattr(value, "name", value))
    for allowed in CHOICES[name]:
        if text.lower() == allowed.lower():
            return allowed
    raise ConfigError(f"model.{name}={_show(text)} is not allowed; allowed: {', '.join(CHOICES[name])}")


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise ConfigError(f"model.{name}={_show(value)} is not allowed; allowed: true, false")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _integer(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < minimum:
        raise ConfigError(f"model.{name}={_show(value)} is not allowed; allowed: an integer >= {minimum}")
    return int(value)


def _number(name: str, value: Any, requirement: str = "") -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ConfigError(f"model.{name}={_show(value)} is not allowed{requirement}; allowed: a number")
    return float(value)


def check_options(in_features: int, out_features: int, **options: Any) -> dict[str, Any]:
    """Validate Memory Head options before any data is read.

    Args:
        in_features: flattened size of one input sample.
        out_features: number of outputs.
        **options: any of the :class:`MemoryHead` keyword options (missing ones take their defaults);
            strings and Enums are accepted for the named choices.

    Returns:
        All options, normalised: canonical choice names, Python bools and numbers, ``delta`` clipped to
        ``key_mem_units`` (with a warning) and ``key_size`` resolved to the size ψ produces.

    Raises:
        ConfigError: one line naming the offending option and the allowed values.
    """
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise ConfigError(
            f"model.{unknown[0]} is not a Memory Head option; allowed: {', '.join(DEFAULT_OPTIONS)}"
        )
    opts = {**DEFAULT_OPTIONS, **options}
    out: dict[str, Any] = {
        "in_features": _integer("in_features", in_features, 1),
        "out_features": _integer("out_features", out_features, 1),
    }
    for name in CHOICES:
        out[name] = _choice(name, opts[name])
    for name in _FLAGS:
        out[name] = _flag(name, opts[name])
    out["key_mem_units"] = _integer("key_mem_units", opts["key_mem_units"], 1)
    delta = _integer("delta", opts["delta"], 1)
    if delta > out["key_mem_units"]:
        warnings.warn(
            f"model.delta={delta} is above model.key_mem_units={out['key_mem_units']}; "
            f"using delta={out['key_mem_units']}",
            stacklevel=3,
        )
        delta = out["key_mem_units"]
    out["delta"] = delta
    out["gamma_alpha"] = _number("gamma_alpha", opts["gamma_alpha"])
    out["sigma_eu"] = _number("sigma_eu", opts["sigma_eu"])
    if out["distance"] == "euclidean" and out["sigma_eu"] <= 0:
        raise ConfigError(f"model.sigma_eu={_show(opts['sigma_eu'])} is not allowed; allowed: a number > 0")

    ad_hoc = out["upd_k"] == "ad_hoc_WTA"
    if out["scramble"] and not ad_hoc:
        raise ConfigError("model.scramble=true requires model.upd_k=ad_hoc_WTA")
    # Thresholds and the key step only matter to the rules that read them; elsewhere null is fine.
    for name in ("tau_alpha", "tau_mu", "tau_eta"):
        value = opts[name]
        if out["scramble"]:
            value = _number(name, value, " with model.scramble=true")
        elif value is not None and _is_number(value):
            value = float(value)
        out[name] = value
    beta_k = opts["beta_k"]
    if ad_hoc:
        beta_k = _number("beta_k", beta_k, " with model.upd_k=ad_hoc_WTA")
    out["beta_k"] = float(beta_k) if _is_number(beta_k) else beta_k

    key_size = opts["key_size"]
    if key_size is not None:
        key_size = _integer("key_size", key_size, 1)
    out["key_size"] = query_size(out["psi"], out["in_features"], key_size)
    return out


# Key dtypes whose online step may run on NumPy views (see MemoryHead._update_one_sample).
_NUMPY_REALS = {torch.float32: np.float32, torch.float64: np.float64}
# Up to this many selected keys, the top-δ search is δ maximum passes (faster than a partial sort).
_MAX_PASSES = 4


def _top(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest scores along the last dimension, in decreasing order, and their indices;
    ties go to the lower index. Scores that need no gradient are overwritten (a caller's temporary)."""
    if k > _MAX_PASSES:
        return scores.topk(k, dim=-1)
    values, indices = scores.max(dim=-1, keepdim=True)
    if k == 1:
        return values, indices
    found_values, found_indices, rest = [values], [indices], scores
    for _ in range(k - 1):
        if scores.requires_grad:
            rest = rest.scatter(-1, indices, float("-inf"))
        else:
            rest.scatter_(-1, indices, float("-inf"))
        values, indices = rest.max(dim=-1, keepdim=True)
        found_values.append(values)
        found_indices.append(indices)
    return torch.cat(found_values, dim=-1), torch.cat(found_indices, dim=-1)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    # Divides by the variance itself, not the standard deviation, as the specification says.
    centred = x - x.mean(dim=-1, keepdim=True)
    return centred / (x.var(dim=-1, keepdim=True) + _LAYER_NORM_EPS)


class MemoryHead(nn.Module):
    r"""A linear layer whose weights are blended, per sample, from ``m`` key-indexed memory units.

    For each sample, the query :math:`z = \psi(x)` is scored against ``m`` keys, the ``delta``
    best-scoring keys select memory units, and their softmax-weighted blend is the sample's weight
    matrix (bias as its last column): :math:`o = W(x)\,[x; 1]`. Keys follow an online K-means rule
    (``upd_k='ad_hoc_WTA'``) or the optimizer (``grad_WTA``, ``grad_not_WTA``); keys that are rarely
    used are re-assigned to poorly matched inputs when ``scramble=True``. Keys, memories and counters
    change only in a training forward (``self.training`` and gradients enabled).

    Args:
        in_features: flattened size of each input sample.
        out_features: size of each output sample.
        bias: if ``False``, memory units hold no bias column.
        key_mem_units: ``m``, the number of keys and memory units per key set.
        delta: ``δ``, how many top-scoring keys are blended (clipped to ``m`` with a warning).
        distance: ``'cosine'``, ``'euclidean'`` or ``'dot_scaled'``.
        sigma_eu: temperature of the euclidean score.
        psi: ``'identity'``, ``'sign'``, ``'resize1d'`` or ``'resize2d'``: the map to the key space.
        key_size: ``d``, the key size; ``None`` for what ``psi`` produces.
        upd_m: ``'vanilla'`` or ``'WTA'`` (only the winner's memory unit gets a gradient).
        upd_k: ``'ad_hoc_WTA'``, ``'grad_WTA'`` or ``'grad_not_WTA'``.
        beta_k: ``β``, step size of the ``ad_hoc_WTA`` key update.
        gamma_alpha: ``γ_α``, softmax temperature on the top-δ scores.
        tau_alpha: scrambling threshold on the smallest winning score of a batch.
        tau_mu: a key used fewer than ``tau_mu`` times may be scrambled...
        tau_eta: ...if it has not won for at least ``tau_eta`` samples.
        scramble: re-assign weak keys (requires ``upd_k='ad_hoc_WTA'``).
        shared_keys: one key set for the layer (``True``) or one per output neuron.
        layer_norm: memory units also carry per-feature gains and shifts; the input is normalised.
        random_memories: a scrambled slot gets a fresh random memory unit instead of a copy.
        device: device of the state tensors.
        dtype: floating dtype of the state tensors.

    Shape:
        - Input: :math:`(b, H_{in})`, or :math:`(b, *)` with ``in_features`` values per sample
          (``psi='resize2d'`` needs :math:`(b, C, H, W)`).
        - Output: :math:`(b, H_{out})` with :math:`H_{out} = \text{out\_features}`.

    Attributes:
        keys: :math:`(q, m, d)`, a buffer for ``ad_hoc_WTA``, a parameter for ``grad_*``; ``q`` is 1
            with shared keys, ``out_features`` otherwise.
        memories: :math:`(q, m, u)` parameter; a unit is the row-major ``(out_features, in_features
            [+1])`` weight matrix (one row with per-neuron keys), then ``2 * in_features`` gains and
            shifts with ``layer_norm``.
        usage: :math:`(q, m)` float buffer, wins since the key was last scrambled (``None`` without
            scrambling).
        age: :math:`(q, m)` float buffer, samples since the key last won (``None`` without scrambling).
        scramble_count: :math:`(q,)` int64 buffer, scrambles so far (``None`` without scrambling).
        last_top_indices: :math:`(b, q, δ)` long tensor, the top-δ key indices of the last forward
            (``None`` before the first one).

    Examples::

        >>> head = MemoryHead(20, 30, key_mem_units=8, delta=2, distance="euclidean")
        >>> output = head(torch.randn(128, 20))
        >>> output.size()
        torch.Size([128, 30])
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        key_mem_units: int = 10,
        delta: int = 2,
        distance: str = "cosine",
        sigma_eu: float = 1.0,
        psi: str = "identity",
        key_size: int | None = None,
        upd_m: str = "WTA",
        upd_k: str = "ad_hoc_WTA",
        beta_k: float | None = 0.01,
        gamma_alpha: float = 25.0,
        tau_alpha: float | None = 0.95,
        tau_mu: float | None = 50,
        tau_eta: float | None = 50,
        scramble: bool = True,
        shared_keys: bool = True,
        layer_norm: bool = False,
        random_memories: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        opts = check_options(
            in_features, out_features, bias=bias, key_mem_units=key_mem_units, delta=delta,
            distance=distance, sigma_eu=sigma_eu, psi=psi, key_size=key_size, upd_m=upd_m, upd_k=upd_k,
            beta_k=beta_k, gamma_alpha=gamma_alpha, tau_alpha=tau_alpha, tau_mu=tau_mu, tau_eta=tau_eta,
            scramble=scramble, shared_keys=shared_keys, layer_norm=layer_norm,
            random_memories=random_memories,
        )  # fmt: skip
        self.in_features: int = opts["in_features"]
        self.out_features: int = opts["out_features"]
        self.bias: bool = opts["bias"]
        self.key_mem_units: int = opts["key_mem_units"]
        self.delta: int = opts["delta"]
        self.distance: str = opts["distance"]
        self.sigma_eu: float = opts["sigma_eu"]
        self.psi: str = opts["psi"]
        self.key_size: int = opts["key_size"]
        self.upd_m: str = opts["upd_m"]
        self.upd_k: str = opts["upd_k"]
        self.beta_k = opts["beta_k"]
        self.gamma_alpha: float = opts["gamma_alpha"]
        self.tau_alpha = opts["tau_alpha"]
        self.tau_mu = opts["tau_mu"]
        self.tau_eta = opts["tau_eta"]
        self.scramble: bool = opts["scramble"]
        self.shared_keys: bool = opts["shared_keys"]
        self.layer_norm: bool = opts["layer_norm"]
        self.random_memories: bool = opts["random_memories"]

        self.num_key_sets = 1 if self.shared_keys else self.out_features
        rows_per_unit = self.out_features if self.shared_keys else 1
        self.weight_size = rows_per_unit * (self.in_features + int(self.bias))
        self.unit_size = self.weight_size + (2 * self.in_features if self.layer_norm else 0)

        q, m = self.num_key_sets, self.key_mem_units
        self.memories = nn.Parameter(torch.empty((q, m, self.unit_size), **factory_kwargs))
        keys = torch.empty((q, m, self.key_size), **factory_kwargs)
        if self.upd_k == "ad_hoc_WTA":
            self.register_buffer("keys", keys)
        else:
            self.keys = nn.Parameter(keys)
        if self.scramble:
            self.register_buffer("usage", torch.empty((q, m), **factory_kwargs))
            self.register_buffer("age", torch.empty((q, m), **factory_kwargs))
            self.register_buffer("scramble_count", torch.empty(q, device=device, dtype=torch.long))
        else:
            self.register_buffer("usage", None)
            self.register_buffer("age", None)
            self.register_buffer("scramble_count", None)
        self.last_top_indices: torch.Tensor | None = None
        self._recycler = blending.GradientRecycler()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw fresh memories and keys and reset the scrambling counters (as the specification's
        initialisation)."""
        with torch.no_grad():
            self.memories.copy_(self._fresh_units(self.memories.shape[:2]))
            bound = 1.0 / math.sqrt(self.key_size)
            nn.init.uniform_(self.keys, -bound, bound)
            if self.distance == "cosine":
                self.keys.copy_(F.normalize(self.keys, dim=-1))
            if self.scramble:
                self.usage.zero_()
                self.age.fill_(self.tau_eta)
                self.scramble_count.zero_()

    def _fresh_units(self, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        # Uniform in +-1/sqrt(u); with layer_norm the gains start at 1 and the shifts at 0.
        units = torch.empty((*shape, self.unit_size), device=self.memories.device, dtype=self.memories.dtype)
        bound = 1.0 / math.sqrt(self.unit_size)
        nn.init.uniform_(units, -bound, bound)
        if self.layer_norm:
            units[..., self.weight_size : self.weight_size + self.in_features] = 1.0
            units[..., self.weight_size + self.in_features :] = 0.0
        return units

    def _learning(self) -> bool:
        return self.training and torch.is_grad_enabled()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blend each sample's weights from its top-δ memory units and apply them.

        Args:
            x: ``(b, in_features)``, or ``(b, *)`` with ``in_features`` values per sample.

        Returns:
            ``(b, out_features)``.
        """
        batch = x.shape[0]
        flat = x.reshape(batch, -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"MemoryHead expects {self.in_features} values per sample, got an input of shape "
                f"{tuple(x.shape)}"
            )
        # One thread for the many small operations; the large products ask for the whole team.
        with blending.cpu_threads(flat.device, parallel=False):
            return self._forward(x, flat)

    def _forward(self, x: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        learning = self._learning()
        keys = self._keys_for_scoring(learning)
        queries = self._queries(x)
        scores = self._scores(queries, keys)
        # Per-neuron keys score b·q·m entries: enough for the whole team.
        with blending.cpu_threads(flat.device, parallel=scores.numel() >= 1 << 20):
            top_scores, top_indices = _top(scores, self.delta)
            attention = torch.softmax(self.gamma_alpha * top_scores, dim=-1)
        if self._needs_graph(attention, flat):
            output = self._output_with_graph(attention, top_indices, flat)
        else:
            output = self._output_without_graph(attention, top_indices, flat)
        self.last_top_indices = top_indices.detach()
        if learning and self.upd_k == "ad_hoc_WTA":
            # (ad_hoc_WTA queries and scores carry no gradient.)
            self._online_key_update(queries, top_scores[..., 0], top_indices[..., 0])
        return output

    def _keys_for_scoring(self, learning: bool) -> torch.Tensor:
        if self.distance != "cosine" or self.upd_k == "ad_hoc_WTA":
            return self.keys
        # Gradient-trained cosine keys drift off the unit sphere after each optimizer step.
        if learning:
            with torch.no_grad():
                self.keys.copy_(F.normalize(self.keys, dim=-1))
            return self.keys
        # Same values without touching the state outside a training forward.
        return self.keys / self.keys.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        # Only cosine with gradient-trained keys lets the gradient reach lower layers via the query.
        through_query = self.distance == "cosine" and self.upd_k != "ad_hoc_WTA"
        queries = apply_psi(self.psi, x if through_query else x.detach(), self.key_size)
        if self.distance == "cosine":
            queries = F.normalize(queries, dim=-1)
        return queries

    def _scores(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Scores ``(b, q, m)`` of queries ``(b, d)`` against keys ``(q, m, d)``."""
        scale = math.sqrt(self.key_size)
        if self.distance == "euclidean":
            # The explicit difference (not the |z|^2 - 2 z.k + |k|^2 expansion) keeps near-ties exact.
            squared = (queries[:, None, None, :] - keys[None]).pow(2).sum(-1)
            return torch.exp(-squared / (scale * self.sigma_eu))
        work = queries.shape[0] * keys.numel()
        with blending.cpu_threads(queries.device, parallel=work >= blending.PARALLEL_MACS):
            if keys.shape[0] == 1:
                return (queries @ keys[0].T)[:, None, :] / scale
            return torch.einsum("bd,qmd->bqm", queries, keys) / scale

    def _needs_graph(self, attention: torch.Tensor, flat: torch.Tensor) -> bool:
        # Without a gradient to compute, outputs can be blended instead of weights (same values).
        return torch.is_grad_enabled() and (
            self.memories.requires_grad or attention.requires_grad or flat.requires_grad
        )

    def _output_with_graph(
        self, attention: torch.Tensor, top_indices: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`_output` of :meth:`_blend`; without layer norm, outputs are blended, not weights."""
        if self.layer_norm:  # gains multiply the weights: not linear in the units
            return self._output(self._blend(attention, top_indices), x)
        if self.upd_m == "WTA" and self.upd_k == "grad_WTA":
            attention = torch.cat([attention[..., :1], attention[..., 1:].detach()], dim=-1)
        inputs = F.pad(x, (0, 1), value=1.0) if self.bias else x
        trainable = 1 if self.upd_m == "WTA" else self.delta
        rows = self._unit_rows(top_indices)
        return blending.SelectedUnits.apply(self.memories, rows, attention, inputs, trainable, self._recycler)

    def _unit_rows(self, top_indices: torch.Tensor) -> torch.Tensor:
        """Rows of ``memories.view(q * m, u)`` that ``top_indices`` ``(b, q, k)`` point to."""
        if self.num_key_sets == 1:
            return top_indices
        offsets = torch.arange(self.num_key_sets, device=top_indices.device) * self.key_mem_units
        return top_indices + offsets[None, :, None]

    def _blend(self, attention: torch.Tensor, top_indices: torch.Tensor) -> torch.Tensor:
        """Attention-weighted sum ``(b, q, u)`` of the selected memory units."""
        batch, q, delta = top_indices.shape
        # index_select, not advanced indexing: its backward is an index_add, which stays fast in
        # deterministic mode (accumulating index_put falls back to a slow scatter on the CPU).
        flat_units = self.memories.view(q * self.key_mem_units, self.unit_size)
        rows = self._unit_rows(top_indices)
        if self.upd_m == "vanilla":
            units = flat_units.index_select(0, rows.reshape(-1)).view(batch, q, delta, -1)
            return torch.einsum("bqk,bqku->bqu", attention, units)
        # WTA: only the winner's unit learns; the runners-up enter as constants.
        winner_units = flat_units.index_select(0, rows[..., 0].reshape(-1)).view(batch, q, -1)
        blended = attention[..., :1] * winner_units
        if delta == 1:
            return blended
        runner_attention = attention[..., 1:]
        if self.upd_k == "grad_WTA":
            runner_attention = runner_attention.detach()
        runner_units = flat_units.detach().index_select(0, rows[..., 1:].reshape(-1))
        runner_units = runner_units.view(batch, q, delta - 1, -1)
        return blended + torch.einsum("bqk,bqku->bqu", runner_attention, runner_units)

    def _output_without_graph(
        self, attention: torch.Tensor, top_indices: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """The output of :meth:`_output` of :meth:`_blend`, with no per-sample weights in memory.

        Only for forwards that need no gradient: the runners-up are not detached here.
        """
        n_cols = self.in_features + int(self.bias)
        if self.shared_keys:
            memories = self.memories[0]
            inputs = x
            if self.layer_norm:
                inputs = self._layer_norm_inputs(memories, attention[:, 0], top_indices[:, 0], x)
            units = memories[:, : self.weight_size].view(self.key_mem_units, self.out_features, n_cols)
            return blending.shared_unit_outputs(inputs, units, top_indices[:, 0], attention[:, 0], self.bias)
        batch, q, delta = top_indices.shape
        dense = not self.layer_norm and blending.prefer_dense(
            batch, self.key_mem_units, delta, q * n_cols, x.device, alternative="gathered"
        )
        if dense:
            inputs = torch.cat([x, x.new_ones(batch, 1)], dim=1) if self.bias else x
            units = self.memories[..., :n_cols]
            return blending.per_neuron_outputs_dense(inputs, units, top_indices, attention)
        # Per-neuron units are single rows: one embedding-bag call blends them (no gathered copies),
        # in slices of the batch that stay in cache.
        table = self.memories.view(q * self.key_mem_units, self.unit_size)
        rows = self._unit_rows(top_indices).reshape(-1, delta)
        weights = attention.reshape(-1, delta)
        output = x.new_empty(batch, self.out_features)
        step = max(1, blending.SLICE_FLOATS // (q * self.unit_size))
        for lo in range(0, batch, step):
            hi = min(lo + step, batch)
            with blending.cpu_threads(x.device, parallel=(hi - lo) * q * delta * self.unit_size >= (1 << 20)):
                blended = F.embedding_bag(
                    rows[lo * q : hi * q], table, per_sample_weights=weights[lo * q : hi * q], mode="sum"
                )
                output[lo:hi] = self._output(blended.view(hi - lo, q, -1), x[lo:hi])
        return output

    def _layer_norm_inputs(
        self, memories: torch.Tensor, attention: torch.Tensor, indices: torch.Tensor, x: torch.Tensor
    ) -> torch.Tensor:
        """``G ⊙ (norm(x) + B)`` per sample, from the blended gains ``G`` and shifts ``B``.

        With shared keys ``(G ⊙ W) n + Σ_i (G ⊙ W)_i B_i = W (G ⊙ (n + B))``: the layer-norm output is
        the blended ``W`` applied to this vector, so only the ``2 * in_features`` gains and shifts are
        blended per sample.
        """
        batch, delta = indices.shape
        n_in = self.in_features
        scales = memories[:, self.weight_size :].index_select(0, indices.reshape(-1)).view(batch, delta, -1)
        blended = torch.bmm(attention[:, None, :], scales).squeeze(1)
        return blended[:, :n_in] * (_normalise(x) + blended[:, n_in:])

    def _output(self, blended: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Apply the per-sample blended units ``(b, q, u)`` to the flat input ``(b, in_features)``."""
        batch, n_in = x.shape[0], self.in_features
        weights = blended[..., : self.weight_size].reshape(batch, self.out_features, n_in + int(self.bias))
        matrix = weights[..., :n_in]
        if self.layer_norm:
            # (q == 1 or q == out_features): both broadcast against the (b, out, in) weight matrix.
            gains = blended[..., self.weight_size : self.weight_size + n_in]
            shifts = blended[..., self.weight_size + n_in :]
            scaled = gains * matrix
            output = torch.bmm(scaled, _normalise(x).unsqueeze(-1)).squeeze(-1)
            output = output + (scaled * shifts).sum(dim=-1)
        else:
            output = torch.bmm(matrix, x.unsqueeze(-1)).squeeze(-1)
        if self.bias:
            output = output + weights[..., n_in]
        return output

    def _rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Flat rows of ``(q, m, ·)`` state for per-key-set indices ``(..., q)``."""
        if self.num_key_sets == 1:
            return indices.reshape(-1)
        offsets = torch.arange(self.num_key_sets, device=indices.device) * self.key_mem_units
        return (indices + offsets).reshape(-1)

    @torch.no_grad()
    def _online_key_update(self, queries: torch.Tensor, winner_scores: torch.Tensor, winners: torch.Tensor):
        """The ``ad_hoc_WTA`` step: scrambling, winners toward their inputs, then the counters.

        Args:
            queries: ``(b, d)``, this forward's queries.
            winner_scores: ``(b, q)``, the winning scores of this forward.
            winners: ``(b, q)``, the winning key indices of this forward.
        """
        one_sample = queries.shape[0] == 1 and self.num_key_sets == 1
        if one_sample and queries.device.type == "cpu" and self.keys.dtype in _NUMPY_REALS:
            self._update_one_sample(queries, winner_scores, int(winners))
            return
        if self.scramble:
            self._scramble(queries, winner_scores, winners)
        batch, q, d = queries.shape[0], self.num_key_sets, self.key_size
        flat_keys = self.keys.view(-1, d)
        rows = self._rows(winners)
        inputs = queries[:, None, :].expand(batch, q, d).reshape(-1, d)
        if self.distance == "cosine":
            steps = self.beta_k * inputs
        elif self.distance == "dot_scaled":
            steps = (self.beta_k / math.sqrt(d)) * inputs
        else:
            rate = self.beta_k / (math.sqrt(d) * self.sigma_eu)
            steps = rate * winner_scores.reshape(-1, 1) * (inputs - flat_keys.index_select(0, rows))
        # Batch elements sharing a winner add up their steps.
        flat_keys.index_add_(0, rows, steps)
        if self.distance == "cosine":
            if batch == 1:
                flat_keys.index_copy_(0, rows, F.normalize(flat_keys.index_select(0, rows), dim=-1))
            else:
                self.keys.copy_(F.normalize(self.keys, dim=-1))
        if self.scramble:
            self._count_wins(queries, winners)

    def _update_one_sample(self, query: torch.Tensor, winner_score: torch.Tensor, winner: int) -> None:
        """:meth:`_online_key_update` for one sample and one key set on the CPU, the online step.

        The state is a few hundred floats: NumPy views of it change it in place without a dispatcher
        call per operation, with the same float arithmetic (the norm comes from torch, so that cosine
        keys are bitwise those of the general path).

        Args:
            query: ``(1, d)``.
            winner_score: ``(1, 1)``.
            winner: the winning key index.
        """
        real, keys, z = _NUMPY_REALS[self.keys.dtype], self.keys.numpy()[0], query[0].numpy()
        if self.scramble:
            usage, age = self.usage.numpy()[0], self.age.numpy()[0]
            weak = (usage < real(self.tau_mu)) & (age >= real(self.tau_eta))
            if winner_score.numpy()[0, 0] < real(self.tau_alpha) and weak.any():
                slot = int(np.where(weak, age, -np.inf).argmax())
                keys[slot] = z
                units = self.memories.detach().numpy()[0]
                units[slot] = self._fresh_units((1,))[0].numpy() if self.random_memories else units[winner]
                usage[slot] = 0
                self.scramble_count.numpy()[0] += 1
        key = keys[winner]
        if self.distance == "cosine":
            key += real(self.beta_k) * z
            key /= real(max(float(self.keys[0, winner].norm()), 1e-12))
        elif self.distance == "dot_scaled":
            key += real(self.beta_k / math.sqrt(self.key_size)) * z
        else:
            rate = real(self.beta_k / (math.sqrt(self.key_size) * self.sigma_eu))
            key += rate * winner_score.numpy()[0, 0] * (z - key)
        if self.scramble:
            age[winner] = 0
            usage[winner] += 1
            age += 1

    def _scramble(self, queries: torch.Tensor, winner_scores: torch.Tensor, winners: torch.Tensor) -> None:
        # Decided once per key set: the batch's worst-matched sample takes over the oldest weak key.
        weak = (self.usage < self.tau_mu) & (self.age >= self.tau_eta)
        if len(queries) == 1:
            weakest_score, weakest_winners, weakest_queries = winner_scores[0], winners[0], queries
        else:
            weakest = winner_scores.argmin(dim=0, keepdim=True)
            weakest_score = winner_scores.gather(0, weakest)[0]
            weakest_winners = winners.gather(0, weakest)[0]
            weakest_queries = queries[weakest[0]]
        scrambling = (weakest_score < self.tau_alpha) & weak.any(dim=-1)
        # On the CPU the check is free; elsewhere everything is written unconditionally (unchanged where
        # not scrambling) to avoid a host sync per step.
        if queries.device.type == "cpu" and not scrambling.any():
            return
        slots = self._rows(torch.where(weak, self.age, float("-inf")).argmax(dim=-1))
        flat_keys, flat_usage = self.keys.view(-1, self.key_size), self.usage.view(-1)
        kept_keys = flat_keys.index_select(0, slots)
        flat_keys.index_copy_(0, slots, torch.where(scrambling[:, None], weakest_queries, kept_keys))
        if self.random_memories:
            chosen = scrambling.nonzero().squeeze(1)
            if chosen.numel():
                self.memories.view(-1, self.unit_size)[slots[chosen]] = self._fresh_units((chosen.numel(),))
        else:
            # Each slot copies the winner's unit, or itself where not scrambling: two row operations.
            flat_units = self.memories.view(-1, self.unit_size)
            sources = torch.where(scrambling, self._rows(weakest_winners), slots)
            flat_units.index_copy_(0, slots, flat_units.index_select(0, sources))
        flat_usage.index_copy_(0, slots, flat_usage.index_select(0, slots).masked_fill(scrambling, 0.0))
        self.scramble_count += scrambling

    def _count_wins(self, queries: torch.Tensor, winners: torch.Tensor) -> None:
        batch = queries.shape[0]
        if batch > 1:
            winners = self._scores(queries, self.keys).argmax(dim=-1)
        rows = self._rows(winners)
        self.age.view(-1).index_fill_(0, rows, 0.0)
        self.usage.view(-1).index_add_(0, rows, torch.ones_like(rows, dtype=self.usage.dtype))
        self.age += batch

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias}, "
            f"key_mem_units={self.key_mem_units}, delta={self.delta}, key_size={self.key_size}, "
            f"distance={self.distance}, psi={self.psi}, upd_m={self.upd_m}, upd_k={self.upd_k}, "
            f"scramble={self.scramble}, shared_keys={self.shared_keys}"
        )
        if self.layer_norm:
            text += ", layer_norm=True"
        if self.random_memories:
            text += ", random_memories=True"
        return text
