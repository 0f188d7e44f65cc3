"""Hydra launcher ``hydra/launcher=population``: a sweep's runs that share a stream train as populations."""
