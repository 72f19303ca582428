"""Bad arguments to the public API fail at once, with typed errors."""

from __future__ import annotations

import asyncio

import pytest
from pki import Pki, make_pki

import mptls
from mptls.errors import ConfigurationError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


async def noop(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    writer.close()


async def echo(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


# start_server(announce_addrs=...)


@pytest.mark.parametrize(
    "announce",
    [
        ["x"],
        "127.0.0.2",
        [("notanip", 4473)],
        [("127.0.0.2", -1)],
        [("127.0.0.2", 70000)],
        [("127.0.0.2", "4473")],
        [("127.0.0.2", 4473, 1)],
        [(None, 4473)],
        [(4473, 4473)],
    ],
)
async def test_bad_announce_addrs_fail_start_server(
    pki: Pki, announce: object
) -> None:
    with pytest.raises(ConfigurationError, match="announce_addrs"):
        await mptls.start_server(
            noop, "127.0.0.1", 0, ssl=pki.server(), announce_addrs=announce
        )


async def test_good_announce_addrs_are_kept(pki: Pki) -> None:
    server = await mptls.start_server(
        noop,
        "127.0.0.1",
        0,
        ssl=pki.server(),
        announce_addrs=[("127.0.0.2", 4473), ("::1", 0)],
    )
    async with server:
        listener = server.mptls_listener  # type: ignore[attr-defined]
        assert listener._announce == [("127.0.0.2", 4473), ("::1", 0)]


# start_server(mode= / modes=)


async def _accepted_modes(pki: Pki, **kw: object) -> frozenset[str]:
    server = await mptls.start_server(
        noop, "127.0.0.1", 0, ssl=pki.server(), **kw
    )
    async with server:
        listener = server.mptls_listener  # type: ignore[attr-defined]
        return frozenset(
            m.value for m in listener._endpoint.config.accept_modes
        )


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, {"G"}),
        ({"mode": "rfc8684"}, {"rfc8684"}),
        ({"mode": "g"}, {"G"}),
        ({"modes": "rfc8684"}, {"rfc8684"}),
        ({"modes": ["G", "rfc8684"]}, {"G", "rfc8684"}),
    ],
)
async def test_server_mode_keywords(
    pki: Pki, kw: dict[str, object], expected: set[str]
) -> None:
    assert await _accepted_modes(pki, **kw) == expected


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"mode": "X"}, "unknown MPTCP mode 'X'"),
        ({"modes": "X"}, "unknown MPTCP mode 'X'"),
        ({"modes": ["G", "tcp"]}, "unknown MPTCP mode 'tcp'"),
        ({"modes": []}, "at least one mode"),
        ({"mode": "G", "modes": ["G"]}, "not both"),
    ],
)
async def test_bad_server_modes(
    pki: Pki, kw: dict[str, object], match: str
) -> None:
    with pytest.raises(ConfigurationError, match=match):
        await _accepted_modes(pki, **kw)


async def test_rfc8684_server_serves_an_rfc8684_client(pki: Pki) -> None:
    server = await mptls.start_server(
        echo, "127.0.0.1", 0, ssl=pki.server(), mode="rfc8684"
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.wait_for(
            mptls.open_connection(
                "127.0.0.1", port, ssl=pki.client(), mode="rfc8684"
            ),
            10,
        )
        writer.write(b"ping")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"ping"
        assert writer.get_extra_info("mptcp").mode == "rfc8684"
        writer.close()
