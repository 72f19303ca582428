"""``mptls serve`` and ``mptls connect``: netcat over secure multipath.

Data goes to stdout and comes from stdin untouched; status lines go to
stderr so that the two never mix. Neither command ever prints key
material, and neither aims at anything the user did not name: the
server's default address is loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mptls
from mptls.backends.base import CONNECT_TIMEOUT, MptcpInfo, format_address
from mptls.cli.common import (
    MAX_SECONDS,
    ExitStatus,
    OutputError,
    UsageError,
    add_backend_arguments,
    add_pcap_argument,
    check_path_count,
    client_options,
    describe_error,
    option_file,
    output_error,
    parse_address,
    parse_announce,
    parse_paths,
    parse_port,
    running_pcap_capture,
    server_options,
    status_lines_from,
    stderr_console,
    summarize_capture,
    until_terminated,
)
from mptls.errors import CertificateError, MptlsError, PeerResetError
from mptls.mptcp.options import ResetReason
from mptls.refusals import refusal_log
from mptls.trace import Capture

if TYPE_CHECKING:
    from mptls.backends.userspace.workers import WorkerPool

CHUNK_SIZE = 64 * 1024

# how long a stopping server lets its connections close in order
CLOSE_WAIT = 2.0

# how many stdin chunks may wait for the connection before reading stops
STDIN_BACKLOG = 8


class InputNotDeliveredError(MptlsError):
    """The server ended the connection before the end of stdin reached
    it: the data-level stream (RFC 8684 section 3.3.3) did not close in
    order, so some input may never have been read. The client cannot
    tell whether the server read every byte before the end, so the
    message says only what it knows."""

    def __init__(self, unsent: int) -> None:
        detail = f" (at least {unsent} bytes not delivered)" if unsent else ""
        super().__init__(
            f"the server closed before the end of the input reached it{detail}"
        )


class ConnectionFailedError(MptlsError):
    """``serve --once``: its one connection failed."""


def describe_connection(info: MptcpInfo | None) -> list[str]:
    """Status lines for a connection: mode, tokens, subflows."""
    if info is None:
        return ["no MPTCP state reported"]
    lines = [
        f"backend {info.backend}, mode {info.mode}"
        + (", fell back to plain TCP" if info.fallback else ""),
        f"tokens local {info.local_token or '-'} "
        f"remote {info.remote_token or '-'}",
        _keys_line(info),
    ]
    for subflow in info.subflows:
        lines.append(
            f"subflow {subflow.subflow_id} "
            f"{format_address(subflow.local_address)} -> "
            f"{format_address(subflow.remote_address)} {subflow.state} "
            f"sent {subflow.bytes_sent} received {subflow.bytes_received}"
        )
    return lines


def _keys_line(info: MptcpInfo) -> str:
    # E mode's keys come from TLS but are in use only once the peer
    # confirmed them; until then keys_installed is False, yet the
    # fingerprint is worth showing beside the reason
    pending_e = info.mode == "E" and info.key_fingerprint is not None
    if info.keys_installed or pending_e:
        fingerprint = f"from TLS, fingerprint {info.key_fingerprint}"
        return "keys " + fingerprint + _generation(info)
    return f"keys not installed ({info.keys_reason or 'no reason given'})"


def _generation(info: MptcpInfo) -> str:
    # E mode: which key generation is in use, or that none is yet
    if info.mode != "E":
        return ""
    if info.key_generation is None:
        return f", not in use yet: {info.keys_reason or 'unconfirmed'}"
    return f", generation {info.key_generation}"


def _status(verbose: bool, lines: Sequence[str]) -> None:
    console = stderr_console(quiet=not verbose)
    for line in lines:
        console.print(line, markup=False, soft_wrap=True)


# serve


def _write_stdout(data: bytes) -> None:
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    except OSError as exc:
        # the reader went away (``| head``), or the disk is full:
        # nothing more can be shown
        raise output_error(exc) from exc


async def _handle_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    echo: bool,
    verbose: bool,
    say_cut_short: bool = False,
) -> str | None:
    """Serve one client; returns why it failed, or None.

    A stdout that takes nothing more (closed by ``| head``, or full) is
    no failure of the client's: it raises :class:`OutputError`, for the
    server cannot print any more. With ``say_cut_short``, a connection
    that this end ended before the client ended its input (a worker's
    stop) is a failure too: what was printed of it may be truncated.
    """
    peer = format_address(writer.get_extra_info("peername"))
    failure = None
    _status(verbose, [f"connection from {peer}"])
    _status(verbose, describe_connection(writer.get_extra_info("mptcp")))
    try:
        while chunk := await reader.read(CHUNK_SIZE):
            if echo:
                writer.write(chunk)
                await writer.drain()
            else:
                _write_stdout(chunk)
        if say_cut_short and writer.transport.is_closing():
            # the input ended because the server ended the connection,
            # not because the client ended it
            failure = _stopped_during(peer)
        # the client half-closed: everything is echoed, so close too
        writer.close()
        await writer.wait_closed()
    except OutputError:
        writer.transport.abort()
        raise
    except (MptlsError, OSError) as exc:
        failure = f"connection from {peer} failed: {describe_error(exc)}"
        writer.close()
    _status(verbose, [f"connection from {peer} closed"])
    _status(verbose, describe_connection(writer.get_extra_info("mptcp")))
    return failure


async def _handle_and_report(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    echo: bool,
    verbose: bool,
) -> None:
    """A worker's handler: a failed client is one line, and the worker
    goes on. So is a client the worker's stop cut short, as in one
    process.

    A stdout that takes nothing more ends the server instead, as in one
    process: the :class:`OutputError` goes on to the pool (its
    ``stop_on``), which tells the parent; the client, reset, knows its
    data went nowhere.
    """
    failure = await _handle_client(
        reader, writer, echo=echo, verbose=verbose, say_cut_short=True
    )
    if failure is not None:
        _status(True, [f"mptls: {failure}"])


def _capture_status(verbose: bool, capture: Capture | None) -> None:
    if capture is not None:
        # a capture that stopped short is news without -v too
        _status(
            verbose or capture.stopped_by is not None,
            [summarize_capture(capture)],
        )


def _stop_on_signals(stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)


async def serve(args: argparse.Namespace) -> None:
    # -v: every client or subflow the server refuses is a line, as the
    # library logs it (mptls.refusals, INFO); without -v, none
    shown = status_lines_from("mptls.refusals")
    with shown if args.verbose else contextlib.nullcontext():
        try:
            await _serve(args)
        finally:
            # refusals held back in a flood are counted; a server that
            # stops before their interval ends says how many now
            refusal_log.flush()


async def _serve(args: argparse.Namespace) -> None:
    port = parse_port(args.port)
    host = await _listen_address(args.host)
    announce = _announced(args.announce, port, args.backend)
    if (
        args.backend == "kernel"
        and port == 0
        and isinstance(listen_hosts(host, port, announce), list)
    ):
        # one listener per address, each on a port of its own: joins,
        # sent to the first one's, would find no listener
        raise UsageError(
            "with --backend kernel and --port 0, --announce needs a "
            "wildcard --host (0.0.0.0 or ::): joins reach an announced "
            "address on the server's own port"
        )
    tls = mptls.TLSConfig(
        certfile=str(option_file(args.cert, "--cert", "certificate file")),
        keyfile=str(option_file(args.key, "--key", "key file")),
    )
    options = server_options(
        args.backend, args.mode, announce, rotate_every=args.rotate_every
    )
    options.update(_token_ids(args))
    if args.no_restart and args.workers == 1:
        raise UsageError("--no-restart goes with --workers N, N > 1")
    if args.workers > 1:
        if args.pcap is not None:
            raise UsageError(
                "--pcap records one process: it cannot go with --workers"
            )
        # the workers listen where clients are told to join, as one
        # process does
        hosts = listen_hosts(host, port, announce)
        await _serve_workers(args, hosts, port, tls, options)
        return
    files = {"--cert": args.cert, "--key": args.key}
    async with running_pcap_capture(args.pcap, args.backend, files) as capture:
        await _serve_one(args, host, port, announce, tls, options)
    _capture_status(args.verbose, capture)


async def _serve_one(
    args: argparse.Namespace,
    host: str,
    port: int,
    announce: Sequence[tuple[str, int]],
    tls: mptls.TLSConfig,
    options: dict[str, Any],
) -> None:
    """``serve`` in this process, until a signal (or ``--once``)."""
    stop = asyncio.Event()
    one_at_a_time = asyncio.Lock()
    # why the server failed: a stdout that takes nothing more, or
    # --once's one client
    failures: list[MptlsError] = []

    clients: dict[asyncio.Task[Any] | None, asyncio.StreamWriter] = {}
    # --once: a client was served to its end, so a stop after it cuts
    # nothing short
    served: list[asyncio.StreamWriter] = []

    async def on_client(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        clients[asyncio.current_task()] = writer
        failure = None
        # printed clients take turns on stdout, and --once serves one;
        # echoed ones need nothing shared, and an idle one must not
        # hold up the others
        shared = args.echo and not args.once
        turn = contextlib.nullcontext() if shared else one_at_a_time
        try:
            async with turn:
                failure = await _handle_client(
                    reader, writer, echo=args.echo, verbose=args.verbose
                )
        except OutputError as exc:
            failures.append(exc)
            stop.set()
        finally:
            del clients[asyncio.current_task()]
            served.append(writer)
        if failure is not None and not args.once:
            _status(True, [f"mptls: {failure}"])
        elif failure is not None:
            failures.append(ConnectionFailedError(failure))
        if args.once:
            stop.set()

    server = await mptls.start_server(
        on_client,
        listen_hosts(host, port, announce),
        port,
        ssl=tls,
        **options,
    )
    async with server:
        _stop_on_signals(stop)
        bound = ", ".join(
            format_address(sock.getsockname()) for sock in server.sockets
        )
        # always shown: with --port 0 it is how a caller learns the port
        _status(True, [f"listening on {bound}"])
        await stop.wait()
        # --once's client was served to its end: the rest never had
        # their turn, and nothing of theirs was printed
        cut_short = [] if args.once and served else _peers(clients)
        await _close_clients(clients)
    if args.once and cut_short:
        failures.insert(
            0, ConnectionFailedError(_stopped_during(cut_short[0]))
        )
    else:
        for peer in cut_short:
            _status(True, [f"mptls: {_stopped_during(peer)}"])
    if failures:
        raise failures[0]


def _peers(
    clients: dict[asyncio.Task[Any] | None, asyncio.StreamWriter],
) -> list[str]:
    """The addresses of the clients still connected."""
    return [
        format_address(writer.get_extra_info("peername"))
        for writer in clients.values()
    ]


def _stopped_during(peer: str) -> str:
    """A connection the server's stop (a signal) cut short: what it
    printed of it may be a truncated copy of the input, which an exit
    status of 0 alone would call complete."""
    return (
        f"stopped before the connection from {peer} ended: what it sent "
        "may be incomplete"
    )


async def _close_clients(
    clients: dict[asyncio.Task[Any] | None, asyncio.StreamWriter],
) -> None:
    """On stop, end every connection in order: its peer sees the end of
    the stream, and no handler is left behind to be cancelled."""
    for writer in clients.values():
        writer.close()
    handlers = {task for task in clients if task is not None}
    if handlers:
        _, late = await asyncio.wait(handlers, timeout=CLOSE_WAIT)
        for writer in clients.values():
            writer.transport.abort()
        if late:
            await asyncio.wait(late, timeout=CLOSE_WAIT)


async def _listen_address(text: str) -> str:
    """``--host``: an IP literal, or a name whose first address (in the
    resolver's order, RFC 6724 section 6) the server listens on."""
    try:
        return parse_address(text)
    except UsageError:
        pass
    loop = asyncio.get_running_loop()
    try:
        found = await loop.getaddrinfo(
            text, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {text}: cannot resolve: {exc}") from None
    if not found:
        raise UsageError(f"--host {text}: the name has no address")
    return str(found[0][4][0])


def _announced(
    items: Sequence[str], port: int, backend: str
) -> list[tuple[str, int]]:
    """``--announce`` values; the port defaults to the server's own."""
    announced = []
    for item in items:
        try:
            announced.append(parse_announce(item, port))
        except UsageError as exc:
            raise UsageError(f"--announce {item}: {exc}") from None
    if backend == "kernel":
        # a signal endpoint with no port: the kernel announces it on
        # each connection's own port, whatever --port picked
        for item, (_, announced_port) in zip(items, announced, strict=True):
            if announced_port != port:
                raise UsageError(
                    f"--announce {item}: the kernel backend announces an "
                    "address on the server's own port; give the address "
                    "alone"
                )
        return announced
    if any(announced_port == 0 for _, announced_port in announced):
        raise UsageError(
            "with --port 0 each --announce needs its own port (IP:PORT)"
        )
    return announced


def listen_hosts(
    host: str, port: int, announce: Sequence[tuple[str, int]]
) -> str | list[str]:
    """Where the server listens: ``host``, and where it tells clients to
    join on its own port, which a join reaches no listener at otherwise
    (the kernel's too); a wildcard ``host`` already covers its family's
    addresses, and a listener of its own there would find the port in
    use."""
    hosts = [host]
    listening = ipaddress.ip_address(host)
    for address, announced_port in announce:
        if announced_port != port or address in hosts:
            continue
        announced = ipaddress.ip_address(address)
        if listening.is_unspecified and (
            announced.version == listening.version
        ):
            continue
        hosts.append(address)
    return hosts if len(hosts) > 1 else host


def _token_ids(args: argparse.Namespace) -> dict[str, Any]:
    """``--server-id`` for the userspace backend's tokens; checks the ids
    ``--server-id`` and ``--workers`` put there fit their 8 bits."""
    if not 1 <= args.workers <= 256:
        raise UsageError("--workers must be 1 to 256 (8 token bits)")
    if args.backend != "userspace":
        if args.workers != 1 or args.server_id:
            raise UsageError(
                "--workers and --server-id apply to the userspace backend"
            )
        return {}
    if not 0 <= args.server_id <= 255:
        raise UsageError("--server-id must be 0 to 255 (8 token bits)")
    return {"server_id": args.server_id}


async def _serve_workers(
    args: argparse.Namespace,
    host: str | list[str],
    port: int,
    tls: mptls.TLSConfig,
    options: dict[str, Any],
) -> None:
    """``serve --workers N``: N processes on one port (SO_REUSEPORT)."""
    from mptls.backends.userspace.workers import WorkerPool

    if args.once:
        raise UsageError("--once cannot go with --workers")
    options.pop("backend", None)
    # runs in the workers, concurrently: each handles its own clients
    handler = functools.partial(
        _handle_and_report, echo=args.echo, verbose=args.verbose
    )
    pool = WorkerPool(
        handler,
        host,
        port,
        workers=args.workers,
        ssl=tls,
        restart=not args.no_restart,
        # a worker's stdout is the parent's: once it takes nothing more,
        # no worker can print a client's data
        stop_on=(OutputError,),
        # the workers' status lines share one stderr: each says whose
        label_stderr=True,
        **options,
    )
    stop = asyncio.Event()
    async with pool:
        _stop_on_signals(stop)
        # the port the pool bound (port 0 picks one), on every host
        bound_port = pool.address[1]
        hosts = [host] if isinstance(host, str) else host
        bound = ", ".join(format_address((one, bound_port)) for one in hosts)
        _status(True, [f"listening on {bound} ({args.workers} workers)"])
        await _until_stopped_or_down(pool, stop)


async def _until_stopped_or_down(
    pool: WorkerPool, stop: asyncio.Event
) -> None:
    """Wait for a signal; raise the pool's error once no worker is left,
    or a worker's stdout took nothing more, which ends ``serve`` with
    one line and exit status 1."""
    serving = asyncio.ensure_future(pool.serve_forever())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait(
            (serving, stopping), return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        serving.cancel()
        stopping.cancel()
    if serving.done() and not serving.cancelled():
        serving.result()


# connect


def _read_stdin(
    loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[bytes]
) -> None:
    """Runs in a daemon thread: a blocked read of a terminal must not keep
    the process alive once the connection is over. It reads the file
    descriptor itself, never ``sys.stdin``'s buffer, whose lock a thread
    blocked at interpreter shutdown would still hold."""
    try:
        descriptor = sys.stdin.fileno()
    except (AttributeError, OSError, ValueError):
        descriptor = -1
    while True:
        try:
            chunk = os.read(descriptor, CHUNK_SIZE) if descriptor >= 0 else b""
        except OSError:
            chunk = b""
        put = queue.put(chunk)
        try:
            asyncio.run_coroutine_threadsafe(put, loop).result()
        except (RuntimeError, concurrent.futures.CancelledError):
            # the loop is gone, or stopped waiting for stdin: a put it
            # never ran is closed here, not warned about at exit
            put.close()
            return
        if not chunk:
            return


async def _stdin_to_connection(
    writer: asyncio.StreamWriter, queue: asyncio.Queue[bytes]
) -> None:
    """Copy stdin to the connection, then half-close it."""
    loop = asyncio.get_running_loop()
    threading.Thread(
        target=_read_stdin, args=(loop, queue), daemon=True
    ).start()
    while chunk := await queue.get():
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()


def _unsent(queue: asyncio.Queue[bytes], writer: asyncio.StreamWriter) -> int:
    """Input read from stdin that never left: queued or still buffered."""
    queued = 0
    while not queue.empty():
        queued += len(queue.get_nowait())
    return queued + writer.transport.get_write_buffer_size()


def _check_path_families(host: str, paths: Sequence[str]) -> None:
    """A local address of the other IP version than a literal server
    address can carry no subflow to it."""
    try:
        server = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return  # a name: its addresses are the resolver's to pick
    for path in paths:
        local = ipaddress.ip_address(path)
        if local.version != server.version:
            raise UsageError(
                f"--paths {path} is IPv{local.version} and the server "
                f"{host} is IPv{server.version}"
            )


async def connect(args: argparse.Namespace) -> None:
    port = parse_port(args.port)
    if port == 0:
        raise UsageError("port 0 cannot be connected to")
    if args.server_name == "":
        # asyncio's way to skip the check; mptls says so out loud
        raise UsageError(
            "--server-name must not be empty; --insecure skips the "
            "certificate check"
        )
    if not 0 < args.connect_timeout <= MAX_SECONDS:
        raise UsageError(
            f"--connect-timeout must be in (0, {MAX_SECONDS:g}] "
            f"seconds, got {args.connect_timeout:g}"
        )
    delay = args.happy_eyeballs_delay
    if delay is not None and not 0 <= delay <= MAX_SECONDS:
        raise UsageError(
            f"--happy-eyeballs-delay must be in [0, {MAX_SECONDS:g}] "
            f"seconds, got {delay:g}"
        )
    # an empty --paths is a mistake, not "no paths given"
    paths = parse_paths(args.paths) if args.paths is not None else None
    check_path_count(paths or (), args.backend)
    _check_path_families(args.host, paths or ())
    cafile = (
        option_file(args.cafile, "--cafile", "CA file")
        if args.cafile is not None
        else None
    )
    if args.insecure:
        _status(True, ["mptls: warning: --insecure: certificate not checked"])
    tls = mptls.TLSConfig(
        cafile=str(cafile) if cafile else None,
        verify=not args.insecure,
        check_hostname=not args.insecure,
    )
    if args.verbose:
        # rejoin attempts after a lost path are detail for -v
        logging.getLogger("mptls.userspace").setLevel(logging.INFO)
    extra_paths = list(paths or ())[1:]
    if args.backend == "kernel" and not args.manage_paths and extra_paths:
        # the kernel opens subflows from its endpoints alone: without
        # this line -v showed one subflow and no reason
        _status(
            args.verbose,
            [
                f"paths {', '.join(extra_paths)} left to the kernel's "
                "endpoints (--manage-paths adds them)"
            ],
        )
    files = {"--cafile": cafile}
    async with running_pcap_capture(args.pcap, args.backend, files) as capture:
        await until_terminated(_converse(args, port, paths, tls))
    _capture_status(args.verbose, capture)


async def _converse(
    args: argparse.Namespace,
    port: int,
    paths: Sequence[str] | None,
    tls: mptls.TLSConfig,
) -> None:
    """``connect`` once the command line is checked: stdin to the
    server, its answer to stdout."""
    try:
        reader, writer = await mptls.open_connection(
            args.host,
            port,
            ssl=tls,
            server_hostname=args.server_name,
            local_addrs=list(paths) if paths else None,
            connect_timeout=args.connect_timeout,
            happy_eyeballs_delay=args.happy_eyeballs_delay,
            **client_options(
                args.backend,
                args.mode,
                manage_paths=args.manage_paths,
                rotate_every=args.rotate_every,
            ),
        )
    except (CertificateError, PeerResetError) as exc:
        hinted = _with_hint(exc, args)
        if hinted is exc:
            raise
        raise hinted from exc
    _status(args.verbose, describe_connection(writer.get_extra_info("mptcp")))
    queue: asyncio.Queue[bytes] = asyncio.Queue(STDIN_BACKLOG)
    upload = asyncio.create_task(_stdin_to_connection(writer, queue))
    try:
        while chunk := await reader.read(CHUNK_SIZE):
            _write_stdout(chunk)
        if not upload.done():
            # the server ended first while stdin still had input (or
            # had not ended): what it did not read is lost
            raise InputNotDeliveredError(_unsent(queue, writer))
        upload.result()
        await _close_in_order(writer)
        _status(
            args.verbose, describe_connection(writer.get_extra_info("mptcp"))
        )
    except PeerResetError as exc:
        said = _reset_by_server(exc)
        if said is exc:
            raise
        raise said from exc
    except asyncio.CancelledError:
        if not upload.done():
            # interrupted (Ctrl-C) before the end of stdin: an orderly
            # close would tell the server that the input was whole
            writer.transport.abort()
        raise
    finally:
        upload.cancel()
        # the upload's failure was raised above if it was the news; on
        # the way out of another error (the reader's, of the same end)
        # it would replace that one
        with contextlib.suppress(asyncio.CancelledError, MptlsError, OSError):
            await upload
        # an orderly close ends every subflow, so the server need not
        # wait for subflows this process would otherwise just drop
        writer.close()
        with contextlib.suppress(MptlsError, OSError):
            await writer.wait_closed()


# what a failed handshake most likely means, for the user to act on
_UNTRUSTED = ("self-signed", "self signed", "unable to get local issuer")


def _with_hint(
    exc: CertificateError | PeerResetError, args: argparse.Namespace
) -> MptlsError:
    """The handshake error with what to try next, where it is likely."""
    text = str(exc)
    if isinstance(exc, CertificateError):
        if not any(word in text for word in _UNTRUSTED):
            return exc
        # a CA was given, but not the one the server's chain leads to
        hint = (
            f"its chain does not lead to the CA in --cafile {args.cafile}"
            if args.cafile
            else "pass the server's CA with --cafile"
        )
        return CertificateError(
            f"{text} ({hint})", alert=exc.alert, verify_code=exc.verify_code
        )
    if exc.reset_reason != ResetReason.ADMINISTRATIVELY_PROHIBITED:
        return exc
    # a server resets an MP_CAPABLE that offers no mode it accepts: keys
    # in the clear or E to a G-only server, G to an E-only one; the
    # library's own hint speaks of the API's keywords, this one of the
    # command's
    return PeerResetError(
        "peer reset the MPTCP handshake "
        f"(the server may not accept --mode {args.mode or 'G'})",
        reset_reason=exc.reset_reason,
    )


def _reset_by_server(exc: PeerResetError) -> PeerResetError:
    """A reset of the established connection, in ``connect``'s words:
    the peer is the server, which aborted the connection."""
    text = str(exc)
    if not text.startswith("the peer "):
        return exc
    return PeerResetError(
        "the server " + text.removeprefix("the peer "),
        reset_reason=exc.reset_reason,
        unacknowledged=exc.unacknowledged,
    )


async def _close_in_order(writer: asyncio.StreamWriter) -> None:
    """Close after all input was sent: a close that does not end in
    order (our DATA_FIN never acknowledged, the peer reset) means the
    server may not have read everything."""
    writer.close()
    try:
        await writer.wait_closed()
    except (MptlsError, OSError) as exc:
        raise InputNotDeliveredError(0) from exc


# the command line


def _add_common(parser: argparse.ArgumentParser) -> None:
    add_backend_arguments(parser)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="status lines on stderr"
    )


def add_parsers(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    _add_serve_parser(subparsers)
    _add_connect_parser(subparsers)


def _add_serve_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    server = subparsers.add_parser(
        "serve",
        help="netcat-style server: print or echo what clients send",
        description="Accept secure multipath connections; print what "
        "each client sends (one client at a time), or echo it back to "
        "every client at once with --echo (one, with --once).",
    )
    server.add_argument(
        "--host",
        default="127.0.0.1",
        help="IP address or name to listen on; a name listens on its "
        "first address (default: %(default)s)",
    )
    server.add_argument(
        "--port",
        default="4433",
        help="0 = any free port (default: %(default)s)",
    )
    server.add_argument(
        "--cert",
        default=str(Path("certs", "server.pem")),
        help="PEM certificate chain, leaf first (default: certs/server.pem)",
    )
    server.add_argument(
        "--key",
        default=str(Path("certs", "server.key")),
        help="PEM private key (default: certs/server.key)",
    )
    server.add_argument(
        "--announce",
        action="append",
        default=[],
        metavar="IP[:PORT]",
        help="an address to announce with ADD_ADDR (repeatable)",
    )
    server.add_argument(
        "--echo",
        action="store_true",
        help="send what a client sends back to it instead of printing it",
    )
    server.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="userspace backend: N processes sharing the port; a join "
        "that reaches the wrong one is passed to its owner",
    )
    server.add_argument(
        "--no-restart",
        action="store_true",
        help="with --workers: leave a worker that dies down instead of "
        "starting it again",
    )
    server.add_argument(
        "--server-id",
        type=int,
        default=0,
        metavar="ID",
        help="userspace backend: this server's id (0-255) in its tokens, "
        "for a load balancer that routes joins",
    )
    server.add_argument(
        "--once", action="store_true", help="exit after one connection"
    )
    add_pcap_argument(server, "this server sends and receives")
    _add_common(server)
    server.set_defaults(run=functools.partial(_run, serve))


def _add_connect_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    client = subparsers.add_parser(
        "connect",
        help="netcat-style client: stdin to the server, answers to stdout",
        description="Send stdin over a secure multipath connection, "
        "half-close at its end, print what the server sends until it "
        "closes.",
    )
    client.add_argument(
        "host",
        help="the server's IP address or name; its certificate must name "
        "it, unless --server-name gives another name",
    )
    client.add_argument("port", help="the server's TCP port")
    client.add_argument(
        "--cafile",
        metavar="FILE",
        help="trust this CA (PEM) (default: the system trust store)",
    )
    client.add_argument(
        "--paths",
        help="local addresses, comma separated; first = first subflow, "
        "each further one an extra subflow (default: one subflow, from "
        "the address the system picks; more only to addresses the server "
        "announces, or from the kernel's endpoints with --backend kernel)",
    )
    client.add_argument("--server-name", help="name to verify (default: HOST)")
    client.add_argument(
        "--connect-timeout",
        type=float,
        default=CONNECT_TIMEOUT,
        metavar="SECONDS",
        help="give up on the server's TCP connect after this long, every "
        f"address of a host name included (default: {CONNECT_TIMEOUT:g})",
    )
    client.add_argument(
        "--happy-eyeballs-delay",
        type=float,
        metavar="SECONDS",
        help="try a host name's next address this long after the one "
        "before, the earlier ones still trying (RFC 8305; default: one "
        "after the other, each until it fails)",
    )
    client.add_argument(
        "--manage-paths",
        action="store_true",
        help="kernel backend: add the extra --paths as kernel subflow "
        "endpoints",
    )
    client.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate",
    )
    add_pcap_argument(client, "this client sends and receives")
    _add_common(client)
    client.set_defaults(run=functools.partial(_run, connect))


def _run(
    command: Callable[[argparse.Namespace], Coroutine[Any, Any, None]],
    args: argparse.Namespace,
) -> ExitStatus:
    asyncio.run(command(args))
    return ExitStatus.OK
