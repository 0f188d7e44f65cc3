"""A frozen ImageNet backbone (torchvision ResNet-18 without its classifier) as a feature extractor.

Weights are given as a torchvision ``ResNet18_Weights`` name (``IMAGENET1K_V1``, ``DEFAULT``), a path
to a local ``.pth`` state dict, or ``None``/``"none"`` for a random initialisation seeded by
``init_seed`` (so random features are reproducible and cacheable).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from memhead.registry import ConfigError

BACKBONES = ("resnet18",)
FEATURE_DIM = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

WeightsSpec = str | Path | None


def _named_weights() -> dict[str, object]:
    from torchvision.models import ResNet18_Weights

    return dict(ResNet18_Weights.__members__)


def is_weight_file(weights: WeightsSpec) -> bool:
    """Whether ``weights`` names a local file rather than a torchvision weights name."""
    if weights is None:
        return False
    text = str(weights)
    return text.endswith((".pth", ".pt")) or "/" in text or os.sep in text


def is_random(weights: WeightsSpec) -> bool:
    """Whether ``weights`` asks for a random initialisation (``None`` or ``"none"``)."""
    return weights is None or str(weights).strip().lower() in ("none", "null", "random")


def check_weights(weights: WeightsSpec, option: str = "benchmark.weights") -> None:
    """Reject an unknown weights name without touching the disk or the network.

    Raises:
        ConfigError: ``weights`` is neither random, a file path nor a ``ResNet18_Weights`` name.
    """
    if is_random(weights) or is_weight_file(weights):
        return
    names = _named_weights()
    if str(weights) not in names:
        raise ConfigError(
            f"{option}={weights!r} is unknown; expected one of {', '.join(names)}, "
            "a path to a .pth state dict, or null for random weights"
        )


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_identity(weights: WeightsSpec, option: str = "benchmark.weights") -> str:
    """A stable name of the weights for cache keys: ``random``, the resolved name, or the file's hash.

    Raises:
        ConfigError: unknown name, or a weight file that does not exist.
    """
    check_weights(weights, option)
    if is_random(weights):
        return "random"
    if is_weight_file(weights):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise ConfigError(f"{option}={weights}: no such file (expected a ResNet-18 .pth state dict)")
        return f"sha256:{file_sha256(path)}"
    return _named_weights()[str(weights)].name  # DEFAULT resolves to IMAGENET1K_V1: one cache entry


def _checkpoint_help(file_name: str, option: str) -> str:
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    return f"without network, place {file_name} in {folder} or pass {option}=/path/to/file.pth"


def _load_named_state(name: str, option: str, progress: bool) -> Mapping:
    member = _named_weights()[name]
    file_name = os.path.basename(member.url)
    try:
        # Same call torchvision makes, kept here so an offline failure becomes one clear message.
        return torch.hub.load_state_dict_from_url(
            member.url, map_location="cpu", progress=progress, check_hash=True, weights_only=True
        )
    except Exception as err:  # download or unpickling failed: either way the user must act
        raise ConfigError(
            f"{option}={name}: cannot load {file_name} ({type(err).__name__}: {err}); "
            f"{_checkpoint_help(file_name, option)}"
        ) from err


def _load_file_state(path: Path, option: str) -> Mapping:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"{option}={path}: cannot read a state dict ({type(err).__name__}: {err})") from err


def _load_state(model: nn.Module, state: object, source: str, option: str) -> None:
    """Load a ResNet-18 state dict; the classifier (``fc.*``) may be absent since it is dropped anyway."""
    if not isinstance(state, Mapping):
        raise ConfigError(f"{option}={source}: expected a state dict, got {type(state).__name__}")
    body = {key: value for key, value in state.items() if not str(key).startswith("fc.")}
    try:
        missing, unexpected = model.load_state_dict(body, strict=False)
    except RuntimeError as err:
        raise ConfigError(
            f"{option}={source}: not a ResNet-18 state dict ({str(err).splitlines()[0]})"
        ) from err
    missing = [key for key in missing if not key.startswith("fc.")]
    if missing or unexpected:
        raise ConfigError(
            f"{option}={source}: not a ResNet-18 state dict "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )


def build_backbone(
    name: str,
    weights: WeightsSpec,
    *,
    device: str | torch.device,
    init_seed: int = 0,
    option: str = "benchmark.weights",
    progress: bool = False,
) -> nn.Module:
    """A frozen feature extractor in eval mode on ``device``, returning ``FEATURE_DIM``-d vectors.

    Args:
        name: backbone name; only ``resnet18``.
        weights: see the module docstring.
        device: where the model runs.
        init_seed: seed of the random initialisation (used when ``weights`` is random).
        option: the configuration path of ``weights`` for error messages.
        progress: show torch hub's download bar.

    Raises:
        ConfigError: unknown backbone, or weights that cannot be loaded.
    """
    if name not in BACKBONES:
        raise ConfigError(f"backbone={name!r} is unknown; known: {', '.join(BACKBONES)}")
    from torchvision.models import resnet18

    identity = weights_identity(weights, option)
    # A private RNG state: the random init is reproducible and the caller's seed stream is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        model = resnet18(weights=None)
    if identity != "random":
        if is_weight_file(weights):
            path = Path(weights).expanduser()
            _load_state(model, _load_file_state(path, option), str(path), option)
        else:
            _load_state(model, _load_named_state(identity, option, progress), identity, option)
    model.fc = nn.Identity()
    model.requires_grad_(False)
    return model.eval().to(device)


def embed(model: nn.Module, images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Features of a batch ``(B, 3, H, W)`` in ``[0, 1]``: resize, ImageNet-normalise, forward."""
    if tuple(images.shape[-2:]) != (image_size, image_size):
        images = F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True
        )
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return model((images - mean) / std)


def _rebatch(chunks: Iterable[np.ndarray], batch_size: int) -> Iterator[np.ndarray]:
    """Regroup chunks of any length into batches of ``batch_size`` (the last may be shorter)."""
    pending: list[np.ndarray] = []
    count = 0
    for chunk in chunks:
        start = 0
        while start < len(chunk):
            take = min(batch_size - count, len(chunk) - start)
            pending.append(chunk[start : start + take])
            count += take
            start += take
            if count == batch_size:
                yield np.concatenate(pending)
                pending, count = [], 0
    if count:
        yield np.concatenate(pending)


def extract_features(
    model: nn.Module,
    chunks: Iterable[np.ndarray],
    *,
    total: int,
    image_size: int,
    batch_size: int,
    device: str | torch.device,
    progress: bool,
    desc: str | None = None,
) -> np.ndarray:
    """Run the backbone over a stream of images, batched, without gradients.

    Args:
        model: from :func:`build_backbone`.
        chunks: ``float32`` arrays ``(n, H, W, 3)`` in ``[0, 1]``, in output order.
        total: the number of images in all chunks (sizes the output and the progress bar).
        image_size: side the images are resized to.
        batch_size: images per forward pass.
        device: where the batches go (the model's device).
        progress: show a tqdm bar.
        desc: the bar's label.

    Returns:
        ``float32`` array ``(total, FEATURE_DIM)``.
    """
    features = np.empty((total, FEATURE_DIM), dtype=np.float32)
    filled = 0
    with torch.inference_mode(), tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in _rebatch(chunks, batch_size):
            if filled + len(batch) > total:
                raise ValueError(f"extract_features: more than total={total} images")
            images = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(device)
            # contiguous(): a permuted (channels-last) tensor takes a several-fold slower CPU conv path.
            output = embed(model, images.permute(0, 3, 1, 2).contiguous(), image_size)
            features[filled : filled + len(batch)] = output.float().cpu().numpy()
            filled += len(batch)
            bar.update(len(batch))
    if filled != total:
        raise ValueError(f"extract_features: got {filled} images, expected total={total}")
    return features
