"""The exit statuses of the ``mptls`` commands.

A module of its own, importing nothing of mptls: the entry point
(:mod:`mptls.cli.main`) needs the status of an interrupted command
before the modules that run commands are imported.
"""

from __future__ import annotations

from enum import IntEnum


class ExitStatus(IntEnum):
    """The process exit statuses the commands use."""

    OK = 0
    # something failed: the connection, the transfer, or a stdout that
    # takes nothing more (closed or full: the result is lost)
    FAILURE = 1
    # bad input: an option, an address, a file the user named
    USAGE = 2
    # 128 + SIGINT, as a shell reports a process that signal ended
    INTERRUPTED = 130
    # 128 + SIGTERM, as a shell reports a process that signal ended
    TERMINATED = 143


class TerminatedInterrupt(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C's KeyboardInterrupt would be.

    A command that holds something on disk (the demo's temporary
    archive) lets it go on the way out, as after Ctrl-C; the exit
    status is still SIGTERM's.
    """
