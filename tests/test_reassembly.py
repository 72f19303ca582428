"""The connection-level receive buffer: order, overlap, window, DATA_FIN."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptls.errors import ProtocolError
from mptls.mptcp.options import ResetReason
from mptls.mptcp.reassembly import MAX_HELD_PIECES, ReceiveBuffer


def test_in_order_pieces_are_delivered_at_once() -> None:
    buffer = ReceiveBuffer(1000)
    assert buffer.insert(0, b"abc") == b"abc"
    assert buffer.insert(3, b"def") == b"def"
    assert buffer.next_offset == 6 and buffer.unconsumed == 6


def test_out_of_order_pieces_wait_for_the_gap() -> None:
    buffer = ReceiveBuffer(1000)
    assert buffer.insert(5, b"fgh") == b""
    assert buffer.held == 3
    assert buffer.insert(0, b"abcde") == b"abcdefgh"
    assert buffer.held == 0


def test_a_later_copy_never_replaces_bytes_already_taken() -> None:
    buffer = ReceiveBuffer(1000)
    buffer.insert(4, b"EFGH")
    # a retransmission elsewhere overlaps with different bytes: the held
    # bytes stay, only the gaps are filled
    assert buffer.insert(2, b"xxxxxxyy") == b""
    assert buffer.insert(0, b"ab") == b"abxxEFGHyy"
    assert buffer.insert(0, b"zzzzzzzzzzzz") == b"zz"


def test_duplicates_below_the_ack_are_dropped() -> None:
    buffer = ReceiveBuffer(1000)
    buffer.insert(0, b"abcd")
    assert buffer.insert(1, b"bc") == b""
    assert buffer.held == 0 and buffer.next_offset == 4


def test_data_beyond_the_window_is_dropped() -> None:
    buffer = ReceiveBuffer(10)
    assert buffer.insert(0, b"0123456789abc") == b"0123456789"
    assert buffer.window() == 0
    buffer.consumed(4)
    assert buffer.window() == 4
    assert buffer.insert(10, b"abcdef") == b"abcd"


def test_window_counts_unconsumed_and_held_bytes() -> None:
    buffer = ReceiveBuffer(100)
    buffer.insert(0, b"x" * 10)
    assert buffer.advertise() == 90
    buffer.insert(50, b"y" * 5)
    # the right edge never moves back (it was 100)
    assert buffer.window() == 90
    buffer.consumed(10)
    assert buffer.window() == 95
    assert buffer.window_growth() == 5


def test_data_fin_is_reached_after_all_data() -> None:
    buffer = ReceiveBuffer(100)
    assert buffer.insert(3, b"de", fin=True) == b""
    assert not buffer.fin_reached and buffer.ack_offset == 0
    assert buffer.insert(0, b"abc") == b"abcde"
    assert buffer.fin_reached
    # RFC 8684 3.3.3: the DATA_FIN takes one octet of the Data ACK
    assert buffer.ack_offset == 6


def test_data_beyond_the_data_fin_is_dropped() -> None:
    buffer = ReceiveBuffer(100)
    buffer.insert(4, b"efgh")
    buffer.insert(0, b"ab", fin=True)
    assert buffer.held == 0
    assert buffer.insert(2, b"cd") == b""
    assert buffer.fin_reached and buffer.ack_offset == 3


def test_a_second_data_fin_elsewhere_is_ignored() -> None:
    buffer = ReceiveBuffer(100)
    buffer.insert(0, b"", fin=True)
    buffer.insert(0, b"abc", fin=True)
    assert buffer.fin_offset == 0 and buffer.ack_offset == 1


def test_consumed_checks_its_argument() -> None:
    buffer = ReceiveBuffer(100)
    buffer.insert(0, b"abc")
    with pytest.raises(ProtocolError):
        buffer.consumed(4)
    with pytest.raises(ProtocolError):
        buffer.consumed(-1)
    with pytest.raises(ProtocolError):
        buffer.consumed(True)


def test_consumed_names_a_bad_argument_without_repeating_it_whole() -> None:
    # the message is the project's typed error, of a readable length,
    # whatever was passed: an int too long for Python to print, or the
    # received data itself handed over by mistake
    buffer = ReceiveBuffer(100)
    buffer.insert(0, b"abc")
    with pytest.raises(ProtocolError, match="an int of 16610 bits"):
        buffer.consumed(10**5000)
    with pytest.raises(ProtocolError) as caught:
        buffer.consumed(b"secret plaintext " * 1000)  # type: ignore[arg-type]
    assert len(str(caught.value)) < 200


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=1, max_size=400),
    seed=st.integers(0, 2**32),
    cuts=st.integers(1, 30),
)
def test_any_arrival_order_gives_back_the_stream(
    data: bytes, seed: int, cuts: int
) -> None:
    rng = random.Random(seed)
    pieces = []
    for _ in range(cuts):
        start = rng.randrange(len(data))
        end = rng.randrange(start, len(data)) + 1
        pieces.append((start, data[start:end]))
    # every byte is covered at least once, then everything is shuffled
    pieces += [(i, data[i : i + 7]) for i in range(0, len(data), 7)]
    rng.shuffle(pieces)
    buffer = ReceiveBuffer(len(data))
    out = b"".join(buffer.insert(offset, piece) for offset, piece in pieces)
    assert out == data
    assert buffer.held == 0


def test_an_in_order_view_is_passed_on_and_a_held_one_copied() -> None:
    read = bytearray(b"abcdefgh")
    buffer = ReceiveBuffer(1000)
    first = memoryview(read)[:3]
    assert buffer.insert(0, first) is first
    # out of order: kept past this read, so copied out of its buffer
    assert buffer.insert(5, memoryview(read)[5:]) == b""
    read[5:] = b"XYZ"
    assert buffer.insert(3, memoryview(read)[3:5]) == b"defgh"
    assert buffer.next_offset == 8 and buffer.unconsumed == 8


def test_a_view_next_to_held_data_is_delivered_with_it() -> None:
    buffer = ReceiveBuffer(1000)
    assert buffer.insert(3, b"def") == b""
    read = bytearray(b"abc")
    assert buffer.insert(0, memoryview(read)) == b"abcdef"
    assert buffer.held == 0


def test_a_run_behind_a_hole_is_held_as_one_piece() -> None:
    # one path's small frames held behind a stalled one: each joins the
    # piece before it, so they take one place whatever their number
    count = 100_000
    buffer = ReceiveBuffer(1 << 20)
    for offset in range(1, count + 1):
        assert buffer.insert(offset, b"x") == b""
    assert buffer.held == count and buffer.held_pieces == 1
    assert buffer.insert(0, b"y") == b"y" + b"x" * count
    assert buffer.held == 0 and buffer.held_pieces == 0


def test_a_piece_joined_to_another_is_copied_out_of_its_buffer() -> None:
    buffer = ReceiveBuffer(1000)
    assert buffer.insert(2, b"cd") == b""
    read = bytearray(b"ef")
    assert buffer.insert(4, memoryview(read)) == b""
    read[:] = b"XY"
    assert buffer.held_pieces == 1
    assert buffer.insert(0, b"ab") == b"abcdef"


def test_pieces_fill_holes_between_joined_runs_in_any_order() -> None:
    data = bytes(range(256)) * 4
    buffer = ReceiveBuffer(len(data))
    # runs of 10 with a hole of 5 after each, then the holes from the
    # last to the first, each joining the run in front of it
    out = []
    for start in range(5, len(data), 15):
        out.append(buffer.insert(start, data[start : start + 10]))
    for start in reversed(range(15, len(data), 15)):
        out.append(buffer.insert(start, data[start : start + 5]))
    out.append(buffer.insert(0, data[:5]))
    assert b"".join(out) == data
    assert buffer.held == 0 and buffer.held_pieces == 0


def test_a_filled_hole_merges_the_runs_on_both_sides() -> None:
    # one-byte pieces with a hole after each, then one frame over them
    # all: the runs it joins become one. Left apart, each later frame
    # over the same range walked every one of them (with the 16,384 a
    # window may hold, 24 ms of CPU per 64 KiB frame a peer resends)
    count = 1000
    buffer = ReceiveBuffer(1 << 20)
    for offset in range(1, 2 * count, 2):
        assert buffer.insert(offset, b"x") == b""
    assert buffer.held_pieces == count
    assert buffer.insert(1, b"y" * 2 * count) == b""
    assert buffer.held_pieces == 1 and buffer.held == 2 * count
    # the bytes taken first stay: only the holes took the new ones
    assert buffer.insert(0, b"z") == b"z" + b"xy" * count
    assert buffer.held == 0 and buffer.held_pieces == 0


def test_more_pieces_with_holes_than_the_limit_fail() -> None:
    # a peer's one-byte pieces, a hole before each, in descending order
    # (the costliest to insert): each would cost about 100 bytes, and a
    # 4 MiB window has room for two million
    buffer = ReceiveBuffer(4 << 20)
    top = 2 * MAX_HELD_PIECES
    for offset in range(top, 0, -2):
        assert buffer.insert(offset, b"x") == b""
    assert buffer.held_pieces == MAX_HELD_PIECES
    with pytest.raises(ProtocolError, match="out of order") as raised:
        buffer.insert(top + 2, b"x")
    assert raised.value.reset_reason == ResetReason.LACK_OF_RESOURCES
    assert buffer.held == buffer.held_pieces == MAX_HELD_PIECES
    # joining a held piece takes no place of its own: still taken
    assert buffer.insert(top + 1, b"y") == b""
    assert buffer.held == MAX_HELD_PIECES + 1


def test_a_reorder_limit_bounds_what_is_held_until_lifted() -> None:
    buffer = ReceiveBuffer(1 << 20, reorder_limit=100)
    assert buffer.insert(50, b"x" * 100) == b""
    assert buffer.held == 50
    # in order, a piece may still be as long as it is
    assert buffer.insert(0, b"y" * 300) == b"y" * 50 + b"x" * 50 + b"y" * 200
    buffer.lift_reorder_limit()
    assert buffer.insert(400, b"z" * 1000) == b""
    assert buffer.held == 1000
