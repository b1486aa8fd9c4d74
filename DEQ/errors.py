"""User-facing errors: one clear line naming the problem and the fix, no traceback."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A mistake in the user's input (arguments, files, data).  CLIs print it as one line."""


def cli_main(fn):
    """Run a CLI entry point; turn UserError into ``error: ...`` on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        except KeyboardInterrupt:
            print("interrupted: results written so far are complete; rerun with --resume to continue", file=sys.stderr)
            sys.exit(130)
    return wrapper
