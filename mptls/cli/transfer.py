"""The demo's transfer: one real file over two paths, checked end to end.

A server and a client run in this process on loopback. The client sends
the payload over subflows from each of its local addresses; the server
hashes what it receives and answers with its digest. The resulting
:class:`DemoReport` holds both ends' MPTCP state, key fingerprints (the
keys themselves must never reach it), digests and timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from OpenSSL import SSL

import mptls
from mptls.backends.base import MptcpInfo
from mptls.cli.archive import Payload
from mptls.cli.certs import DevelopmentPems, issue_development_pems
from mptls.cli.common import (
    MAX_SECONDS,
    UsageError,
    client_options,
    server_options,
)
from mptls.errors import MptlsError, MptlsTimeoutError
from mptls.tls.config import parse_private_key

CHUNK_SIZE = 256 * 1024
DEFAULT_PATHS = "127.0.0.1,127.0.0.2"

# how long to let the extra subflows join before sending: the demo is
# about the paths, so it waits for them, but never for long
JOIN_WAIT = 5.0
JOIN_POLL = 0.005


@dataclass(frozen=True, slots=True)
class DemoSettings:
    """What the demo was asked to do."""

    backend: str
    mode: str | None
    paths: tuple[str, ...]
    timeout: float
    manage_paths: bool = False
    rotate_every: float | None = None

    def __post_init__(self) -> None:
        # refuse what the backend cannot do before any file is built
        if not self.paths:
            raise UsageError("the demo needs at least one path")
        # nan passed a "<= 0" test and made a deadline that had passed
        # already; inf waited without limit, which --connect-timeout
        # and --rotate-every refuse
        if not 0 < self.timeout <= MAX_SECONDS:
            raise UsageError(
                f"--timeout must be in (0, {MAX_SECONDS:g}] seconds, "
                f"got {self.timeout:g}"
            )
        self.client_options()
        self.server_options()

    def client_options(self) -> dict[str, Any]:
        """The client's backend keywords for these settings."""
        return client_options(
            self.backend,
            self.mode,
            manage_paths=self.manage_paths,
            rotate_every=self.rotate_every,
        )

    def server_options(self) -> dict[str, Any]:
        """The server's backend keywords for these settings."""
        return server_options(
            self.backend, self.mode, rotate_every=self.rotate_every
        )


@dataclass(frozen=True, slots=True)
class ServerSide:
    """What the server saw: its digest, byte count and MPTCP state."""

    sha256: str
    received: int
    info: MptcpInfo


@dataclass(frozen=True, slots=True)
class ClientSide:
    """What the client sent, the server's answer and the client's view."""

    sha256: str
    sent: int
    seconds: float
    answer: str
    info: MptcpInfo
    tls_version: str | None
    cipher: str | None


@dataclass(frozen=True, slots=True)
class DemoReport:
    """Both ends of one demo transfer."""

    payload: Payload
    settings: DemoSettings
    client: ClientSide
    server: ServerSide

    @property
    def sha256_match(self) -> bool:
        return (
            self.client.sha256 == self.server.sha256 == self.client.answer
            and self.client.sent == self.server.received
        )

    @property
    def fingerprints_match(self) -> bool:
        client = self.client.info.key_fingerprint
        return client is not None and client == (
            self.server.info.key_fingerprint
        )

    @property
    def generations_differ(self) -> bool:
        """The ends were looked at on either side of a key rotation
        (E mode): their fingerprints are of different keys."""
        client = self.client.info.key_generation
        server = self.server.info.key_generation
        return None not in (client, server) and client != server

    @property
    def idle_paths(self) -> tuple[str, ...]:
        """The requested local addresses no subflow sent data from.

        Empty where the kernel's own endpoints decide the extra
        subflows: then the paths asked for are not the demo's to open.
        """
        if _expected_subflows(self.settings) < len(self.settings.paths):
            return ()
        used = {
            subflow.local_address[0]
            for subflow in self.client.info.subflows
            if subflow.local_address is not None and subflow.bytes_sent > 0
        }
        return tuple(path for path in self.settings.paths if path not in used)

    @property
    def joined_idle_paths(self) -> tuple[str, ...]:
        """The idle paths whose subflow joined all the same: the server
        held an established subflow from each once it had read the
        file. The other paths took the whole file before the scheduler
        needed these (a file small enough fits on one path)."""
        joined = {
            subflow.remote_address[0]
            for subflow in self.server.info.subflows
            if subflow.remote_address is not None
            and subflow.state.lower() == "established"
        }
        return tuple(path for path in self.idle_paths if path in joined)

    @property
    def unjoined_idle_paths(self) -> tuple[str, ...]:
        """The idle paths whose subflow never opened or joined."""
        joined = self.joined_idle_paths
        return tuple(path for path in self.idle_paths if path not in joined)

    @property
    def ok(self) -> bool:
        # ends that exported no keys have no fingerprints to compare
        keys_agree = (
            self.fingerprints_match
            or self.generations_differ
            or not (
                self.client.info.key_fingerprint
                or self.server.info.key_fingerprint
            )
        )
        return self.sha256_match and keys_agree and not self.idle_paths

    @property
    def throughput(self) -> float:
        """Bytes per second, application data only."""
        return self.client.sent / max(self.client.seconds, 1e-9)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "file": {
                "path": str(self.payload.path),
                "size": self.payload.size,
                "description": self.payload.description,
            },
            "backend": self.settings.backend,
            "mode": self.client.info.mode,
            "paths": list(self.settings.paths),
            "idle_paths": list(self.idle_paths),
            "joined_idle_paths": list(self.joined_idle_paths),
            "tls": {
                "version": self.client.tls_version,
                "cipher": self.client.cipher,
            },
            "keys": {
                "source": "TLS exporter (EXPORTER-MPTCP)",
                "installed": self.client.info.keys_installed,
                "reason": self.client.info.keys_reason,
                "client_fingerprint": self.client.info.key_fingerprint,
                "server_fingerprint": self.server.info.key_fingerprint,
                "match": self.fingerprints_match,
                "client_generation": self.client.info.key_generation,
                "server_generation": self.server.info.key_generation,
            },
            "transfer": {
                "bytes_sent": self.client.sent,
                "bytes_received": self.server.received,
                "seconds": round(self.client.seconds, 6),
                "bytes_per_second": round(self.throughput),
            },
            "sha256": {
                "client": self.client.sha256,
                "server": self.server.sha256,
                "match": self.sha256_match,
            },
            "client": self.client.info.as_dict(),
            "server": self.server.info.as_dict(),
        }


Progress = Callable[[int], None]


async def _receive(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    result: asyncio.Future[ServerSide],
    progress: Progress,
) -> None:
    """The server's side: hash everything until EOF, answer the digest."""
    try:
        digest = hashlib.sha256()
        received = 0
        while chunk := await reader.read(CHUNK_SIZE):
            digest.update(chunk)
            received += len(chunk)
            progress(received)
        info = writer.get_extra_info("mptcp")
        writer.write(digest.hexdigest().encode("ascii") + b"\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()
    except Exception as exc:
        if not result.done():
            result.set_exception(exc)
        return
    if not result.done():
        result.set_result(ServerSide(digest.hexdigest(), received, info))


async def _wait_for_subflows(writer: asyncio.StreamWriter, count: int) -> None:
    """Give the extra paths a moment to join before the data flows."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + JOIN_WAIT
    while loop.time() < deadline:
        info: MptcpInfo | None = writer.get_extra_info("mptcp")
        if info is None or info.fallback:
            return
        established = [
            subflow
            for subflow in info.subflows
            if subflow.state.lower() == "established"
        ]
        if len(established) >= count:
            return
        await asyncio.sleep(JOIN_POLL)


async def _send(
    settings: DemoSettings, port: int, payload: Payload, pems: DevelopmentPems
) -> ClientSide:
    """The client's side: send the file, half-close, read the answer."""
    host = _server_host(settings.paths)
    reader, writer = await mptls.open_connection(
        host,
        port,
        ssl=mptls.TLSConfig(cadata=pems.ca),
        server_hostname="localhost",
        local_addrs=list(settings.paths),
        **settings.client_options(),
    )
    try:
        await _wait_for_subflows(writer, _expected_subflows(settings))

        # send while hashing; drain keeps the buffer bounded
        started = time.perf_counter()
        digest = hashlib.sha256()
        sent = 0
        with payload.path.open("rb") as source:
            while chunk := source.read(CHUNK_SIZE):
                digest.update(chunk)
                writer.write(chunk)
                sent += len(chunk)
                await writer.drain()
        writer.write_eof()

        # the server answers once it has everything
        answer = (await reader.read()).decode("ascii", "replace").strip()
        seconds = time.perf_counter() - started
        cipher = writer.get_extra_info("cipher")
        return ClientSide(
            sha256=digest.hexdigest(),
            sent=sent,
            seconds=seconds,
            answer=answer,
            info=writer.get_extra_info("mptcp"),
            tls_version=writer.get_extra_info("tls_version"),
            cipher=cipher[0] if cipher else None,
        )
    finally:
        writer.close()
        with contextlib.suppress(MptlsError, OSError):
            await writer.wait_closed()


def _expected_subflows(settings: DemoSettings) -> int:
    """One subflow per path, except where the kernel's own endpoints
    decide the extra subflows."""
    if settings.backend == "kernel" and not settings.manage_paths:
        return 1
    return len(settings.paths)


def _server_host(paths: tuple[str, ...]) -> str:
    """The server listens on the loopback of the first path's family."""
    return "::1" if ":" in paths[0] else "127.0.0.1"


def _server_tls(pems: DevelopmentPems) -> SSL.Context:
    """The server's context, straight from memory: TLSConfig reads its
    identity from files, and the demo writes none. mptls still switches
    renegotiation and compression off on a context it is handed."""
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_min_proto_version(SSL.TLS1_3_VERSION)
    context.use_certificate(x509.load_pem_x509_certificates(pems.chain)[0])
    context.use_privatekey(parse_private_key(pems.key, "the demo key"))
    context.check_privatekey()
    return context


async def run_demo(
    settings: DemoSettings,
    payload: Payload,
    progress: Progress = lambda received: None,
) -> DemoReport:
    """Run one transfer of ``payload`` and report both ends."""
    pems = issue_development_pems()
    loop = asyncio.get_running_loop()
    result: asyncio.Future[ServerSide] = loop.create_future()
    handler = functools.partial(_receive, result=result, progress=progress)
    server = await mptls.start_server(
        handler,
        _server_host(settings.paths),
        0,
        ssl=_server_tls(pems),
        **settings.server_options(),
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        sending = asyncio.ensure_future(_send(settings, port, payload, pems))
        deadline = asyncio.timeout(settings.timeout)
        try:
            async with deadline:
                client, server_side = await _both(sending, result)
        except TimeoutError as exc:
            if not deadline.expired():
                raise
            raise MptlsTimeoutError(
                f"the demo did not finish within {settings.timeout:g} s "
                "(see --timeout)"
            ) from exc
    return DemoReport(payload, settings, client, server_side)


async def _both(
    sending: asyncio.Future[ClientSide], receiving: asyncio.Future[ServerSide]
) -> tuple[ClientSide, ServerSide]:
    """Wait for both ends; the first to fail stops the other, so a broken
    server never leaves the client waiting for an answer until timeout."""
    try:
        await asyncio.wait(
            (sending, receiving), return_when=asyncio.FIRST_EXCEPTION
        )
        for end in (sending, receiving):
            error = end.exception() if end.done() else None
            if error is not None:
                raise error
        return await sending, await receiving
    finally:
        for end in (sending, receiving):
            end.cancel()
        await asyncio.gather(sending, receiving, return_exceptions=True)
