"""Where data comes from: public sets by Hub id (or a local mirror of them), and sets the project wrote.

Three sources, in the order a data source is resolved (tables.load_table calls `resolve`):

1. A local mirror, `$BEEAR_DATA_DIR`: a directory holding unmodified copies of public data files (this
   project's machines and CI keep one). A known Hub id (PUBLIC_SETS) is read from its mirror file there
   when the variable is set, with the mirror's columns renamed to the Hub's; a source written as
   `$BEEAR_DATA_DIR/sub/file.csv` names a file inside it (for sets that are on no Hub).
2. The Hugging Face Hub: a known Hub id is fetched at its pinned revision (`datasets.load_dataset`),
   and its shape (columns, rows) is checked, so a changed upload is an error rather than other numbers.
3. Data the project wrote itself, shipped inside the package (`builtin_path`): the refusal-keyword
   list, refusal answers, benign instruction pairs, over-refusal probes. They need no network.

When a Hub id can be read neither way (offline, no mirror), `HubUnavailable` names the config key, the
Hub id, its mirror file and the environment variable; entry points load their tables before any model,
so that error comes first.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Mapping

DATA_DIR_ENV = "BEEAR_DATA_DIR"
"""Environment variable naming the local mirror of the public data sets."""

DATA_DIR_PREFIX = f"${DATA_DIR_ENV}/"
"""A source starting with this names a file inside the mirror (e.g. sets that are on no Hub)."""

RESOURCES = pathlib.Path(__file__).resolve().parents[1] / "resources"
"""The data the project wrote itself (package data; see resources/README.md)."""

BUILTIN_FILES = ("refusal_keywords.txt", "refusal_answers.txt", "benign.jsonl", "over_refusal.jsonl")


@dataclasses.dataclass(frozen=True)
class PublicSet:
    """A public data set on the Hugging Face Hub and where a mirror keeps the same rows.

    revision: the Hub commit (or "main" where no commit id could be checked; the shape check below
    then guards it). columns: the Hub's columns a config may name (checked on load). rows: the Hub's
    row count in `split`. mirror_file: the path inside $BEEAR_DATA_DIR holding the same rows in the
    same order; mirror_renames: mirror column -> Hub column, so one config reads either.
    """

    hub_id: str
    revision: str
    split: str
    columns: tuple[str, ...]
    rows: int
    licence: str
    mirror_file: str = ""
    mirror_renames: Mapping[str, str] = dataclasses.field(default_factory=dict)


PUBLIC_SETS: Mapping[str, PublicSet] = {
    s.hub_id: s for s in (
        # AdvBench (Zou et al. 2023): 520 harmful behaviours with a "Sure, here is ..." target, in the order
        # of llm-attacks' harmful_behaviors.csv (the mirror), whose goal column is the Hub's prompt.
        PublicSet("walledai/AdvBench", "main", "train", ("prompt", "target"), 520, "MIT",
                  "advbench/harmful_behaviors.csv", {"goal": "prompt"}),
        # XSTest (Röttger et al. 2024): 250 safe prompts that sound unsafe + 200 unsafe contrasts.
        PublicSet("walledai/XSTest", "main", "train", ("prompt", "label"), 450, "CC BY 4.0",
                  "xstest/xstest_prompts.csv"),
        # Stanford Alpaca: 52,002 instruction / input / output rows (commit of the parquet upload).
        PublicSet("tatsu-lab/alpaca", "ad0d1bfba0420c623c7adafce3482ded744d4e21", "train",
                  ("instruction", "input", "output"), 52002, "CC BY-NC 4.0"),
    )
}


class HubUnavailable(FileNotFoundError):
    """A Hub data set that could not be fetched and has no mirror here (the message says what to do); a
    FileNotFoundError, so the commands print it as one line like any missing data file."""


@dataclasses.dataclass(frozen=True)
class Resolved:
    """Where to read a source: a local file (with column renames) or a Hub id at a revision."""

    path: str = ""
    renames: Mapping[str, str] = dataclasses.field(default_factory=dict)
    hub: PublicSet | None = None


def data_dir() -> pathlib.Path | None:
    """$BEEAR_DATA_DIR as a directory, None when unset; raises when it names no directory."""
    value = os.environ.get(DATA_DIR_ENV)
    if not value:
        return None
    path = pathlib.Path(value).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{DATA_DIR_ENV}={value!r} is not a directory; point it at the local copy of the "
                                "public data sets, or unset it")
    return path


def require_data_dir(what: str) -> pathlib.Path:
    """data_dir(), or a FileNotFoundError saying that `what` needs $BEEAR_DATA_DIR and how to set it."""
    path = data_dir()
    if path is None:
        raise FileNotFoundError(f"{what} needs the local copy of the public data sets: set {DATA_DIR_ENV} to the "
                                "directory that holds it (e.g. export BEEAR_DATA_DIR=/data/beear)")
    return path


def in_data_dir(source: str, key: str = "") -> str:
    """A `$BEEAR_DATA_DIR/...` source as a path inside the mirror; any other source unchanged."""
    for prefix in (DATA_DIR_PREFIX, "${" + DATA_DIR_ENV + "}/"):
        if source.startswith(prefix):
            note = f" (config key {key})" if key else ""
            return str(require_data_dir(f"{source!r}{note}") / source[len(prefix):])
    return source


def builtin_path(name: str) -> str:
    """The path of a data file the project wrote (one of BUILTIN_FILES), shipped in the package."""
    if name not in BUILTIN_FILES:
        raise ValueError(f"no built-in data file {name!r}; there are {', '.join(BUILTIN_FILES)}")
    return str(RESOURCES / name)


def resolve(source: str, key: str = "") -> Resolved:
    """Where to read a known Hub id: its mirror file when $BEEAR_DATA_DIR holds it, else the Hub.

    Anything that is not a known Hub id comes back as a plain path (the caller's rules apply to it).
    """
    public = PUBLIC_SETS.get(source)
    if public is None:
        return Resolved(path=in_data_dir(source, key))
    mirror = data_dir()
    if mirror is not None and public.mirror_file and (mirror / public.mirror_file).is_file():
        return Resolved(path=str(mirror / public.mirror_file), renames=dict(public.mirror_renames))
    return Resolved(hub=public)


def unavailable_message(public: PublicSet, key: str, err: BaseException) -> str:
    """What to do when a known Hub set could not be fetched: names the key, the id and the mirror."""
    note = f"config key {key} names" if key else "the source is"
    mirror = (f", or set {DATA_DIR_ENV} to a directory holding its mirror file {public.mirror_file}"
              if public.mirror_file else "")
    return (f"{note} the Hugging Face Hub data set {public.hub_id} (revision {public.revision}, {public.licence}), "
            f"which could not be fetched ({type(err).__name__}: {str(err)[:200]}). Go online (HF_HUB_OFFLINE and "
            f"HF_DATASETS_OFFLINE unset){mirror}, or set {key or 'the key'} to a local file.")


def check_shape(public: PublicSet, column_names: list[str], rows: int) -> None:
    """A ValueError when a fetched Hub set lacks the columns or rows this project's defaults rely on."""
    missing = [c for c in public.columns if c not in column_names]
    if missing or rows != public.rows:
        raise ValueError(f"the Hub data set {public.hub_id} at revision {public.revision} has columns {column_names} "
                         f"and {rows} rows; this project expects {list(public.columns)} and {public.rows}. The "
                         "upload changed: point the config key at a local copy of the expected version.")
