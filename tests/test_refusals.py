"""Refused peers on the ``mptls.refusals`` logger: one INFO line each,
naming the peer and the reason, never a secret, and no flood.

The rate limit is checked with a fake clock; the refusals themselves on
real loopback sockets, against a server in this process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
from pki import Pki
from support import client_hello, stalled_in_handshake, usable_backend

import mptls
from mptls import refusals
from mptls.mptcp.framing import (
    NOT_MPTLS_REPLY,
    PREAMBLE,
    Flag,
    Segment,
    SegmentDecoder,
    encode_segment,
)
from mptls.mptcp.options import MpCapable, MpJoinAck, MpJoinSyn
from mptls.refusals import RefusalLog
from mptls.tls.keys import KeyMaterial

# every wait on the network is bounded
WAIT = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    """The messages logged on mptls.refusals so far."""
    caplog.set_level(logging.INFO, logger="mptls.refusals")

    def messages() -> list[str]:
        return [
            record.getMessage()
            for record in caplog.records
            if record.name == "mptls.refusals"
        ]

    return messages


@pytest.fixture
def fresh_log(monkeypatch: pytest.MonkeyPatch) -> Iterator[RefusalLog]:
    """A process-wide refusal log of this test's own: refusals of other
    tests within the same interval must not use up its burst."""
    log = RefusalLog()
    monkeypatch.setattr(refusals, "refusal_log", log)
    yield log


# the rate limit


def test_a_flood_shows_a_burst_then_one_line_with_the_count(
    lines: Callable[[], list[str]],
) -> None:
    clock = FakeClock()
    log = RefusalLog(burst=3, interval=10.0, clock=clock)
    for port in range(1000, 1200):
        log.refused(("127.0.0.1", port), "a reason")
    assert lines() == [
        "refused 127.0.0.1:1000: a reason",
        "refused 127.0.0.1:1001: a reason",
        "refused 127.0.0.1:1002: a reason",
    ]

    # the next interval starts with what the last one held back
    clock.now += 10.0
    log.refused(("::1", 2000), "another reason")
    assert lines()[3:] == [
        "refused 197 more peers within 10 s, not shown one by one (the "
        "last: 127.0.0.1:1199: a reason)",
        "refused [::1]:2000: another reason",
    ]
    log.flush()
    assert len(lines()) == 5, "nothing was held back"


def test_refusals_apart_in_time_are_each_shown(
    lines: Callable[[], list[str]],
) -> None:
    clock = FakeClock()
    log = RefusalLog(burst=1, interval=1.0, clock=clock)
    for port in range(5):
        log.refused(("127.0.0.1", port), "slow retries")
        clock.now += 1.0
    assert len(lines()) == 5
    assert not any("more peer" in line for line in lines())


def test_nothing_is_counted_while_nobody_listens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="mptls.refusals")
    clock = FakeClock()
    log = RefusalLog(burst=1, clock=clock)
    for port in range(50):
        log.refused(("127.0.0.1", port), "unheard")
    caplog.set_level(logging.INFO, logger="mptls.refusals")
    log.flush()
    assert caplog.records == []


async def test_what_was_held_back_is_told_when_the_interval_ends(
    lines: Callable[[], list[str]],
) -> None:
    told = asyncio.Event()

    class Waker(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "more peers" in record.getMessage():
                told.set()

    waker = Waker()
    refusals.logger.addHandler(waker)
    try:
        log = RefusalLog(burst=2, interval=0.05)
        for port in range(10):
            log.refused(("127.0.0.1", port), "quick")
        # no further refusal comes: the loop's timer tells the count
        await asyncio.wait_for(told.wait(), WAIT)
    finally:
        refusals.logger.removeHandler(waker)
    assert lines()[-1] == (
        "refused 8 more peers within 0.05 s, not shown one by one (the "
        "last: 127.0.0.1:9: quick)"
    )


# refusals on real sockets


@contextlib.asynccontextmanager
async def served(
    pki: Pki, tls: mptls.TLSConfig | None = None, **options: object
) -> AsyncIterator[int]:
    async def close_at_once(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        writer.close()

    server = await mptls.start_server(
        close_at_once, "127.0.0.1", 0, ssl=tls or pki.server(), **options
    )
    async with server:
        yield int(server.sockets[0].getsockname()[1])


async def raw_exchange(port: int, data: bytes) -> tuple[int, bytes]:
    """Send ``data`` and the end of the stream on a plain TCP connection
    and read until the server closes; returns this end's port and what
    came back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local_port = int(writer.get_extra_info("sockname")[1])
    writer.write(data)
    writer.write_eof()
    answer = await asyncio.wait_for(reader.read(), WAIT)
    writer.close()
    return local_port, answer


async def test_a_mode_the_server_does_not_allow_is_one_line(
    pki: Pki, lines: Callable[[], list[str]], fresh_log: RefusalLog
) -> None:
    async with served(pki) as port:
        # an E client's MP_CAPABLE SYN, sent by hand to know its port
        syn = Segment(Flag.SYN, (MpCapable(flags=0x08),))
        local, answer = await raw_exchange(
            port, PREAMBLE + encode_segment(syn)
        )
    (reset,) = SegmentDecoder().feed(answer)
    assert reset.flags & Flag.RST
    assert lines() == [
        f"refused 127.0.0.1:{local}: the client asked for mode E, this "
        "server allows G"
    ]


async def test_a_client_that_does_not_trust_the_server_is_one_line(
    pki: Pki, lines: Callable[[], list[str]], fresh_log: RefusalLog
) -> None:
    async with served(pki) as port:
        with pytest.raises(mptls.CertificateError):
            # no CA given: the system's trust store has not this one
            await mptls.open_connection(
                "127.0.0.1", port, ssl=mptls.TLSConfig()
            )
        # the server reads the client's alert after the client gave up
        await wait_for_line(lines)
    [line] = lines()
    assert line.startswith("refused 127.0.0.1:")
    assert line.endswith(
        ": TLS handshake failed: peer sent TLS alert unknown_ca (48) (the "
        "client does not accept this server's certificate)"
    )


async def test_a_handshake_the_server_fails_reads_as_the_others(
    pki: Pki, lines: Callable[[], list[str]], fresh_log: RefusalLog
) -> None:
    # the server's own OpenSSL error, not a peer's alert: its line starts
    # as every other failed handshake's, so one search finds them all
    server_tls = pki.server(require_client_cert=True, cafile=pki.ca_pem)
    async with served(pki, tls=server_tls) as port:
        writer = None
        # TLS 1.3: the server's alert may come after the client finished
        with contextlib.suppress(mptls.TLSError):
            _, writer = await mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client()
            )
        await wait_for_line(lines)
        if writer is not None:
            writer.transport.abort()
    [line] = lines()
    assert line.startswith("refused 127.0.0.1:")
    assert ": TLS handshake failed: peer did not return a certificate" in line
    assert "TLS failed" not in line


async def wait_for_line(lines: Callable[[], list[str]]) -> None:
    """Until a refusal is logged: the server's side of a failure the
    client already saw may come a few loop steps later."""
    told = asyncio.Event()

    class Waker(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            told.set()

    waker = Waker()
    refusals.logger.addHandler(waker)
    try:
        if not lines():
            await asyncio.wait_for(told.wait(), WAIT)
    finally:
        refusals.logger.removeHandler(waker)


async def test_a_peer_that_is_not_mptls_is_one_line(
    pki: Pki, lines: Callable[[], list[str]], fresh_log: RefusalLog
) -> None:
    async with served(pki) as port:
        local, answer = await raw_exchange(port, b"GET / HTTP/1.1\r\n\r\n")
    assert answer == NOT_MPTLS_REPLY
    [line] = lines()
    assert line.startswith(f"refused 127.0.0.1:{local}: the peer does not")
    assert "an HTTP request" in line


@pytest.mark.parametrize("backend", ["userspace", "kernel"])
async def test_a_peer_that_leaves_unrefused_is_no_line(
    pki: Pki,
    lines: Callable[[], list[str]],
    fresh_log: RefusalLog,
    backend: str,
) -> None:
    # a port scan or a load balancer's health check: connect, close;
    # on the kernel backend TLS sees that connection at once
    async with served(pki, backend=usable_backend(backend)) as port:
        _, answer = await raw_exchange(port, b"")
        # a refused peer after it, to know the server had its turn
        syn = Segment(Flag.SYN, (MpCapable(flags=0x08),))
        local, _ = await raw_exchange(port, PREAMBLE + encode_segment(syn))
    assert answer == b""
    [line] = lines()
    assert line.startswith(f"refused 127.0.0.1:{local}: ")


@pytest.mark.parametrize(
    "sent",
    [b"MPTLS", PREAMBLE, PREAMBLE + b"\x02\x10"],
    ids=["part of the preamble", "the preamble", "part of a frame"],
)
async def test_a_peer_that_leaves_in_its_first_frame_is_one_line(
    pki: Pki,
    lines: Callable[[], list[str]],
    fresh_log: RefusalLog,
    sent: bytes,
) -> None:
    # unlike a port scan it sent something: a first frame cut short (a
    # balancer's inspection given up, a client killed) is news
    async with served(pki) as port:
        local, answer = await raw_exchange(port, sent)
        await wait_for_line(lines)
    assert answer == b""
    assert lines() == [
        f"refused 127.0.0.1:{local}: the connection ended before its "
        "first frame was whole"
    ]


@pytest.mark.parametrize(
    ("after", "reason"),
    [
        (b"\xff" * 8, "frame flags 0xff outside FIN..ACK"),
        (
            encode_segment(Segment(Flag.ACK)),
            "the third ACK carries no MP_CAPABLE",
        ),
    ],
    ids=["a frame it cannot read", "a third ACK without MP_CAPABLE"],
)
async def test_a_peer_that_fails_after_its_syn_is_one_line(
    pki: Pki,
    lines: Callable[[], list[str]],
    fresh_log: RefusalLog,
    after: bytes,
    reason: str,
) -> None:
    # a valid MP_CAPABLE SYN with no TLS in it, then garbage: the server
    # dropped the connection without a line, for TLS had heard nothing
    # and took the peer for a port scan
    syn = encode_segment(Segment(Flag.SYN, (MpCapable(flags=0x02),)))
    async with served(pki) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        local = int(writer.get_extra_info("sockname")[1])
        writer.write(PREAMBLE + syn)
        # the SYN|ACK: the connection exists before the garbage comes
        answer = await asyncio.wait_for(reader.read(len(PREAMBLE)), WAIT)
        writer.write(after)
        await wait_for_line(lines)
        writer.close()
    assert answer == PREAMBLE
    assert lines() == [f"refused 127.0.0.1:{local}: {reason}"]


async def test_silence_past_the_handshake_limit_names_no_keyword(
    pki: Pki, lines: Callable[[], list[str]], fresh_log: RefusalLog
) -> None:
    # the line is read by whoever runs the server, the command line's
    # user too, who has no handshake_timeout to turn
    async with served(pki, handshake_timeout=0.2) as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        local = int(writer.get_extra_info("sockname")[1])
        writer.write(PREAMBLE)
        # the server ends the TCP connection once the limit is past
        assert await asyncio.wait_for(reader.read(), WAIT) == b""
        writer.close()
    assert lines() == [
        f"refused 127.0.0.1:{local}: no MPTCP handshake within 0.2 s"
    ]


async def test_a_join_naming_no_connection_is_one_line(
    pki: Pki, lines: Callable[[], list[str]], fresh_log: RefusalLog
) -> None:
    token = os.urandom(8)
    syn = Segment(Flag.SYN, (MpJoinSyn(token, 1, address_id=1),))
    async with served(pki) as port:
        local, _ = await raw_exchange(port, PREAMBLE + encode_segment(syn))
    assert lines() == [
        f"refused 127.0.0.1:{local}: MP_JOIN names an unknown token"
    ]


async def test_a_flood_of_refusals_is_cut_short(
    pki: Pki,
    lines: Callable[[], list[str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    log = RefusalLog(burst=5, interval=60.0)
    monkeypatch.setattr(refusals, "refusal_log", log)
    syn = Segment(Flag.SYN, (MpCapable(flags=0x08),))
    async with served(pki) as port:
        for _ in range(30):
            await raw_exchange(port, PREAMBLE + encode_segment(syn))
    assert len(lines()) == 5
    log.flush()
    assert lines()[-1].startswith("refused 25 more peers within 60 s")


# a server that stops


@contextlib.contextmanager
def watching_the_end(logged: asyncio.Event) -> Iterator[None]:
    """Sets ``logged`` at the first line on mptls.refusals or the debug
    line of a handshake the server's stop cut short."""

    class Watcher(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            if record.name == "mptls.refusals" or "stopping" in message:
                logged.set()

    watcher = Watcher()
    logging.getLogger("mptls").addHandler(watcher)
    try:
        yield
    finally:
        logging.getLogger("mptls").removeHandler(watcher)


async def stalled_tls_alone(
    port: int,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The kernel backend's stalled client: TLS with no framing under
    it, a ClientHello and then silence, once the server answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(client_hello())
    assert await asyncio.wait_for(reader.read(65536), WAIT)
    return reader, writer


# asyncio's servers end their clients from Python 3.13 only: before, the
# kernel backend's close_clients() raises NotImplementedError
STOPPING_BACKENDS = ["userspace"] + (
    ["kernel"] if hasattr(asyncio.Server, "abort_clients") else []
)


@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
@pytest.mark.parametrize("backend", STOPPING_BACKENDS)
async def test_a_handshake_the_servers_stop_cuts_short_is_no_refusal(
    pki: Pki,
    lines: Callable[[], list[str]],
    caplog: pytest.LogCaptureFixture,
    fresh_log: RefusalLog,
    how: str,
    backend: str,
) -> None:
    # the server stopped; the client asked for nothing it refuses. On
    # the kernel backend asyncio's own close_clients() ends the
    # connections: the backend tells their protocols first
    caplog.set_level(logging.DEBUG, logger="mptls")

    async def never_called(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        raise AssertionError("the handshake completed")

    server = await mptls.start_server(
        never_called,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        backend=usable_backend(backend),
    )
    port = int(server.sockets[0].getsockname()[1])
    stalled = (
        stalled_in_handshake if backend == "userspace" else stalled_tls_alone
    )
    logged = asyncio.Event()
    async with server:
        _, writer = await stalled(port)
        with watching_the_end(logged):
            server.close()
            getattr(server, how)()
            # a closing server waits for the client's end, which comes
            writer.close()
            await asyncio.wait_for(logged.wait(), WAIT)
    assert lines() == []
    assert any(
        "stopping" in record.getMessage()
        for record in caplog.records
        if record.levelno == logging.DEBUG
    )


# what never shows


def spellings(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), repr(secret)[2:-1]]


async def forged_join(port: int, token: bytes, hmac: bytes) -> int:
    """A join with a known token and a wrong HMAC in its third ACK;
    returns this end's port once the server has reset it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local_port = int(writer.get_extra_info("sockname")[1])
    decoder = SegmentDecoder()
    syn = Segment(Flag.SYN, (MpJoinSyn(token, 0x0A0B0C0D, address_id=1),))
    writer.write(PREAMBLE + encode_segment(syn))
    segments: list[Segment] = []
    while not any(s.flags & Flag.RST for s in segments):
        data = await asyncio.wait_for(reader.read(65536), WAIT)
        assert data, "the server closed without a reset"
        segments += decoder.feed(data)
        if len(segments) == 1:
            # its SYN|ACK: the third ACK follows, with a made-up HMAC
            ack = Segment(Flag.ACK, (MpJoinAck(hmac),))
            writer.write(encode_segment(ack))
    writer.close()
    return local_port


async def test_a_forged_join_is_one_line_with_no_secret(
    pki: Pki,
    caplog: pytest.LogCaptureFixture,
    exported: list[KeyMaterial],
    fresh_log: RefusalLog,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with served(pki) as port:
        _, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        info = writer.get_extra_info("mptcp")
        token = bytes.fromhex(info.remote_token)
        hmac = os.urandom(20)
        local = await forged_join(port, token, hmac)
        writer.close()
    [line] = [
        record.getMessage()
        for record in caplog.records
        if record.name == "mptls.refusals"
    ]
    assert line == (
        f"refused 127.0.0.1:{local}: bad MP_JOIN HMAC in the third ACK"
    )

    # no key or HMAC in any line logged at any level, and no token in
    # the refusal (debug lines tag a connection by its token's prefix)
    assert exported, "no key was exported"
    secrets = [hmac]
    for keys in exported:
        secrets += [keys.key_a + keys.key_b, keys.key_a, keys.key_b]
    logged = "\n".join(record.getMessage() for record in caplog.records)
    for secret in secrets:
        for spelling in spellings(secret):
            assert spelling not in logged
    for secret in (token, bytes.fromhex(info.local_token)):
        for spelling in spellings(secret) + spellings(secret[:4]):
            assert spelling not in line
