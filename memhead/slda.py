"""Streaming linear discriminant analysis (SLDA) on frozen features (Hayes & Kanan 2020, "Lifelong
Machine Learning with Deep Streaming Linear Discriminant Analysis").

Running class means and one covariance shared by all classes, updated by a rank-one term per sample.
A class scores ``x^T L mu_c - mu_c^T L mu_c / 2`` with ``L`` the precision of the shrunk covariance
``(1 - shrinkage) * Sigma + shrinkage * I``. The precision is never formed: its Cholesky factor and the
class weights it gives are computed (in float64) only when a forward needs them after an update, and
kept until the next one. Classes not seen yet score ``-inf``.

``covariance_update``:

* ``exact``: ``Sigma`` is the pooled within-class covariance of everything seen, ``S / n`` with
  ``S = sum_i (x_i - mu_{y_i})(x_i - mu_{y_i})^T`` over the final class means: adding ``x`` to a class
  seen ``n_c`` times adds ``n_c / (n_c + 1) * d d^T`` to ``S``, ``d = x - mu_c`` (Welford's update,
  merged exactly for larger batches), so it equals the batch estimate after any number of samples;
* ``hayes_kanan``: the paper's recursion (as Avalanche's ``StreamingLDA``), ``t / (t + 1) * d d^T``
  with ``t`` the samples seen by the covariance in all classes and ``mu_c`` starting at zero; it counts
  each class's first sample as a deviation from the origin, so it is not the batch estimate.

With ``streaming_covariance=false`` the covariance learns from the first distribution only (the
"initial batch") and stays fixed afterwards; the means keep learning.
"""

from __future__ import annotations

import torch

from memhead.models import ClosedFormModel
from memhead.ncm import class_batch_means, merge_means
from memhead.registry import ConfigError

COVARIANCE_UPDATES = ("exact", "hayes_kanan")


def check_shrinkage(value) -> None:
    """The shrinkage mixes the covariance with the identity: it must lie in ``(0, 1]``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"model.shrinkage must be a number in (0, 1] (got {value!r})")


class StreamingLDA(ClosedFormModel):
    """Streaming LDA with a shared, shrinkage-regularised covariance (``model=slda``).

    Args:
        in_features: feature size.
        num_classes: number of classes.
        shrinkage: weight of the identity in the regularised covariance, in ``(0, 1]``.
        streaming_covariance: update the covariance on the whole stream (true) or on the first
            distribution only (false).
        covariance_update: ``exact`` or ``hayes_kanan`` (see the module's notes).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        shrinkage: float = 1e-4,
        streaming_covariance: bool = True,
        covariance_update: str = "exact",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_shrinkage(shrinkage)
        if covariance_update not in COVARIANCE_UPDATES:
            allowed = ", ".join(COVARIANCE_UPDATES)
            raise ValueError(f"covariance_update must be one of {allowed} (got {covariance_update!r})")
        self.in_features, self.num_classes = in_features, num_classes
        self.shrinkage, self.streaming_covariance = float(shrinkage), bool(streaming_covariance)
        self.covariance_update = covariance_update
        self.register_buffer("means", torch.zeros(num_classes, in_features, device=device, dtype=dtype))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long, device=device))
        # S, the scatter of deviations from the class means, and the samples it holds: Sigma = S / n.
        self.register_buffer("scatter", torch.zeros(in_features, in_features, device=device, dtype=dtype))
        self.register_buffer("scatter_count", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("covariance_frozen", torch.zeros((), dtype=torch.bool, device=device))
        self._frozen = False  # mirrors the buffer without a device sync per sample
        self._factor: torch.Tensor | None = None  # Cholesky factor of the regularised covariance
        self._weights: tuple[torch.Tensor, torch.Tensor] | None = None  # (L M^T, biases)
        self.register_load_state_dict_post_hook(lambda module, _keys: module._forget())

    def _forget(self) -> None:
        """Drop what was derived from the statistics (they changed, or moved)."""
        self._frozen = bool(self.covariance_frozen)
        self._factor, self._weights = None, None

    def _apply(self, fn, recurse=True):
        self._forget()
        return super()._apply(fn, recurse)

    def covariance(self) -> torch.Tensor:
        """The shared covariance ``S / n`` estimated so far (zero before any sample)."""
        return self.scatter / self.scatter_count.clamp(min=1).to(self.scatter.dtype)

    @torch.no_grad()
    def learn(self, x: torch.Tensor, y: torch.Tensor) -> None:
        x = x.to(self.means.dtype)
        self._weights = None
        if self._frozen:  # the means alone keep learning
            merge_means(self.means, self.counts, *class_batch_means(x, y, self.num_classes))
        elif self.covariance_update == "exact":
            self._learn_exact(x, y)
        else:
            for i in range(len(y)):  # the recursion is defined one sample at a time
                self._learn_hayes_kanan(x[i : i + 1], y[i : i + 1])

    def _learn_exact(self, x: torch.Tensor, y: torch.Tensor) -> None:
        batch_counts, batch_means = class_batch_means(x, y, self.num_classes)
        if len(y) > 1:  # the batch's own within-class scatter (zero for one sample)
            within = x - batch_means[y]
            self.scatter.addmm_(within.T, within)
        # Between the batch's and the running means: n_c * n_b / (n_c + n_b) * e e^T per class, spread
        # over the class's samples of the batch (each takes n_c / (n_c + n_b)).
        gap = (batch_means - self.means)[y]
        seen = self.counts[y].to(x.dtype)
        weight = seen / (seen + batch_counts[y].to(x.dtype))
        self.scatter.addmm_((gap * weight.unsqueeze(1)).T, gap)
        self.scatter_count += len(y)
        self._factor = None
        merge_means(self.means, self.counts, batch_counts, batch_means)

    def _learn_hayes_kanan(self, x: torch.Tensor, y: torch.Tensor) -> None:
        gap = x - self.means[y]
        t = self.scatter_count.to(x.dtype)
        self.scatter.addmm_((gap * (t / (t + 1))).T, gap)
        self.scatter_count += 1
        self._factor = None
        merge_means(self.means, self.counts, *class_batch_means(x, y, self.num_classes))

    def end_distribution(self) -> None:
        if not self.streaming_covariance and not self._frozen:
            self.covariance_frozen.fill_(True)
            self._frozen = True

    def class_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W (in_features, C), b (C,))`` with scores ``x @ W - b``, computed once per update."""
        if self._weights is None:
            with torch.inference_mode(False), torch.no_grad():  # plain tensors, even under evaluation
                if self._factor is None:
                    eye = torch.eye(self.in_features, dtype=torch.float64, device=self.scatter.device)
                    shrunk = (1 - self.shrinkage) * self.covariance().double() + self.shrinkage * eye
                    self._factor = torch.linalg.cholesky(shrunk)
                means = self.means.double().T  # (d, C)
                weights = torch.cholesky_solve(means, self._factor)
                biases = 0.5 * (means * weights).sum(0)
                self._weights = (weights.to(self.means.dtype), biases.to(self.means.dtype))
        return self._weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, biases = self.class_weights()
        scores = x.to(weights.dtype) @ weights - biases
        return scores.masked_fill(self.counts == 0, float("-inf"))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, shrinkage={self.shrinkage:g}, "
            f"streaming_covariance={self.streaming_covariance}, covariance_update={self.covariance_update}"
        )
