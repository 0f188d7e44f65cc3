"""The maps ψ from a Memory Head's input to its key space (the query before any normalisation).

Each map takes a batch ``(b, *shape)`` and the key size ``d`` and returns ``(b, d)``; ``identity`` and
``sign`` produce ``d = in_features`` only (the layer checks that), the resizes any ``d``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from memhead.registry import ConfigError


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


def _identity(x: torch.Tensor, key_size: int) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def _sign(x: torch.Tensor, key_size: int) -> torch.Tensor:
    return torch.sign(x.reshape(x.shape[0], -1))


def _resize1d(x: torch.Tensor, key_size: int) -> torch.Tensor:
    flat = x.reshape(x.shape[0], 1, -1)
    if flat.shape[-1] != key_size:
        flat = F.interpolate(flat, size=key_size, mode="linear")
    return flat.reshape(x.shape[0], key_size)


def _resize2d(x: torch.Tensor, key_size: int) -> torch.Tensor:
    if x.dim() != 4:
        raise ValueError(f"psi=resize2d expects an input of shape (b, C, H, W), got {tuple(x.shape)}")
    size = resize2d_shape(*x.shape[1:], key_size)
    resized = F.interpolate(x, size=size, mode="bilinear").reshape(x.shape[0], -1)
    # C * h' * w' <= d by construction; the rest of the key space is zero.
    return F.pad(resized, (0, key_size - resized.shape[1]))


MAPS = {"identity": _identity, "sign": _sign, "resize1d": _resize1d, "resize2d": _resize2d}
PSI_NAMES = tuple(MAPS)


def apply_psi(psi: str, x: torch.Tensor, key_size: int) -> torch.Tensor:
    """Map a batch ``x`` of shape ``(b, *shape)`` to queries of shape ``(b, key_size)``.

    Args:
        psi: one of :data:`PSI_NAMES`.
        x: the layer input; ``resize2d`` needs ``(b, C, H, W)``.
        key_size: the key size ``d``.

    Returns:
        The (not yet normalised) queries.
    """
    return MAPS[psi](x, key_size)
