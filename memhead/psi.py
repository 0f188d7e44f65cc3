"""The maps ψ from a Memory Head's input to its key space (the query before any normalisation)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memhead.registry import ConfigError

PSI_NAMES = ("identity", "sign", "resize1d", "resize2d")


def query_size(psi: str, in_features: int, key_size: int | None) -> int:
    """The key size ``d`` that ``psi`` produces from ``in_features`` input values.

    Args:
        psi: one of :data:`PSI_NAMES`.
        in_features: flattened size of one input sample.
        key_size: the requested key size, or ``None`` for "what ψ produces".

    Returns:
        The key size ``d``.

    Raises:
        ConfigError: if ``psi`` cannot produce ``key_size``.
    """
    if key_size is None:
        return in_features
    if psi in ("identity", "sign") and key_size != in_features:
        raise ConfigError(
            f"model.key_size={key_size} cannot be produced by model.psi={psi}; "
            f"allowed: null or {in_features} (in_features)"
        )
    return key_size


def resize2d_shape(channels: int, height: int, width: int, key_size: int) -> tuple[int, int]:
    """The spatial size ``(h', w')`` that ``resize2d`` interpolates a ``(C, H, W)`` input to.

    Raises:
        ConfigError: if the key size leaves less than one pixel per channel.
    """
    per_channel = key_size // channels
    new_width = round(math.sqrt(per_channel / (height * width)) * width)
    new_height = per_channel // new_width if new_width > 0 else 0
    if new_width < 1 or new_height < 1:
        raise ConfigError(
            f"model.key_size={key_size} is too small for model.psi=resize2d on a ({channels}, {height}, "
            f"{width}) input: it leaves no pixel per channel (h'={new_height}, w'={new_width})"
        )
    return new_height, new_width


def apply_psi(psi: str, x: torch.Tensor, key_size: int) -> torch.Tensor:
    """Map a batch ``x`` of shape ``(b, *shape)`` to queries of shape ``(b, key_size)``.

    Args:
        psi: one of :data:`PSI_NAMES`.
        x: the layer input; ``resize2d`` needs ``(b, C, H, W)``.
        key_size: the key size ``d``.

    Returns:
        The (not yet normalised) queries.
    """
    batch = x.shape[0]
    if psi == "identity":
        return x.reshape(batch, -1)
    if psi == "sign":
        return torch.sign(x.reshape(batch, -1))
    if psi == "resize1d":
        flat = x.reshape(batch, 1, -1)
        if flat.shape[-1] == key_size:
            return flat.reshape(batch, key_size)
        return F.interpolate(flat, size=key_size, mode="linear").reshape(batch, key_size)
    if psi == "resize2d":
        if x.dim() != 4:
            raise ValueError(f"psi=resize2d expects an input of shape (b, C, H, W), got {tuple(x.shape)}")
        channels, height, width = x.shape[1:]
        size = resize2d_shape(channels, height, width, key_size)
        resized = F.interpolate(x, size=size, mode="bilinear").reshape(batch, -1)
        # C * h' * w' <= d by construction; the rest of the key space is zero.
        return F.pad(resized, (0, key_size - resized.shape[1]))
    raise ConfigError(f"model.psi={psi!r} is not allowed; allowed: {', '.join(PSI_NAMES)}")
