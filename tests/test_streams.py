"""The stream reader mptls's open_connection and start_server hand out."""

from __future__ import annotations

import asyncio

import pytest

from mptls.aio.streams import _new_reader


class FlowTransport(asyncio.Transport):
    """Records the reader's pause and resume calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")


def reader(limit: int = 1 << 16) -> asyncio.StreamReader:
    return _new_reader(limit, asyncio.get_running_loop())


async def test_read_returns_bytes_from_the_front_and_keeps_the_rest() -> None:
    stream = reader()
    stream.feed_data(b"abcdef")
    first = await stream.read(4)
    assert first == b"abcd" and type(first) is bytes
    assert await stream.read(100) == b"ef"


async def test_read_waits_for_data_then_ends_with_eof() -> None:
    stream = reader()
    pending = asyncio.ensure_future(stream.read(10))
    await asyncio.sleep(0)
    assert not pending.done()
    stream.feed_data(b"xy")
    assert await pending == b"xy"
    stream.feed_eof()
    assert await stream.read(10) == b""


async def test_read_all_read_zero_and_errors_keep_asyncio_behaviour() -> None:
    stream = reader()
    stream.feed_data(b"abc")
    assert await stream.read(0) == b""
    stream.feed_data(b"def")
    stream.feed_eof()
    assert await stream.read() == b"abcdef"
    failed = reader()
    failed.feed_data(b"abc")
    failed.set_exception(ConnectionResetError("gone"))
    with pytest.raises(ConnectionResetError):
        await failed.read(2)


async def test_a_read_below_the_limit_resumes_the_transport() -> None:
    stream = reader(limit=4)
    transport = FlowTransport()
    stream.set_transport(transport)
    stream.feed_data(b"0123456789")  # over twice the limit: paused
    assert transport.calls == ["pause"]
    assert await stream.read(8) == b"01234567"
    assert transport.calls == ["pause", "resume"]
    assert await stream.read(8) == b"89"
