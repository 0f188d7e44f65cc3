"""Embed an image folder with a frozen backbone into a stream file for ``benchmark=features``.

Usage::

    python -m data.extract_features --images DIR --out FILE.npz [--backbone resnet18]
        [--weights IMAGENET1K_V1|/path/to/file.pth|none] [--image-size 224] [--device cpu] [--batch-size 64]

``DIR`` is in torchvision ``ImageFolder`` layout (one sub-folder per class, sorted by name), either
directly or under ``train/``, ``val/`` and ``test/`` sub-folders (then the classes are those of
``train/``). Without split folders each class's images, sorted by file name, are split 70/10/20 as in
NS-ImageNet. Each class is one distribution (``distributions = y``, ``domain = 0``), streamed class
after class. Images are loaded as RGB, resized to ``image-size`` (bilinear) and ImageNet-normalised.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data import backbone as backbone_lib
from data.feature_cache import atomic_write
from data.ns_imagenet import MIN_IMAGES_PER_CLASS, split_bounds
from memhead.registry import ConfigError

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

Samples = list[tuple[Path, int]]


def _class_folders(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.is_dir())


def _images(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)


def find_samples(images_dir: Path) -> tuple[list[str], dict[str, Samples]]:
    """Class names and the ``(image path, label)`` list of each split, class-major.

    Raises:
        ConfigError: no folder, no classes, a split folder missing, unknown or too small classes.
    """
    if not images_dir.is_dir():
        raise ConfigError(f"--images={images_dir} is not a folder")
    present = [split for split in SPLITS if (images_dir / split).is_dir()]
    if present:
        missing = [split for split in SPLITS if split not in present]
        if missing:
            raise ConfigError(
                f"--images={images_dir} has {', '.join(present)}/ but lacks {', '.join(missing)}/"
            )
        names = [path.name for path in _class_folders(images_dir / "train")]
        if not names:
            raise ConfigError(f"--images={images_dir / 'train'} has no class folders")
        samples = {}
        for split in SPLITS:
            samples[split] = []
            for folder in _class_folders(images_dir / split):
                if folder.name not in names:
                    raise ConfigError(f"--images: class folder {folder} is not among the classes of train/")
                samples[split] += [(path, names.index(folder.name)) for path in _images(folder)]
            samples[split].sort(key=lambda sample: sample[1])  # stable: file order within a class
            if not samples[split]:
                raise ConfigError(f"--images={images_dir / split} has no images")
        return names, samples

    folders = _class_folders(images_dir)
    if not folders:
        raise ConfigError(f"--images={images_dir} has no class folders (expected ImageFolder layout)")
    samples = {split: [] for split in SPLITS}
    for label, folder in enumerate(folders):
        paths = _images(folder)
        if len(paths) < MIN_IMAGES_PER_CLASS:
            raise ConfigError(
                f"--images: {folder} has {len(paths)} images; at least {MIN_IMAGES_PER_CLASS} are needed "
                "for a 70/10/20 split (or use train/ val/ test/ folders)"
            )
        train_end, val_end = split_bounds(len(paths))
        for split, part in zip(SPLITS, (paths[:train_end], paths[train_end:val_end], paths[val_end:])):
            samples[split] += [(path, label) for path in part]
    return [folder.name for folder in folders], samples


def _load_chunks(samples: Samples, image_size: int, chunk: int) -> Iterator[np.ndarray]:
    for start in range(0, len(samples), chunk):
        batch = []
        for path, _ in samples[start : start + chunk]:
            with Image.open(path) as image:
                resized = image.convert("RGB").resize((image_size, image_size), Image.BILINEAR)
            batch.append(np.asarray(resized, dtype=np.float32) / np.float32(255.0))
        yield np.stack(batch)


def extract(
    images_dir: Path,
    *,
    backbone: str = "resnet18",
    weights: str | None = "IMAGENET1K_V1",
    image_size: int = 224,
    device: str = "cpu",
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """The stream arrays of an image folder (see the module docstring)."""
    _, samples = find_samples(images_dir)
    weights = None if backbone_lib.is_random(weights) else weights
    model = backbone_lib.build_backbone(
        backbone, weights, device=device, option="--weights", progress=progress
    )
    stream = {}
    for split in SPLITS:
        labels = np.array([label for _, label in samples[split]], dtype=np.int64)
        stream[f"X_{split}"] = backbone_lib.extract_features(
            model,
            _load_chunks(samples[split], image_size, batch_size),
            total=len(labels),
            image_size=image_size,
            batch_size=batch_size,
            device=device,
            progress=progress,
            desc=split,
        )
        stream[f"y_{split}"] = labels
        stream[f"distributions_{split}"] = labels.copy()
        stream[f"domain_{split}"] = np.zeros_like(labels)
    return stream


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data.extract_features", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--images", type=Path, required=True, help="ImageFolder root (optionally train/ val/ test/)"
    )
    parser.add_argument("--out", type=Path, required=True, help="the .npz stream file to write")
    parser.add_argument("--backbone", default="resnet18", choices=backbone_lib.BACKBONES)
    parser.add_argument(
        "--weights", default="IMAGENET1K_V1", help="torchvision weights name, a .pth path, or none"
    )
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.image_size < 32 or args.batch_size < 1:
        print("error: --image-size must be >= 32 and --batch-size >= 1", file=sys.stderr)
        return 2
    try:
        stream = extract(
            args.images,
            backbone=args.backbone,
            weights=args.weights,
            image_size=args.image_size,
            device=args.device,
            batch_size=args.batch_size,
            progress=not args.no_progress,
        )
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = args.out if args.out.suffix == ".npz" else args.out.with_name(args.out.name + ".npz")
    atomic_write(out, lambda handle: np.savez(handle, **stream))
    sizes = ", ".join(f"{split} {len(stream[f'y_{split}'])}" for split in SPLITS)
    print(f"wrote {out}: {sizes} samples, {stream['X_train'].shape[1]} features")
    return 0


if __name__ == "__main__":
    sys.exit(main())
