"""The benchmark registry: ``benchmark.name -> Benchmark`` (checks, feature count, array builder)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from memhead.registry import Registry


@dataclass(frozen=True)
class Benchmark:
    """How to check a benchmark's options, size its input before any data is read, and build it.

    ``build(cfg, device, progress)`` returns the arrays of the stream schema (see ``data.stream``).
    """

    check: Callable[[object], None]
    input_features: Callable[[object], int]
    build: Callable[[object, torch.device, bool], dict[str, np.ndarray]]
    # Options naming files or folders: made absolute against the launch directory before use.
    paths: tuple[str, ...] = ()
    # Classes known before any data is read (a lower bound for size checks).
    min_classes: int = 2


BENCHMARKS: Registry[Benchmark] = Registry("benchmark")


def _two_d(kind: str) -> Benchmark:
    def params(cfg) -> dict:
        return {k: v for k, v in cfg.items() if k not in ("name", "order")}

    checked: set[str] = set()  # parameter sets already generated without error (a grid repeats them)

    def check(cfg) -> None:
        from data.two_d import make_2d

        # Generating 2n points takes milliseconds; doing it here validates every parameter.
        key = repr((cfg.order.name, sorted(params(cfg).items())))
        if key not in checked:
            make_2d(kind, cfg.order.name, **params(cfg))
            checked.add(key)

    def build(cfg, device, progress) -> dict[str, np.ndarray]:
        from data.two_d import make_2d

        return make_2d(kind, cfg.order.name, **params(cfg))

    return Benchmark(check=check, input_features=lambda cfg: 2, build=build, min_classes=4)


def _features() -> Benchmark:
    from data.stream import check_npz_fits, load_npz, npz_feature_count

    def check(cfg) -> None:
        check_npz_fits(cfg.path)
        npz_feature_count(cfg.path)

    return Benchmark(
        check=check,
        input_features=lambda cfg: npz_feature_count(cfg.path),
        build=lambda cfg, device, progress: load_npz(cfg.path),
        paths=("path",),
    )


def _ns_imagenet() -> Benchmark:
    def module():
        # Imported on use: it pulls in torchvision.
        from data import ns_imagenet

        return ns_imagenet

    return Benchmark(
        check=lambda cfg: module().check(cfg),
        input_features=lambda cfg: module().input_features(cfg),
        build=lambda cfg, device, progress: module().build(cfg, device=device, progress=progress),
        paths=("root", "cache_dir"),
        min_classes=100,
    )


BENCHMARKS.register("modes")(_two_d("modes"))
BENCHMARKS.register("moons")(_two_d("moons"))
BENCHMARKS.register("features")(_features())
BENCHMARKS.register("ns_imagenet")(_ns_imagenet())
