"""Nearest class mean (NCM) on frozen features (as in Janson et al. 2022, "A Simple Baseline that
Questions the Use of Pretrained-Models in Continual Learning").

A running mean per class of the (optionally L2-normalised) features; the logit of a class is the
negative squared euclidean distance to its mean, or the cosine similarity with it. Classes not seen
yet score ``-inf``, so they are never predicted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memhead.models import ClosedFormModel

METRICS = ("euclidean", "cosine")


def class_batch_means(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """Per class: the number of samples of the batch ``(C,)`` and their mean ``(C, d)`` (0 if none)."""
    counts = torch.bincount(y, minlength=num_classes)
    sums = torch.zeros(num_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, y, x)
    return counts, sums / counts.clamp(min=1).unsqueeze(1).to(x.dtype)


def merge_means(means: torch.Tensor, counts: torch.Tensor, batch_counts, batch_means) -> None:
    """Fold a batch's class means into running ones, in place: ``mu += n_b / (n + n_b) * (m_b - mu)``.

    Exact for any batch size (one sample: ``mu += (x - mu) / (n + 1)``); classes absent from the batch
    do not move.
    """
    counts += batch_counts
    weight = batch_counts.to(means.dtype) / counts.clamp(min=1).to(means.dtype)
    means += weight.unsqueeze(1) * (batch_means - means)


class NearestClassMean(ClosedFormModel):
    """Predict the class whose running mean is nearest (``model=ncm``).

    Args:
        in_features: feature size.
        num_classes: number of classes.
        metric: ``euclidean`` (logit: minus the squared distance) or ``cosine`` (logit: cosine similarity).
        normalize: L2-normalise every feature before it enters a mean or is classified.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        metric: str = "euclidean",
        normalize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {', '.join(METRICS)} (got {metric!r})")
        self.in_features, self.num_classes = in_features, num_classes
        self.metric, self.normalize = metric, bool(normalize)
        self.register_buffer("means", torch.zeros(num_classes, in_features, device=device, dtype=dtype))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.long, device=device))

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.means.dtype)
        return F.normalize(x, dim=-1) if self.normalize else x

    @torch.no_grad()
    def learn(self, x: torch.Tensor, y: torch.Tensor) -> None:
        batch_counts, batch_means = class_batch_means(self._features(x), y, self.num_classes)
        merge_means(self.means, self.counts, batch_counts, batch_means)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._features(x)
        if self.metric == "cosine":
            scores = F.normalize(x, dim=-1) @ F.normalize(self.means, dim=-1).T
        else:  # -|x - mu|^2 expanded: one matrix product instead of a (b, C, d) difference
            scores = 2 * x @ self.means.T - self.means.square().sum(1) - x.square().sum(1, keepdim=True)
        return scores.masked_fill(self.counts == 0, float("-inf"))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, num_classes={self.num_classes}, metric={self.metric}, "
            f"normalize={self.normalize}"
        )
