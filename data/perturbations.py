"""Image perturbations of NS-ImageNet: the same images seen under shifted input distributions.

Noise comes from a generator seeded by the *data* seed, the perturbation's parameters and the class
index, never by the run seed. So the perturbed images (and the features cached from them) are the
same in every run, for every batch size and position of the perturbation in the list, and the first
``k`` images of a class get the same noise whether or not ``samples_per_class`` keeps only them.
Two identical perturbations in one list therefore also produce identical images.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np

from memhead.registry import ConfigError


class PerturbationKind(Enum):
    none = "none"
    gaussian = "gaussian"
    occlusion = "occlusion"


@dataclass
class Perturbation:
    """One input distribution: the clean images, additive Gaussian noise, or a white square.

    Attributes:
        kind: ``none``, ``gaussian`` (``clip(x + noise_factor * N(0, sig^2), 0, 1)`` per pixel) or
            ``occlusion`` (a square of side ``int(occlusion_factor * H)`` set to 1).
        noise_factor: scale of the Gaussian noise (gaussian only).
        sig: standard deviation of the Gaussian noise (gaussian only).
        occlusion_factor: side of the occluding square as a fraction of the image side (occlusion only).
    """

    kind: PerturbationKind = PerturbationKind.none
    noise_factor: float = 0.0
    sig: float = 0.0
    occlusion_factor: float = 0.0


def paper_perturbations() -> list[Perturbation]:
    """The paper's three distributions: clean, small noise, large noise."""
    return [
        Perturbation(PerturbationKind.none),
        Perturbation(PerturbationKind.gaussian, noise_factor=0.25, sig=0.1),
        Perturbation(PerturbationKind.gaussian, noise_factor=0.5, sig=0.2),
    ]


def as_perturbation(item: Any, option: str) -> Perturbation:
    """Read and validate one perturbation from a dataclass, a DictConfig or a plain dict.

    Args:
        item: the configured perturbation.
        option: its configuration path, used in error messages.

    Raises:
        ConfigError: unknown kind or a parameter out of range.
    """

    def get(name: str, default: Any) -> Any:
        if isinstance(item, Mapping):
            return item.get(name, default)
        return getattr(item, name, default)

    kind = get("kind", "none")
    kind_name = kind.value if isinstance(kind, Enum) else str(kind)
    known = [k.value for k in PerturbationKind]
    if kind_name not in known:
        raise ConfigError(f"{option}.kind={kind_name!r} is unknown; expected one of {', '.join(known)}")
    try:
        values = {name: float(get(name, 0.0)) for name in ("noise_factor", "sig", "occlusion_factor")}
    except (TypeError, ValueError) as err:
        raise ConfigError(
            f"{option}: noise_factor, sig and occlusion_factor must be numbers ({err})"
        ) from err
    for name in ("noise_factor", "sig"):
        if not values[name] >= 0:
            raise ConfigError(f"{option}.{name}={values[name]} must be >= 0")
    if not 0.0 <= values["occlusion_factor"] <= 1.0:
        raise ConfigError(f"{option}.occlusion_factor={values['occlusion_factor']} must be in [0, 1]")
    return Perturbation(PerturbationKind(kind_name), **values)


def describe(perturbation: Perturbation) -> dict[str, Any]:
    """The parameters that change the images (a cache key: irrelevant fields are left out)."""
    kind = perturbation.kind
    if kind is PerturbationKind.gaussian:
        return {"kind": kind.value, "noise_factor": perturbation.noise_factor, "sig": perturbation.sig}
    if kind is PerturbationKind.occlusion:
        return {"kind": kind.value, "occlusion_factor": perturbation.occlusion_factor}
    return {"kind": kind.value}


def class_generator(perturbation: Perturbation, data_seed: int, class_index: int) -> np.random.Generator:
    """The noise generator of one class under one perturbation (see the module docstring)."""
    params = zlib.crc32(json.dumps(describe(perturbation), sort_keys=True).encode())
    return np.random.default_rng([data_seed, params, class_index])


def perturb(images: np.ndarray, perturbation: Perturbation, rng: np.random.Generator) -> np.ndarray:
    """Apply a perturbation to a batch of images.

    Args:
        images: ``uint8`` array ``(N, H, W, 3)``.
        perturbation: what to apply.
        rng: source of the noise / square positions, consumed image after image.

    Returns:
        ``float32`` array ``(N, H, W, 3)`` in ``[0, 1]``; the input is left unchanged.
    """
    x = images.astype(np.float32) / np.float32(255.0)
    if perturbation.kind is PerturbationKind.gaussian:
        scale = np.float32(perturbation.noise_factor * perturbation.sig)
        x += scale * rng.standard_normal(x.shape, dtype=np.float32)
        np.clip(x, 0.0, 1.0, out=x)
    elif perturbation.kind is PerturbationKind.occlusion:
        n, height, width = x.shape[:3]
        side = min(int(perturbation.occlusion_factor * height), height, width)
        if side > 0:
            # One (top, left) row per image, drawn in image order, so a prefix of the images gets
            # the same squares as the whole class.
            corners = rng.integers(0, [height - side + 1, width - side + 1], size=(n, 2))
            for image, (top, left) in zip(x, corners):
                image[top : top + side, left : left + side, :] = 1.0
    return x
