"""How one config key is described and checked: `key(default, meaning, check)` and the checks the schema uses.

A schema field (config/schema.py) is a dataclass field whose metadata holds the key's meaning and an optional
check. `check_fields(section, prefix)` runs in each section's __post_init__: every value is coerced to its
field's type (ints pass for floats, lists for tuples) or refused, then range-checked; every error names the
dotted key and the override that fixes it.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

Check = Callable[[str, Any], None]
"""A check of one key's (typed) value: raises ConfigError naming the key."""


class ConfigError(ValueError):
    """A config file, config argument, override or setting that cannot be used."""


def key(default: Any, meaning: str, check: Check | None = None, what: str = "", follows: str = "") -> Any:
    """A schema field: its default, its meaning (one line or a few), an optional range/choice check, `what`
    the type error calls the expected value (default: the annotation's words), and the key whose value it
    `follows` in base_config() until set (a one-way link)."""
    return dataclasses.field(default=default, metadata={"meaning": meaning, "check": check, "what": what,
                                                        "follows": follows})


def about(meaning: str) -> dict[str, str]:
    """The metadata of a nested section or column map field: its meaning."""
    return {"meaning": meaning}


def fix(key_name: str, value: Any = None) -> str:
    """The override that sets key_name, with an example value when one is given (and says something)."""
    shown = "" if value is None else override_text(value)
    return f"--config.{key_name}" + (f"={shown}" if shown else "")


def override_text(value: Any) -> str:
    """A value as `--config.KEY=` takes it (tuples as a,b,c)."""
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


# ---- types -------------------------------------------------------------------------------------


def _type_words(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        element = typing.get_args(kind)[0]
        return "a tuple of " + {int: "integers", float: "numbers", str: "strings"}.get(element, str(element))
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_type_words(k) for k in typing.get_args(kind))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "None"}.get(kind, getattr(kind, "__name__", str(kind)))


class _Mismatch(Exception):
    pass


def _coerce(value: Any, kind: Any) -> Any:
    """value as `kind` (int, float, bool, str, None, tuple[T, ...], a union of those); _Mismatch if it is not."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _coerce(value, option)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is tuple:
        if not isinstance(value, (tuple, list)):
            raise _Mismatch
        return tuple(_coerce(item, typing.get_args(kind)[0]) for item in value)
    if kind is type(None) and value is None:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and number and isinstance(value, int):
        return int(value)
    if kind is float and number:
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise _Mismatch


def check_fields(section: Any, prefix: str) -> None:
    """Coerces and checks every field of a frozen section in place; nested column maps are checked here too
    (a nested section with its own prefix checked itself when it was built)."""
    hints = typing.get_type_hints(type(section))
    for field in dataclasses.fields(section):
        name, value = f"{prefix}{field.name}", getattr(section, field.name)
        if dataclasses.is_dataclass(value):
            if not hasattr(value, "PREFIX"):
                check_fields(value, f"{name}.")
            continue
        try:
            typed = _coerce(value, hints[field.name])
        except _Mismatch:
            what = field.metadata.get("what") or _type_words(hints[field.name])
            example = field.default if override_text(field.default) else None  # the default, when it says something
            hint = f"e.g. {fix(name, example)}" if example is not None else f"set {fix(name)}"
            raise ConfigError(f"Config key {name!r} is {value!r}; it must be {what} ({hint}).") from None
        object.__setattr__(section, field.name, typed)
        check = field.metadata.get("check")
        if check is not None:
            check(name, typed)


# ---- checks ------------------------------------------------------------------------------------


def at_least(least: int) -> Check:
    """An integer >= least."""
    def check(name: str, value: int) -> None:
        if value < least:
            raise ConfigError(f"Config key {name!r} is {value}; it must be >= {least} (set {fix(name)}).")
    return check


def rate(bound: float, strict: bool) -> Check:
    """A finite number > bound (strict: a learning rate) or >= bound (a weight)."""
    def check(name: str, value: float) -> None:
        if not math.isfinite(value) or (value <= bound if strict else value < bound):
            rule = f"a finite number {'>' if strict else '>='} {bound:g}"
            raise ConfigError(f"Config key {name!r} is {value}; it must be {rule} (set {fix(name)}).")
    return check


def finite(name: str, value: float) -> None:
    """A threshold: any finite number (<= 0 turns it off); nan compares false with everything, so the setting
    would silently do nothing."""
    if not math.isfinite(value):
        raise ConfigError(f"Config key {name!r} is {value}; it must be a finite number (<= 0 turns it off; "
                          f"set {fix(name)}).")


def one_of(choices: Sequence[str], note: str = "") -> Check:
    """One of the named choices (note: what else the key takes, said in the error)."""
    def check(name: str, value: str) -> None:
        if value not in choices:
            shown = ", ".join(map(repr, choices))
            raise ConfigError(f"Config key {name!r} is {value!r}; choose one of {shown}{note} (set {fix(name)}).")
    return check


def each(check: Check) -> Check:
    """The check applied to every element of a tuple."""
    def check_all(name: str, values: tuple) -> None:
        for value in values:
            check(name, value)
    return check_all


def regex_or(names: Sequence[str]) -> Check:
    """One of the names, or a valid regular expression."""
    def check(name: str, value: str) -> None:
        if value in names:
            return
        try:
            re.compile(value)
        except re.error as err:
            raise ConfigError(f"Config key {name!r} is {value!r}: neither {', '.join(names)} nor a valid regular "
                              f"expression ({err}).") from None
    return check


def named_by(validate: Callable[[Any], Any]) -> Check:
    """A check by a function of the code that uses the key (raises ValueError); the error names the key."""
    def check(name: str, value: Any) -> None:
        try:
            validate(value)
        except ValueError as err:
            raise ConfigError(f"Config key {name!r}: {err}") from None
    return check
