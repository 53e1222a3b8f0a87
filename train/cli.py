"""Errors a user can fix (a bad run config, a bad corpus, no checkpoint to restore), and the entry point of the
train/ commands: such an error is printed as one line (no traceback) unless `--debug` is given or V4JAX_DEBUG=1
is set; any other exception keeps its traceback."""

from __future__ import annotations

import os
import sys
import traceback


class InputError(SystemExit):
    """Bad input, explained by its message. A SystemExit: uncaught, Python prints the message alone, exit 1."""


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("V4JAX_DEBUG", "") not in ("", "0")


def run(main, argv: list[str] | None = None) -> None:
    """main(argv without --debug); an InputError is one line on stderr, with its traceback in debug mode."""
    argv = sys.argv[1:] if argv is None else argv
    debug = debug_requested(argv)
    try:
        main([a for a in argv if a != "--debug"])
    except InputError as e:
        if debug:
            traceback.print_exc()
        sys.exit(f"error: {e}")
