"""The userspace backend's listening side: first segments to connections.

:class:`Listener` is the protocol factory of the server's TCP socket. It
holds each accepted TCP connection until its first segment, asks the
sans-I/O :class:`mptls.mptcp.endpoint.Endpoint` whether that segment
opens a connection or joins one, and attaches the subflow to the right
:class:`~mptls.backends.userspace.transport.MultipathTransport`.

It makes no protocol decisions of its own, and it never keeps a TCP
connection that sends nothing past the MPTCP handshake limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from mptls.backends.userspace.subflow import SubflowProtocol
from mptls.backends.userspace.transport import MultipathTransport
from mptls.errors import ProtocolError
from mptls.mptcp.connection import Connection
from mptls.mptcp.endpoint import Endpoint, Refused
from mptls.mptcp.framing import Segment, encode_segment
from mptls.refusals import refused
from mptls.trace import pcap

logger = logging.getLogger("mptls.userspace")


# Takes a new subflow's first segments before the Endpoint does; True
# means it took the TCP connection away (to the worker owning the token)
Handoff = Callable[[SubflowProtocol, list[Segment]], bool]


class Listener:
    """Routes each new TCP connection's first segment through an Endpoint.

    A first subflow becomes a new :class:`MultipathTransport` with a fresh
    application protocol; a join is attached to the transport that owns
    the token it names.
    """

    def __init__(
        self,
        endpoint: Endpoint,
        protocol_factory: Callable[[], asyncio.Protocol],
        *,
        announce: Sequence[tuple[str, int]] = (),
        close_timeout: float = 10.0,
        handoff: Handoff | None = None,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._endpoint = endpoint
        self._handoff = handoff
        self._protocol_factory = protocol_factory
        self._announce = list(announce)
        self._close_timeout = close_timeout
        self._transports: dict[int, MultipathTransport] = {}
        # accepted TCP connections whose first segment has not come yet
        self._waiting: dict[SubflowProtocol, asyncio.TimerHandle] = {}

    def __call__(self) -> SubflowProtocol:
        subflow = SubflowProtocol(self, initiator=False)
        # a TCP connection that sends nothing, or the preamble alone,
        # would hold its socket forever: its first segment opens the
        # MP_CAPABLE or MP_JOIN exchange, so it gets the MPTCP
        # handshake's limit to arrive
        self._waiting[subflow] = self._loop.call_later(
            self._endpoint.config.handshake_timeout,
            self._first_segment_overdue,
            subflow,
        )
        return subflow

    def _first_segment_overdue(self, subflow: SubflowProtocol) -> None:
        self._waiting.pop(subflow, None)
        if subflow.sink is self and not subflow.closed:
            # no keyword named: the operator of ``mptls serve`` reads
            # this line too, and has no handshake_timeout to turn
            refused(
                subflow.name("peername"),
                "no MPTCP handshake within "
                f"{self._endpoint.config.handshake_timeout:g} s",
            )
            subflow.close()

    def _first_segment_came(self, subflow: SubflowProtocol) -> None:
        handle = self._waiting.pop(subflow, None)
        if handle is not None:
            handle.cancel()

    @property
    def transports(self) -> list[MultipathTransport]:
        return list(self._transports.values())

    def end_connections(self, *, abort: bool) -> None:
        """End every connection because the server stops.

        Each is reset (MP_FASTCLOSE) with ``abort``; otherwise it closes
        as its application's ``close()`` would (close_notify, then
        DATA_FIN), or, before its TLS handshake is over, as a transport
        closes. Its protocol hears first that the server is stopping: a
        peer cut off in its handshake by this was not refused.
        """
        for transport in self.transports:
            # None only while the factory's protocol is being made
            protocol = transport._protocol
            stopping = getattr(protocol, "server_stopping", None)
            if stopping is not None:
                stopping()
            if abort:
                transport.abort()
            else:
                # the TLS layer closes as its application would; another
                # protocol, or none yet, is closed under it
                getattr(protocol, "close_application", transport.close)()

    def segments_received(
        self, subflow: SubflowProtocol, segments: list[Segment]
    ) -> None:
        self._first_segment_came(subflow)
        if self._handoff is not None and self._handoff(subflow, segments):
            return  # another process owns the token this join names
        result = self._endpoint.receive_first(
            segments[0],
            self._loop.time(),
            # asked for joins only: a first subflow pays nothing
            local_address_id=lambda core: self._address_id(
                core, subflow.name("sockname")
            ),
        )
        if isinstance(result, Refused):
            refused(subflow.name("peername"), result.reason)
            if result.reply is not None:
                if (capture := pcap.active) is not None:
                    capture.frame_sent(subflow, result.reply)
                subflow.send(encode_segment(result.reply))
            subflow.close()
            return
        core, subflow_id = result.connection, result.subflow_id
        transport = self._transports.get(id(core))
        fresh = transport is None
        if transport is None:
            transport = MultipathTransport(
                core,
                initiator=False,
                announce=self._announce,
                close_timeout=self._close_timeout,
                on_closed=self._forget,
            )
            self._transports[id(core)] = transport
        transport.attach(subflow_id, subflow)
        if fresh:
            # start() hands the first segment's data on and sends the
            # answer
            transport.start(self._protocol_factory())
        if len(segments) > 1:
            transport.segments_received(subflow, segments[1:])
        elif not fresh:
            transport.process()

    def _address_id(self, core: Connection, sockname: Any) -> int:
        """The id of the local address a join SYN reached (RFC 8684 3.2).

        The paths of its connection's transport number that
        connection's addresses.
        """
        transport = self._transports.get(id(core))
        if transport is None:
            return 0
        return transport.paths.local_address_id(sockname)

    def _forget(self, transport: MultipathTransport) -> None:
        self._transports.pop(id(transport._core), None)
        self._endpoint.remove(transport._core)

    def subflow_lost(
        self, subflow: SubflowProtocol, exc: BaseException | None
    ) -> None:
        waiting = subflow in self._waiting
        self._first_segment_came(subflow)
        if isinstance(exc, ProtocolError):
            # the server ended it: a peer that is not mptls, or frames
            # it cannot read
            refused(subflow.name("peername"), str(exc))
            return
        if waiting and subflow.heard_from:
            # it sent the start of the wire and went away: a first
            # frame cut short is no port scan
            refused(
                subflow.name("peername"),
                "the connection ended before its first frame was whole",
            )
            return
        # the peer went away unrefused: a port scan, a load balancer's
        # health check; news for debugging only
        logger.debug("a subflow closed before its first segment: %s", exc)

    def subflow_writable(
        self, subflow: SubflowProtocol, writable: bool
    ) -> None:
        return None
