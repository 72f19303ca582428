"""The pool of TLS output buffers: reuse only once nothing refers to one.

The pool is driven directly (its own instance, so other tests' buffers
do not count) and through a TLS engine whose outputs are kept, dropped
and read back in the order a multipath sender would.
"""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest
import trustme
from OpenSSL._util import ffi

from mptls.tls.config import TLSConfig
from mptls.tls.engine import TLSEngine
from mptls.tls.outbuf import POOLED_MIN, POOLED_SIZE, OutputPool

WRITE = 256 * 1024


def address(buffer: object) -> int:
    return int(ffi.cast("uintptr_t", buffer))


def test_a_dropped_buffer_is_handed_out_again() -> None:
    pool = OutputPool(keep=2)
    first = pool.allocate("char[]", 100_000)
    where = address(first)
    assert (pool.lent, pool.idle) == (1, 0)

    del first
    gc.collect()
    assert (pool.lent, pool.idle) == (0, 1)
    assert address(pool.allocate("char[]", 200_000)) == where


def test_a_view_keeps_its_buffer_lent() -> None:
    pool = OutputPool(keep=2)
    buffer = pool.allocate("char[]", 1000)
    view = memoryview(ffi.buffer(buffer, 1000))
    del buffer
    gc.collect()
    assert pool.lent == 1

    other = pool.allocate("char[]", 1000)
    assert address(other) != address(ffi.from_buffer(view))
    view.release()
    del view
    gc.collect()
    assert (pool.lent, pool.idle) == (1, 1)


def test_only_a_few_free_buffers_are_kept() -> None:
    pool = OutputPool(keep=2)
    buffers = [pool.allocate("char[]", 1000) for _ in range(5)]
    del buffers
    gc.collect()
    assert (pool.lent, pool.idle) == (0, 2)


def _burst_returned(pool: OutputPool, count: int) -> tuple[object, set[int]]:
    """One buffer kept out (a transfer under way), and ``count`` more
    handed out and returned at once, as a run of Data ACKs frees them:
    the one still out, and the addresses returned."""
    in_flight = pool.allocate("char[]", 1000)
    burst = [pool.allocate("char[]", 1000) for _ in range(count)]
    returned = {address(buffer) for buffer in burst}
    del burst
    gc.collect()
    return in_flight, returned


def test_a_burst_returned_mid_transfer_is_kept_for_the_next_writes() -> None:
    # a sender that reads a run of Data ACKs frees most of a window at
    # once, then writes as many: those writes must not need new buffers
    pool = OutputPool(keep=2, busy_keep=6)
    in_flight, returned = _burst_returned(pool, 5)
    assert (pool.lent, pool.idle) == (1, 5)

    again = [pool.allocate("char[]", 1000) for _ in range(5)]
    assert {address(buffer) for buffer in again} == returned
    del again, in_flight


def test_free_buffers_beyond_the_busy_limit_are_let_go() -> None:
    pool = OutputPool(keep=2, busy_keep=3)
    in_flight, _ = _burst_returned(pool, 5)
    assert (pool.lent, pool.idle) == (1, 3)
    del in_flight


def test_once_every_buffer_is_back_only_a_few_are_kept() -> None:
    pool = OutputPool(keep=2, busy_keep=6)
    in_flight, _ = _burst_returned(pool, 5)
    assert pool.idle == 5

    del in_flight
    gc.collect()
    assert (pool.lent, pool.idle) == (0, 2)


def test_an_output_too_big_for_a_buffer_is_refused() -> None:
    pool = OutputPool()
    with pytest.raises(MemoryError):
        pool.allocate("char[]", POOLED_SIZE + 1)


def test_a_bulk_write_fits_a_pooled_buffer() -> None:
    # 16 records of 16 KiB, each with a 5-byte header, a content type
    # byte and a 16-byte tag
    records = WRITE // (16 * 1024) * (16 * 1024 + 5 + 1 + 16)
    assert POOLED_MIN <= records <= POOLED_SIZE


@pytest.fixture
def engines(tmp_path: Path) -> tuple[TLSEngine, TLSEngine]:
    directory = tmp_path
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    ca_file, chain = directory / "ca.pem", directory / "chain.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.private_key_and_cert_chain_pem.write_to_path(str(chain))
    client = TLSEngine(
        TLSConfig(cafile=ca_file).client_context(),
        server_side=False,
        server_hostname="localhost",
    )
    server = TLSEngine(
        TLSConfig(certfile=chain).server_context(), server_side=True
    )
    client.start()
    for _ in range(16):
        server.receive(client.data_to_send())
        client.receive(server.data_to_send())
        if client.handshake_complete and server.handshake_complete:
            break
    assert client.handshake_complete and server.handshake_complete
    return client, server


def test_kept_outputs_survive_later_ones(
    engines: tuple[TLSEngine, TLSEngine],
) -> None:
    client, server = engines
    rng = random.Random(5)
    writes = [rng.randbytes(WRITE) for _ in range(24)]
    kept: list[tuple[memoryview, bytes]] = []
    for index, data in enumerate(writes):
        client.send(data)
        output = client.take_output()
        kept.append((output, bytes(output)))
        server.receive(kept[-1][1])
        if index % 3 == 2:
            # the peer acknowledged the oldest two: their buffers go back
            del kept[:2]
            gc.collect()
            # and the next outputs reuse them, never a kept one's
    for output, copy in kept:
        assert bytes(output) == copy
    assert server.read() == b"".join(writes)


def test_pooled_outputs_decrypt_in_order(
    engines: tuple[TLSEngine, TLSEngine],
) -> None:
    client, server = engines
    rng = random.Random(8)
    writes = [rng.randbytes(WRITE) for _ in range(8)]
    outputs = []
    for data in writes:
        client.send(data)
        outputs.append(client.take_output())
    for output in outputs:
        server.receive(bytes(output))
    assert server.read() == b"".join(writes)
