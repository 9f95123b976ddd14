"""Whole-file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile


def write_atomically(path: str | os.PathLike[str], data: bytes | str) -> None:
    """Writes `data` (str as UTF-8) to a temporary file beside `path`, fsyncs it and renames it over `path`.

    A failure or a kill leaves `path` as it was and removes the temporary file (a SIGKILL may leave a
    hidden `.NAME.*.tmp` beside it, never a partial `path`). The file is made readable by others (mkstemp
    creates 0600): reports, manifests and metrics are meant to be shared.
    """
    target = pathlib.Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
