"""Population runs: the runs of a sweep that share a stream, trained together as one batched model.

See ``README.md`` (Populations). Entry points: :func:`memhead.population.run.run_population` and the
Hydra launcher ``hydra/launcher=population`` (``hydra_plugins/memhead_population``).
"""
