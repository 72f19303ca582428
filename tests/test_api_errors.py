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
