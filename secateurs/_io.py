"""The one atomic file writer: every file the package writes (weights, checkpoints, logs, reports,
run state) goes through it, so a kill mid-write leaves the previous file, never a truncated one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``.

    On any failure the temporary file is removed and ``path`` is as it was; an ``OSError`` (a full
    disk, a read-only folder) is raised again, of the same type, naming ``path``."""
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno is not None and err.filename != str(path):
            raise type(err)(err.errno, f"writing failed: {err.strerror or err}", str(path)) from err
        raise
