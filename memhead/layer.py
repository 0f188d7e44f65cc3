"""The Memory Head layer: a drop-in for ``nn.Linear`` whose weights are blended, per sample, from
key-indexed memory units (behaviour: ``shared/spec/memory-head.md``).

The specification's steps live in :mod:`memhead.reference`, once. This module owns the options (the
constructor's signature is the single source of their defaults and allowed values) and the fast
path, which differs from the reference only in how the output and its gradient and the top-δ are
computed (:mod:`memhead.blending`; the same values, the same top-δ on ties).
"""

from __future__ import annotations

import inspect
import math
import numbers
import typing
import warnings
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from memhead import blending, reference
from memhead.psi import PSI_NAMES

# Scores from this many floats on are kept in a buffer during evaluation (smaller tensors come back
# from the allocator's free lists, without page faults).
SCORE_BUFFER_MIN_FLOATS = 1 << 22


class MemoryHeadOptionError(ValueError):
    """A Memory Head option the layer cannot accept; one line naming the argument(s).

    ``option_message(prefix)`` gives the same line with every argument name prefixed (the runner
    says ``model.upd_k='foo' ...`` where the layer says ``upd_k='foo' ...``).
    """

    def __init__(self, template: str, **names: str):
        self.template, self.names = template, names
        super().__init__(self.option_message(""))

    def option_message(self, prefix: str) -> str:
        return self.template.format(**{key: prefix + name for key, name in self.names.items()})


class MemoryHeadOptionWarning(UserWarning):
    """A Memory Head option the layer adjusted (``delta`` clipped to ``key_mem_units``); one line naming
    the argument(s), and ``option_message(prefix)`` / ``prefixed(prefix)`` as for the error."""

    def __init__(self, template: str, **names: str):
        self.template, self.names = template, names
        super().__init__(self.option_message(""))

    option_message = MemoryHeadOptionError.option_message

    def prefixed(self, prefix: str) -> MemoryHeadOptionWarning:
        """The same warning with every argument name prefixed."""
        return type(self)(self.template, **{key: prefix + name for key, name in self.names.items()})


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
        distance: Literal["cosine", "euclidean", "dot_scaled"] = "cosine",
        sigma_eu: float = 1.0,
        psi: str = "identity",
        key_size: int | None = None,
        upd_m: Literal["vanilla", "WTA"] = "WTA",
        upd_k: Literal["ad_hoc_WTA", "grad_WTA", "grad_not_WTA"] = "ad_hoc_WTA",
        beta_k: float | None = 0.01,
        gamma_alpha: float = 25.0,
        tau_alpha: float | None = 0.95,
        tau_mu: float | None = 50,
        tau_eta: float | None = 50,
        scramble: bool = True,
        shared_keys: bool = True,
        layer_norm: bool = False,
        random_memories: bool = False,
        impl: Literal["auto", "reference", "fast"] = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        options = {name: value for name, value in locals().items() if name in DEFAULT_OPTIONS}
        for name, value in check_options(in_features, out_features, **options).items():
            setattr(self, name, value)
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
        for name, shape, kind in (
            ("usage", (q, m), dtype),
            ("age", (q, m), dtype),
            ("scramble_count", q, torch.long),
        ):
            self.register_buffer(
                name, torch.empty(shape, device=device, dtype=kind) if self.scramble else None
            )
        self.last_top_indices: torch.Tensor | None = None
        self._score_buffer: torch.Tensor | None = None
        self._recycler = blending.GradientRecycler(self.memories)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw fresh memories and keys and reset the scrambling counters (as the specification's
        initialisation)."""
        with torch.no_grad():
            self.memories.copy_(reference.fresh_units(self, self.memories.shape[:2]))
            bound = 1.0 / math.sqrt(self.key_size)
            nn.init.uniform_(self.keys, -bound, bound)
            if self.distance == "cosine":
                self.keys.copy_(F.normalize(self.keys, dim=-1))
            if self.scramble:
                self.usage.zero_()
                self.age.fill_(self.tau_eta)
                self.scramble_count.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Blend each sample's weights from its top-δ memory units and apply them.

        Args:
            x: ``(b, in_features)``, or ``(b, *)`` with ``in_features`` values per sample.

        Returns:
            ``(b, out_features)``.
        """
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(
                f"MemoryHead expects {self.in_features} values per sample, got an input of shape "
                f"{tuple(x.shape)}"
            )
        # One thread for the many small operations; the large products ask for the whole team.
        with blending.cpu_threads(flat.device, parallel=False):
            learning = self.training and torch.is_grad_enabled()
            # The fast path's top-δ: the same picks, cheaper for many key sets.
            steps = reference if self.impl == "reference" else blending
            z = reference.queries(self, x)
            with blending.cpu_threads(
                flat.device, parallel=len(z) * self.keys.numel() >= blending.PARALLEL_MACS
            ):
                keys = self._scoring_keys(learning)
                scores = reference.scores(self, z, keys, out=self._evaluation_buffer(z, keys))
                top_scores, top_indices = steps.top(scores, self.delta)
            # The reference's softmax, on every path: a softmax along a leading dimension is cheaper for
            # many rows but rounds otherwise, and populations and traces need the same bits.
            alpha = reference.attention(self, top_scores)
            output = self._output(alpha, top_indices, flat)
            self.last_top_indices = top_indices.detach()
            if learning and self.upd_k == "ad_hoc_WTA":
                reference.key_update(self, z, top_scores[..., 0], top_indices[..., 0])
            return output

    def train(self, mode: bool = True) -> MemoryHead:
        if mode:
            self._score_buffer = None  # evaluation's, released when training resumes
        return super().train(mode)

    def _evaluation_buffer(self, z: torch.Tensor, keys: torch.Tensor) -> torch.Tensor | None:
        """Where an evaluation forward's scores go, chunk after chunk (``None``: a fresh tensor).

        A fresh CPU tensor of tens of MB (per-neuron keys) costs a page fault per 4 kB: about a fifth
        of its own product. The fast path's scores are consumed by its top-δ and never escape, so in
        ``eval()`` mode one buffer serves every chunk, until ``train()``.
        """
        size = len(z) * keys.shape[0] * keys.shape[1]
        if (
            self.impl == "reference"
            or self.training
            or self.distance == "euclidean"
            or z.device.type != "cpu"
            or size < SCORE_BUFFER_MIN_FLOATS
            or (torch.is_grad_enabled() and (z.requires_grad or keys.requires_grad))
        ):
            return None
        buffer = self._score_buffer
        if (
            buffer is None
            or buffer.numel() < size
            or buffer.dtype != z.dtype
            or buffer.is_inference() != torch.is_inference_mode_enabled()
        ):
            buffer = self._score_buffer = z.new_empty(size)
        return buffer[:size].view(len(z), -1)

    def _scoring_keys(self, learning: bool) -> torch.Tensor:
        if self.distance != "cosine" or self.upd_k == "ad_hoc_WTA":
            return self.keys
        # Gradient-trained cosine keys drift off the unit sphere after each optimizer step.
        if learning:
            with torch.no_grad():
                self.keys.copy_(F.normalize(self.keys, dim=-1))
            return self.keys
        # Same values without touching the state outside a training forward.
        return self.keys / self.keys.detach().norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def _output(self, alpha: torch.Tensor, top_indices: torch.Tensor, flat: torch.Tensor) -> torch.Tensor:
        """Steps 5-6: the reference's blend of weights, or the fast path's equal values."""
        needs_graph = torch.is_grad_enabled() and (
            self.memories.requires_grad or alpha.requires_grad or flat.requires_grad
        )
        # Layer-norm gains multiply the weights: with a gradient, the blend of weights is the way.
        if self.impl == "reference" or (needs_graph and self.layer_norm):
            return reference.output(self, self.memories, alpha, top_indices, flat)
        if needs_graph:
            if self.upd_m == "WTA" and self.upd_k == "grad_WTA":
                alpha = torch.cat([alpha[..., :1], alpha[..., 1:].detach()], dim=-1)
            inputs = F.pad(flat, (0, 1), value=1.0) if self.bias else flat
            trainable = 1 if self.upd_m == "WTA" else self.delta
            unit_rows = reference.rows(self, top_indices, dim=1)
            return blending.SelectedUnits.apply(
                self.memories, unit_rows, alpha, inputs, trainable, self._recycler
            )
        return blending.evaluate(self, alpha, top_indices, flat)

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias}, "
            f"key_mem_units={self.key_mem_units}, delta={self.delta}, key_size={self.key_size}, "
            f"distance={self.distance}, psi={self.psi}, upd_m={self.upd_m}, upd_k={self.upd_k}, "
            f"scramble={self.scramble}, shared_keys={self.shared_keys}"
        )
        for name in ("layer_norm", "random_memories"):
            if getattr(self, name):
                text += f", {name}=True"
        if self.impl != "auto":
            text += f", impl={self.impl}"
        return text


# --- options: defaults and allowed values come from the signature above ----------------------------

_SIGNATURE = inspect.signature(MemoryHead.__init__).parameters
_NOT_OPTIONS = ("self", "in_features", "out_features", "device", "dtype")
DEFAULT_OPTIONS: dict[str, Any] = {
    name: parameter.default for name, parameter in _SIGNATURE.items() if name not in _NOT_OPTIONS
}
_HINTS = typing.get_type_hints(MemoryHead.__init__)
CHOICES: dict[str, tuple[str, ...]] = {
    name: typing.get_args(hint) for name, hint in _HINTS.items() if typing.get_origin(hint) is Literal
}
CHOICES["psi"] = PSI_NAMES
_FLAGS = tuple(name for name, hint in _HINTS.items() if hint is bool)


def _show(value: Any) -> str:
    # YAML spelling, so that the message reads like the override the user typed; braces escaped
    # for the message template.
    if isinstance(value, (bool, np.bool_)):
        text = str(bool(value)).lower()
    else:
        text = "null" if value is None else repr(value) if isinstance(value, str) else str(value)
    return text.replace("{", "{{").replace("}", "}}")


def _refuse(name: str, value: Any, allowed: str, condition: str = "", **others: str) -> MemoryHeadOptionError:
    return MemoryHeadOptionError(
        f"{{{name}}}={_show(value)} is not allowed{condition}; allowed: {allowed}", **{name: name}, **others
    )


def _choice(name: str, value: Any) -> str:
    text = str(getattr(value, "name", value))
    for allowed in CHOICES[name]:
        if text.lower() == allowed.lower():
            return allowed
    raise _refuse(name, text, ", ".join(CHOICES[name]))


def _flag(name: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise _refuse(name, value, "true, false")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _integer(name: str, value: Any, minimum: int) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, (bool, np.bool_)) or value < minimum:
        raise _refuse(name, value, f"an integer >= {minimum}")
    return int(value)


def _number(name: str, value: Any, condition: str = "", low: float = -math.inf, **others: str) -> float:
    """A finite number, above ``low`` if given."""
    if not _is_number(value) or not math.isfinite(value) or not value > low:
        raise _refuse(
            name, value, "a number" if low == -math.inf else f"a number > {low:g}", condition, **others
        )
    return float(value)


def _tau_alpha_bounds(distance: str, key_size: int) -> tuple[float, float]:
    """``(low, high]`` for ``tau_alpha``: at or below the lowest possible score scrambling could never
    happen. Above the highest it always passes the score test: the paper's NS-ImageNet values (cosine,
    0.7 and 0.95 > 1/sqrt(512)) rely on that, so the upper bound is the similarity's own, 1."""
    if distance == "euclidean":
        return 0.0, 1.0  # exp(-·) lies in (0, 1]
    if distance == "cosine":
        return -1.0 / math.sqrt(key_size), 1.0  # unit vectors: |z·k| / sqrt(d) <= 1 / sqrt(d)
    return -math.inf, math.inf  # dot_scaled: unbounded


def check_options(in_features: int, out_features: int, **options: Any) -> dict[str, Any]:
    """Validate Memory Head options before any data is read.

    Args:
        in_features: flattened size of one input sample.
        out_features: number of outputs.
        **options: any of the :class:`MemoryHead` keyword options (missing ones take their defaults);
            strings and Enums are accepted for the named choices.

    Returns:
        All options and the two sizes, normalised: canonical choice names, Python bools and numbers,
        ``delta`` clipped to ``key_mem_units`` (with a warning) and ``key_size`` resolved to the size ψ
        produces.

    Raises:
        MemoryHeadOptionError: one line naming the offending argument and the allowed values.
    """
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise MemoryHeadOptionError(
            f"{{name}} is not a Memory Head option; allowed: {', '.join(DEFAULT_OPTIONS)}", name=unknown[0]
        )
    opts = {**DEFAULT_OPTIONS, **options}
    out: dict[str, Any] = {
        "in_features": _integer("in_features", in_features, 1),
        "out_features": _integer("out_features", out_features, 1),
    }
    out.update({name: _choice(name, opts[name]) for name in CHOICES})
    out.update({name: _flag(name, opts[name]) for name in _FLAGS})
    out["key_mem_units"] = m = _integer("key_mem_units", opts["key_mem_units"], 1)
    out["delta"] = _integer("delta", opts["delta"], 1)
    if out["delta"] > m:
        warnings.warn(
            MemoryHeadOptionWarning(
                f"{{delta}}={out['delta']} is above {{m}}={m}; using {{delta}}={m}",
                delta="delta",
                m="key_mem_units",
            ),
            stacklevel=3,
        )
        out["delta"] = m
    out["gamma_alpha"] = _number("gamma_alpha", opts["gamma_alpha"], low=0.0)  # a softmax temperature
    euclidean = out["distance"] == "euclidean"
    out["sigma_eu"] = _number("sigma_eu", opts["sigma_eu"], low=0.0 if euclidean else -math.inf)

    key_size = opts["key_size"]
    if key_size is None:
        key_size = out["in_features"]
    key_size = _integer("key_size", key_size, 1)
    if out["psi"] in ("identity", "sign") and key_size != out["in_features"]:
        raise MemoryHeadOptionError(
            f"{{key_size}}={key_size} cannot be produced by {{psi}}={out['psi']}; "
            f"allowed: null or {out['in_features']} (in_features)",
            key_size="key_size", psi="psi",
        )  # fmt: skip
    out["key_size"] = key_size

    ad_hoc = out["upd_k"] == "ad_hoc_WTA"
    if out["scramble"] and not ad_hoc:
        raise MemoryHeadOptionError(
            "{scramble}=true requires {upd_k}=ad_hoc_WTA", scramble="scramble", upd_k="upd_k"
        )
    # Thresholds and the key step only matter to the rules that read them; elsewhere null is fine.
    for name in ("tau_alpha", "tau_mu", "tau_eta"):
        value = opts[name]
        if out["scramble"]:
            value = _number(name, value, " with {scramble}=true", scramble="scramble")
        elif _is_number(value):
            value = float(value)
        out[name] = value
    if out["scramble"]:
        low, high = _tau_alpha_bounds(out["distance"], key_size)
        if not low < out["tau_alpha"] <= high:
            allowed = f"a number > {low:g} and <= {high:g}"
            raise _refuse("tau_alpha", out["tau_alpha"], allowed, f" with {{distance}}={out['distance']}",
                          distance="distance")  # fmt: skip
    beta_k = opts["beta_k"]
    if ad_hoc:
        beta_k = _number("beta_k", beta_k, " with {upd_k}=ad_hoc_WTA", upd_k="upd_k")
        if beta_k < 0:
            raise _refuse("beta_k", beta_k, "a number >= 0")
    out["beta_k"] = float(beta_k) if _is_number(beta_k) else beta_k
    return out
