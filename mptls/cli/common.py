"""What every ``mptls`` command shares: input checks, exit codes, output.

Every command turns bad input into a :class:`UsageError` (exit status 2)
and every other failure into a one-line message (exit status 1). This
module must never print a traceback unless asked to (``--debug``), and
never prints key material: commands show key fingerprints only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
import signal
import stat
import sys
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from pathlib import Path
from types import FrameType
from typing import IO, Any, TypeVar, cast

from rich.console import Console
from rich.markup import escape

# every command's statuses, where they always were
from mptls.backends.addresses import unusable_reason
from mptls.cli.status import ExitStatus as ExitStatus
from mptls.cli.status import TerminatedInterrupt
from mptls.errors import (
    BackendError,
    ConfigurationError,
    ConnectError,
    MptlsError,
    NotMptlsPeerError,
    shown_value,
)
from mptls.mptcp.config import ConnectionConfig
from mptls.trace import Capture, capture

logger = logging.getLogger("mptls.cli")

T = TypeVar("T")

BACKENDS = ("userspace", "kernel")
MODES = ("G", "E", "rfc8684")
# the longest wait a command line takes (--rotate-every,
# --connect-timeout): a day, as every other wait of mptls's
MAX_SECONDS = 86400.0
MAX_ROTATE_EVERY = MAX_SECONDS


def _mode_name(text: str) -> str:
    """``--mode`` in any case, as the library takes it: its spelling in
    :data:`MODES` (or the text itself, for argparse to refuse)."""
    return next((mode for mode in MODES if mode.lower() == text.lower()), text)


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend``, ``--mode`` and ``--rotate-every``, as every command
    that connects takes them."""
    parser.add_argument("--backend", choices=BACKENDS, default="userspace")
    parser.add_argument(
        "--mode",
        choices=MODES,
        type=_mode_name,
        help="userspace backend: G, keys from TLS (default); E, keys from "
        "TLS confirmed with NEW_KEY and rotatable, 32-bit tokens; or "
        "rfc8684, keys in the clear (any case)",
    )
    parser.add_argument(
        "--rotate-every",
        type=float,
        metavar="SECONDS",
        help="with --mode E: move to the next key generation this long "
        "after each one is in use",
    )


def _rotation(mode: str | None, rotate_every: float | None) -> dict[str, Any]:
    """``key_rotation_interval`` for ``--rotate-every``, checked."""
    if rotate_every is None:
        return {}
    if mode != "E":
        raise UsageError(
            "--rotate-every needs --mode E: only the E mode rotates keys"
        )
    if not 0 < rotate_every <= MAX_ROTATE_EVERY:
        raise UsageError(
            f"--rotate-every must be in (0, {MAX_ROTATE_EVERY:g}] seconds, "
            f"got {rotate_every:g}"
        )
    return {"key_rotation_interval": rotate_every}


def _userspace_client(
    mode: str | None, manage_paths: bool, rotate_every: float | None
) -> dict[str, Any]:
    if manage_paths:
        raise UsageError("--manage-paths applies to the kernel backend")
    return {"mode": mode or "G", **_rotation(mode, rotate_every)}


def _kernel_client(
    mode: str | None, manage_paths: bool, rotate_every: float | None
) -> dict[str, Any]:
    if mode is not None:
        raise UsageError(
            "--mode applies to the userspace backend; the kernel runs its "
            "own RFC 8684 MPTCP"
        )
    if rotate_every is not None:
        raise UsageError(
            "--rotate-every applies to the userspace backend's E mode: "
            "the kernel backend cannot rotate keys"
        )
    return {"manage_paths": manage_paths}


def _userspace_server(
    mode: str | None,
    announce: Sequence[tuple[str, int]],
    rotate_every: float | None,
) -> dict[str, Any]:
    return {
        "modes": (mode or "G",),
        "announce_addrs": list(announce),
        **_rotation(mode, rotate_every),
    }


def _kernel_server(
    mode: str | None,
    announce: Sequence[tuple[str, int]],
    rotate_every: float | None,
) -> dict[str, Any]:
    _kernel_client(mode, False, rotate_every)
    # the kernel announces addresses as endpoints, each on every port
    return {"announce": [address for address, _ in announce]}


_CLIENT_OPTIONS = {"userspace": _userspace_client, "kernel": _kernel_client}
_SERVER_OPTIONS = {"userspace": _userspace_server, "kernel": _kernel_server}


def client_options(
    backend: str,
    mode: str | None,
    *,
    manage_paths: bool = False,
    rotate_every: float | None = None,
) -> dict[str, Any]:
    """The keywords that carry the command line's choices to a backend's
    ``create_connection``: each backend takes its own."""
    chosen = _CLIENT_OPTIONS[backend](mode, manage_paths, rotate_every)
    return {"backend": backend, **chosen}


def server_options(
    backend: str,
    mode: str | None,
    announce: Sequence[tuple[str, int]] = (),
    *,
    rotate_every: float | None = None,
) -> dict[str, Any]:
    """The keywords for a backend's ``create_server``."""
    chosen = _SERVER_OPTIONS[backend](mode, announce, rotate_every)
    return {"backend": backend, **chosen}


def add_pcap_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """``--pcap FILE``: a packet capture of the userspace frames."""
    parser.add_argument(
        "--pcap",
        metavar="FILE",
        help=f"write every userspace frame {what} to FILE as a pcap "
        "(IPv4/IPv6 + TCP with the MPTCP options, for Wireshark or "
        "tshark); never holds keys taken from TLS",
    )


def pcap_capture(
    path: str | None,
    backend: str,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> contextlib.AbstractContextManager[Capture | None]:
    """The capture ``--pcap`` asks for, or a context that does nothing.

    ``inputs`` are the command's own files by option (``--key``...):
    ``--pcap`` naming one of them is refused, for the capture would
    overwrite it. Entering the context opens the file: an unwritable
    one, or one that is not a capture already, is a
    :class:`~mptls.errors.ConfigurationError` naming it, before any
    connection.
    """
    if path is None:
        return contextlib.nullcontext()
    if not path:
        raise UsageError("--pcap needs a file name")
    if backend != "userspace":
        raise UsageError(
            "--pcap records the userspace backend's frames; the kernel "
            "backend's subflows are real TCP: capture them with tcpdump"
        )
    for option, given in (inputs or {}).items():
        if given is not None and _same_file(path, given):
            raise UsageError(
                f"--pcap {path} is the {option} file: the capture would "
                "overwrite it"
            )
    if _is_fifo(path):
        # a live capture (wireshark -k -i FIFO): opening it waits for
        # the reader, which would look like a hang without a word
        print(
            f"mptls: waiting for a reader of the FIFO {path}",
            file=sys.stderr,
            flush=True,
        )
    return capture(path)


@contextlib.asynccontextmanager
async def running_pcap_capture(
    path: str | None,
    backend: str,
    inputs: Mapping[str, str | os.PathLike[str] | None] | None = None,
) -> AsyncIterator[Capture | None]:
    """:func:`pcap_capture` for a command already in its event loop.

    Opening a FIFO waits for its reader, and a wait inside the loop
    would hold the loop, so that a signal could not end the command
    meanwhile: the reader is awaited here, and the capture opens once
    it is there.
    """
    context = pcap_capture(path, backend, inputs)
    held = await _fifo_reader(path) if path and _is_fifo(path) else None
    try:
        with context as running:
            if held is not None:
                # the capture holds the FIFO open now
                os.close(held)
                held = None
            yield running
    finally:
        if held is not None:
            os.close(held)


# how often a command that waits for a FIFO's reader looks for one
_FIFO_POLL = 0.05


async def _fifo_reader(path: str) -> int | None:
    """A write end of the FIFO ``path`` once it has a reader, or None
    when it cannot be opened at all (the capture then says why)."""
    flags = os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC
    while True:
        try:
            return os.open(path, flags)
        except OSError as exc:
            if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                return None
        await asyncio.sleep(_FIFO_POLL)


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def summarize_capture(capture: Capture, what: str = "") -> str:
    """The line that ends a command run with ``--pcap``; the capture's
    name is the user's, shown as it is (:func:`printable`)."""
    path = printable(str(capture.path))
    if capture.stopped_by is not None:
        return (
            f"packet capture stopped after {capture.frames} frames "
            f"({capture.stopped_by}): {path}"
        )
    return f"packet capture: {capture.frames} frames{what} in {path}"


def _same_file(first: str, second: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False  # one of them does not exist (yet)


class Terminated(Exception):
    """A command ended by SIGTERM once it had closed what it had open:
    the exit status says so, with no message, as for Ctrl-C."""


async def until_terminated(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``; SIGTERM (``timeout``, a service manager) ends it
    as Ctrl-C does: cancelled, so that a connection whose input had not
    ended is aborted and one whose input had is closed in order, then
    :class:`Terminated`. Killed outright, the server heard nothing and
    waited ``path_loss_timeout`` for the paths to come back.

    The SIGTERM handler that was there before (the process's default,
    or :func:`sigterm_as_interrupt`'s) is there again after.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    terminated = False

    def terminate() -> None:
        nonlocal terminated
        terminated = True
        task.cancel()

    previous = signal.getsignal(signal.SIGTERM)
    loop.add_signal_handler(signal.SIGTERM, terminate)
    try:
        return await work
    except asyncio.CancelledError:
        if terminated:
            raise Terminated from None
        raise
    finally:
        # asyncio's removal leaves the default, which ends the process
        loop.remove_signal_handler(signal.SIGTERM)
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within, SIGTERM unwinds the command as Ctrl-C does, where its
    default would end the process at once and leave what the command
    made behind (:class:`TerminatedInterrupt`)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise TerminatedInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class UsageError(ConfigurationError):
    """The command line asked for something that cannot be done."""


class OutputError(MptlsError):
    """stdout takes nothing more: the command's result, or the data
    serve and connect print, is lost. A failure, exit 1, not bad input,
    though the operating system calls it an OSError."""


class OutputClosedError(OutputError):
    """Whoever read stdout went away (``| head``)."""


class OutputFailedError(OutputError):
    """stdout refused a write for another reason: a full disk or
    ``/dev/full`` (ENOSPC), an I/O error (EIO)."""


def output_error(exc: OSError) -> OutputError:
    """What a failed write to stdout means for the command, in one line
    that says what happened."""
    if isinstance(exc, BrokenPipeError):
        return OutputClosedError("output closed")
    reason = exc.strerror or type(exc).__name__
    return OutputFailedError(f"output failed: {reason}")


def parse_address(text: str) -> str:
    """Check one IP address literal and return it in canonical form."""
    try:
        return str(ipaddress.ip_address(text.strip().strip("[]")))
    except ValueError:
        raise UsageError(f"not an IP address: {shown_value(text)}") from None


def parse_paths(text: str) -> tuple[str, ...]:
    """Parse ``--paths``: a comma list of local addresses, first = first
    subflow."""
    items = text.split(",")
    if not text.strip():
        raise UsageError("--paths needs at least one local address")
    if not all(item.strip() for item in items):
        # "127.0.0.1,,127.0.0.2": a path left out by mistake, as likely
        # as a stray comma
        raise UsageError(
            f"--paths has an empty entry: {shown_value(text)}; separate "
            "addresses with single commas"
        )
    try:
        paths = tuple(parse_address(item) for item in items)
    except UsageError as exc:
        raise UsageError(f"--paths takes IP addresses: {exc}") from None
    for path in paths:
        _check_path(path)
    if len(set(paths)) != len(paths):
        raise UsageError(
            f"--paths names an address twice: {shown_value(text)}"
        )
    return paths


def _check_path(path: str) -> None:
    """Refuse a ``--paths`` entry that is no source address of its own.

    An unspecified address (``0.0.0.0``, ``::``) lets the system pick
    the source, so its subflow ran from another address (127.0.0.1 on
    loopback) and the demo, looking for a subflow from ``0.0.0.0``,
    failed after its whole transfer; two of them were one path.
    """
    address = ipaddress.ip_address(path)
    reason = unusable_reason(address, local=True)
    if reason is not None:
        raise UsageError(
            f"--paths takes unicast addresses: {path} is {reason}"
        )
    if isinstance(address, ipaddress.IPv6Address):
        address = address.ipv4_mapped or address
    if address.is_unspecified:
        raise UsageError(
            f"--paths takes the source address of each path: {path} is the "
            "unspecified address, which leaves the source to the system; "
            "name the local address itself (127.0.0.1, say)"
        )


def check_path_count(paths: Sequence[str], backend: str) -> None:
    """Refuse more ``--paths`` than one userspace connection has subflows.

    The ones past ``max_subflows`` were refused one by one (a warning
    each), and the demo then failed after its whole transfer, saying of
    every path past the limit that its subflow "did not open or join".
    The kernel backend's limit is the kernel's own (``mptls info``).
    """
    limit = ConnectionConfig().max_subflows
    if backend == "userspace" and len(paths) > limit:
        raise UsageError(
            f"--paths names {len(paths)} addresses: a connection opens "
            f"at most {limit} subflows (max_subflows)"
        )


def parse_port(text: str) -> int:
    """Check a TCP port number (0 = any free port)."""
    try:
        port = int(text)
    except ValueError:
        raise UsageError(f"not a port number: {shown_value(text)}") from None
    if not 0 <= port <= 65535:
        raise UsageError(f"port out of range 0-65535: {port}")
    return port


def parse_announce(text: str, default_port: int) -> tuple[str, int]:
    """Parse one ``--announce`` value: ``ip``, ``ip:port`` or
    ``[ipv6]:port``."""
    host, port = text, default_port
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise UsageError(
                f"unclosed '[' in address to announce: {shown_value(text)}"
            )
        if rest:
            if not rest.startswith(":"):
                raise UsageError(
                    f"bad address to announce: {shown_value(text)}"
                )
            port = parse_port(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        port = parse_port(port_text)
    address = parse_address(host)
    # the server listens there too, and clients would try to join it
    reason = unusable_reason(ipaddress.ip_address(address), local=False)
    if reason is not None:
        raise UsageError(f"{address} is {reason}: no client could join it")
    return address, port


def option_file(text: str, option: str, what: str) -> Path:
    """:func:`existing_file` for an option's value.

    An empty one (``--cafile "$CA"`` with ``CA`` unset) names no file:
    ``Path("")`` is the current directory, and a test for a value given
    took it for no option at all (``--cafile ""`` fell back to the
    system's trust store).
    """
    if not text:
        raise UsageError(f"{option} needs a file name")
    return existing_file(text, what)


def existing_file(text: str, what: str) -> Path:
    """A path that must name a readable regular file.

    Opened here, so that a file the user may not read (or a loop of
    links) is refused with the system's reason before anything runs,
    not as a missing file or later, half-way through a command.
    """
    path = Path(text)
    shown = printable(text)
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise UsageError(f"{what} not found: {shown}") from None
    except OSError as exc:
        raise _unreadable(text, what, exc) from exc
    if stat.S_ISDIR(mode):
        raise UsageError(f"{what} is a directory: {shown}")
    if not stat.S_ISREG(mode):
        # a device or a pipe (/dev/null): there is no file to send, and
        # opening a pipe would wait for a writer
        raise UsageError(f"{what} is not a regular file: {shown}")
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise _unreadable(text, what, exc) from exc
    return path


def _unreadable(text: str, what: str, exc: OSError) -> UsageError:
    reason = exc.strerror or type(exc).__name__
    return UsageError(f"cannot read the {what} {printable(text)}: {reason}")


# how an established connection ends abruptly, in the system's words
_CONNECTION_ENDED = (
    ConnectionResetError | ConnectionAbortedError | BrokenPipeError
)


def exit_status_for(exc: BaseException) -> ExitStatus:
    """Bad input exits with 2, anything else that failed with 1.

    A backend error caused by the operating system (refused connection,
    address in use, unknown host) is bad input too: the user named a port
    or address that cannot be used; so is a peer that does not speak
    mptls at all (a plain TLS server, say).
    """
    if isinstance(exc, MptlsError):
        # mptls's TLS, reset and timeout errors are OSErrors too (as
        # stdlib's are), but what failed there is the connection
        bad_input = isinstance(
            exc, ConfigurationError | ConnectError | NotMptlsPeerError
        ) or (
            isinstance(exc, BackendError)
            and isinstance(exc.__cause__, OSError)
        )
        return ExitStatus.USAGE if bad_input else ExitStatus.FAILURE
    # the system's own: a timeout or a connection that a peer reset or
    # that broke is no input of the user's; any other OSError (a file, a
    # port) is
    if isinstance(exc, TimeoutError | _CONNECTION_ENDED):
        return ExitStatus.FAILURE
    if isinstance(exc, OSError):
        return ExitStatus.USAGE
    return ExitStatus.FAILURE


# what the OS said, in the words of the command line's other errors;
# asyncio's own text ("Connect call failed (...)", "error while attempting
# to bind on address (...)") repeats the address the message names
_OS_REASONS = {
    errno.ECONNREFUSED: "connection refused",
    errno.EADDRINUSE: "address already in use",
}


def _short_os_reason(exc: OSError) -> str | None:
    """``cannot connect to H:P: connection refused`` for a refusal that
    the library wrapped with the address it was aimed at."""
    reason = _OS_REASONS.get(exc.errno or 0)
    if reason is None or not exc.strerror:
        return None
    where, colon, _ = exc.strerror.partition(": ")
    return f"{where}: {reason}" if colon else reason


def describe_error(exc: BaseException) -> str:
    """One line that says what went wrong, without a traceback; a name
    in it (a file's, from the user or the system) cannot steer the
    terminal."""
    return printable(_describe(exc))


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and (short := _short_os_reason(exc)):
        return short
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused ({exc.strerror or exc})"
    if isinstance(exc, OSError) and exc.strerror:
        where = f": {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, TimeoutError) and not isinstance(exc, MptlsError):
        return "timed out"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def report_error(exc: BaseException, *, debug: bool) -> ExitStatus:
    """Print the error as one line on stderr and pick the exit status.

    A stderr nobody reads, or that takes nothing more (a full disk),
    leaves the exit status to tell it.
    """
    status = exit_status_for(exc)
    if debug:
        logger.error("command failed", exc_info=exc)
    try:
        print(f"mptls: error: {describe_error(exc)}", file=sys.stderr)
    except OSError:
        drop_output(sys.stderr)
    return status


def drop_output(stream: IO[str] | None) -> None:
    """Nobody reads ``stream`` (stdout or stderr) any more: point its
    descriptor at /dev/null, so that what is still written there is
    dropped rather than failed on, the interpreter's last flush at exit
    included."""
    try:
        descriptor = stream.fileno() if stream is not None else -1
    except (OSError, ValueError):
        return
    if descriptor < 0:
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, descriptor)
    except OSError:
        pass
    finally:
        os.close(devnull)


def fill_closed_stderr() -> None:
    """A process started with descriptor 2 closed (``2>&-``) has no
    ``sys.stderr``: rich then writes status lines to stdout, into the
    command's data, and the next socket opened would take descriptor 2.
    Put /dev/null there instead: every status line, log record and error
    line is dropped, and the command runs as it would otherwise."""
    if sys.stderr is None:
        sys.stderr = _fill_descriptor(
            2, lambda: os.open(os.devnull, os.O_WRONLY)
        )


def fill_closed_stdout() -> None:
    """A process started with descriptor 1 closed (``>&-``) has no
    ``sys.stdout``: a report went nowhere with status 0, the data serve
    prints failed in its handler, and the next socket opened would take
    descriptor 1. Put there a pipe whose reader has gone: the command
    fails with ``output closed``, as it does after ``| head``."""
    if sys.stdout is None:
        sys.stdout = _fill_descriptor(1, _pipe_without_reader)


def _pipe_without_reader() -> int:
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


def _fill_descriptor(descriptor: int, make: Callable[[], int]) -> IO[str]:
    """A text stream on ``descriptor``, first given what ``make`` opens
    if the process started with it closed."""
    try:
        os.fstat(descriptor)
    except OSError:
        made = make()
        if made != descriptor:
            os.dup2(made, descriptor)
            os.close(made)
    # the process's stream from now on: never closed before it exits
    return open(descriptor, "w", encoding="utf-8", closefd=False)


class _ReportConsole(Console):
    """A console whose closed output is an :class:`OutputClosedError`.

    rich's own answer to a broken pipe is a silent ``SystemExit(1)``;
    this one gives the command line's ``output closed`` line, as serve
    and connect print it. Any other failed write reaches the command as
    an :class:`OutputFailedError`, through :class:`_WriteErrorsAs`.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise OutputClosedError("output closed")


class _StatusConsole(Console):
    """A console for status lines whose closed output drops them.

    rich's own answer to a broken pipe points *stdout* at /dev/null and
    exits with status 1, without a word: a server whose stderr reader
    went away lost its data and stopped at its next status line. Status
    lines are no command's result: this one stops writing them, and the
    command goes on. A stderr that fails otherwise (ENOSPC on a full
    disk or /dev/full, EIO) is dropped alike: rich lets those through.
    """

    def on_broken_pipe(self) -> None:
        self.quiet = True
        drop_output(self.file)


class _WriteErrorsAs:
    """A text stream whose write errors, but a broken pipe, are turned
    into what ``translate`` makes of them.

    rich hands only :class:`BrokenPipeError` to ``on_broken_pipe`` and
    lets every other OSError through as it came: a full disk (ENOSPC)
    or EIO ended a command with the status of bad input. Everything but
    ``write`` and ``flush`` is the stream's own.
    """

    def __init__(
        self, stream: IO[str], translate: Callable[[OSError], Exception]
    ) -> None:
        self._stream = stream
        self._translate = translate

    def write(self, text: str) -> int:
        return int(self._guarded(self._stream.write, text))

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def _guarded(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise self._translate(exc) from exc

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _as_broken_pipe(exc: OSError) -> Exception:
    # a status line that cannot be written is dropped as a closed
    # stderr's is, by rich's on_broken_pipe
    return BrokenPipeError(exc.errno, exc.strerror)


def stdout_console(*, quiet: bool = False) -> Console:
    """The console for a command's report on stdout."""
    stream = cast(IO[str], _WriteErrorsAs(sys.stdout, output_error))
    return _ReportConsole(file=stream, quiet=quiet, highlight=False)


def stderr_console(*, quiet: bool = False) -> Console:
    """The console for status lines, kept off stdout's data (with no
    stderr at all, rich's own fallback would be stdout)."""
    stream = cast(IO[str], _WriteErrorsAs(sys.stderr, _as_broken_pipe))
    return _StatusConsole(
        file=stream, stderr=True, quiet=quiet, highlight=False
    )


class ConsoleLogHandler(logging.Handler):
    """Log records as status lines: the bare message, on the stderr
    console, as the commands print their own."""

    def __init__(self, level: int = logging.INFO) -> None:
        super().__init__(level)
        # the format a worker process copies to log as this one does
        self.setFormatter(logging.Formatter("%(message)s"))
        self._console = stderr_console()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._console.print(
                self.format(record), markup=False, soft_wrap=True
            )
        except Exception:
            self.handleError(record)


@contextlib.contextmanager
def status_lines_from(name: str) -> Iterator[None]:
    """Show the INFO records of the logger ``name`` (and its children)
    as status lines on stderr, and nowhere else, within the block.

    ``-v`` asks for them; they are not propagated to the root's handler,
    which would print each a second time with ``--debug``.
    """
    chosen = logging.getLogger(name)
    handler = ConsoleLogHandler()
    level, propagate = chosen.level, chosen.propagate
    if chosen.getEffectiveLevel() > logging.INFO:
        chosen.setLevel(logging.INFO)
    chosen.propagate = False
    chosen.addHandler(handler)
    try:
        yield
    finally:
        chosen.removeHandler(handler)
        chosen.setLevel(level)
        chosen.propagate = propagate


def print_json(document: dict[str, Any]) -> None:
    """Machine output: one JSON document on stdout."""
    try:
        sys.stdout.write(
            json.dumps(document, indent=2, sort_keys=True, default=str) + "\n"
        )
        sys.stdout.flush()
    except OSError as exc:
        raise output_error(exc) from exc


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on (an escape
    sequence, a newline, a byte of a name that was not UTF-8) written
    as its Python escape: a file name shows as it is, and cannot steer
    the terminal it is shown on."""
    if text.isprintable():
        return text
    return "".join(
        char if char.isprintable() else repr(char)[1:-1] for char in text
    )


def as_markup(text: str) -> str:
    """``text`` from the user (a path) for a rich console's markup,
    where a ``[`` would start a style or, unmatched, fail the print."""
    return escape(printable(text))


def human_bytes(count: float) -> str:
    """A byte count in decimal units (MB = 10**6 bytes)."""
    units = ("B", "kB", "MB", "GB")
    step = 0
    while count >= 1000 and step < len(units) - 1:
        count /= 1000
        step += 1
    return f"{count:.0f} B" if step == 0 else f"{count:.1f} {units[step]}"
