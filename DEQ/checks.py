"""Argument and path checks shared by every CLI: one :class:`UserError` line each, before any work.

The same words everywhere; each range check is written ``not (lo <= v <= hi)`` so that nan fails it."""
from __future__ import annotations

import math
import os
import tempfile
from typing import Optional

from .errors import UserError


def check_number(name: str, value, minimum: Optional[float] = None, strict: bool = False,
                 maximum: Optional[float] = None, hint: str = "") -> None:
    """``value`` must be a finite number with ``value >= minimum`` (``> minimum`` if strict) and ``<= maximum``."""
    if value is None:
        return
    lo = "" if minimum is None else (f" > {minimum:g}" if strict else f" >= {minimum:g}")
    hi = "" if maximum is None else f" and <= {maximum:g}"
    want = f"a finite number{lo}{hi}"
    ok = isinstance(value, (int, float)) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        raise UserError(f"{name} must be {want}, got {value}{hint}")


def check_count(name: str, value, minimum: int = 1, allow: Optional[int] = None, hint: str = "") -> None:
    """An integer ``>= minimum`` (or exactly ``allow``, e.g. -1 for 'all')."""
    if value is None or value == allow:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        extra = f" (or {allow})" if allow is not None else ""
        raise UserError(f"{name} must be an integer >= {minimum}{extra}, got {value}{hint}")


def check_input_file(path: str, what: str, fix: str = "check the path", inside: Optional[str] = None) -> None:
    """An existing regular file: 'not found' and 'is a directory' are told apart.
    ``inside``: the usual file name in such a folder, suggested when the folder holds it."""
    if os.path.isdir(path):
        example = os.path.join(path, inside) if inside and os.path.isfile(os.path.join(path, inside)) else None
        raise UserError(f"{what} {path} is a directory, not a file: pass a file" + (f", e.g. {example}" if example else ""))
    if not os.path.isfile(path):
        raise UserError(f"{what} not found: {path} ({fix})")


def writable_dir_problem(folder: str) -> Optional[str]:
    """Why files cannot be created in ``folder`` (created on demand), or None.  Leaves nothing behind:
    a missing folder is judged by creating and removing its topmost missing ancestor (os.access
    misjudges root, /proc and some mounts)."""
    folder = os.path.abspath(folder)
    probe, top = folder, None
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe, top = parent, probe
    if not os.path.isdir(probe):
        return f"{probe} is a file, not a folder"
    if probe == folder:
        try:  # os.access misjudges some mounts and root; a real file tells
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as exc:
            return f"cannot create files there ({exc.strerror})"
        return None
    try:
        os.mkdir(top)
    except FileExistsError:
        return None  # created meanwhile by someone else
    except OSError as exc:
        return f"cannot create {folder} ({exc.strerror} in {probe})"
    os.rmdir(top)
    return None


def check_writable_dir(folder: str, flag: str) -> None:
    problem = writable_dir_problem(folder)
    if problem:
        raise UserError(f"{flag} {folder}: {problem}; choose a writable {flag}")


__all__ = ["check_number", "check_count", "check_input_file", "writable_dir_problem", "check_writable_dir"]


def check_choice(flag: str, value: str, choices) -> str:
    """Return ``value`` if it is in ``choices``, else a one-line error naming ``flag`` (for callers that bypass
    argparse)."""
    if value not in choices:
        raise UserError(f"{flag} must be one of {', '.join(choices)}, got {value!r}")
    return value
