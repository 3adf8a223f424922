"""The ``policycascade`` command: one entry point with a subcommand per job."""

from __future__ import annotations

import importlib
import logging
import os
import sys

# subcommand -> (module with main(argv) -> int, one line of help)
COMMANDS = {
    "train": (
        "policycascade.train",
        "train a stopping rule (continuation learner, REINFORCE or LtC) into run directories",
    ),
    "compare": (
        "policycascade.compare.cli",
        "compare every policy on trained runs or outputs files (fit on val, report on test)",
    ),
    "fit": ("policycascade.fit_cli", "fit a rule on an outputs file and save it as JSON"),
    "watch": ("policycascade.watch_cli", "watch a deployed rule's exits for drift (no labels)"),
    "bench": ("policycascade.bench", "benchmark early exit, the vector env and the training step"),
    "bench-epoch": ("policycascade.bench_epoch", "time one epoch of a paper setting"),
    "bench-compare": (
        "policycascade.bench_compare",
        "time compare on stored outputs against recomputing them",
    ),
}


def usage() -> str:
    """The command's help text."""
    lines = ["usage: policycascade <command> [options]   (policycascade <command> --help)", ""]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a subcommand's ``main``; returns its exit status (2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a usage error: the usage goes to stderr
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


# Commands that close every file they write before their main returns. They end without
# the interpreter's teardown, which after importing torch takes about 0.45 s (a tenth of
# comparing five digits runs) and only frees memory the process is about to give back.
QUICK_EXIT = frozenset({"compare"})


def run() -> None:
    """The console script: :func:`main`, then exit with its status.

    Ctrl-C ends with one line and status 130; a reader that goes away (``| head``) ends it
    quietly with status 1, as for any command-line tool.
    """
    argv = sys.argv[1:]
    try:
        code = main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:
        # nothing more can reach the reader: later writes and the final flush go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 1
    if argv and argv[0] in QUICK_EXIT:
        logging.shutdown()
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:  # a closed pipe: leave it to the normal exit to report
            sys.exit(code)
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
