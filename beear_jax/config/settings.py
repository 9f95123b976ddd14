"""The config turned into typed settings once, at the entry point: `settings_from_config(cfg) -> RunSettings`.

    settings = settings_from_config(load_config("configs/tiny.py", ["inner.lr=0.05"]))
    settings.inner.lr  # 0.05, a float, checked > 0

Every key is listed, typed, range-checked and explained in config/schema.py; this module walks a ConfigDict
(or a plain dict of one) along that schema, refusing a key the schema lacks or a missing one, and builds the
frozen sections (each checks its keys on construction, naming the key and the override that fixes it). The
way back, `config_of(settings)`, gives the ConfigDict that base_config() is and that runs store.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

import ml_collections

from beear_jax.config.checks import ConfigError
from beear_jax.config.schema import (
    DataSection,
    EvalSection,
    InnerSection,
    MeshSection,
    ModelSection,
    OuterSection,
    PerturbSection,
    PlantSection,
    RunSettings,
    ScanSection,
    StopSection,
)

__all__ = [
    "ConfigError", "DataSection", "EvalSection", "InnerSection", "MeshSection", "ModelSection", "OuterSection",
    "PerturbSection", "PlantSection", "RunSettings", "ScanSection", "StopSection", "absolute_settings",
    "config_of", "link_followers", "schema_keys", "settings_dict", "settings_from_config",
]


def _nested_type(field: dataclasses.Field) -> type | None:
    """The dataclass a field holds (a section or a column map), or None for a plain key."""
    if field.default_factory is dataclasses.MISSING:
        return None
    value = field.default_factory()
    return type(value) if dataclasses.is_dataclass(value) else None


def schema_keys(section: type = RunSettings, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (column maps' columns included), in schema order."""
    keys: list[str] = []
    for field in dataclasses.fields(section):
        nested = _nested_type(field)
        keys.extend(schema_keys(nested, f"{prefix}{field.name}.") if nested else [f"{prefix}{field.name}"])
    return keys


def _build(section: type, node: Any, prefix: str) -> Any:
    """section(**values of node), nested sections built first; unknown or missing keys are named."""
    where = prefix[:-1] or "the config"
    if not isinstance(node, (ml_collections.ConfigDict, Mapping)):
        raise ConfigError(f"Config key {where!r} is {node!r}; it must be a group of keys (build get_config() on "
                          "beear_jax.config.defaults.base_config()).")
    fields = {f.name: f for f in dataclasses.fields(section)}
    given = list(node.keys())
    unknown = [name for name in given if name not in fields]
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(prefix + c for c in close)}?" if close else ""
        raise ConfigError(f"Unknown config key {prefix + unknown[0]!r} (no such key in beear_jax/config/schema.py)."
                          f"{hint}")
    missing = [f"{prefix}{name}" for name in fields if name not in given]
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ConfigError(f"the config lacks the key(s) {shown}; build get_config() on "
                          "beear_jax.config.defaults.base_config() and change only what differs.")
    values = {}
    for name, field in fields.items():
        nested = _nested_type(field)
        values[name] = _build(nested, node[name], f"{prefix}{name}.") if nested else node[name]
    return section(**values)


def settings_from_config(cfg: ml_collections.ConfigDict | Mapping[str, Any] | RunSettings) -> RunSettings:
    """The typed, checked settings of a config (a RunSettings passes through unchanged).

    Raises:
      ConfigError: a key the schema lacks (with the closest ones), a missing key, a value of the wrong type
        or out of its range, or keys that do not fit together; the message names the key and its override.
    """
    if isinstance(cfg, RunSettings):
        return cfg
    return _build(RunSettings, cfg, "")


def _config_dict(section: Any) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({
        f.name: _config_dict(value) if dataclasses.is_dataclass(value := getattr(section, f.name)) else value
        for f in dataclasses.fields(section)})


def config_of(settings: RunSettings) -> ml_collections.ConfigDict:
    """The settings as an (unlocked) ConfigDict with every key: what a config file returns and a run stores."""
    return _config_dict(settings)


def link_followers(config: ml_collections.ConfigDict, section: type = RunSettings, prefix: str = "") -> None:
    """Makes each key whose schema field `follows` another (eval.trigger follows plant.trigger) a one-way link
    to it in `config`: it takes the other's value until set itself."""
    for field in dataclasses.fields(section):
        nested = _nested_type(field)
        if nested:
            link_followers(config, nested, f"{prefix}{field.name}.")
        elif field.metadata.get("follows"):
            *leader_groups, leader = field.metadata["follows"].split(".")
            *groups, leaf = f"{prefix}{field.name}".split(".")
            source, target = config, config
            for part in leader_groups:
                source = source[part]
            for part in groups:
                target = target[part]
            target[leaf] = source.get_oneway_ref(leader)


def settings_dict(settings: RunSettings) -> dict[str, Any]:
    """A plain, JSON-able dict of the settings (tuples as lists): config.json, checkpoint metadata, reports."""
    from beear_jax.config.loading import config_to_dict

    return config_to_dict(config_of(settings))


def absolute_settings(settings: RunSettings) -> RunSettings:
    """The settings with the path keys made absolute (config/loading.absolute_paths), so that what a run stores
    names the same files from any directory."""
    from beear_jax.config.loading import absolute_paths

    return settings_from_config(absolute_paths(config_of(settings)))

