"""Typed dotted overrides (`--config.inner.lr=0.1`), config-file arguments and the command-line split.

Overrides are parsed by the type of the field they replace, so a typo in a key or a value fails at start-up
with a message that names the key, instead of hours into a run.

    apply_overrides(cfg, ["inner.lr=0.05", "perturb.layers=5,12"])
    spec, overrides = parse_cli_args(sys.argv[1:])
"""

from __future__ import annotations

import ast
import difflib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections
from ml_collections.config_dict import FieldReference

from beear_jax.config.checks import ConfigError

__all__ = ["apply_overrides", "flat_keys", "parse_cli_args", "parse_config_arg", "split_cli_args"]

_FLAG = "--config"
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1")
_FALSE_WORDS = ("false", "0")


# --- Overrides ---


def apply_overrides(
    config: ml_collections.ConfigDict, overrides: Sequence[str] | Mapping[str, Any]
) -> ml_collections.ConfigDict:
    """Sets dotted keys in place, each value parsed or checked against the type of its field.

    Strings are parsed by field type: int; float (ints accepted); bool (true/false/1/0, any case);
    str (verbatim); tuple/list (`1,2,3`, `[1,2,3]`, `(1,2,3)` or any Python literal, each element
    typed like the current elements, empty text = empty); FieldReference fields (placeholders) also
    take `none`/`null` for None. Fields whose value is None take a Python literal, else the string.
    Mapping values that are not strings are type-checked instead of parsed.

    Returns:
      `config`, for chaining.

    Raises:
      ConfigError: an unknown key (with the closest existing keys) or a value that does not fit.
    """
    if isinstance(overrides, Mapping):
        items = [(_strip_flag(str(k)), v) for k, v in overrides.items()]
    elif isinstance(overrides, str):
        raise ConfigError(f"Overrides must be a list of 'key=value' strings or a dict, not the string {overrides!r}.")
    else:
        items = [_split_override(text) for text in overrides]
    for key, value in items:
        _set(config, key, value)
    return config


def _strip_flag(key: str) -> str:
    return key[len(_FLAG) + 1 :] if key.startswith(_FLAG + ".") else key


def _split_override(text: str) -> tuple[str, str]:
    key, sep, value = _strip_flag(text).partition("=")
    if not sep or not key:
        raise ConfigError(f"Override {text!r} is not of the form key=value (for example inner.lr=0.1).")
    return key.strip(), value


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All leaf keys of a config as dotted paths (in ConfigDict iteration order: sorted by name)."""
    keys = []
    for name, value in config.items(preserve_field_references=True):
        resolved = value.get() if isinstance(value, FieldReference) else value
        if isinstance(resolved, ml_collections.ConfigDict):
            keys.extend(flat_keys(resolved, f"{prefix}{name}."))
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _closest_keys(config: ml_collections.ConfigDict, key: str, n: int = 3) -> list[str]:
    """Existing keys that look like `key`: whole-path matches first, then same-looking leaf names."""
    candidates = flat_keys(config)
    found = difflib.get_close_matches(key, candidates, n=n, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    by_leaf: dict[str, list[str]] = {}
    for candidate in candidates:
        by_leaf.setdefault(candidate.rsplit(".", 1)[-1], []).append(candidate)
    for close_leaf in difflib.get_close_matches(leaf, list(by_leaf), n=n, cutoff=0.75):
        found.extend(c for c in by_leaf[close_leaf] if c not in found)
    return found[: max(n, 1)]


def _unknown_key_error(config: ml_collections.ConfigDict, key: str) -> ConfigError:
    suggestions = _closest_keys(config, key)
    hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
    return ConfigError(f"Unknown config key {key!r}.{hint}")


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
    """Finds the field `key` (dotted), converts `value` to its type and assigns it."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"Malformed config key {key!r}.")
    parent = config
    for depth, part in enumerate(parts[:-1]):
        if part not in parent:
            raise _unknown_key_error(config, key)
        child = parent[part]
        if not isinstance(child, ml_collections.ConfigDict):
            where = ".".join(parts[: depth + 1])
            raise ConfigError(f"Config key {key!r}: {where!r} holds a {type(child).__name__}, not a group of keys.")
        parent = child
    leaf = parts[-1]
    if leaf not in parent:
        raise _unknown_key_error(config, key)
    field = _raw_field(parent, leaf)
    current = parent[leaf]
    if isinstance(current, ml_collections.ConfigDict):
        members = ", ".join(f"{key}.{k}" for k in list(current.keys())[:4])
        raise ConfigError(f"Config key {key!r} is a group of keys ({members}, ...); override its fields one by one.")
    field_type = field.get_type() if isinstance(field, FieldReference) else type(current)
    new_value = _convert(key, value, field_type, current, none_ok=isinstance(field, FieldReference))
    try:
        parent[leaf] = new_value
    except (TypeError, ValueError) as e:
        raise ConfigError(f"Config key {key!r}: cannot set {new_value!r}: {e}") from e


def _raw_field(parent: ml_collections.ConfigDict, leaf: str) -> Any:
    return dict(parent.items(preserve_field_references=True))[leaf]


class _Mismatch(Exception):
    """A value that does not fit a type; the optional argument says why."""


def _convert(key: str, value: Any, field_type: type, current: Any, none_ok: bool) -> Any:
    """`value` (text to parse, or a typed value to check) as the type of the field `key`."""
    if none_ok and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
        return None
    if field_type is type(None):
        return _auto_value(value) if isinstance(value, str) else value
    expected = field_type.__name__
    if value is None:
        raise ConfigError(
            f"Config key {key!r} expects {expected} and cannot be None (only FieldReference/placeholder fields can)."
        )
    try:
        if field_type in (tuple, list):
            element = _element_type(current)
            expected += f" of {element.__name__}" if element else ""
            return _sequence(value, field_type, element)
        return _scalar(value, field_type)
    except _Mismatch as e:
        why = f" ({e.args[0]})" if e.args else ""
        raise ConfigError(f"Config key {key!r} expects {expected}, got {value!r}{why}.") from None


def _scalar(value: Any, field_type: type) -> Any:
    """Parses text or checks a typed value; ints pass for floats, bool takes true/false/1/0 only."""
    if isinstance(value, str) and field_type is not str:
        text = value.strip()
        if field_type is bool:
            if text.lower() in _TRUE_WORDS + _FALSE_WORDS:
                return text.lower() in _TRUE_WORDS
            raise _Mismatch("use true/false/1/0")
        if field_type in (int, float):
            try:
                return int(text, 10) if field_type is int else float(text)
            except ValueError:
                raise _Mismatch() from None
        value = _auto_value(value)
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if field_type is bool and isinstance(value, int) and value in (0, 1):
        return bool(value)
    if field_type is float and is_number:
        return float(value)
    if field_type is int and is_number and isinstance(value, int):
        return value
    if field_type not in (bool, int, float) and isinstance(value, field_type):
        return value
    raise _Mismatch()


def _sequence(value: Any, field_type: type, element: type | None) -> tuple[Any, ...] | list[Any]:
    """`1,2,3`, `[1,2,3]`, `(1,2,3)`, a Python literal, a bare `5`, or a typed tuple/list."""
    if isinstance(value, str):
        items = _split_sequence(value, element)
    elif isinstance(value, (tuple, list)):
        items = list(value)
    else:
        raise _Mismatch("a tuple or list")
    if element is not None:
        converted = []
        for item in items:
            try:
                converted.append(_scalar(item, element))
            except _Mismatch:
                raise _Mismatch(f"element {item!r} is not {element.__name__}") from None
        items = converted
    return tuple(items) if field_type is tuple else items


def _split_sequence(text: str, element: type | None) -> list[Any]:
    stripped = text.strip()
    if not stripped:
        return []
    literal = _auto_value(stripped)
    if isinstance(literal, (tuple, list)) and (element is not str or all(isinstance(x, str) for x in literal)):
        return list(literal)
    if literal is not stripped and "," not in stripped and element is not str:
        return [literal]  # A single bare value: "5" -> (5,).
    if stripped[0] + stripped[-1] in ("[]", "()"):
        stripped = stripped[1:-1]
    parts = [part.strip() for part in stripped.split(",")] if stripped.strip() else []
    return parts if element is not None else [_auto_value(part) for part in parts]


def _element_type(current: Any) -> type | None:
    """The one element type of a tuple/list field (int+float -> float), or None when unknown/mixed."""
    types = {type(x) for x in current} if isinstance(current, (tuple, list)) else set()
    if types == {int, float}:
        return float
    return types.pop() if len(types) == 1 else None


def _auto_value(text: str) -> Any:
    """A Python literal if `text` is one (true/false/none/null also accepted), else `text` itself."""
    stripped = text.strip()
    lowered = stripped.lower()
    if lowered in _NONE_WORDS:
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


# --- Config arguments (the text after `file.py:`) ---


def parse_config_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses the `get_config(arg)` string `name=value,flag,...` against typed defaults.

    A bare name is `name=true`. Values are typed like the defaults (same rules as overrides); an
    unknown name is an error. For use inside config files:

        def get_config(arg=None):
            arg = parse_config_arg(arg, quick=False, layer=9)
    """
    result = ml_collections.ConfigDict(defaults)
    for part in (arg or "").split(","):
        if not part.strip():
            continue
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in defaults:
            close = difflib.get_close_matches(name, list(defaults), n=3)
            hint = f" Did you mean: {', '.join(close)}?" if close else ""
            known = ", ".join(defaults) or "none"
            raise ConfigError(f"Unknown config argument {name!r} (known: {known}).{hint}")
        _set(result, name, value if sep else "true")
    return result.lock()


# --- Command line ---


def split_cli_args(argv: Sequence[str]) -> tuple[str | None, list[str], list[str]]:
    """Splits argv into (config spec, overrides, other args).

    Recognised: `--config FILE[:arg]`, `--config=FILE[:arg]`, `--config.a.b=v`, `--config.a.b v`.
    Overrides come back as `a.b=v`. Everything else, and everything after a bare `--`, is left in
    the third list in its original order.
    """
    spec: str | None = None
    overrides: list[str] = []
    rest: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        if arg == _FLAG or arg.startswith(_FLAG + "="):
            if arg == _FLAG:
                if i + 1 >= len(args):
                    raise ConfigError("--config needs a value: --config path/to/config.py[:arg].")
                given = args[i + 1]
                i += 2
            else:
                given = arg[len(_FLAG) + 1 :]
                i += 1
            if spec is not None:
                raise ConfigError(f"--config given twice ({spec!r} and {given!r}); name one config file.")
            spec = given
            continue
        if arg.startswith(_FLAG + "."):
            key, sep, value = arg[len(_FLAG) + 1 :].partition("=")
            if not key:
                raise ConfigError(f"Malformed override {arg!r}: expected --config.key=value.")
            if not sep:
                if i + 1 >= len(args):
                    raise ConfigError(f"Override {arg!r} needs a value: {arg}=VALUE or {arg} VALUE.")
                value = args[i + 1]
                i += 1
            overrides.append(f"{key}={value}")
            i += 1
            continue
        rest.append(arg)
        i += 1
    return spec, overrides, rest


def parse_cli_args(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Extracts (config spec, overrides) from argv; other arguments are ignored (see `split_cli_args`)."""
    spec, overrides, _ = split_cli_args(argv)
    return spec, overrides
