"""The ``mptls`` command: argument parsing and the one error boundary.

Each command module adds its own subcommand; this module parses, runs the
command and turns any failure into one line on stderr and an exit status
(2 for bad input, 1 for anything else). It must never let a traceback
reach the user unless ``--debug`` asks for one. Ctrl-C is
:mod:`mptls.cli.main`'s to catch, which imports this module under the
same guard.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, NoReturn, cast

from mptls.cli import bench, certs, demo, info, netcat
from mptls.cli.common import (
    ExitStatus,
    OutputError,
    Terminated,
    drop_output,
    fill_closed_stderr,
    fill_closed_stdout,
    output_error,
    report_error,
)

if TYPE_CHECKING:
    from _typeshed import SupportsWrite

_COMMANDS = (
    demo.add_parser,
    certs.add_parser,
    netcat.add_parsers,
    info.add_parser,
    bench.add_parser,
)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("mptls")
    except PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors in the one-line style of every other
    ``mptls`` error; subcommands' parsers are of this class too."""

    # the top level's commands by name: their names for the error that
    # none was given, their parsers for an error in their arguments
    commands: Mapping[str, argparse.ArgumentParser] = MappingProxyType({})

    def error(self, message: str) -> NoReturn:
        self.exit(
            ExitStatus.USAGE,
            f"mptls: error: {message} (see: {self.prog} --help)\n",
        )

    def _print_message(
        self, message: str, file: SupportsWrite[str] | None = None
    ) -> None:
        """argparse's one way out for help, usage, version and errors.

        Its own drops a write that fails: ``--help`` or ``--version``
        into a full disk or a closed pipe exited 0 with nothing shown.
        On stdout that is an :class:`OutputError`, as for every other
        command's result; stderr's lines are dropped, as always.
        """
        if not message:
            return
        stderr = sys.stderr
        stream = file or stderr
        try:
            stream.write(message)
            flush = getattr(stream, "flush", None)
            if flush is not None:
                flush()
        except OSError as exc:
            if stream is sys.stdout:
                raise output_error(exc) from exc
            if stream is stderr:
                drop_output(sys.stderr)


def build_parser() -> _Parser:
    """The full command line, every subcommand included."""
    parser = _Parser(
        prog="mptls",
        description="Secure multipath connections: TLS over Multipath "
        "TCP, with the MPTCP keys taken from TLS.",
    )
    parser.add_argument(
        "--version", action="version", version=f"mptls {_version()}"
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        help="debug logging and full tracebacks on stderr",
    )
    # the commands' parsers are _Parsers, though typed as the base class
    subparsers = cast(
        "argparse._SubParsersAction[argparse.ArgumentParser]",
        parser.add_subparsers(dest="command", metavar="COMMAND"),
    )
    for add in _COMMANDS:
        add(subparsers)
    parser.commands = MappingProxyType(dict(subparsers.choices))
    for subparser in subparsers.choices.values():
        # SUPPRESS: a subcommand without --debug keeps the global one
        subparser.add_argument(
            "--debug",
            action="store_true",
            default=argparse.SUPPRESS,
            help="debug logging and full tracebacks on stderr",
        )
    return parser


def _configure_logging(debug: bool) -> None:
    """Warnings from everyone; with ``--debug``, mptls's own debug lines.

    Other libraries stay at WARNING: their debug output (pyroute2 dumps
    every netlink message, asyncio every slow callback) would bury
    mptls's.
    """
    logging.basicConfig(
        level=logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if debug:
        logging.getLogger("mptls").setLevel(logging.DEBUG)


def _parser_of(
    parser: _Parser, command: str | None, words: list[str], extras: list[str]
) -> argparse.ArgumentParser:
    """The parser whose options ``extras`` were meant for.

    The command's, when they all come after its name: its ``--help``
    lists its options, where ``mptls --help`` lists only the commands.
    The top level's only options take no value, so the first word that
    is not an option is the command's name.
    """
    if command is None:
        return parser
    after = words[words.index(command) + 1 :]
    if Counter(extras) - Counter(after):
        return parser
    return parser.commands[command]


def run(argv: Sequence[str] | None = None) -> int:
    """Run one ``mptls`` command; returns the process exit status.

    A KeyboardInterrupt goes through, to :func:`mptls.cli.main.main`.
    """
    fill_closed_stderr()
    fill_closed_stdout()
    parser = build_parser()
    words = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extras = parser.parse_known_args(words)
    except OutputError as exc:
        # --help or --version, whose output took nothing
        drop_output(sys.stdout)
        return report_error(exc, debug=False)
    if extras:
        _parser_of(parser, args.command, words, extras).error(
            f"unrecognized arguments: {' '.join(extras)}"
        )
    if args.command is None:
        # one line, as every other failure; the names are what the
        # whole help would have shown first
        *rest, last = parser.commands
        parser.error(f"a command is required: {', '.join(rest)} or {last}")
    _configure_logging(args.debug)
    try:
        return int(args.run(args))
    except Terminated:
        return ExitStatus.TERMINATED
    except Exception as exc:
        if isinstance(exc, OutputError):
            # or the interpreter's last flush at exit fails with a
            # second message
            drop_output(sys.stdout)
        # the command line's boundary: one line, no traceback
        return report_error(exc, debug=args.debug)
