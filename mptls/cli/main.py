"""The entry point of the ``mptls`` command: the console script and
``python -m mptls`` call :func:`main`.

Ctrl-C ends a command with exit status 130 and no traceback, and it may
come before any command runs: the modules that run them (pyOpenSSL,
cryptography, rich, trustme, the backends) take a while to import, a
third of a second on a fast machine. So this module imports none of
them at its top; :func:`main` imports them under the guard that ends an
interrupted command. What runs before it (the interpreter's start, the
``mptls`` package's own import) is beyond any guard of the command's.
"""

from __future__ import annotations

from collections.abc import Sequence

from mptls.cli.status import ExitStatus, TerminatedInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``mptls`` command; returns the process exit status."""
    try:
        from mptls.cli.commands import run

        return run(argv)
    except TerminatedInterrupt:
        return ExitStatus.TERMINATED
    except KeyboardInterrupt:
        return ExitStatus.INTERRUPTED
