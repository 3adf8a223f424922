"""One command-line convention: user mistakes become exit status 2 and one line on stderr."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Callable

USAGE_ERROR = 2
# A user's mistake: a bad value (ValueError, incl. UnicodeDecodeError), a wrong type, or a
# file or directory that cannot be read or written (every OSError).
USER_ERRORS = (ValueError, TypeError, OSError)


class OneLineParser(argparse.ArgumentParser):
    """argparse with one-line usage errors (the full usage stays in --help)."""

    def error(self, message: str):
        """Print ``error: MESSAGE`` on one line and exit with status 2."""
        self.exit(USAGE_ERROR, f"error: {message} (see --help)\n")


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
