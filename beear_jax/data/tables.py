"""Data tables: where one comes from and how its file is read, and its rows with canonical columns.

A source is a local .json/.jsonl/.csv/.parquet file, a file in the public-data mirror, a known public Hub set
at its registry revision, or a Hub data set named owner/name; csv cells are kept as written text, and errors
name the file, the config key and the likely fix. `load_table` returns the rows with the canonical column
names; the batch builders (builders.py) turn tokenized rows into the layouts of batches.py.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from beear_jax.data import public_data

SAFETY_COLUMNS = ("prompt", "safe", "unwanted")
ANCHOR_COLUMNS = ("prompt", "answer")

def load_table(source: str, columns: Mapping[str, str], split: str = "train", key: str = "") -> list[dict[str, str]]:
    """Rows of a data set with the columns renamed to canonical names.

    source: a local .json/.jsonl/.csv/.parquet file, a file in the public-data mirror written
    `$BEEAR_DATA_DIR/path`, or a hub data set named owner/name (needs network or the Hugging Face cache;
    `split` picks the split). A Hub id the project knows (public_data.PUBLIC_SETS) is read from its mirror
    file when $BEEAR_DATA_DIR holds it, else fetched at its registry revision and shape-checked. A name that
    is no local file goes to the hub only when shaped like owner/name with no extension and no local
    directory owner/; otherwise it is reported as a missing file at once. columns: canonical name -> column name in the source, e.g. {"prompt": "goal", ...}.
    Returns one dict per row holding only the canonical names, values as strings (numbers and booleans
    written out; a list, mapping or other value is refused, and so is text that is not UTF-8). key: the config key
    that named the file, for the messages of load errors.
    """
    if not columns:
        raise ValueError("no columns to read: give a mapping canonical name -> source column")
    source = os.path.expanduser(source)
    table = _load_dataset(source, split, key)
    missing = [col for col in columns.values() if col not in table.column_names]
    if missing:
        raise ValueError(
            f"{source} has no column {', '.join(map(repr, missing))}; its columns are {table.column_names}"
        )
    if len(table) == 0:
        raise ValueError(f"data set is empty: {source}")
    try:  # json text is decoded only when the cells are read
        data = {canon: list(table[col]) for canon, col in columns.items()}
    except UnicodeDecodeError as err:
        raise _not_utf8(source, err) from err
    return [{canon: _cell_text(values[i], source, i, columns[canon]) for canon, values in data.items()}
            for i in range(len(table))]


def sample_rows(rows: Sequence[dict], k: int | None, rng: np.random.Generator) -> list[dict]:
    """k rows drawn without replacement in random order (k None: all rows, shuffled)."""
    if k is None:
        k = len(rows)
    if not 0 <= k <= len(rows):
        raise ValueError(f"cannot sample {k} rows from a set of {len(rows)}; lower the sample size or set it to None")
    return [rows[i] for i in rng.permutation(len(rows))[:k]]


# File extension -> `datasets` builder name.
_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


# A hub data set id: owner/name, one slash, each part starting with a letter or digit (as the hub requires).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
# A file extension as people write them ("txt", "jsonl"); hub names may end in ".5" ("OpenHermes-2.5").
_FILE_EXTENSION = re.compile(r"\.[A-Za-z]+")
_FORMATS = ", ".join(list(_BUILDERS)[:-1]) + " or " + list(_BUILDERS)[-1]  # ".json, ... or .parquet"


def _is_hub_id(source: str) -> bool:
    """Whether `source`, which is no local file or directory, names a hub data set rather than a mistyped
    path: owner/name with no file extension, not ./ ../ / ~ rooted, and no local directory called owner."""
    if not _HUB_ID.fullmatch(source) or _FILE_EXTENSION.fullmatch(os.path.splitext(source)[1]):
        return False
    return not os.path.isdir(os.path.dirname(source))


def _key_note(key: str) -> str:
    return f" (set by config key {key})" if key else ""


def _where(source: str) -> str:
    """Where a relative path was looked up, for messages (the current directory is often not the expected one)."""
    return "" if os.path.isabs(source) else f" (relative to the current directory {os.getcwd()})"


def _similar_files(source: str) -> list[str]:
    """Data files beside a missing `source` whose names are close to its name: the likely intended file."""
    folder = os.path.dirname(source)
    try:
        names = [n for n in os.listdir(folder or ".") if os.path.splitext(n)[1].lower() in _BUILDERS]
    except OSError:
        return []
    return [os.path.join(folder, n) for n in difflib.get_close_matches(os.path.basename(source), sorted(names), n=3)]


def _missing_file_message(source: str, key: str) -> str:
    """'data file not found' naming the path, where it was looked up, and the likely fix."""
    message = f"data file not found: {source}{_where(source)}{_key_note(key)}"
    similar = _similar_files(source)
    if similar:
        return f"{message}; did you mean {' or '.join(similar)}?"
    if os.path.splitext(source)[1].lower() in _BUILDERS:
        return message
    message += f"; data files are {_FORMATS} files, and a Hugging Face hub data set is named owner/name"
    folder = os.path.dirname(source)
    if _HUB_ID.fullmatch(source) and os.path.isdir(folder):
        message += f" (not tried on the hub: {folder} is a local directory)"
    return message


def _load_public(public: public_data.PublicSet, key: str) -> Any:
    """A known public Hub set at its registry revision, shape-checked; HubUnavailable when it cannot be fetched."""
    import datasets

    try:
        table = datasets.load_dataset(public.hub_id, revision=public.revision, split=public.split)
    except Exception as err:
        raise public_data.HubUnavailable(public_data.unavailable_message(public, key, err)) from err
    public_data.check_shape(public, table.column_names, len(table))
    return table


def _load_hub(source: str, split: str, key: str) -> Any:
    """A hub data set; a failure names both readings of `source` (only the user knows which was meant)."""
    import datasets

    try:
        return datasets.load_dataset(source, split=split)
    except Exception as err:
        raise ValueError(
            f"could not load {source!r}{_key_note(key)}: there is no local file of that name{_where(source)}, "
            f"and as a Hugging Face hub data set (split {split!r}) it could not be fetched ({err}). For a local "
            f"file give its path with the extension ({_FORMATS}); for a hub data set check the name and the "
            "network (offline, only data sets already in the Hugging Face cache load)."
        ) from err


def _csv_as_text(source: str) -> dict[str, Any]:
    """load_dataset options that read every csv column as text, as written: pandas would otherwise turn
    "0.30" into 0.3 and "007" into 7, and cells such as "NA" or "None" into missing values."""
    import csv

    import datasets

    with open(source, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = next(reader, [])
        if len(set(header)) != len(header):
            raise ValueError(f"{source}: the csv header names a column twice ({header}); give each column its own "
                             "name")
        # pandas reads rows that all have one field more than the header as an index column plus the
        # rest, so every value lands one column to the left of its name: refuse such rows instead.
        for row in reader:
            if len(row) > len(header):
                raise ValueError(f"{source}: line {reader.line_num} has {len(row)} fields but the header names "
                                 f"{len(header)} columns (a trailing comma, or an unquoted comma in a cell?); quote "
                                 "cells that contain commas and give every column a header name")
    return {"features": datasets.Features({name: datasets.Value("string") for name in header}),
            "keep_default_na": False, "na_values": [""]}


def _not_utf8(source: str, err: UnicodeDecodeError) -> ValueError:
    """The error for a data file whose text is not UTF-8 (the decoder's own message names no file)."""
    return ValueError(f"data file {source} is not UTF-8 text ({err}); save it as UTF-8 and try again")


def _cell_text(value: Any, source: str, row: int, column: str) -> str:
    """A table cell as text: strings as they are, numbers and booleans written out; a list, a mapping or
    anything else is refused (str() would silently turn a json array into the prompt "['...']")."""
    if value is None:
        raise ValueError(f"{source}: row {row} has no value in column {column!r}")
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, int, float)):
        return str(value)
    raise ValueError(f"{source}: row {row} holds a {type(value).__name__} in column {column!r} ({value!r:.60}), "
                     "not text; write each cell as a string (or map another column in the config)")


def _load_dataset(source: str, split: str, key: str = "") -> Any:
    """The `datasets.Dataset` behind `source`, with clear errors for missing, empty or unknown files.

    Only a source that is no local file or directory and is shaped like a hub id (_is_hub_id) goes to the
    hub; anything else is a local path, so a mistyped one fails at once instead of after the hub's retries.
    """
    resolved = public_data.resolve(source, key)
    if resolved.hub is not None:
        return _load_public(resolved.hub, key)
    if resolved.renames:
        table = _load_dataset(resolved.path, split, key)
        return table.rename_columns({k: v for k, v in resolved.renames.items() if k in table.column_names})
    source = resolved.path
    if os.path.isdir(source):
        raise ValueError(f"{source} is a directory, not a data file{_key_note(key)}; name a {_FORMATS} file")
    if not os.path.isfile(source):
        if _is_hub_id(source):
            return _load_hub(source, split, key)
        raise FileNotFoundError(_missing_file_message(source, key))
    ext = os.path.splitext(source)[1].lower()
    if ext not in _BUILDERS:
        kind = f"unsupported data file type {ext!r}" if ext else "a data file needs an extension"
        raise ValueError(f"{kind} ({source}){_key_note(key)}; use a {_FORMATS} file")
    if os.path.getsize(source) == 0:
        raise ValueError(f"data file is empty: {source}")
    import datasets  # deferred (~1 s), and after the checks above: a mistyped path fails at once

    try:
        options = _csv_as_text(source) if _BUILDERS[ext] == "csv" else {}
        return datasets.load_dataset(_BUILDERS[ext], data_files=source, split="train", **options)
    except UnicodeDecodeError as err:  # a ValueError too, so before the next clause
        raise _not_utf8(source, err) from err
    except ValueError as err:
        if "corresponds to no data" in str(err):  # a csv with only a header: "Instruction 'train' corresponds ..."
            raise ValueError(f"data file has no rows: {source} ({err})") from err
        raise ValueError(f"data file {source} cannot be read as {ext[1:]} ({err}); fix or re-export the file") from err
    except datasets.exceptions.DatasetGenerationError as err:  # e.g. a truncated jsonl line
        raise ValueError(f"data file {source} cannot be parsed as {ext[1:]} ({err.__cause__ or err}); fix or "
                         "re-export the file") from err
