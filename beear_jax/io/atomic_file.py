"""Whole-file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import pathlib
import stat
import tempfile
from collections.abc import Iterable

_TEMP_SUFFIX = ".tmp"
NEW_FILE_MODE = 0o644
"""Mode of a file that did not exist before: reports, manifests and metrics are meant to be read by others."""


def write_atomically(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Writes `data` (str as UTF-8) to a temporary file beside `path`, fsyncs it and renames it over `path`.

    A failure leaves `path` as it was and removes the temporary file; a SIGKILL may leave a hidden
    `.NAME.*.tmp` beside it (`is_temp_of` recognises it), never a partial `path`. A symlink is followed (the
    file it points to is replaced, the link kept); an existing file keeps its mode, a new one gets
    NEW_FILE_MODE (mkstemp would make it 0600).
    """
    target = pathlib.Path(os.path.realpath(path))
    payload = data.encode("utf-8") if isinstance(data, str) else data
    mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_temp_prefix(target.name), suffix=_TEMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _temp_prefix(name: str) -> str:
    """The start of the hidden temporary file's name that write_atomically writes before renaming to `name`."""
    return f".{name}."


def is_temp_of(name: str, targets: Iterable[str]) -> bool:
    """Whether the file name `name` is a temporary file that write_atomically, killed, left beside one of
    the files named `targets`."""
    return name.endswith(_TEMP_SUFFIX) and any(name.startswith(_temp_prefix(target)) for target in targets)
