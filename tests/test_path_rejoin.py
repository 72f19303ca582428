"""A client joins a lost path of its own again while others carry on.

The unit tests drive :class:`Paths` with a stand-in transport and core
on a real event loop whose TCP connects are recorded (and fail, so no
join ever settles); the loopback test resets one of two subflows of a
real upload and waits for the path to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import itertools
import logging
import random
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import pytest
from pki import Pki
from support import digest_handler, established
from test_hijack import join_as_observer

import mptls
from mptls.backends.userspace import paths as paths_module
from mptls.backends.userspace.paths import Paths
from mptls.errors import MptlsError
from mptls.mptcp import events
from mptls.mptcp.framing import Flag
from mptls.mptcp.options import ResetReason

REMOTE = ("127.0.0.1", 4433)
FIRST, SECOND = "127.0.0.1", "127.0.0.2"


class FakeCore:
    """What :class:`Paths` reads of the core: one subflow stays live."""

    def __init__(self) -> None:
        self.closed = False
        self.live_subflows = 1
        self.joins_allowed = True
        self.config = SimpleNamespace(
            join_timeout=1.0,
            max_subflows=8,
            join_failure_burst=16,
            join_failure_rate=2.0,
        )
        self.subflow_ids = itertools.count(10)

    def info(self) -> Any:
        return SimpleNamespace(subflows=(), keys_reason="")

    def open_subflow(self, now: float, **kwargs: Any) -> int:
        if self.live_subflows >= self.config.max_subflows:
            raise MptlsError("already at max_subflows")
        return next(self.subflow_ids)


class FakeOwner:
    """The transport as its paths see it: the joins it is handed."""

    def __init__(self) -> None:
        self.closing = False
        self.attached: list[int] = []
        self.changed = asyncio.Event()

    def is_closing(self) -> bool:
        return self.closing

    def tag(self) -> str:
        return "test"

    def process(self) -> None:
        pass

    def attach(self, subflow_id: int, subflow: Any) -> None:
        self.attached.append(subflow_id)
        self.changed.set()

    async def until(self, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.attached) < count:
                self.changed.clear()
                await self.changed.wait()


class Attempts:
    """The connects tried: (loop time, local address), in place of the
    paths' TCP connects; each fails unless ``succeed`` is set."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.made: list[tuple[float, str | None]] = []
        self.remotes: list[str] = []
        self.changed = asyncio.Event()
        self.succeed = False

    async def connect_subflow(
        self, protocol: Any, remote: tuple[str, int], local: str | None
    ) -> None:
        self.made.append((self.loop.time(), local))
        self.remotes.append(remote[0])
        self.changed.set()
        if not self.succeed:
            raise ConnectionRefusedError("refused by the test")

    def of(self, local: str) -> list[float]:
        return [when for when, where in self.made if where == local]

    async def until(self, local: str, count: int) -> None:
        async with asyncio.timeout(10):
            while len(self.of(local)) < count:
                self.changed.clear()
                await self.changed.wait()


@pytest.fixture
async def setup() -> AsyncIterator[
    tuple[Paths, FakeCore, FakeOwner, Attempts]
]:
    loop = asyncio.get_running_loop()
    attempts = Attempts(loop)
    core, owner = FakeCore(), FakeOwner()
    original = paths_module.connect_subflow
    paths_module.connect_subflow = attempts.connect_subflow
    paths = Paths(
        owner,  # type: ignore[arg-type]
        core,  # type: ignore[arg-type]
        loop,
        initiator=True,
        local_addrs=[FIRST, SECOND],
        remote=REMOTE,
        announce=[],
        names={},
    )
    try:
        yield paths, core, owner, attempts
    finally:
        paths.close()
        paths_module.connect_subflow = original


def lost(subflow_id: int, reset: int | None = None) -> events.SubflowClosed:
    return events.SubflowClosed(subflow_id, "subflow lost", reset)


async def started(paths: Paths, attempts: Attempts) -> None:
    """Keys installed: the second path's first join is tried (and fails)."""
    paths.keys_installed()
    await attempts.until(SECOND, 1)


async def test_a_lost_path_is_tried_again_with_backoff_until_close(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
) -> None:
    paths, _, _, attempts = setup
    await started(paths, attempts)
    # the first subflow (first local address) is reset, another lives
    paths.subflow_closed(lost(0, ResetReason.UNACCEPTABLE_PERFORMANCE))
    paths.subflow_closed(lost(0))  # told twice: still one attempt
    await attempts.until(FIRST, 4)
    times = attempts.of(FIRST)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    # 0.1 s, then 0.2, 0.4, 0.8: each wait doubles
    for gap, least in zip(gaps, (0.2, 0.4, 0.8), strict=True):
        assert least * 0.9 <= gap < least + 0.5
    paths.close()
    tasks = list(paths._tasks)
    if tasks:
        await asyncio.wait(tasks, timeout=1)
    made = len(attempts.made)
    # no task is left to try again: nothing more is ever opened
    assert all(task.done() for task in tasks)
    assert len(attempts.made) == made
    assert len(attempts.of(SECOND)) == 1


async def test_a_path_that_fails_once_joined_still_backs_off(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
) -> None:
    paths, _, owner, attempts = setup
    await started(paths, attempts)
    attempts.succeed = True
    # each join on the first path is established, then reset at once
    # (a middlebox that lets handshakes through, or resets forged by a
    # party on the path): the waits still double. They started afresh
    # at each establishment, and the path was joined every 0.1 s for
    # the connection's life.
    failed = ResetReason.MIDDLEBOX_INTERFERENCE
    paths.subflow_closed(lost(0, failed))
    for count in range(1, 4):
        await owner.until(count)
        subflow_id = owner.attached[-1]
        paths.join_established(subflow_id)
        paths.subflow_closed(lost(subflow_id, failed))
    times = attempts.of(FIRST)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    for gap, least in zip(gaps, (0.2, 0.4), strict=True):
        assert least * 0.9 <= gap < least + 0.5
    # a join that held 4 s (the longest wait) starts them afresh
    await owner.until(4)
    subflow_id = owner.attached[-1]
    paths.join_established(subflow_id)
    paths._up_since[(FIRST, REMOTE)] -= 4.0
    closed_at = asyncio.get_running_loop().time()
    paths.subflow_closed(lost(subflow_id, failed))
    await attempts.until(FIRST, 5)
    assert attempts.of(FIRST)[-1] - closed_at < 0.1 + 0.5


async def test_a_lost_path_opens_nothing_while_the_subflows_are_full(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
    caplog: pytest.LogCaptureFixture,
) -> None:
    paths, core, owner, attempts = setup
    await started(paths, attempts)
    attempts.succeed = True
    # the first path is lost while the others (joins to addresses the
    # peer announced) fill max_subflows: each attempt opened a TCP
    # connection the core then refused to join, with a WARNING, every
    # 4 s for the connection's life
    core.live_subflows = core.config.max_subflows
    paths.subflow_closed(lost(0, ResetReason.UNACCEPTABLE_PERFORMANCE))
    await asyncio.sleep(0.8)
    assert attempts.of(FIRST) == []
    assert "no join" not in caplog.text
    # one of them closes: the path is joined in the next attempt
    core.live_subflows -= 1
    await owner.until(1)
    assert len(attempts.of(FIRST)) == 1


async def test_a_lost_path_refused_in_passing_is_still_tried(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
) -> None:
    paths, _, owner, attempts = setup
    await started(paths, attempts)
    attempts.succeed = True
    paths.subflow_closed(lost(0, ResetReason.UNACCEPTABLE_PERFORMANCE))
    await owner.until(1)
    # a key rotation overtook the join (mode E), and the link is down
    # again: the retry's connect fails. The path was left lost with no
    # attempt, for as long as no other join came up.
    attempts.succeed = False
    refusal = events.JoinRefused(owner.attached[-1], "rotated", True)
    paths.join_refused(refusal)
    await attempts.until(FIRST, 3)


TRY_LATER = (
    ResetReason.LACK_OF_RESOURCES,
    ResetReason.ADMINISTRATIVELY_PROHIBITED,
)


def later(subflow_id: int, code: int) -> events.JoinRefused:
    """A refusal with T for want of room or failed-join credit."""
    return events.JoinRefused(subflow_id, "try later", True, code)


@pytest.mark.parametrize("code", TRY_LATER)
async def test_a_lost_path_refused_for_now_stays_in_its_attempts(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
    monkeypatch: pytest.MonkeyPatch,
    code: int,
) -> None:
    # waits of 0.01 s doubling to 0.04 s stand for 0.1 s doubling to 4 s,
    # and 0.16 s for the 32 s a refusal "for now" lets them grow to
    monkeypatch.setattr(paths_module, "_PATH_REJOIN_FIRST_DELAY", 0.01)
    monkeypatch.setattr(paths_module, "_PATH_REJOIN_MAX_DELAY", 0.04)
    monkeypatch.setattr(paths_module, "_PATH_LATER_MAX_DELAY", 0.16)
    paths, _, owner, attempts = setup
    await started(paths, attempts)
    attempts.succeed = True
    paths.subflow_closed(lost(0, ResetReason.UNACCEPTABLE_PERFORMANCE))
    # forged joins keep the server's bucket dry (or its subflows full):
    # each rejoin is refused with T, more often than a key rotation's
    # refusals are retried. Without T the path was given up at the
    # first; counted as a rotation's, at the fourth.
    for count in range(1, 7):
        await owner.until(count)
        assert not paths.join_refused(later(owner.attached[-1], code))
    await owner.until(7)
    times = attempts.of(FIRST)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # one attempt at a time, after the path's wait: never at once, and
    # the waits grow past a lost path's cap, as the peer asked
    for gap, least in zip(gaps, (0.02, 0.04, 0.08, 0.16, 0.16), strict=False):
        assert gap >= least * 0.9
    assert len(times) == 7
    # the flood stops: the next join holds, and the path is up again
    paths.join_established(owner.attached[-1])
    assert (FIRST, REMOTE) not in paths._lost
    # lost again for a fault of the path: its cap is 4 s again
    assert (FIRST, REMOTE) not in paths._later


async def test_a_path_refused_for_now_at_its_first_join_is_tried_again(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
) -> None:
    paths, _, owner, attempts = setup
    attempts.succeed = True
    # the second path's first join meets a dry bucket: it is tried again
    # as a lost path is, rather than never
    paths.keys_installed()
    await owner.until(1)
    paths.join_refused(later(owner.attached[0], TRY_LATER[1]))
    await owner.until(2)
    assert len(attempts.of(SECOND)) == 2


@pytest.mark.parametrize(
    ("code", "again"),
    [
        (ResetReason.MPTCP_ERROR, True),
        (ResetReason.LACK_OF_RESOURCES, False),
        (ResetReason.ADMINISTRATIVELY_PROHIBITED, False),
    ],
)
async def test_an_announced_address_refused_for_now_is_left(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
    code: int,
    again: bool,
) -> None:
    paths, _, owner, attempts = setup
    await started(paths, attempts)
    attempts.succeed = True
    announced = "127.0.0.3"
    paths.address_announced(
        events.AddressAnnounced(2, ipaddress.IPv4Address(announced), None)
    )
    await owner.until(1)
    attempts.succeed = False
    refusal = events.JoinRefused(owner.attached[0], "refused", True, code)
    # a rotation that overtook the join: opened again at once, no news;
    # a peer out of room or credit: left, as after a refusal for good
    assert paths.join_refused(refusal) is not again
    # a witness: the second path, lost, is tried three times meanwhile
    paths._own[5] = (SECOND, REMOTE)
    paths.subflow_closed(lost(5))
    await attempts.until(SECOND, 1 + 3)
    assert attempts.remotes.count(announced) == (2 if again else 1)


def announce(paths: Paths, address_id: int) -> None:
    """The peer announces 127.0.1.<address_id>, port 1."""
    paths.address_announced(
        events.AddressAnnounced(
            address_id, ipaddress.IPv4Address(f"127.0.1.{address_id}"), 1
        )
    )


async def test_announcements_open_no_more_connects_than_max_subflows(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a peer that announces (and withdraws and announces again) had a
    # TCP connect opened for each address, any number at once, each
    # refused by the core once up, with a warning
    caplog.set_level(logging.DEBUG, logger="mptls")
    paths, core, _, attempts = setup
    await started(paths, attempts)
    core.config.max_subflows = 3
    loop = asyncio.get_running_loop()
    connects = loop.create_future()
    announced: list[str] = []

    async def pending(
        protocol: Any, remote: tuple[str, int], local: str | None
    ) -> None:
        if remote[0].startswith("127.0.1."):
            announced.append(remote[0])
            attempts.changed.set()
        await asyncio.shield(connects)

    paths_module.connect_subflow = pending

    async def until(condition: Callable[[], bool]) -> None:
        async with asyncio.timeout(10):
            while not condition():
                attempts.changed.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await attempts.changed.wait()

    for address_id in range(1, 21):
        announce(paths, address_id)
    await until(lambda: len(announced) >= 2)
    # the first subflow and two connects fill max_subflows
    assert announced == ["127.0.1.1", "127.0.1.2"]
    assert caplog.text.count("not joined: max_subflows reached") == 18
    # the two connects fail: room for another
    connects.set_exception(ConnectionRefusedError("refused by the test"))
    await until(lambda: caplog.text.count("to 127.0.1.") >= 2)
    announce(paths, 21)
    await until(lambda: len(announced) >= 3)
    assert announced == ["127.0.1.1", "127.0.1.2", "127.0.1.21"]


async def test_announcements_are_joined_no_faster_than_the_bucket(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # connects that fail at once leave max_subflows room: a peer that
    # announced, withdrew and announced again had a connect made for
    # each announcement, to wherever it named
    caplog.set_level(logging.DEBUG, logger="mptls")
    paths, core, _, attempts = setup
    await started(paths, attempts)
    core.config.max_subflows = 100
    core.config.join_failure_rate = 1e-6
    for address_id in range(1, 41):
        announce(paths, address_id)

    def joined() -> list[str]:
        return [r for r in attempts.remotes if r.startswith("127.0.1.")]

    async with asyncio.timeout(10):
        while len(joined()) < 16:
            attempts.changed.clear()
            await attempts.changed.wait()
    assert joined() == [f"127.0.1.{n}" for n in range(1, 17)]
    assert caplog.text.count("not joined: too many joined") == 24


@pytest.mark.parametrize("how", ["removed", "withdrawn", "refused"])
async def test_a_path_given_up_is_not_joined_again(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts], how: str
) -> None:
    paths, _, _, attempts = setup
    await started(paths, attempts)
    if how == "removed":
        paths.removed(0)
    elif how == "withdrawn":
        # the peer named the address the first path reached 2 in its
        # answer to that path's join; the second path's is unknown (0)
        paths._remote_ids[(FIRST, REMOTE)] = 2
        paths.address_removed(2)
    else:
        # the first path's join was refused for good (bad HMAC)
        paths._joining[7] = paths._own[7] = (FIRST, REMOTE)
        paths.join_refused(events.JoinRefused(7, "bad HMAC"))
    paths.subflow_closed(lost(0))
    # a witness: the second path, lost as well, is tried twice (0.1 s
    # and 0.3 s) in the time the first would have been tried three times
    paths._own[5] = (SECOND, REMOTE)
    paths.subflow_closed(lost(5))
    await attempts.until(SECOND, 3)
    assert attempts.of(FIRST) == []


async def test_no_path_rejoin_while_the_connection_closes(
    setup: tuple[Paths, FakeCore, FakeOwner, Attempts],
) -> None:
    paths, _, owner, attempts = setup
    await started(paths, attempts)
    paths._own[5] = (SECOND, REMOTE)
    paths.subflow_closed(lost(5))
    owner.closing = True
    paths.subflow_closed(lost(0))
    tasks = list(paths._tasks)
    if tasks:
        await asyncio.wait(tasks, timeout=2)
    assert all(task.done() for task in tasks)
    # the attempt that was waiting saw the close and opened nothing
    assert attempts.of(FIRST) == []
    assert len(attempts.of(SECOND)) == 1


# loopback: one of two subflows reset mid-upload


def reset(writer: asyncio.StreamWriter, subflow_id: int) -> None:
    """RST the subflow's TCP connection (SO_LINGER 0, then abort)."""
    transport = writer.get_extra_info("subflow_transports")[subflow_id]
    sock = transport.get_extra_info("socket")
    sock.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    transport.abort()


async def back_on(
    writer: asyncio.StreamWriter, local: str, old: set[int]
) -> int:
    """Steps the loop until a new subflow from ``local`` is established."""
    async with asyncio.timeout(10):
        while True:
            for s in writer.get_extra_info("mptcp").subflows:
                if (
                    s.subflow_id not in old
                    and s.state == "ESTABLISHED"
                    and s.local_address
                    and s.local_address[0] == local
                ):
                    return s.subflow_id
            await asyncio.sleep(0)


async def upload_across_a_reset(
    port: int,
    pki: Pki,
    seed: int,
    before_reset: Callable[[Any], Awaitable[None]] | None = None,
) -> events.JoinRefused | None:
    """Upload 2 MiB from both paths, the second path's subflow reset
    halfway; check that the path came back and carried data and that
    the server's digest matches. ``before_reset`` gets the connection's
    info first. Returns the client's last join refusal, if any."""
    reader, writer = await mptls.open_connection(
        "127.0.0.1", port, ssl=pki.client(), local_addrs=[FIRST, SECOND]
    )
    payload = random.Random(seed).randbytes(2 * 1024 * 1024)
    half = len(payload) // 2
    await established(writer, 2)
    info = writer.get_extra_info("mptcp")
    old = {s.subflow_id for s in info.subflows}
    second = next(
        s.subflow_id
        for s in info.subflows
        if s.local_address and s.local_address[0] == SECOND
    )
    if before_reset is not None:
        await before_reset(info)
    writer.write(payload[:half])
    reset(writer, second)
    await writer.drain()
    rejoined = await back_on(writer, SECOND, old)
    client = writer.transport._tls._transport  # type: ignore[attr-defined]
    refused: events.JoinRefused | None = client.last_join_refusal
    writer.write(payload[half:])
    writer.write_eof()
    reply = await asyncio.wait_for(reader.read(), 20.0)
    info = writer.get_extra_info("mptcp")
    writer.close()
    digest, received, _ = reply.decode().split()
    assert int(received) == len(payload)
    assert digest == hashlib.sha256(payload).hexdigest()
    (status,) = [s for s in info.subflows if s.subflow_id == rejoined]
    # the path came back and carried part of the second half
    assert status.bytes_sent > 0
    return refused


async def test_a_reset_path_is_joined_again_while_the_other_carries_on(
    pki: Pki,
) -> None:
    server = await mptls.start_server(
        digest_handler, "127.0.0.1", 0, ssl=pki.server()
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        await upload_across_a_reset(port, pki, 16)


async def test_a_path_refused_while_forged_joins_drain_the_bucket_comes_back(
    pki: Pki,
) -> None:
    # the server takes one failed join on the connection, then one more
    # each 2 s: a single forged join leaves its bucket dry for 2 s
    server = await mptls.start_server(
        digest_handler,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        join_failure_burst=1,
        join_failure_rate=0.5,
    )

    async def drain_the_bucket(info: Any) -> None:
        # an observer's join with the token off the wire fails its HMAC
        token = bytes.fromhex(info.remote_token)
        answer = await join_as_observer(port, token, lambda *_: bytes(20))
        assert answer and answer[0].flags & Flag.RST

    async with server:
        port = server.sockets[0].getsockname()[1]
        # the path's rejoins, 0.1, 0.3, 0.7 and 1.5 s after its loss,
        # meet the dry bucket; the one at 3.1 s is taken. Refused
        # without T the path was never tried again; with T counted as
        # a key rotation's refusals, given up at the fourth
        refused = await upload_across_a_reset(
            port, pki, 17, before_reset=drain_the_bucket
        )
    assert refused is not None and refused.transient
    assert refused.reset_reason == ResetReason.ADMINISTRATIVELY_PROHIBITED
