"""A long-lived connection keeps no state per subflow it ever had.

A server runs for weeks and a connection can outlive many subflows:
joins come and go (a mobile client changing networks), and an observer
who saw the token can open join after join that fails at the third ACK.
The core forgets all but its last closed subflows; the transport around
it must forget the same ones, or each join ever attached costs memory
for the connection's whole life.
"""

from __future__ import annotations

from pki import Pki
from test_hijack import echo, join_as_observer

import mptls
from mptls.mptcp.framing import Flag

JOINS = 40


def addresses_beyond_reported(transport: object) -> int:
    """Cached subflow addresses the connection no longer reports.

    The cache is pruned when a subflow is attached, so the subflow the
    core forgot since the last join may still be there: at most one,
    however many joins came before.
    """
    reported = {s.subflow_id for s in transport.mptcp_info().subflows}  # type: ignore[attr-defined]
    kept = set(transport._addresses)  # type: ignore[attr-defined]
    # the first subflow's stay: a closed connection's peername
    return len(kept - reported - {min(kept)})


async def test_joins_come_and_go_without_growing_the_transport(
    pki: Pki,
) -> None:
    server = await mptls.start_server(echo, "127.0.0.1", 0, ssl=pki.server())
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        for _ in range(JOINS):
            subflow_id = await writer.transport.add_path(
                ("127.0.0.1", port), local="127.0.0.2"
            )
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await writer.transport.remove_path(subflow_id)
        writer.write(b"done")
        assert await reader.readexactly(4) == b"done"
        (served,) = server.mptls_listener.transports
        client = writer.transport._tls._transport
        assert addresses_beyond_reported(client) <= 1
        assert addresses_beyond_reported(served) <= 1
        writer.close()
        await writer.wait_closed()


async def test_refused_joins_leave_nothing_on_the_connection(
    pki: Pki,
) -> None:
    server = await mptls.start_server(
        echo,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        join_failure_burst=JOINS + 1,
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await mptls.open_connection(
            "127.0.0.1", port, ssl=pki.client()
        )
        token = bytes.fromhex(writer.get_extra_info("mptcp").remote_token)
        for count in range(JOINS):
            # the observer's join: the token is right, the HMAC is not
            answer = await join_as_observer(
                port, token, lambda nonce, syn_ack: bytes(20)
            )
            assert answer and answer[0].flags & Flag.RST, count
        writer.write(b"still")
        assert await reader.readexactly(5) == b"still"
        (served,) = server.mptls_listener.transports
        assert addresses_beyond_reported(served) <= 1
        writer.close()
        await writer.wait_closed()
