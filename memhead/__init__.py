"""Memory Heads for continual learning: the layer, the online protocol and its metrics."""

__all__ = ["MemoryHead"]


def __getattr__(name):
    # Lazy, so that `import memhead.metrics` does not pay for torch-heavy modules.
    if name == "MemoryHead":
        from memhead.layer import MemoryHead

        return MemoryHead
    raise AttributeError(f"module 'memhead' has no attribute {name!r}")
