"""One command-line convention: user mistakes become exit status 2 and one line on stderr."""

from __future__ import annotations

import argparse
import errno
import functools
import importlib
import os
import sys
from collections.abc import Callable
from pathlib import Path

USAGE_ERROR = 2
# A user's mistake: a bad value (ValueError, incl. UnicodeDecodeError), a wrong type, or a
# file or directory that cannot be read or written (every OSError).
USER_ERRORS = (ValueError, TypeError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage stays in --help).

    An option given twice is an error, not "the last one wins": ``--alpha 1e-3 --alpha
    1e-2`` would otherwise train 1e-2 only, and ``--augment --no-augment`` keep one of two
    contradicting values without a word. Options meant to repeat (``action="append"`` or
    ``"count"``) still may.
    """

    def parse_known_args(self, args=None, namespace=None):
        """Parse as argparse does, refusing any option given more than once."""
        for action in self._actions:
            if action.option_strings and not isinstance(action, _REPEATABLE):
                action.__class__ = _given_once(type(action))
        self._given: dict[str, tuple[str, object]] = {}
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        """Print ``error: MESSAGE`` on one line and exit with status 2."""
        self.exit(USAGE_ERROR, f"error: {message} (see --help)\n")


_REPEATABLE = (
    argparse._AppendAction,
    argparse._AppendConstAction,
    argparse._CountAction,
    argparse._HelpAction,
    argparse._VersionAction,
)


@functools.cache
def _given_once(action_class: type) -> type:
    """``action_class`` refusing a second use of its option in one command line."""
    if getattr(action_class, "_given_once", False):
        return action_class

    def __call__(self, parser, namespace, values, option_string=None):
        given = getattr(parser, "_given", None)
        if given is not None:
            if self.dest in given:
                first, first_values = given[self.dest]
                parser.error(
                    f"{_shown(first, first_values)} and {_shown(option_string, values)}: "
                    f"{self.option_strings[0]} is given twice; give it once"
                    + (" with all its values" if self.nargs in ("+", "*") else "")
                )
            given[self.dest] = (option_string, values)
        action_class.__call__(self, parser, namespace, values, option_string)

    return type(action_class.__name__, (action_class,), {"__call__": __call__, "_given_once": True})


def _shown(option: str | None, values: object) -> str:
    """An option and its values as typed: ``--alpha 0.001 0.01``."""
    if values is None or values == []:
        return str(option)
    items = values if isinstance(values, list) else [values]
    return " ".join([str(option), *(f"{v:g}" if isinstance(v, float) else str(v) for v in items)])


def user_message(error: BaseException) -> str:
    """One line for a user's mistake; OS errors name the path and the reason in plain words."""
    if isinstance(error, UnicodeDecodeError):
        return f"a file is not UTF-8 text (byte {error.start}: {error.reason})"
    if isinstance(error, OSError) and error.errno is not None:
        reason = os.strerror(error.errno).lower()
        if error.errno == errno.ENOENT and error.filename is None:
            return str(error)
        where = f"{error.filename!s}" if error.filename is not None else "a file"
        return f"{where!r} cannot be used: {reason}" if error.filename else f"{where}: {reason}"
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def run_main(main: Callable[[], int]) -> int:
    """Call an entry point; any user error that escaped it still ends as one line and status 2."""
    try:
        return main()
    except USER_ERRORS as error:
        print(f"error: {user_message(error)}", file=sys.stderr)
        return USAGE_ERROR


def import_user_module(module: str, what: str) -> object:
    """Import a user's ``module`` of a ``module:id`` name, as ``python -m`` would find it.

    The working directory is put on the import path for this import (the console script,
    unlike ``python -m``, does not), so ``policycascade train --env mymodule:...`` works
    from the folder that holds ``mymodule.py``, as gymnasium users expect. A module that
    cannot be found, or one that fails to import a module of its own, is a ``ValueError``
    in one line naming ``what``.
    """
    cwd = os.getcwd()
    added = cwd not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        missing = error.name or module
        if module == missing or module.startswith(missing + "."):
            raise ValueError(
                f"{what}: no module named {missing!r} (looked on the Python path and in the "
                f"working directory {Path(cwd)}); check the spelling before ':'"
            ) from None
        raise ValueError(f"{what}: importing {module!r} failed: {error}") from None
    except ImportError as error:
        raise ValueError(f"{what}: importing {module!r} failed: {error}") from None
    finally:
        if added:
            sys.path.remove(cwd)
