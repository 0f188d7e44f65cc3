"""Composing a grid's job configs once per shape: a job that differs from one already composed only in
the values of plain options (``key=value`` where ``key`` is not a config group) is that job's config with
those values set, exactly as Hydra would compose it.

Hydra composes every job from the config files (about 0.1 s a job, and the basic sweeper composes each
job twice: to validate the batch, then in the launcher), which for a 640-run 2-D grid costs more than
training it. A grid's jobs repeat a few *shapes* (their config-group choices and other overrides) with
many values, so :class:`MemberComposer` composes the first job of each shape through Hydra and derives
the others: Hydra applies a plain ``key=value`` override by ``OmegaConf.update(cfg, key, value,
merge=True)`` after composing the defaults, and records it in ``hydra.overrides.task`` and
``hydra.job.override_dirname``; an option that is not a config group cannot change the defaults list.
Values that would merge (dicts, lists) and ``hydra.*`` options stay part of the shape. A job whose
derivation fails is composed by Hydra, so it fails with Hydra's own error. The tests hold derived
configs equal to Hydra's on every job of the project's sweeps.
"""

from __future__ import annotations

import pickle
import re

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf


def is_value_override(override: Override, is_group) -> bool:
    """A plain ``key=<scalar>`` assignment of a task option that is not a config group (no sweep, no
    +/++/~, no package): Hydra applies it to the composed config without touching the defaults list."""
    return (
        override.package is None
        and not override.is_add()
        and not override.is_force_add()
        and not override.is_delete()
        and not override.is_sweep_override()
        and not override.is_hydra_override()
        and not isinstance(override.value(), (dict, list))
        and not is_group(override.key_or_group)
    )


def override_dirname(task: list[Override], cfg: DictConfig) -> str:
    """``hydra.job.override_dirname`` as Hydra forms it: sorted task overrides, minus excluded keys."""
    options = cfg.hydra.job.config.override_dirname
    lines = sorted(o.input_line for o in task if o.key_or_group not in options.exclude_keys)
    return re.sub("=", options.kv_sep, options.item_sep.join(lines))


class MemberComposer:
    """Wraps a Hydra config loader: ``load_sweep_config`` composes each shape once, the rest derive."""

    def __init__(self, loader) -> None:
        self.loader = loader
        self.parser = OverridesParser.create(config_loader=loader)
        self.templates: dict[tuple, bytes] = {}  # each shape's first config, pickled
        self.groups: dict[str, bool] = {}  # whether a key names a config group
        self.composed = 0  # jobs composed by Hydra (the others derived)
        self.derived = 0
        # Configs handed to the sweeper's validation pass, kept for the launcher (see ``take``).
        self.validated: dict[tuple[str, ...], DictConfig] = {}

    def __getattr__(self, name):  # every other method is the wrapped loader's
        if name == "loader":  # not set yet (unpickling): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        cfg = self._compose(master_config, sweep_overrides)
        self.validated[tuple(sweep_overrides)] = cfg
        return cfg

    def take(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """The launcher's config of a job: the one the sweeper's validation pass composed (which only
        checks that it composes, and drops it), else a new one."""
        cfg = self.validated.pop(tuple(sweep_overrides), None)
        return self._compose(master_config, sweep_overrides) if cfg is None else cfg

    def _compose(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        parsed = self.parser.parse_overrides(list(sweep_overrides))
        values = [is_value_override(o, self._is_group) for o in parsed]
        shape = tuple(("value", o.key_or_group) if v else o.input_line for o, v in zip(parsed, values))
        template = self.templates.get(shape) if self._derivable(parsed, values) else None
        if template is not None:
            try:
                cfg = self._derive(template, master_config, parsed, values)
                self.derived += 1
                return cfg
            except Exception:  # e.g. a value of the wrong type: Hydra's composition reports it
                pass
        cfg = self.loader.load_sweep_config(master_config, list(sweep_overrides))
        self.templates.setdefault(
            shape, pickle.dumps(cfg)
        )  # a pickled copy loads in a third of a deepcopy's time
        self.composed += 1
        return cfg

    def _derivable(self, parsed: list[Override], values: list[bool]) -> bool:
        """Whether a job's other overrides are config-group choices or ``hydra.*`` options only. Hydra
        applies the rest (adds, deletes, a dict given to a group's key) in order with the values, so
        they may interact with a value set before them: such jobs compose."""
        return all(
            v or o.is_hydra_override() or (self._is_group(o.key_or_group) and not isinstance(o.value(), dict))
            for o, v in zip(parsed, values)
        )

    def _is_group(self, key: str) -> bool:
        if key not in self.groups:
            self.groups[key] = self.loader.repository.group_exists(key)
        return self.groups[key]

    @staticmethod
    def _derive(template: bytes, master_config: DictConfig, parsed: list[Override], values: list[bool]):
        cfg = pickle.loads(template)
        for override, is_value in zip(parsed, values):
            if is_value:  # in the jobs' order, as Hydra applies them
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        task = [o for o in parsed if not o.is_hydra_override()]
        cfg.hydra.overrides.task = [o.input_line for o in task]
        cfg.hydra.job.override_dirname = override_dirname(task, cfg)
        OmegaConf.copy_cache(from_config=master_config, to_config=cfg)
        return cfg
