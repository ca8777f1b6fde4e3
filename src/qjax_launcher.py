"""The ``qjax`` command's entry point, outside the package so Ctrl-C is handled at once.

Importing :mod:`qjax.cli` imports qjax and JAX, which takes seconds; a Ctrl-C in that time
would print a ``KeyboardInterrupt`` traceback. This module imports nothing heavy itself,
so the interrupt lands here and ends the command with one line and exit status 130, as
:func:`qjax.cli.main` does once it runs.
"""

import sys

EXIT_INTERRUPTED = 130


def main() -> None:
    """Runs :func:`qjax.cli.main` and exits with its status (130 on Ctrl-C at any time)."""
    try:
        from qjax.cli import main as run

        status = run()
    except KeyboardInterrupt:
        print("qjax: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    sys.exit(status)
