"""Thin explicit registries: ``name -> builder``, names normalised in one place."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration the run cannot accept; its message is one line naming the option."""


def normalise(name: str) -> str:
    return str(name).strip().lower().replace("-", "_")


class Registry(Generic[T]):
    """A named table of builders. Unknown names raise :class:`ConfigError` listing the known ones.

    Example::

        MODELS = Registry("model")

        @MODELS.register("lp")
        def build_lp(cfg, in_features, num_classes): ...
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        key = normalise(name)

        def add(item: T) -> T:
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = item
            return item

        return add

    def get(self, name: str) -> T:
        key = normalise(name)
        if key not in self._items:
            raise ConfigError(f"{self.kind}={name!r} is unknown; known: {', '.join(self.names())}")
        return self._items[key]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return normalise(str(name)) in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
