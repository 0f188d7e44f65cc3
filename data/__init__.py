"""Benchmark streams: the 2-D MODES/MOONS generator, NS-ImageNet features and feature files."""
