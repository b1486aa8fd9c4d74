"""Atomic file replacement: the one writer of whole files that must never be seen half-written
(training checkpoints, merged certification results).
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import IO, Iterator


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_folder(folder: str) -> None:
    """Make a rename in ``folder`` durable where the platform allows opening a folder (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w", prefix: str = ".tmp-", suffix: str = "") -> Iterator[IO]:
    """Replace ``path`` (``mode`` "w" or "wb") with what the ``with`` block writes to the yielded file.

    Guarantees: a reader sees the old file or the whole new one, never a part (temporary ``prefix*suffix`` file in
    the folder, fsynced, mode 0666 minus the umask, ``os.replace``, folder fsynced).  If the block raises, the
    temporary file is removed, ``path`` is unchanged and the exception propagates; a kill can leave the temporary file.
    """
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    try:
        with os.fdopen(fd, mode) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_folder(folder)


__all__ = ["atomic_write", "current_umask"]
