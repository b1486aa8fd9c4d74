"""User-facing errors: one clear line naming the problem and the fix, no traceback.

Every command line of the toolkit (training, certification, analysis) wraps its ``main`` in
:func:`cli_main`; it lives here, in the lowest layer, because ``UserError`` is raised from every
layer (config, data, checkpoints, smoothing) and each CLI turns it into the same one line.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Optional

RESUME_HINT = "interrupted: results written so far are complete; rerun with --resume to continue"


class UserError(Exception):
    """A mistake in the user's input (arguments, files, data).  CLIs print it as one line."""


def cli_main(fn=None, *, interrupted: str = RESUME_HINT):
    """Run a CLI entry point; turn UserError into ``error: ...`` on stderr and exit code 2, and Ctrl-C
    into the one line ``interrupted`` (default: the --resume hint of resumable commands) and exit 130.

    Use as ``@cli_main`` or ``@cli_main(interrupted="...")``."""
    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            try:
                return func(*args, **kwargs)
            except UserError as exc:
                print(f"error: {exc}", file=sys.stderr)
                sys.exit(2)
            except KeyboardInterrupt:
                print(interrupted, file=sys.stderr)
                sys.exit(130)
        return wrapper
    return decorate(fn) if fn is not None else decorate


CONSOLE_PREFIX = "deq-"


def other_spelling(option: str) -> Optional[str]:
    """The other spelling of a multi-word long flag: ``--a_b`` <-> ``--a-b`` (None for a one-word flag, a
    short flag, or one that mixes both separators)."""
    if not option.startswith("--"):
        return None
    body = option[2:]
    if "-" in body and "_" not in body:
        return "--" + body.replace("-", "_")
    if "_" in body and "-" not in body:
        return "--" + body.replace("_", "-")
    return None


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` with the toolkit's contracts.  Every command line builds its parser from
    this class.

    * Bad input: a usage mistake (unknown flag, missing or malformed value) is the one line
      ``error: <problem>; see PROG --help`` on stderr and exit code 2, without argparse's usage block.
    * One spelling rule: every multi-word flag is accepted with hyphens and with underscores
      (``--dist-timeout`` = ``--dist_timeout``, ``--f_thresh`` = ``--f-thresh``).  The spelling the flag was
      defined with is the one --help and error messages show; the other (:func:`other_spelling`) is a
      hidden alias of the same flag, added when parsing unless some flag is defined with that spelling.
      An abbreviation that matches only one flag (in either spelling) stays unambiguous.
    * PROG is the ``prog`` given (the script's name, e.g. ``certify.py``), except when the process runs as
      one of the installed console commands (``deq-certify``, ...: ``sys.argv[0]`` named ``deq-*``), whose
      name it then is, so usage and errors name the command the user typed.
    """

    def __init__(self, *args, **kwargs):
        command = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
        if command.startswith(CONSOLE_PREFIX):
            if args:
                args = (command,) + args[1:]
            else:
                kwargs["prog"] = command
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)

    def parse_known_args(self, args=None, namespace=None):
        self._add_other_spellings()
        return super().parse_known_args(args, namespace)

    def _add_other_spellings(self) -> None:
        """Map each multi-word flag's other spelling to its action (argument groups included)."""
        for action in self._actions:
            for option in action.option_strings:
                alias = other_spelling(option)
                if alias is not None:
                    self._option_string_actions.setdefault(alias, action)

    def _get_option_tuples(self, option_string):
        """argparse's abbreviation matches, one per flag: a flag's spellings are one flag, not an ambiguity."""
        seen, unique = set(), []
        for match in super()._get_option_tuples(option_string):
            if id(match[0]) not in seen:
                seen.add(id(match[0]))
                unique.append(match)
        return unique
