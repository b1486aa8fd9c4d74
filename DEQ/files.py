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
    """Replace ``path`` with what the ``with`` block writes, all at once.

    The block writes to a temporary file ``prefix*suffix`` in the folder of ``path``; when it ends, the file
    is flushed and fsynced, gets the mode of an ordinary new file (0666 minus the umask, not mkstemp's
    0600), and is renamed over ``path`` (``os.replace``); the folder is then fsynced where possible.

    Guarantees: a reader sees the old file or the whole new one, never a part.  If the block (or any step
    before the rename) raises, the temporary file is removed, ``path`` is left as it was, and the exception
    propagates.  A kill mid-write can leave the temporary file behind (``prefix``/``suffix`` let the
    caller find it), never a torn ``path``.

    Args:
        path: the file to replace (its folder must exist).
        mode: ``"w"`` (text) or ``"wb"`` (bytes).
        prefix, suffix: the temporary file's name around mkstemp's random part.

    Yields:
        the open temporary file.
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
