"""``OmegaConf.to_yaml``'s text, written by libyaml's C emitter wherever that gives the same text.

A population writes three ``.hydra/`` files for each member, as Hydra's ``run_job`` does; PyYAML's
Python emitter spends about 2 ms on each, more than a 2-D member's training. libyaml emits the same
text except where it folds a long double-quoted scalar, a style the emitter picks only for strings that
single quotes cannot hold (control and non-ASCII characters, line breaks beside spaces) and for
multi-line keys, and where it decides whether a key is simple (empty keys, keys of 123 to 128
characters). A config whose strings are all printable ASCII (line breaks allowed in values) and
single-quotable, with keys of 1 to 122 characters, goes through the C emitter; any other through
``OmegaConf.to_yaml`` itself. The tests hold the two equal on the project's sweeps and on random configs.
"""

from __future__ import annotations

import functools

import yaml
from omegaconf import OmegaConf

# Printable ASCII, and line breaks in values only.
_VALUE_CHARS = frozenset(map(chr, range(0x20, 0x7F))) | {"\n"}
_KEY_CHARS = frozenset(map(chr, range(0x20, 0x7F)))
# PyYAML writes a key as ``? key`` (complex) from 128 characters with its 5-character tag counted, and an
# empty key so too; libyaml counts no tag and keeps an empty key simple. Keys in between agree.
_SIMPLE_KEY_MAX = 122


@functools.cache
def _dumper() -> type:
    # OmegaConf's dumper quotes strings that would read back as booleans or numbers; the same
    # representer on libyaml's dumper (the test of this module fails if OmegaConf moves it).
    from omegaconf._utils import get_omega_conf_dumper

    python_dumper = get_omega_conf_dumper()
    dumper = type("OmegaConfCDumper", (yaml.CDumper,), {})
    dumper.add_representer(str, python_dumper.str_representer)
    return dumper


@functools.cache
def _analyzer() -> yaml.emitter.Emitter:
    return yaml.emitter.Emitter(None, allow_unicode=True)


@functools.lru_cache(maxsize=65536)
def _same_in_both(text: str, key: bool) -> bool:
    """Whether both emitters write ``text`` alike: never double quoted, so never folded differently."""
    if not set(text) <= (_KEY_CHARS if key else _VALUE_CHARS):
        return False
    if key and not 0 < len(text) <= _SIMPLE_KEY_MAX:
        return False
    return _analyzer().analyze_scalar(text).allow_single_quoted


def _c_safe(node) -> bool:
    if isinstance(node, dict):
        return all((not isinstance(k, str) or _same_in_both(k, True)) and _c_safe(v) for k, v in node.items())
    if isinstance(node, list):
        return all(_c_safe(v) for v in node)
    return not isinstance(node, str) or _same_in_both(node, False)


def to_yaml(cfg) -> str:
    """``OmegaConf.to_yaml(cfg)`` (unresolved, keys in order)."""
    if not yaml.__with_libyaml__:
        return OmegaConf.to_yaml(cfg)
    container = OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)
    if not _c_safe(container):
        return OmegaConf.to_yaml(cfg)
    return yaml.dump(
        container, default_flow_style=False, allow_unicode=True, sort_keys=False, Dumper=_dumper()
    )
