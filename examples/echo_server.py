"""An echo server over secure multipath, in a dozen lines of mptls.

Run ``mptls certs`` first (it writes certs/), then this file, then
``examples/echo_client.py`` in another terminal. The server listens on
loopback only and announces a second loopback address with ADD_ADDR, so
a client can open a subflow to it once the TLS-derived keys exist.
"""

from __future__ import annotations

import asyncio
import sys

import mptls

HOST, PORT = "127.0.0.1", 4433
# a second address of this machine, for the client's extra subflow
ANNOUNCE = [("127.0.0.3", PORT)]


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    info = writer.get_extra_info("mptcp")
    print(f"client {info.remote_token}: mode {info.mode}")
    # echo until the client half-closes, then close our side too
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


async def main() -> None:
    tls = mptls.TLSConfig(
        certfile="certs/server.pem", keyfile="certs/server.key"
    )
    server = await mptls.start_server(
        echo, [HOST, "127.0.0.3"], PORT, ssl=tls, announce_addrs=ANNOUNCE
    )
    print(f"echo server on {HOST}:{PORT}; Ctrl-C stops it")
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        sys.exit(130)
