"""Unknown config keys, however they are spelled, fail at start with the nearest valid keys.

Hydra's struct mode refuses an unknown `key=value` override itself, but suggests `+key=value`; and a `+key` (or
`++key`) override adds any key to a structured config, so `+trainer.max_stepz=3` was silently accepted. Both
are checked here against the schema, the `TrainConfig` dataclass tree: `check_overrides` before Hydra
composes (so a typo gets "did you mean" rather than Hydra's `+`), `check_known_keys` on the composed tree
(keys added by `+` overrides or recipe files). Fields typed as dicts (`parallel.deepspeed.overrides`) take
any key below them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig

__all__ = ["check_known_keys", "check_overrides", "schema_keys"]


def _without_none(hint: Any) -> Any:
    """`X` of an optional `X | None` field (a dataclass such as model.rope_scaling may be null)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def schema_keys() -> tuple[frozenset[str], frozenset[str]]:
    """(every dotted key of the schema, the dict-typed keys below which any key is allowed). `model.*` are the
    keys of every registered family's config class (which family a run uses is known only once composed)."""
    from treadle.models import load_builtin_families

    families = tuple(spec.config_cls for spec in load_builtin_families())
    return _schema_keys(families)


@functools.cache
def _schema_keys(families: tuple[type, ...]) -> tuple[frozenset[str], frozenset[str]]:
    from treadle.train.config import TrainConfig

    keys: set[str] = set()
    open_keys: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name.startswith("_"):
                continue
            key = f"{prefix}{f.name}"
            keys.add(key)
            hint = _without_none(hints[f.name])
            origin = typing.get_origin(hint)
            if key == "model":
                for family in families:
                    walk(family, f"{key}.")
            elif dataclasses.is_dataclass(hint):
                walk(hint, f"{key}.")
            elif hint is dict or origin is dict:
                open_keys.add(key)

    walk(TrainConfig, "")
    return frozenset(keys), frozenset(open_keys)


def _known(key: str) -> bool:
    keys, open_keys = schema_keys()
    return key in keys or any(key.startswith(f"{k}.") for k in open_keys)


def _unknown(key: str, how: str) -> ValueError:
    keys, _ = schema_keys()
    parent, _, name = key.rpartition(".")
    if parent == "" or parent in keys:
        siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
        close = [siblings[n] for n in difflib.get_close_matches(name, list(siblings), n=2, cutoff=0.6)]
        where = f"the keys of {parent}" if parent else "the top-level keys"
        fallback = f"{where} are {', '.join(sorted(siblings))}"
    else:
        close = difflib.get_close_matches(key, list(keys), n=2, cutoff=0.8)
        fallback = "see configs/train.yaml and its groups for the keys"
    hint = f"did you mean {' or '.join(close)}?" if close else fallback
    return ValueError(f"{key} ({how}) is not a config key; {hint}")


def _config_groups(config_dir: Path) -> set[str]:
    return {p.name for p in config_dir.iterdir() if p.is_dir()}


def check_overrides(overrides: Iterable[str], config_dir: Path) -> None:
    """Raise ValueError for the first command-line override whose key is not in the schema (group choices
    such as `model=tiny` or `+config=debug/tiny`, and `hydra.*` settings, are Hydra's to check)."""
    groups = _config_groups(config_dir)
    candidates = [o for o in overrides if not o.startswith("-") and ("=" in o or o.startswith("~"))]
    for override in OverridesParser.create().parse_overrides(candidates):
        key = override.key_or_group
        if key in groups or "/" in key or key.split(".")[0] == "hydra":
            continue
        if not _known(key):
            raise _unknown(key, f"from the override {override.input_line}")


def check_known_keys(raw: DictConfig) -> None:
    """Raise ValueError for the first key of the composed tree that the schema does not have."""

    def walk(node: DictConfig, prefix: str) -> None:
        for name in node:
            key = f"{prefix}{name}"
            if not _known(key):
                raise _unknown(key, "added to the composed config")
            child = node._get_node(name)
            if isinstance(child, DictConfig) and key not in schema_keys()[1]:
                walk(child, f"{key}.")

    walk(raw, "")
