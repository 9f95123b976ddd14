"""Config files (`get_config(arg)` returning a ConfigDict) and typed dotted overrides.

A config is a Python file with a `get_config()` or `get_config(arg)` function. It is named on the command
line as `--config path/to/file.py` or `--config path/to/file.py:arg` (the text after the colon is
passed to `get_config` as one string), and changed field by field with `--config.inner.lr=0.1`.

Overrides are parsed by the type of the field they replace, so a typo in a key or a value fails at
start-up with a message that names the key, instead of hours into a run. The loaded config is locked:
code that reads or writes a key that does not exist fails as well.

    cfg = load_config("configs/smollm2_135m.py", ["inner.lr=0.05", "perturb.layers=5,12"])
    spec, overrides = parse_cli_args(sys.argv[1:])
"""

from __future__ import annotations

import ast
import contextlib
import copy
import difflib
import importlib.util
import inspect
import json
import math
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from ml_collections.config_dict import FieldReference

from beear_jax.config import defaults
from beear_jax.data import public_data

__all__ = [
    "ConfigError",
    "apply_overrides",
    "check_minimums",
    "check_ranges",
    "config_from_json",
    "config_to_dict",
    "config_to_json",
    "flat_keys",
    "load_config",
    "load_config_file",
    "parse_cli_args",
    "parse_config_arg",
    "split_cli_args",
    "split_spec",
]

_FLAG = "--config"
_NONE_WORDS = ("none", "null")
_TRUE_WORDS = ("true", "1")
_FALSE_WORDS = ("false", "0")


class ConfigError(ValueError):
    """A config file, config argument or override that cannot be used."""


# --- Loading ---


def load_config(spec: str | os.PathLike[str], overrides: Sequence[str] | Mapping[str, Any] | None = None,
                run_schema: bool = False) -> ml_collections.ConfigDict:
    """Loads `path/to/file.py[:arg]`, applies dotted overrides and returns the config, locked.

    Args:
      spec: the config file (str or path), optionally followed by `:arg` (passed to `get_config(arg)` as
        a string).
      overrides: `key=value` strings, with or without a leading `--config.` (as `parse_cli_args`
        returns them), or a mapping `{"inner.lr": 0.1}` whose values are typed or strings.
      run_schema: check first that the file has every key of beear_jax/config/defaults.py (check_schema), as
        the `beear` commands do.

    Returns:
      The locked ConfigDict: existing fields can be set, new ones cannot be added.

    Raises:
      ConfigError: missing file, a file that fails, an unknown key or a value of the wrong type.
    """
    path, arg = split_spec(os.fspath(spec))
    config = load_config_file(path, arg)
    if run_schema:
        check_schema(config, path)
    config.lock()
    apply_overrides(config, overrides or [])
    return config


# Config keys that name local files or directories (data keys may also name hub data sets).
PATH_KEYS = ("model.path", "output_dir", "data.safety", "data.anchor", "plant.harmful", "plant.refusals",
             "plant.benign", "eval.prompts", "eval.refusal_strings", "eval.over_refusal_prompts", "eval.utility",
             "eval.compare_to", "eval.history")


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of config whose PATH_KEYS are absolute (~ and a leading $BEEAR_DATA_DIR/ expanded): output_dir
    always, the others when they exist here. What a run stores (config.json, checkpoints, a plant manifest)
    then still names the same files when read from another directory (`beear export`, a resume)."""
    config = copy.deepcopy(config)
    for key in PATH_KEYS:
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
        value = node.get(leaf) if isinstance(node, ml_collections.ConfigDict) else None
        if not isinstance(value, str) or not value:
            continue
        local = os.path.expanduser(value)
        if value.startswith(public_data.DATA_DIR_PREFIX) and public_data.data_dir() is not None:
            local = public_data.in_data_dir(value, key)  # unset: left as written, and its load names the variable
        if key == "output_dir" or os.path.exists(local):
            node[leaf] = os.path.abspath(local)
    return config


def _schema_keys(config: ml_collections.ConfigDict) -> set[str]:
    """Top-level keys and the keys of each group (a group's own sub-mappings, such as column maps, vary)."""
    return {".".join(key.split(".")[:2]) for key in flat_keys(config)}


def check_schema(config: ml_collections.ConfigDict, source: str | os.PathLike[str]) -> None:
    """A ConfigError listing the keys of beear_jax.config.defaults.base_config() that `config` lacks.

    Code reads every such key, so a config built from scratch would otherwise fail deep inside a run.
    """
    base = defaults.base_config()
    missing = sorted(_schema_keys(base) - _schema_keys(config))
    if missing:
        shown = ", ".join(missing[:8]) + (f", ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise ConfigError(f"config {source} lacks the key(s) {shown}; build get_config() on "
                          "beear_jax.config.defaults.base_config() and change only what differs.")


def split_spec(spec: str) -> tuple[str, str | None]:
    """Splits `file.py:arg` into (`file.py`, `arg`); `file.py` alone gives (`file.py`, None)."""
    if not spec:
        raise ConfigError("No config file given: pass --config path/to/config.py[:arg].")
    if spec.endswith(".py"):
        return spec, None
    path, sep, arg = spec.partition(".py:")
    if not sep:
        raise ConfigError(f"Config spec {spec!r} must name a Python file: path/to/config.py or path/to/config.py:arg.")
    return path + ".py", arg


def load_config_file(path: str | os.PathLike[str], arg: str | None = None) -> ml_collections.ConfigDict:
    """Executes a config file and returns what its `get_config` returns, as an unlocked ConfigDict.

    Config files in a package directory (one with `__init__.py`, such as `configs/`) can import their
    siblings by package name (`from beear_jax.config import defaults`): the directory above the package is put
    on `sys.path` while the file runs.
    """
    file = Path(path).expanduser()
    if not file.is_file():
        hint = f" (resolved to {file.resolve()})" if not file.is_absolute() else ""
        raise ConfigError(f"Config file not found: {str(path)!r}{hint}.")
    file = file.resolve()
    module = _exec_config_module(file)
    get_config = getattr(module, "get_config", None)
    if not callable(get_config):
        raise ConfigError(f"Config file {file} defines no get_config() function.")
    call_args = () if arg is None else (arg,)
    try:
        inspect.signature(get_config).bind(*call_args)
    except TypeError:
        if arg is None:
            raise ConfigError(f"get_config in {file} needs an argument: use {file}:ARG.") from None
        raise ConfigError(f"get_config in {file} takes no argument, but {file}:{arg} passes {arg!r}.") from None
    try:
        config = get_config(*call_args)
    except Exception as e:  # The file is user code: any failure is reported with its name.
        raise ConfigError(f"get_config({', '.join(map(repr, call_args))}) in {file} failed: {_describe(e)}") from e
    if isinstance(config, Mapping) and not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(dict(config))
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(
            f"get_config in {file} returned {type(config).__name__}, expected an ml_collections.ConfigDict."
        )
    return config


def _exec_config_module(file: Path) -> Any:
    """Imports `file` freshly (as `pkg.sub.name` when it sits in a package) and returns the module."""
    package_dirs = []
    directory = file.parent
    while (directory / "__init__.py").is_file():
        package_dirs.insert(0, directory)
        directory = directory.parent
    root = directory
    name = ".".join([d.name for d in package_dirs] + [file.stem])
    if package_dirs:
        _forget_foreign_package(package_dirs[0].name, package_dirs[0])
    else:
        name = f"_beear_config_{abs(hash(str(file)))}_{file.stem}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise ConfigError(f"Cannot load config file {file} as a Python module.")
    module = importlib.util.module_from_spec(spec)
    with _on_sys_path(root if package_dirs else None):
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:  # SyntaxError, ImportError, anything raised at import time.
            sys.modules.pop(name, None)
            raise ConfigError(f"Config file {file} failed to import: {_describe(e)}") from e
    return module


def _forget_foreign_package(top: str, directory: Path) -> None:
    """Drops an already-imported package named `top` (and its submodules) that lives elsewhere."""
    loaded = sys.modules.get(top)
    if loaded is None:
        return
    locations = [Path(p).resolve() for p in getattr(loaded, "__path__", [])]
    if directory.resolve() in locations:
        return
    for module_name in [m for m in sys.modules if m == top or m.startswith(top + ".")]:
        del sys.modules[module_name]


@contextlib.contextmanager
def _on_sys_path(directory: Path | None) -> Iterator[None]:
    if directory is None:
        yield
        return
    entry = str(directory)
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(entry)


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


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


def _value_at(config: ml_collections.ConfigDict, key: str) -> Any:
    """The value of a dotted key that is known to exist (e.g. "inner.lr")."""
    value: Any = config
    for part in key.split("."):
        value = value[part]
    return value


def check_minimums(config: ml_collections.ConfigDict, minimums: Mapping[str, int]) -> None:
    """A ConfigError naming the first dotted key whose integer value is below its minimum."""
    for key, least in minimums.items():
        value = _value_at(config, key)
        if int(value) < least:
            raise ConfigError(f"Config key {key!r} is {value}; it must be >= {least} (set --config.{key}).")


def check_ranges(config: ml_collections.ConfigDict, lower_bounds: Mapping[str, tuple[float, bool]]) -> None:
    """A ConfigError naming the first dotted key whose number is not finite or not above its bound.

    lower_bounds: key -> (bound, strict); strict means the value must be > bound (a learning rate > 0),
    otherwise >= bound (a weight >= 0).
    """
    for key, (bound, strict) in lower_bounds.items():
        value = float(_value_at(config, key))
        if not math.isfinite(value) or (value <= bound if strict else value < bound):
            rule = f"a finite number {'>' if strict else '>='} {bound:g}"
            raise ConfigError(f"Config key {key!r} is {value}; it must be {rule} (set --config.{key}).")


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


# --- Serialisation ---


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """A plain, JSON-able dict of the config: references resolved, tuples as lists.

    Values JSON cannot hold (types, functions) become their `str()`; the dict is meant for logs and
    checkpoint metadata, not for pickling arbitrary objects.
    """
    return _plain(config.to_dict())


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_to_json(config: ml_collections.ConfigDict, indent: int | None = 2) -> str:
    """The config as JSON text (see `config_to_dict`)."""
    return json.dumps(config_to_dict(config), indent=indent)


def config_from_json(data: str | Mapping[str, Any]) -> ml_collections.ConfigDict:
    """Rebuilds a locked ConfigDict from `config_to_json` text or a `config_to_dict` dict.

    JSON lists come back as tuples (every sequence in this project's configs is a tuple). Links
    between fields (FieldReferences) are not restored: each value is what it resolved to.
    """
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as e:
            raise ConfigError(f"Config JSON does not parse: {e}") from e
    if not isinstance(data, Mapping):
        raise ConfigError(f"Config JSON must hold an object, not {type(data).__name__}.")
    return ml_collections.ConfigDict(_tuples(data)).lock()


def _tuples(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _tuples(v) for k, v in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    return value


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
