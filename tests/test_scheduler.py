"""The sending side: mapped chunks, Data ACKs, reinjection, subflow choice."""

from __future__ import annotations

import array

import pytest

from mptls.errors import ProtocolError
from mptls.mptcp.scheduler import (
    SendBuffer,
    Subflow,
    SubflowState,
    has_room,
    pick_subflow,
    smooth_rtt,
)


def test_chunks_are_cut_by_size_and_window() -> None:
    buffer = SendBuffer()
    buffer.write(b"x" * 100)
    first = buffer.take_new(40, limit=1000)
    assert first is not None and (first.offset, len(first.data)) == (0, 40)
    second = buffer.take_new(40, limit=50)
    assert second is not None and (second.offset, len(second.data)) == (40, 10)
    assert buffer.take_new(40, limit=50) is None
    assert buffer.size == 100 and buffer.pending == 50


@pytest.mark.parametrize("owned", [False, True])
def test_a_view_of_wider_items_is_counted_and_cut_by_byte(owned: bool) -> None:
    # an owned view of an array of 4-byte ints was counted by item: two
    # bytes of pending data for eight, and chunks cut by item
    data = array.array("I", [1, 2])
    buffer = SendBuffer()
    buffer.write(memoryview(data), owned=owned)
    assert buffer.pending == 8
    chunk = buffer.take_new(5, 100)
    assert chunk is not None and bytes(chunk.data) == data.tobytes()[:5]


def test_data_fin_rides_the_chunk_with_the_last_byte() -> None:
    buffer = SendBuffer()
    buffer.write(b"abc")
    buffer.close()
    chunk = buffer.take_new(10, limit=100)
    assert chunk is not None and chunk.fin and chunk.end == 4
    assert buffer.fin_offset == 3 and buffer.mapped_end == 4
    assert buffer.take_new(10, limit=100) is None


def test_data_fin_alone_may_sit_at_the_window_edge() -> None:
    buffer = SendBuffer()
    buffer.write(b"abc")
    buffer.take_new(10, limit=3)
    buffer.close()
    assert buffer.wants_new_chunk(limit=3)
    fin = buffer.take_new(10, limit=3)
    assert fin is not None and fin.fin and fin.data == b"" and fin.offset == 3


def test_implicit_frames_hold_back_the_data_fin() -> None:
    buffer = SendBuffer()
    buffer.write(b"abc")
    buffer.close()
    chunk = buffer.take_new(10, limit=100, fin_allowed=False)
    assert chunk is not None and not chunk.fin
    later = buffer.take_new(10, limit=100)
    assert later is not None and later.fin and later.data == b""


def test_data_ack_frees_covered_chunks() -> None:
    buffer = SendBuffer()
    buffer.write(b"x" * 30)
    chunks = [buffer.take_new(10, limit=100) for _ in range(3)]
    freed = buffer.ack(20)
    assert freed == chunks[:2]
    assert buffer.size == 10
    assert buffer.ack(10) == []
    with pytest.raises(ProtocolError):
        buffer.ack(31)


def test_requeue_sends_a_lost_subflows_chunks_again_in_order() -> None:
    buffer = SendBuffer()
    buffer.write(b"x" * 40)
    chunks = [buffer.take_new(10, limit=100) for _ in range(4)]
    for chunk, subflow_id in zip(chunks, (1, 2, 1, 2), strict=True):
        assert chunk is not None
        chunk.subflow_id = subflow_id
    moved = buffer.requeue(2)
    assert [c.offset for c in moved] == [10, 30]
    buffer.requeue(1)
    buffer.ack(20)
    # acked chunks are not sent again; the rest come back by offset
    assert buffer.has_reinjection
    again = [buffer.take_reinjection(), buffer.take_reinjection()]
    assert [c.offset for c in again if c is not None] == [20, 30]
    assert buffer.take_reinjection() is None


def subflow(
    subflow_id: int,
    *,
    srtt: float | None = None,
    inflight: int = 0,
    backup: bool = False,
    writable: bool = True,
    state: SubflowState = SubflowState.ESTABLISHED,
) -> Subflow:
    return Subflow(
        subflow_id,
        state,
        srtt=srtt,
        inflight=inflight,
        backup=backup,
        writable=writable,
    )


def test_lowest_rtt_wins_and_ties_go_to_less_in_flight() -> None:
    fast, slow = subflow(1, srtt=0.01), subflow(2, srtt=0.05)
    assert pick_subflow([slow, fast], 100) is fast
    a = subflow(1, srtt=0.02, inflight=50)
    b = subflow(2, srtt=0.02, inflight=10)
    assert pick_subflow([a, b], 100) is b


def test_full_unwritable_or_unready_subflows_are_skipped() -> None:
    full = subflow(1, srtt=0.001, inflight=100)
    blocked = subflow(2, srtt=0.001, writable=False)
    joining = subflow(3, state=SubflowState.SYN_SENT)
    ok = subflow(4, srtt=0.5)
    assert pick_subflow([full, blocked, joining, ok], 100) is ok
    assert pick_subflow([full, blocked, joining], 100) is None


def test_room_is_writable_and_below_the_limit_and_the_queue_cap() -> None:
    assert has_room(subflow(1, inflight=99), 100)
    assert not has_room(subflow(1, inflight=100), 100)
    assert not has_room(subflow(1, writable=False), 100)
    capped = subflow(1, inflight=10)
    capped.set_queue_room(5)
    assert has_room(capped, 100)
    capped.inflight = 15
    assert not has_room(capped, 100)
    # the lone subflow of a one-path transfer: pick_subflow agrees
    assert pick_subflow([capped], 100) is None


def test_backup_only_when_no_regular_subflow_is_established() -> None:
    backup = subflow(1, srtt=0.001, backup=True)
    regular = subflow(2, srtt=0.1, inflight=100)
    # the regular subflow is full, but that is no reason to use the backup
    assert pick_subflow([backup, regular], 100) is None
    regular.state = SubflowState.CLOSED
    assert pick_subflow([backup, regular], 100) is backup


def test_rtt_is_an_ewma_with_gain_one_eighth() -> None:
    assert smooth_rtt(None, 0.08) == 0.08
    assert smooth_rtt(0.08, 0.16) == pytest.approx(0.09)


def test_rtt_probe_is_timed_on_its_own_subflow() -> None:
    path = subflow(1)
    path.start_probe(100, now=1.0)
    path.start_probe(200, now=1.5)  # one probe at a time
    path.ack_arrived(50, now=1.2)
    assert path.srtt is None
    path.ack_arrived(150, now=1.25)
    assert path.srtt == pytest.approx(0.25)


def test_illegal_state_edges_are_refused() -> None:
    path = subflow(1, state=SubflowState.CLOSED)
    with pytest.raises(ProtocolError):
        path.set_state(SubflowState.ESTABLISHED)
