"""How a connect tries a host's addresses: one by one, or staggered.

``happy_eyeballs_delay`` and ``interleave`` mean what asyncio's keywords
of those names mean (RFC 8305). The race is driven through
``connect_any`` with real sockets and a connect of the test's own, which
answers, refuses or never answers per address; no packet leaves. Then
both backends take the keywords end to end, on loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pki import Pki
from support import usable_backend

import mptls
from mptls.backends.base import (
    AddressRace,
    connect_any,
    within_connect_timeout,
)
from mptls.errors import BackendError, ConfigurationError

V4 = socket.AF_INET
V6 = socket.AF_INET6
A = (V4, ("192.0.2.1", 443))
B = (V4, ("192.0.2.2", 443))
C = (V6, ("2001:db8::1", 443, 0, 0))
D = (V6, ("2001:db8::2", 443, 0, 0))
LIMIT = 5.0


class FakeConnects:
    """A connect per address: ``ok``, ``refuse``, ``hang`` or ``bug``.

    Records the order the attempts started in and every socket made, so
    that a test can check which were closed.
    """

    def __init__(self, behaviour: dict[tuple[Any, ...], str]) -> None:
        self.behaviour = behaviour
        self.started: list[tuple[Any, ...]] = []
        self.sockets: dict[tuple[Any, ...], socket.socket] = {}

    def new_socket(self, family: int) -> socket.socket:
        return socket.socket(family, socket.SOCK_STREAM)

    async def connect(
        self, sock: socket.socket, address: tuple[Any, ...]
    ) -> None:
        self.started.append(address)
        self.sockets[address] = sock
        what = self.behaviour[address]
        if what == "refuse":
            raise ConnectionRefusedError(111, "Connection refused")
        if what == "hang":
            await asyncio.Event().wait()
        if what == "bug":
            raise RuntimeError("a bug in the connect")

    async def run(
        self,
        addresses: list[tuple[int, tuple[Any, ...]]],
        race: AddressRace,
    ) -> socket.socket:
        return await connect_any(
            "example.test",
            443,
            addresses,
            local=None,
            new_socket=self.new_socket,
            connect=self.connect,
            race=race,
        )

    def closed(self, address: tuple[Any, ...]) -> bool:
        return self.sockets[address].fileno() == -1

    def close_all(self) -> None:
        for sock in self.sockets.values():
            sock.close()


@pytest.fixture
def fakes() -> Iterator[list[FakeConnects]]:
    made: list[FakeConnects] = []
    yield made
    for connects in made:
        connects.close_all()


def fake(made: list[FakeConnects], **behaviour: str) -> FakeConnects:
    names = {"a": A[1], "b": B[1], "c": C[1], "d": D[1]}
    connects = FakeConnects({names[k]: v for k, v in behaviour.items()})
    made.append(connects)
    return connects


# the order


@pytest.mark.parametrize(
    ("race", "expected"),
    [
        (AddressRace(), [A, B, C, D]),
        (AddressRace(interleave=1), [A, C, B, D]),
        (AddressRace(interleave=2), [A, B, C, D]),
        (AddressRace(0.25), [A, B, C, D]),
        (AddressRace.from_options(0.25), [A, C, B, D]),
        (AddressRace.from_options(None, 1), [A, C, B, D]),
    ],
)
def test_interleave_takes_that_many_of_the_first_family_then_alternates(
    race: AddressRace, expected: list[tuple[int, tuple[Any, ...]]]
) -> None:
    assert race.order([A, B, C, D]) == expected


def test_interleave_of_one_family_or_none_keeps_the_order() -> None:
    assert AddressRace(interleave=1).order([A, B]) == [A, B]
    assert AddressRace(interleave=3).order([C, A]) == [C, A]
    assert AddressRace(interleave=1).order([]) == []


@pytest.mark.parametrize(
    ("delay", "interleave", "message"),
    [
        (-1, None, r"happy_eyeballs_delay must be in \[0, 86400\]"),
        ("0.25", None, "happy_eyeballs_delay must be a number"),
        (True, None, "happy_eyeballs_delay must be a number"),
        (float("nan"), None, r"happy_eyeballs_delay must be in"),
        (None, -1, "interleave must be an int >= 0"),
        (0.25, 1.5, "interleave must be an int >= 0"),
        (None, True, "interleave must be an int >= 0"),
    ],
)
def test_bad_race_keywords_are_refused_clearly(
    delay: object, interleave: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        AddressRace.from_options(delay, interleave)


# an int past Python's 4300 digits cannot be made a str: the message
# names its size instead of failing with a ValueError of its own
HUGE = 10**5000


@pytest.mark.parametrize(
    ("delay", "interleave", "message"),
    [
        (HUGE, None, r"in \[0, 86400\] seconds, got an int of \d+ bits"),
        (-HUGE, None, r"in \[0, 86400\] seconds, got an int of \d+ bits"),
        (None, -HUGE, r"an int >= 0, got an int of \d+ bits"),
        (10**40, None, r"got an int of 133 bits"),
        ("x" * 10_000, None, r"got 'x+\.\.\.$"),
    ],
    ids=["huge", "huge-negative", "huge-interleave", "long-int", "long-str"],
)
def test_a_huge_race_keyword_is_refused_with_a_short_message(
    delay: object, interleave: object, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        AddressRace.from_options(delay, interleave)
    assert len(str(caught.value)) < 120


# one by one (no delay), and staggered


@pytest.mark.parametrize(
    ("behaviour", "race"),
    [
        # one by one: a refusal moves on to the next address
        ({"a": "refuse", "b": "ok"}, AddressRace()),
        # staggered: a silent address does not hold up the next
        ({"a": "hang", "b": "ok"}, AddressRace(0.01)),
        # a delay no test would wait out: only A's failure can start B
        ({"a": "refuse", "b": "ok"}, AddressRace(3600.0)),
    ],
    ids=["refused-one-by-one", "silent-staggered", "refused-staggered"],
)
async def test_the_next_address_connects_and_the_first_is_closed(
    fakes: list[FakeConnects], behaviour: dict[str, str], race: AddressRace
) -> None:
    connects = fake(fakes, **behaviour)
    sock = await asyncio.wait_for(connects.run([A, B], race), LIMIT)
    assert sock is connects.sockets[B[1]]
    assert not connects.closed(B[1])
    assert connects.started == [A[1], B[1]]
    # the loser failed, or was cancelled, and its socket is closed
    assert connects.closed(A[1])


@pytest.mark.parametrize(
    ("race", "started"),
    [
        # one by one: B waits for A to fail
        (AddressRace(), [A]),
        # staggered: B waits for A's delay
        (AddressRace(3600.0), [A]),
        # no delay at all: every address at once
        (AddressRace(0.0), [A, B, C]),
    ],
    ids=["one-by-one", "before-the-delay", "all-at-once"],
)
async def test_a_caller_that_gives_up_leaves_no_socket_open(
    fakes: list[FakeConnects],
    race: AddressRace,
    started: list[tuple[int, tuple[Any, ...]]],
) -> None:
    connects = fake(fakes, a="hang", b="hang", c="hang")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(connects.run([A, B, C], race), 0.2)
    assert connects.started == [address for _, address in started]
    assert all(connects.closed(address) for address in connects.started)


async def test_of_two_that_connect_together_one_wins_the_other_is_closed(
    fakes: list[FakeConnects],
) -> None:
    connects = fake(fakes, a="ok", b="ok")
    sock = await asyncio.wait_for(
        connects.run([A, B], AddressRace(0.0)), LIMIT
    )
    open_ones = [a for a in connects.started if not connects.closed(a)]
    assert len(open_ones) == 1
    assert connects.sockets[open_ones[0]] is sock


async def test_every_address_failing_names_each_in_order(
    fakes: list[FakeConnects],
) -> None:
    connects = fake(fakes, a="refuse", b="refuse", c="refuse")
    with pytest.raises(BackendError) as caught:
        await asyncio.wait_for(
            connects.run([A, B, C], AddressRace(0.01)), LIMIT
        )
    message = str(caught.value)
    where = [message.index(address[0]) for _, address in (A, B, C)]
    assert where == sorted(where)
    assert isinstance(caught.value.__cause__, ConnectionRefusedError)
    assert all(connects.closed(address) for address in connects.started)


async def test_a_bug_in_one_attempt_is_not_taken_for_a_failed_address(
    fakes: list[FakeConnects],
) -> None:
    connects = fake(fakes, a="hang", b="bug", c="ok")
    with pytest.raises(RuntimeError, match="a bug in the connect"):
        await asyncio.wait_for(
            connects.run([A, B, C], AddressRace(0.01)), LIMIT
        )
    assert all(connects.closed(address) for address in connects.started)


async def test_a_cancel_while_the_losers_end_closes_the_winner(
    fakes: list[FakeConnects],
) -> None:
    """The caller gives up after an address connected, while the
    attempts that lost are still ending: the winner is closed too. It
    was dropped open, a connection the server held until the socket
    was collected."""
    connects = fake(fakes, a="hang", b="ok")
    caller: asyncio.Future[socket.socket] | None = None

    async def connect(sock: socket.socket, address: tuple[Any, ...]) -> None:
        try:
            await connects.connect(sock, address)
        except asyncio.CancelledError:
            # the loser ends just as the caller is cancelled
            assert caller is not None
            caller.cancel()
            raise

    caller = asyncio.ensure_future(
        connect_any(
            "example.test",
            443,
            [A, B],
            local=None,
            new_socket=connects.new_socket,
            connect=connect,
            race=AddressRace(0.0),
        )
    )
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(caller, LIMIT)
    assert connects.started == [A[1], B[1]]
    assert all(connects.closed(address) for address in connects.started)


async def test_a_connect_cancelled_as_it_completes_hands_its_socket_over() -> (
    None
):
    """A cancel that comes just as the connect completes: the socket
    reaches the caller, whose cleanup closes it, and the cancel still
    lands. asyncio.wait_for ran the connect as a task of its own: from
    Python 3.12 such a cancel dropped the connected socket unclosed
    (a ResourceWarning, the server's end held open until collected),
    on 3.11 the socket came back and the cancel was lost."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    received: list[socket.socket] = []

    async def connecting() -> socket.socket:
        # the cancel runs before anything that resumes on this return
        loop.call_soon(caller.cancel)
        return sock

    async def connect_then_use() -> None:
        connected = await within_connect_timeout(
            connecting(), "example.test", 443, LIMIT
        )
        received.append(connected)
        try:
            await asyncio.Event().wait()
        finally:
            connected.close()

    caller = asyncio.ensure_future(connect_then_use())
    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, LIMIT)
        assert received == [sock]
        assert sock.fileno() == -1
    finally:
        sock.close()


# end to end


async def _echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.write(await reader.read(100))
    with contextlib.suppress(ConnectionError, mptls.MptlsError):
        await writer.drain()
    writer.close()


@pytest.fixture(params=["userspace", "kernel"])
async def server(
    request: pytest.FixtureRequest, pki: Pki
) -> AsyncIterator[tuple[str, int]]:
    backend = usable_backend(request.param)
    listening = await mptls.start_server(
        _echo, "127.0.0.1", 0, ssl=pki.server(), backend=backend
    )
    async with listening:
        yield backend, listening.sockets[0].getsockname()[1]


async def test_both_backends_take_asyncios_race_keywords(
    pki: Pki, server: tuple[str, int]
) -> None:
    backend, port = server
    reader, writer = await asyncio.wait_for(
        mptls.open_connection(
            "localhost",
            port,
            ssl=pki.client(),
            backend=backend,
            happy_eyeballs_delay=0.25,
            interleave=1,
        ),
        LIMIT,
    )
    try:
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.read(100), LIMIT) == b"ping"
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, mptls.MptlsError):
            await writer.wait_closed()
