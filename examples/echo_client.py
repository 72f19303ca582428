"""An echo client over secure multipath: two local paths, one stream.

Sends a message, half-closes, prints the echo and what MPTCP did: the
negotiated mode, the tokens, the key fingerprint (never the keys) and the
bytes each subflow carried. Start ``examples/echo_server.py`` first.
"""

from __future__ import annotations

import asyncio

import mptls

HOST, PORT = "127.0.0.1", 4433


async def main() -> None:
    tls = mptls.TLSConfig(cafile="certs/ca.pem")
    reader, writer = await mptls.open_connection(
        HOST,
        PORT,
        ssl=tls,
        # the first address carries the first subflow; the second joins
        # once the keys from the TLS exporter are installed
        local_addrs=["127.0.0.1", "127.0.0.2"],
    )
    writer.write(b"hello over more than one path\n" * 1000)
    await writer.drain()
    writer.write_eof()
    echoed = await reader.read()
    print(f"echoed {len(echoed)} bytes")

    info = writer.get_extra_info("mptcp")
    print(f"mode {info.mode}, tokens {info.local_token} / {info.remote_token}")
    print(f"keys installed: {info.keys_installed}")
    print(f"key fingerprint: {info.key_fingerprint}")
    for subflow in info.subflows:
        print(
            f"  subflow {subflow.subflow_id} {subflow.local_address} -> "
            f"{subflow.remote_address}: sent {subflow.bytes_sent}, "
            f"received {subflow.bytes_received}"
        )
    writer.close()
    await writer.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
