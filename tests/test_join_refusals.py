"""A refused join is logged at the level it deserves.

A join the peer refuses for good on a connection that lives on is news
for whoever runs the client: a WARNING. An ending peer answers a join
the same way (its connection is gone, with the token the join names),
and that refusal often arrives before the MP_FASTCLOSE that ends the
connection here, which waits on the other subflows behind the data
the peer had queued. Such a refusal is held for a moment and, when the
peer's end follows, logged at DEBUG.

The transport is driven with crafted core events, in the order the
sockets delivered them; the hold itself is checked with a fake clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from types import SimpleNamespace
from typing import Any, cast

import pytest
from support import until

from mptls.backends.userspace import join_refusals
from mptls.backends.userspace.join_refusals import JoinRefusals
from mptls.backends.userspace.transport import MultipathTransport
from mptls.errors import JoinRefusedError, MptlsTimeoutError, PeerResetError
from mptls.mptcp import events
from mptls.mptcp.config import ConnectionConfig
from mptls.mptcp.connection import Connection
from mptls.mptcp.options import ResetReason

# what the core reports when the peer resets a join with MP_TCPRST 0x01
# and no T: the peer knows no such token, or its connection takes no
# more joins
UNKNOWN_TOKEN = events.JoinRefused(
    1,
    "peer reset the join (MP_TCPRST 1)",
    False,
    ResetReason.MPTCP_ERROR,
    by_peer=True,
)
FASTCLOSE = PeerResetError("the peer aborted the connection (MP_FASTCLOSE)")


class EventCore:
    """Just what the transport asks of a Connection whose events a
    test queues by hand."""

    send_buffer_size = 0
    send_pending = 0
    peer_window_closed = True
    config = ConnectionConfig()
    closed = False

    def __init__(self) -> None:
        self.queued: deque[events.Event] = deque()

    def next_event(self) -> events.Event | None:
        return self.queued.popleft() if self.queued else None

    def segments_to_send(self, now: float) -> list[Any]:
        return []

    def get_timer(self) -> None:
        return None

    def close(self) -> None:
        return None

    def abort(self) -> None:
        self.closed = True

    def info(self) -> Any:
        return SimpleNamespace(subflows=(), local_token="01020304")


def client(core: EventCore) -> MultipathTransport:
    transport = MultipathTransport(cast(Connection, core), initiator=True)
    transport.set_protocol(asyncio.Protocol())
    return transport


def deliver(
    transport: MultipathTransport, core: EventCore, *happened: events.Event
) -> None:
    """The core's events of one socket read, handled as after it."""
    core.queued.extend(happened)
    transport.process()


def refusal_records(
    caplog: pytest.LogCaptureFixture,
) -> list[tuple[int, str]]:
    return [
        (record.levelno, record.getMessage())
        for record in caplog.records
        if record.name == "mptls.userspace" and "refused" in record.message
    ]


def levels(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [level for level, _ in refusal_records(caplog)]


@pytest.fixture
def logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="mptls.userspace")
    return caplog


# the transport


async def test_a_join_refused_just_before_the_peer_aborts_is_no_warning(
    logged: pytest.LogCaptureFixture,
) -> None:
    # the server aborted while the client's join SYN was on its way: it
    # refused the join at once (unknown token), while its MP_FASTCLOSE
    # waited on the first subflow behind queued data. The client warned
    # of the refusal, then its read raised PeerResetError
    core = EventCore()
    transport = client(core)
    deliver(transport, core, UNKNOWN_TOKEN)
    deliver(transport, core, events.ConnectionClosed(FASTCLOSE))
    assert refusal_records(logged) == [
        (
            logging.DEBUG,
            "[01020304]: join on subflow 1 refused as the peer ended the "
            "connection: peer reset the join (MP_TCPRST 1)",
        )
    ]


async def test_a_refused_rejoin_that_ends_the_connection_is_no_warning(
    logged: pytest.LogCaptureFixture,
) -> None:
    # the last subflow was lost and the rejoin refused: the application
    # gets the JoinRefusedError that says the peer forgot the connection
    core = EventCore()
    transport = client(core)
    ended = JoinRefusedError("every subflow is gone and the peer refused")
    deliver(transport, core, UNKNOWN_TOKEN, events.ConnectionClosed(ended))
    assert levels(logged) == [logging.DEBUG]


async def test_a_join_refused_on_a_live_connection_still_warns(
    logged: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(join_refusals, "GRACE", 0.0)
    core = EventCore()
    transport = client(core)
    deliver(transport, core, UNKNOWN_TOKEN)
    await until(lambda: refusal_records(logged), "the warning")
    assert refusal_records(logged) == [
        (
            logging.WARNING,
            "[01020304]: join on subflow 1 refused: peer reset the join "
            "(MP_TCPRST 1)",
        )
    ]
    transport.abort()


async def test_refusals_held_for_different_times_each_warn_at_its_own(
    logged: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the transport keeps one timer, armed for the oldest refusal: once
    # it fired, the next refusal's time must arm it again, or that
    # refusal waited, silent, for the connection's end
    core = EventCore()
    transport = client(core)
    later = dataclasses.replace(UNKNOWN_TOKEN, subflow_id=2)
    monkeypatch.setattr(join_refusals, "GRACE", 0.0)
    deliver(transport, core, UNKNOWN_TOKEN)
    monkeypatch.setattr(join_refusals, "GRACE", 0.5)
    deliver(transport, core, later)
    await until(lambda: refusal_records(logged), "the first warning")
    assert subflows(logged) == ["[01020304]: join on subflow 1"]
    async with asyncio.timeout(5):
        while len(refusal_records(logged)) < 2:
            await asyncio.sleep(0.01)
    assert levels(logged) == [logging.WARNING, logging.WARNING]
    assert subflows(logged)[1] == "[01020304]: join on subflow 2"
    transport.abort()


async def test_a_refusal_of_policy_warns_at_once(
    logged: pytest.LogCaptureFixture,
) -> None:
    # no ending peer sends it: administratively prohibited
    core = EventCore()
    transport = client(core)
    prohibited = events.JoinRefused(
        1,
        "peer reset the join (MP_TCPRST 3)",
        False,
        ResetReason.ADMINISTRATIVELY_PROHIBITED,
        by_peer=True,
    )
    deliver(transport, core, prohibited)
    assert levels(logged) == [logging.WARNING]
    deliver(transport, core, events.ConnectionClosed(FASTCLOSE))
    assert len(refusal_records(logged)) == 1


async def test_a_join_refused_while_this_end_closes_is_no_warning(
    logged: pytest.LogCaptureFixture,
) -> None:
    # the peer had the DATA_FIN and forgot the connection: a join still
    # on its way was refused
    core = EventCore()
    transport = client(core)
    transport.close()
    deliver(transport, core, UNKNOWN_TOKEN)
    assert levels(logged) == [logging.DEBUG]
    deliver(transport, core, events.ConnectionClosed(None))
    assert len(refusal_records(logged)) == 1


# the hold, on a fake clock


def held_refusals() -> JoinRefusals:
    return JoinRefusals(lambda: "[tag]")


def subflows(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Which join each line said was refused, in order."""
    return [
        message.split(" refused")[0] for _, message in refusal_records(caplog)
    ]


def test_a_held_refusal_is_a_warning_once_the_grace_is_over(
    logged: pytest.LogCaptureFixture,
) -> None:
    held = held_refusals()
    held.refused(UNKNOWN_TOKEN, 100.0, ending=False)
    assert held.deadline == 100.0 + join_refusals.GRACE
    held.handle_timer(100.0 + join_refusals.GRACE - 0.001)
    assert refusal_records(logged) == []
    held.handle_timer(100.0 + join_refusals.GRACE)
    assert refusal_records(logged) == [
        (
            logging.WARNING,
            "[tag]: join on subflow 1 refused: peer reset the join "
            "(MP_TCPRST 1)",
        )
    ]
    assert held.deadline is None
    held.connection_ended(FASTCLOSE)
    assert len(refusal_records(logged)) == 1


def test_held_refusals_are_said_in_order_each_at_its_time(
    logged: pytest.LogCaptureFixture,
) -> None:
    held = held_refusals()
    later = dataclasses.replace(UNKNOWN_TOKEN, subflow_id=2)
    held.refused(UNKNOWN_TOKEN, 100.0, ending=False)
    held.refused(later, 101.0, ending=False)
    held.handle_timer(100.0 + join_refusals.GRACE)
    assert subflows(logged) == ["[tag]: join on subflow 1"]
    assert held.deadline == 101.0 + join_refusals.GRACE
    held.handle_timer(101.0 + join_refusals.GRACE)
    assert subflows(logged) == [
        "[tag]: join on subflow 1",
        "[tag]: join on subflow 2",
    ]


@pytest.mark.parametrize(
    "error",
    [None, MptlsTimeoutError("close timed out")],
    ids=["clean", "timeout"],
)
def test_an_end_that_is_not_the_peers_says_the_held_refusal_now(
    logged: pytest.LogCaptureFixture, error: Exception | None
) -> None:
    # the refusal was news this end's own close or timeout did not
    # explain: it is not lost with the connection
    held = held_refusals()
    held.refused(UNKNOWN_TOKEN, 100.0, ending=False)
    held.connection_ended(error)
    assert levels(logged) == [logging.WARNING]
    assert held.deadline is None


def test_a_refusal_without_a_reason_code_warns_at_once(
    logged: pytest.LogCaptureFixture,
) -> None:
    # a plain RST on the join: no mptls peer refuses so as it ends
    held = held_refusals()
    plain = events.JoinRefused(1, "peer reset the join")
    held.refused(plain, 100.0, ending=False)
    assert levels(logged) == [logging.WARNING]
    assert held.deadline is None


async def test_this_ends_own_refusal_warns_at_once_whatever_follows(
    logged: pytest.LogCaptureFixture,
) -> None:
    # a SYN|ACK whose HMAC fails is refused here with the same 0x01: it
    # is no news of the peer's end, and is said when it happens
    core = EventCore()
    transport = client(core)
    bad_hmac = events.JoinRefused(
        1,
        "SYN|ACK HMAC mismatch",
        False,
        ResetReason.MPTCP_ERROR,
    )
    deliver(transport, core, bad_hmac)
    assert levels(logged) == [logging.WARNING]
    deliver(transport, core, events.ConnectionClosed(FASTCLOSE))
    assert len(refusal_records(logged)) == 1
