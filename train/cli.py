"""Errors a user can fix (a bad run config, a bad corpus, no checkpoint to restore), and the entry point of the
train/ commands, with the command-line error handling of the whole project (v4jax.config.cli_errors): such an
error is one line on stderr, exit status 1, with its traceback only under `--debug` or V4JAX_DEBUG=1."""

from __future__ import annotations

import sys

from v4jax.config import cli_errors


class InputError(ValueError):
    """Bad input, explained by its message."""


def run(main, prog: str, argv: list[str] | None = None) -> None:
    """main(argv without --debug) under cli_errors(prog)."""
    argv = sys.argv[1:] if argv is None else argv
    with cli_errors(prog, "--debug" in argv):
        main([a for a in argv if a != "--debug"])
