"""An in-memory network for the sans-I/O MPTCP core.

A :class:`MemNet` wires one initiator :class:`Connection` to a responder
:class:`Endpoint`. Each subflow is a pair of FIFO pipes; every segment is
encoded with ``encode_segment`` and decoded with ``SegmentDecoder``, so
the real wire format is exercised. Time is a fake clock that jumps to the
next delivery or timer; randomness comes from a seeded ``random.Random``.
Knobs: a per-subflow delay and rate, a seeded shuffle of deliveries
across subflows, pausing a subflow (a link down for a while: TCP holds
its bytes and delivers them late, none lost), losing what one
direction of a subflow carries, killing a subflow, a fake
TLS layer that installs fixed keys after the MPTCP handshake (and, in
mode E, the generations the core asks for), and raw subflows that a
test drives by hand (an observer trying to join). Nothing here sleeps
or touches a socket.
"""

from __future__ import annotations

import hashlib
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mptls.mptcp import events as ev
from mptls.mptcp.config import ConnectionConfig, Mode
from mptls.mptcp.connection import Connection
from mptls.mptcp.endpoint import Accepted, Endpoint, Refused
from mptls.mptcp.framing import (
    PREAMBLE,
    Segment,
    SegmentDecoder,
    encode_segment,
)
from mptls.mptcp.tokens import E_TOKEN_LAYOUT, TokenAllocator
from mptls.tls.keys import KeyMaterial

KEYS = KeyMaterial(bytes.fromhex("89a873a3e2e80ec30b5eba7b3c4541df"))
# mode E's 32-bit tokens carry no server or worker id


def generation_keys(generation: int) -> KeyMaterial:
    """Fixed keys of one generation, as a TLS exporter would give:
    KEYS for generation 0, a distinct seeded 16 bytes for the others."""
    if generation == 0:
        return KEYS
    seed = b"memnet generation %d" % generation
    return KeyMaterial(
        hashlib.sha256(seed).digest()[:16], generation=generation
    )


def seeded_bytes(rng: random.Random) -> Callable[[int], bytes]:
    """A ``random`` callable for the core, drawing from ``rng``."""

    def draw(count: int) -> bytes:
        return rng.randbytes(count)

    return draw


@dataclass
class Pipe:
    """One direction of a subflow: encoded frames with delivery times."""

    queue: deque[tuple[float, bytes]] = field(default_factory=deque)
    decoder: SegmentDecoder = field(default_factory=SegmentDecoder)
    started: bool = False
    sent: list[Segment] = field(default_factory=list)
    # when each of ``sent`` was written (the fake clock)
    sent_at: list[float] = field(default_factory=list)
    # bytes per second (None: no limit): a frame leaves once those
    # before it have, as from a TCP socket's send queue
    rate: float | None = None
    free_at: float = 0.0
    # nothing leaves before this time (a link that is down)
    paused_until: float = 0.0
    # everything written is lost (this direction blackholes)
    lost: bool = False

    def put(self, segment: Segment, at: float, now: float) -> None:
        if self.lost:
            return
        data = encode_segment(segment)
        if not self.started:
            self.started = True
            data = PREAMBLE + data
        if self.rate is not None or self.paused_until > now:
            start = max(now, self.free_at, self.paused_until)
            sending = len(data) / self.rate if self.rate else 0.0
            self.free_at = start + sending
            at = self.free_at + (at - now)
        if self.queue:
            # a TCP connection delivers in order, whatever the delay
            at = max(at, self.queue[-1][0])
        self.queue.append((at, data))
        self.sent.append(segment)
        self.sent_at.append(now)


@dataclass
class Link:
    """A subflow as a TCP connection between the two ends."""

    client_id: int | None
    server_id: int | None = None
    delay: float = 0.0
    dead: bool = False
    raw: bool = False
    refused: Refused | None = None
    to_server: Pipe = field(default_factory=Pipe)
    to_client: Pipe = field(default_factory=Pipe)
    # segments a raw link's far end (the test) received
    inbox: list[Segment] = field(default_factory=list)


@dataclass
class Side:
    """What one end's application saw."""

    events: list[ev.Event] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    unconsumed: int = 0
    eof: bool = False
    closed: ev.ConnectionClosed | None = None

    def of_type(self, kind: type) -> list[ev.Event]:
        return [event for event in self.events if isinstance(event, kind)]


class MemNet:
    """An initiator and a responder endpoint joined by in-memory links."""

    def __init__(
        self,
        client_config: ConnectionConfig | None = None,
        server_config: ConnectionConfig | None = None,
        *,
        seed: int = 0,
        reorder: bool = False,
        keys: KeyMaterial | None = KEYS,
        server_keys_at: float | None = None,
        auto_consume: bool = True,
        on_accept: Callable[[Connection], None] | None = None,
        on_event: Callable[[Connection, ev.Event], None] | None = None,
        derive: Callable[[int], KeyMaterial] | None = generation_keys,
    ) -> None:
        self.now = 0.0
        self.rng = random.Random(seed)
        self.reorder = reorder
        self.keys = keys
        self.server_keys_at = server_keys_at
        self.auto_consume = auto_consume
        self.on_accept = on_accept
        self.on_event = on_event
        # the fake TLS layer's answer to KeysRequested (mode E)
        self.derive = derive
        client_config = client_config or ConnectionConfig()
        server_config = server_config or ConnectionConfig()
        if client_config.mode is Mode.E:
            self.client_tokens = TokenAllocator(
                bytes(range(32)), layout=E_TOKEN_LAYOUT
            )
        else:
            self.client_tokens = TokenAllocator(bytes(range(32)), server_id=1)
        # an endpoint that accepts E routes no joins by server id
        server_id = 0 if Mode.E in server_config.accept_modes else 2
        self.server_tokens = TokenAllocator(
            bytes(range(1, 33)), server_id=server_id
        )
        self.client = Connection.initiator(
            client_config,
            tokens=self.client_tokens,
            random=seeded_bytes(random.Random(seed + 1)),
            now=self.now,
        )
        self.endpoint = Endpoint(
            server_config,
            tokens=self.server_tokens,
            random=seeded_bytes(random.Random(seed + 2)),
        )
        self.server: Connection | None = None
        self.client_side = Side()
        self.server_side = Side()
        self.links: list[Link] = [Link(client_id=0)]
        self.refusals: list[Refused] = []
        # client segments for subflows the test opened without a link
        self.unrouted: list[tuple[int, Segment]] = []
        # the adapter's part in a join: the id of the server address a
        # join SYN reached (None: the Endpoint answers with id 0)
        self.server_address_id: Callable[[Connection], int] | None = None

    # knobs

    def link(self, client_id: int) -> Link:
        return next(x for x in self.links if x.client_id == client_id)

    def find_link(self, client_id: int) -> Link | None:
        for link in self.links:
            if link.client_id == client_id:
                return link
        return None

    def server_link(self, server_id: int) -> Link | None:
        for link in self.links:
            if link.server_id == server_id and not link.dead:
                return link
        return None

    def open_subflow(
        self, *, delay: float = 0.0, backup: bool = False, address_id: int = 0
    ) -> int:
        subflow_id = self.client.open_subflow(
            self.now, backup=backup, address_id=address_id
        )
        self.links.append(Link(client_id=subflow_id, delay=delay))
        return subflow_id

    def open_raw(self) -> Link:
        """A TCP connection to the server that the test drives itself."""
        link = Link(client_id=None, raw=True)
        self.links.append(link)
        return link

    def raw_send(self, link: Link, segment: Segment) -> None:
        link.to_server.put(segment, self.now + link.delay, self.now)

    def set_rate(self, client_id: int, rate: float) -> None:
        """Limit the subflow to ``rate`` bytes per second each way."""
        link = self.link(client_id)
        link.to_server.rate = rate
        link.to_client.rate = rate

    def pause(self, client_id: int, seconds: float) -> None:
        """The subflow's link is down for ``seconds``; nobody is told.

        Unlike a blackhole nothing is lost: what is on the way or sent
        meanwhile arrives that much later, as TCP's retransmissions
        would bring it once the link is back.
        """
        link = self.link(client_id)
        until = self.now + seconds
        for pipe in (link.to_server, link.to_client):
            pipe.queue = deque((at + seconds, data) for at, data in pipe.queue)
            pipe.free_at = max(pipe.free_at, self.now) + seconds
            pipe.paused_until = until

    def kill(self, client_id: int) -> None:
        """The subflow's TCP connection dies: both ends are told."""
        link = self.link(client_id)
        link.dead = True
        link.to_server.queue.clear()
        link.to_client.queue.clear()
        self.client.subflow_lost(client_id, self.now)
        if self.server is not None and link.server_id is not None:
            self.server.subflow_lost(link.server_id, self.now)

    # driving

    def run(
        self,
        until: Callable[[], bool] | None = None,
        *,
        max_time: float = 120.0,
        max_rounds: int = 200_000,
    ) -> bool:
        """Run until ``until()`` holds (True) or nothing is left to do."""
        for _ in range(max_rounds):
            self._settle()
            if until is not None and until():
                return True
            upcoming = self._next_time()
            if upcoming is None or upcoming > max_time:
                return until is None
            self.now = max(self.now, upcoming)
            self._fire_timers()
        raise AssertionError("memnet did not settle within max_rounds")

    def _settle(self) -> None:
        while True:
            self._flush()
            delivered = self._deliver_ready()
            # keys a KeysRequested brought send a NEW_KEY: flush again
            answered = self._drain_events()
            if not delivered and not answered:
                return

    def _flush(self) -> None:
        for subflow_id, segment in self.client.segments_to_send(self.now):
            link = self.find_link(subflow_id)
            if link is None:
                self.unrouted.append((subflow_id, segment))
            elif not link.dead:
                link.to_server.put(segment, self.now + link.delay, self.now)
        if self.server is None:
            return
        for subflow_id, segment in self.server.segments_to_send(self.now):
            link = self.server_link(subflow_id)
            if link is not None:
                link.to_client.put(segment, self.now + link.delay, self.now)

    def _ready(self) -> list[tuple[Link, bool]]:
        ready = []
        for link in self.links:
            if link.dead:
                continue
            for to_server in (True, False):
                pipe = link.to_server if to_server else link.to_client
                if pipe.queue and pipe.queue[0][0] <= self.now:
                    ready.append((link, to_server))
        return ready

    def _deliver_ready(self) -> bool:
        delivered = False
        while True:
            ready = self._ready()
            if not ready:
                return delivered
            # one random frame at a time mixes the subflows' arrivals
            order = [self.rng.choice(ready)] if self.reorder else ready
            for link, to_server in order:
                pipe = link.to_server if to_server else link.to_client
                if link.dead or not pipe.queue:
                    continue
                _, data = pipe.queue.popleft()
                for segment in pipe.decoder.feed(data):
                    self._arrive(link, to_server, segment)
                delivered = True

    def _arrive(self, link: Link, to_server: bool, segment: Segment) -> None:
        if link.dead:
            return
        if not to_server:
            if link.raw:
                link.inbox.append(segment)
            elif link.client_id is not None:
                self.client.receive_segment(link.client_id, segment, self.now)
            return
        if link.refused is not None:
            return
        if link.server_id is None:
            self._first(link, segment)
            return
        if self.server is not None:
            self.server.receive_segment(link.server_id, segment, self.now)

    def _first(self, link: Link, segment: Segment) -> None:
        result = self.endpoint.receive_first(
            segment, self.now, local_address_id=self.server_address_id
        )
        if isinstance(result, Refused):
            link.refused = result
            self.refusals.append(result)
            if result.reply is not None:
                link.to_client.put(
                    result.reply, self.now + link.delay, self.now
                )
            return
        assert isinstance(result, Accepted)
        link.server_id = result.subflow_id
        if self.server is None:
            self.server = result.connection
            if self.on_accept is not None:
                self.on_accept(result.connection)

    def _drain_events(self) -> bool:
        """Hand out the events; True if keys were installed for some."""
        answered = self._drain(self.client, self.client_side)
        if self.server is not None:
            answered |= self._drain(self.server, self.server_side)
        return answered

    def _drain(self, connection: Connection, side: Side) -> bool:
        answered = False
        while (event := connection.next_event()) is not None:
            side.events.append(event)
            if self.on_event is not None:
                self.on_event(connection, event)
            if isinstance(event, ev.DataReceived):
                side.data += event.data
                side.unconsumed += len(event.data)
                if self.auto_consume:
                    self.consume(connection, side)
            elif isinstance(event, ev.EndOfStream):
                side.eof = True
            elif isinstance(event, ev.ConnectionClosed):
                side.closed = event
            elif isinstance(event, ev.HandshakeComplete):
                self._fake_tls(connection)
            elif isinstance(event, ev.KeysRequested) and self.derive:
                connection.install_keys(self.derive(event.generation))
                answered = True
        return answered

    def consume(self, connection: Connection, side: Side) -> None:
        connection.consumed(side.unconsumed)
        side.unconsumed = 0

    def inject(self, client_id: int, segment: Segment) -> None:
        """Put a forged segment on the wire towards the client."""
        link = self.link(client_id)
        link.to_client.put(segment, self.now + link.delay, self.now)

    def inject_to_server(self, client_id: int, segment: Segment) -> None:
        """Put a forged segment on the wire towards the server."""
        link = self.link(client_id)
        link.to_server.put(segment, self.now + link.delay, self.now)

    def _fake_tls(self, connection: Connection) -> None:
        # stands in for TLS: the keys appear once the MPTCP handshake is
        # done (the server's at server_keys_at if set)
        if self.keys is None:
            return
        if connection is self.server and self.server_keys_at is not None:
            return
        connection.install_keys(self.keys)

    def _next_time(self) -> float | None:
        times = []
        for connection in (self.client, self.server):
            if connection is not None:
                timer = connection.get_timer()
                if timer is not None:
                    times.append(timer)
        for link in self.links:
            if link.dead:
                continue
            for pipe in (link.to_server, link.to_client):
                if pipe.queue:
                    times.append(pipe.queue[0][0])
        if (
            self.server_keys_at is not None
            and self.server is not None
            and self.server_keys_at > self.now
        ):
            times.append(self.server_keys_at)
        return min(times, default=None)

    def _fire_timers(self) -> None:
        if (
            self.server_keys_at is not None
            and self.server is not None
            and self.keys is not None
            and self.now >= self.server_keys_at
        ):
            self.server.install_keys(self.keys)
        for connection in (self.client, self.server):
            if connection is not None:
                connection.handle_timer(self.now)


# shortcuts the connection tests share


def stream(size: int, seed: int = 7) -> bytes:
    """``size`` seeded bytes for the application to send."""
    return random.Random(seed).randbytes(size)


def established(net: MemNet) -> MemNet:
    """Run the MPTCP handshake (and the fake TLS) to completion."""
    net.client.send(b"hello")
    assert net.run(
        lambda: (
            net.server is not None and bytes(net.server_side.data) == b"hello"
        )
    )
    return net


def join(net: MemNet, **kwargs: float) -> int:
    """Open one more subflow and run until the client sees it up."""
    subflow_id = net.open_subflow(**kwargs)
    assert net.run(
        lambda: ev.SubflowEstablished(subflow_id) in net.client_side.events
    )
    return subflow_id


def has_data(side: Side, size: int) -> Callable[[], bool]:
    """A condition for :meth:`MemNet.run`: ``side`` got ``size`` bytes."""
    return lambda: len(side.data) >= size


def both_have(net: MemNet, server: int, client: int) -> Callable[[], bool]:
    """A condition for :meth:`MemNet.run`: each side got its bytes."""
    return lambda: (
        len(net.server_side.data) >= server
        and len(net.client_side.data) >= client
    )
