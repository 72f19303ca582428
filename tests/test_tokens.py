"""Owner-chosen tokens, 64-bit and 32-bit: layout, uniqueness, permutation."""

from __future__ import annotations

import ast
import functools
import gc
import inspect
import itertools
import struct
import subprocess
import sys
import tracemalloc
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mptls.errors import ConfigurationError, TokenError
from mptls.mptcp import tokens as tokens_module
from mptls.mptcp.tokens import (
    MAX_BATCH,
    SerialPermutation,
    TokenAllocator,
    TokenFields,
    TokenLayout,
    token_fields,
)

SECRET = bytes(range(32))
OTHER_SECRET = bytes(range(1, 33))


# layout and fields


def test_default_layout() -> None:
    layout = TokenLayout()
    assert (layout.server_id_bits, layout.worker_id_bits) == (8, 8)
    assert layout.serial_bits == 48


@pytest.mark.parametrize(
    ("server_bits", "worker_bits"),
    [(33, 0), (16, 17), (-1, 8), (8, -1), (True, 8), (8, False)],
)
def test_layout_must_leave_32_serial_bits(
    server_bits: int, worker_bits: int
) -> None:
    with pytest.raises(ConfigurationError):
        TokenLayout(server_bits, worker_bits)


@pytest.mark.parametrize(
    ("layout", "server_id", "worker_id"),
    [
        (TokenLayout(), 0xAB, 0xCD),
        (TokenLayout(), 0, 0),
        (TokenLayout(), 255, 255),
        (TokenLayout(0, 0), 0, 0),
        (TokenLayout(12, 4), 0xFED, 0x3),
        (TokenLayout(16, 16), 0xFFFF, 0x1234),
        (TokenLayout(1, 0), 1, 0),
        (TokenLayout(0, 9), 0, 300),
        # 32-bit tokens (mode E)
        (TokenLayout(0, 0, token_bits=32), 0, 0),
        (TokenLayout(8, 8, token_bits=32), 0xAB, 0xCD),
        (TokenLayout(16, 0, token_bits=32), 0xFFFF, 0),
        (TokenLayout(0, 3, token_bits=32), 0, 5),
        (TokenLayout(1, 0, token_bits=32), 1, 0),
    ],
)
def test_token_fields_reads_the_ids_without_the_secret(
    layout: TokenLayout, server_id: int, worker_id: int
) -> None:
    allocator = TokenAllocator(
        SECRET, layout=layout, server_id=server_id, worker_id=worker_id
    )
    for _ in range(50):
        token = allocator.allocate()
        assert len(token) == layout.token_length
        fields = token_fields(token, layout)
        assert fields == TokenFields(server_id, worker_id)


def test_server_id_is_the_leading_bits() -> None:
    allocator = TokenAllocator(SECRET, server_id=0x5A, worker_id=0xC3)
    token = allocator.allocate()
    # The fixed bytes a load balancer routes on.
    assert token[:2] == b"\x5a\xc3"


@pytest.mark.parametrize("token", [b"", b"1234567", b"123456789", "12345678"])
def test_token_fields_refuses_wrong_tokens(token: Any) -> None:
    with pytest.raises(ConfigurationError):
        token_fields(token)


def test_token_fields_reads_any_bytes_like_token() -> None:
    # release() took a memoryview of a token, token_fields() refused one
    token = TokenAllocator(SECRET, server_id=0x5A, worker_id=0xC3).allocate()
    for form in (bytearray(token), memoryview(token)):
        assert token_fields(form) == TokenFields(
            server_id=0x5A, worker_id=0xC3
        )


# allocator


def test_tokens_are_unique_and_counted() -> None:
    allocator = TokenAllocator(SECRET, server_id=1, worker_id=2)
    issued = [allocator.allocate() for _ in range(5000)]
    assert len(set(issued)) == len(issued)
    assert allocator.live == 5000
    for token in issued[:1000]:
        allocator.release(token)
    assert allocator.live == 4000
    assert allocator.next_counter == 5000
    # Released tokens are never handed out again.
    assert not set(issued) & {allocator.allocate() for _ in range(1000)}


def test_release_twice_or_foreign_token_is_an_error() -> None:
    allocator = TokenAllocator(SECRET)
    token = allocator.allocate()
    allocator.release(token)
    with pytest.raises(TokenError, match="does not hold"):
        allocator.release(token)
    other = TokenAllocator(OTHER_SECRET).allocate()
    with pytest.raises(TokenError):
        allocator.release(other)


@pytest.mark.parametrize("token", ["12345678", None, 8, 2**40, [1, 2]])
def test_release_of_what_is_not_bytes_is_refused(token: Any) -> None:
    # bytes(token) raised TypeError for a str or None, and made a
    # zero-filled buffer of an int's size (2**40: a terabyte)
    allocator = TokenAllocator(SECRET)
    allocator.allocate()
    with pytest.raises(ConfigurationError, match="a token is bytes"):
        allocator.release(token)
    assert allocator.live == 1


def test_release_takes_any_bytes_like_token() -> None:
    allocator = TokenAllocator(SECRET)
    token = allocator.allocate()
    allocator.release(memoryview(bytearray(token)))
    assert allocator.live == 0


def test_same_secret_and_ids_give_the_same_sequence() -> None:
    first = TokenAllocator(SECRET, server_id=3, worker_id=4)
    second = TokenAllocator(SECRET, server_id=3, worker_id=4)
    assert [first.allocate() for _ in range(20)] == [
        second.allocate() for _ in range(20)
    ]


def test_start_continues_where_a_worker_stopped() -> None:
    first = TokenAllocator(SECRET)
    issued = [first.allocate() for _ in range(30)]
    resumed = TokenAllocator(SECRET, start=first.next_counter - 10)
    assert [resumed.allocate() for _ in range(10)] == issued[20:]


def test_other_secret_or_worker_gives_unrelated_serials() -> None:
    base = TokenAllocator(SECRET, worker_id=1)
    other_secret = TokenAllocator(OTHER_SECRET, worker_id=1)
    other_worker = TokenAllocator(SECRET, worker_id=2)
    mask = (1 << 48) - 1

    def serials(allocator: TokenAllocator) -> list[int]:
        return [
            int.from_bytes(allocator.allocate(), "big") & mask
            for _ in range(100)
        ]

    reference = serials(base)
    assert not set(reference) & set(serials(other_secret))
    assert not set(reference) & set(serials(other_worker))


def test_serials_do_not_look_like_a_counter() -> None:
    allocator = TokenAllocator(SECRET)
    mask = (1 << 48) - 1
    values = [
        int.from_bytes(allocator.allocate(), "big") & mask for _ in range(4000)
    ]
    steps = {b - a for a, b in itertools.pairwise(values)}
    assert len(steps) > 3900
    # Each serial bit is set in about half of the tokens.
    for bit in range(48):
        ones = sum(value >> bit & 1 for value in values)
        assert 1800 < ones < 2200, bit


def test_exhaustion_is_a_clear_error() -> None:
    layout = TokenLayout(16, 16)
    allocator = TokenAllocator(SECRET, layout=layout, start=2**32 - 2)
    tokens = {allocator.allocate(), allocator.allocate()}
    assert len(tokens) == 2
    with pytest.raises(TokenError, match="exhausted"):
        allocator.allocate()
    # The counter did not move: the allocator keeps refusing.
    with pytest.raises(TokenError, match="exhausted"):
        allocator.allocate()
    assert TokenAllocator(SECRET, layout=layout, start=2**32).live == 0


@pytest.mark.parametrize(
    "arguments",
    [
        {"secret": b"too short"},
        {"secret": "a string of more than sixteen"},
        {"secret": SECRET, "server_id": 256},
        {"secret": SECRET, "worker_id": -1},
        {"secret": SECRET, "start": -1},
        {"secret": SECRET, "start": 2**48 + 1},
        {
            "secret": SECRET,
            "layout": TokenLayout(0, 4),
            "worker_id": 16,
        },
    ],
)
def test_allocator_checks_its_settings(arguments: dict[str, Any]) -> None:
    secret = arguments.pop("secret")
    with pytest.raises(ConfigurationError):
        TokenAllocator(secret, **arguments)


HUGE = 10**5000


@pytest.mark.parametrize(
    "make",
    [
        lambda: TokenLayout(HUGE, 0),
        lambda: TokenLayout(0, HUGE, token_bits=32),
        lambda: TokenLayout(0, 0, token_bits=HUGE),
        lambda: TokenAllocator(SECRET, server_id=HUGE),
        lambda: TokenAllocator(SECRET, worker_id=-HUGE),
    ],
)
def test_a_huge_width_or_id_is_named_by_its_size(make: Any) -> None:
    # past 4300 digits Python refuses to make an int a str: the message
    # naming the argument raised a bare ValueError in its place
    with pytest.raises(ConfigurationError, match="an int of 16610 bits"):
        make()


def test_the_secret_never_shows() -> None:
    secret = b"S" * 16 + b"E" * 16
    allocator = TokenAllocator(secret, server_id=7)
    for text in (repr(allocator), str(allocator), repr(allocator.permutation)):
        assert "SSSS" not in text
        assert secret.hex()[:8] not in text
    assert "server_id=7" in repr(allocator)


def test_module_imports_no_random_source() -> None:
    tree = ast.parse(inspect.getsource(tokens_module))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"random", "secrets", "os", "uuid"}


def test_module_imports_without_a_warning() -> None:
    # the batch path's CFB mode has moved between cryptography releases:
    # taken from the wrong module it warns at every import of mptls,
    # which an application run with -W error sees as a crash
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", "import mptls.mptcp.tokens"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, "")


# the keyed permutation


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 7, 8, 11, 12])
def test_permutation_on_small_widths_is_a_bijection(bits: int) -> None:
    permutation = SerialPermutation(SECRET, bits)
    domain = range(2**bits)
    images = [permutation.forward(value) for value in domain]
    assert sorted(images) == list(domain)
    assert images != list(domain)
    assert [permutation.inverse(image) for image in images] == list(domain)
    assert permutation.forward_many(0, 2**bits) == images


@pytest.mark.parametrize("bits", [32, 33, 47, 48, 63, 64])
def test_permutation_inverse_on_wide_widths(bits: int) -> None:
    permutation = SerialPermutation(SECRET, bits, tweak=b"t")
    for value in (0, 1, 2**bits - 1, 0x5555 % 2**bits, 12345678):
        image = permutation.forward(value)
        assert 0 <= image < 2**bits
        assert permutation.inverse(image) == value
    assert permutation.forward_many(100, 50) == [
        permutation.forward(value) for value in range(100, 150)
    ]


@pytest.mark.parametrize("bits", range(2, 65))
def test_batches_match_forward_at_every_width(bits: int) -> None:
    # the batch code keeps each half in byte planes, whose count and top
    # mask depend on the width; a run that crosses a change of the high
    # half takes two pieces
    permutation = SerialPermutation(SECRET, bits, tweak=b"w")
    low_size = 1 << (bits - bits // 2)
    start = max(low_size - 20, 0)
    count = min(40, 2**bits - start)
    expected = [
        permutation.forward(value) for value in range(start, start + count)
    ]
    assert permutation.forward_many(start, count) == expected
    for length in (4, 8):
        if bits > 8 * length:
            continue
        prefix = (0x5A5A5A5A5A5A5A5A >> bits << bits) & ((1 << 8 * length) - 1)
        blobs = permutation.forward_bytes(
            start, count, prefix=prefix, length=length
        )
        assert [int.from_bytes(blob) for blob in blobs] == [
            prefix | image for image in expected
        ]


def test_a_million_consecutive_tokens_are_distinct() -> None:
    allocator = TokenAllocator(SECRET, server_id=9, worker_id=10)
    serials = allocator.permutation.forward_many(0, 1_000_000)
    assert len(set(serials)) == 1_000_000
    # The allocator's tokens are exactly these serials behind its ids.
    prefix = (9 << 8 | 10) << 48
    for serial in serials[:1000]:
        expected = (prefix | serial).to_bytes(8, "big")
        assert allocator.allocate() == expected


def test_tweak_and_key_change_the_permutation() -> None:
    base = SerialPermutation(SECRET, 40)
    values = range(64)
    reference = base.forward_many(0, 64)
    assert SerialPermutation(SECRET, 40, tweak=b"x").forward_many(0, 64) != (
        reference
    )
    assert SerialPermutation(OTHER_SECRET, 40).forward_many(0, 64) != (
        reference
    )
    assert [base.forward(value) for value in values] == reference


@pytest.mark.parametrize(
    ("key", "bits"),
    [(SECRET, 1), (SECRET, 65), (b"short", 32), ("not bytes" * 4, 32)],
)
def test_permutation_checks_its_settings(key: Any, bits: int) -> None:
    with pytest.raises(ConfigurationError):
        SerialPermutation(key, bits)


@pytest.mark.parametrize("tweak", ["a str", 5, None, [1, 2]])
def test_a_tweak_that_is_not_bytes_is_refused(tweak: Any) -> None:
    # it went into the round keys' HMAC message: a bare TypeError
    with pytest.raises(ConfigurationError, match="tweak must be bytes"):
        SerialPermutation(SECRET, 32, tweak=tweak)


def test_a_bytearray_tweak_is_its_bytes() -> None:
    made = SerialPermutation(SECRET, 32, tweak=bytearray(b"t"))
    assert made.forward_many(0, 8) == SerialPermutation(
        SECRET, 32, tweak=b"t"
    ).forward_many(0, 8)


def test_permutation_checks_its_domain() -> None:
    permutation = SerialPermutation(SECRET, 8)
    for value in (-1, 256):
        with pytest.raises(ConfigurationError):
            permutation.forward(value)
        with pytest.raises(ConfigurationError):
            permutation.inverse(value)
    with pytest.raises(ConfigurationError):
        permutation.forward_many(250, 7)
    with pytest.raises(ConfigurationError):
        permutation.forward_many(0, -1)
    assert permutation.forward_many(3, 0) == []


@pytest.mark.parametrize("start", [-1, 257, 2**100, "0", 1.0, None])
def test_an_empty_batch_still_checks_its_start(start: Any) -> None:
    # a count of 0 returned [] before anything was checked, so a start
    # that any other count refused went through unseen
    permutation = SerialPermutation(SECRET, 8)
    with pytest.raises(ConfigurationError, match="domain"):
        permutation.forward_many(start, 0)
    with pytest.raises(ConfigurationError, match="domain"):
        permutation.forward_bytes(start, 0, length=4)


def test_an_empty_batch_may_start_where_the_domain_ends() -> None:
    permutation = SerialPermutation(SECRET, 8)
    assert permutation.forward_many(256, 0) == []
    assert permutation.forward_bytes(256, 0, length=4) == ()
    with pytest.raises(ConfigurationError, match="domain"):
        permutation.forward_many(256, 1)


@pytest.mark.parametrize("count", [0, 1])
def test_a_bad_prefix_is_refused_whatever_the_count(count: int) -> None:
    permutation = SerialPermutation(SECRET, 8)
    with pytest.raises(ConfigurationError, match="overlaps"):
        permutation.forward_bytes(0, count, prefix=1, length=4)
    with pytest.raises(ConfigurationError, match="unsigned 32-bit"):
        permutation.forward_bytes(0, count, prefix=-1, length=4)


def test_a_batch_too_big_to_make_is_refused_before_it_is_made() -> None:
    # forward_many(0, 2**40) asked for a piece of 2**32 values at once
    # and failed with a MemoryError
    permutation = SerialPermutation(SECRET, 64)
    for count in (MAX_BATCH + 1, 2**40, 2**100):
        with pytest.raises(ConfigurationError, match=f"at most {MAX_BATCH}"):
            permutation.forward_many(0, count)
        with pytest.raises(ConfigurationError, match=f"at most {MAX_BATCH}"):
            permutation.forward_bytes(0, count)


def test_big_batches_leave_little_memory_behind() -> None:
    # the formats that unpack a batch are cached by size: sized for the
    # whole batch, each big count kept tens of MiB after the call
    permutation = SerialPermutation(SECRET, 64, tweak=b"m")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for offset in range(3):
            permutation.forward_many(offset, 2**18 - offset)
            permutation.forward_bytes(offset, 2**18 - 7 - offset)
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept < 6 * 2**20


def test_a_batch_past_the_end_of_the_domain_says_how_much_is_left() -> None:
    permutation = SerialPermutation(SECRET, 64)
    with pytest.raises(ConfigurationError, match="at most 3 values"):
        permutation.forward_many(2**64 - 3, 10)
    with pytest.raises(ConfigurationError, match="at most 3 values"):
        permutation.forward_bytes(2**64 - 3, 10)
    assert permutation.forward_many(2**64 - 3, 3) == [
        permutation.forward(value) for value in range(2**64 - 3, 2**64)
    ]


def test_a_long_batch_is_made_in_pieces_that_match_forward() -> None:
    permutation = SerialPermutation(SECRET, 64, tweak=b"p")
    count = 3 * 2**16 + 5
    made = permutation.forward_many(7, count)
    assert len(made) == count
    for index in (0, 2**16 - 1, 2**16, 2**16 + 1, 2 * 2**16, count - 1):
        assert made[index] == permutation.forward(7 + index)


@functools.cache
def _shared_permutation(bits: int) -> SerialPermutation:
    # one per width for every example, so that each call follows calls
    # of other sizes on the same round contexts
    return SerialPermutation(SECRET, bits, tweak=b"h")


@st.composite
def _runs(draw: st.DrawFn) -> tuple[int, int, int, int, int]:
    """A width, a run inside its domain, and a prefix and length that
    forward_bytes takes for it."""
    bits = draw(st.sampled_from(range(2, 65)))
    domain = 1 << bits
    count = draw(
        st.one_of(st.integers(1, 40), st.integers(1, 3000)).map(
            lambda count: min(count, domain)
        )
    )
    low_size = 1 << (bits - bits // 2)
    # where a piece ends: a change of the high part, the domain's end
    boundary = low_size * draw(st.integers(1, domain // low_size))
    start = draw(
        st.one_of(
            st.integers(0, domain - count),
            st.integers(0, count).map(lambda back: boundary - back),
            st.just(domain - count),
        ).map(lambda start: min(max(start, 0), domain - count))
    )
    length = draw(st.sampled_from([4, 8] if bits <= 32 else [8]))
    prefix = draw(st.integers(0, (1 << (8 * length - bits)) - 1)) << bits
    return bits, start, count, prefix, length


@settings(max_examples=150, deadline=None)
@given(_runs())
def test_any_batch_is_forward_value_by_value(
    run: tuple[int, int, int, int, int],
) -> None:
    # what the fixed runs above leave out: pieces that start and end
    # anywhere in a high part, runs that end the domain at any width,
    # prefixes of any bits (zero bytes, or only low ones beside a narrow
    # serial), calls that follow calls of other sizes on the same round
    # contexts, and inverse() over what a batch made
    bits, start, count, prefix, length = run
    permutation = _shared_permutation(bits)
    values = range(start, start + count)
    expected = [permutation.forward(value) for value in values]
    assert permutation.forward_many(start, count) == expected
    assert [permutation.inverse(image) for image in expected] == list(values)
    blobs = permutation.forward_bytes(
        start, count, prefix=prefix, length=length
    )
    assert {len(blob) for blob in blobs} == {length}
    assert [int.from_bytes(blob) for blob in blobs] == [
        prefix | image for image in expected
    ]


def test_a_bool_is_not_a_count_or_a_counter() -> None:
    # count=True made the batch's struct format "TrueQ": struct.error
    permutation = SerialPermutation(SECRET, 32)
    with pytest.raises(ConfigurationError, match="count"):
        permutation.forward_many(0, True)
    with pytest.raises(ConfigurationError, match="count"):
        permutation.forward_bytes(0, True)
    with pytest.raises(ConfigurationError, match="domain"):
        permutation.forward_many(True, 2)
    with pytest.raises(ConfigurationError, match="domain"):
        permutation.forward(False)
    with pytest.raises(ConfigurationError, match="start"):
        TokenAllocator(SECRET, start=True)


def test_batched_allocation_is_the_one_by_one_sequence() -> None:
    # across two batch boundaries, from a start that is not a multiple
    # of the batch: each token is the permutation of its own counter
    start = 1000
    count = 2 * tokens_module.ALLOCATION_BATCH + 77
    allocator = TokenAllocator(SECRET, server_id=3, worker_id=4, start=start)
    permutation = allocator.permutation
    prefix = (3 << 8 | 4) << permutation.bits
    issued = [allocator.allocate() for _ in range(count)]
    expected = [
        (prefix | permutation.forward(counter)).to_bytes(8, "big")
        for counter in range(start, start + count)
    ]
    assert issued == expected
    assert allocator.next_counter == start + count
    assert allocator.live == count


def test_a_restart_from_next_counter_skips_nothing_made_ahead() -> None:
    first = TokenAllocator(SECRET)
    issued = [first.allocate() for _ in range(5)]
    # the first allocator made a whole batch; only five were handed out
    second = TokenAllocator(SECRET, start=first.next_counter)
    assert second.allocate() == first.allocate()
    assert second.next_counter == first.next_counter == 6
    assert len(set(issued)) == 5


def test_forward_bytes_carries_the_prefix_beside_the_serial() -> None:
    permutation = SerialPermutation(SECRET, 48)
    prefix = 0xABCD << 48
    blobs = permutation.forward_bytes(70, 40, prefix=prefix)
    assert [int.from_bytes(b, "big") for b in blobs] == [
        prefix | image for image in permutation.forward_many(70, 40)
    ]
    assert permutation.forward_bytes(0, 0) == ()
    with pytest.raises(ConfigurationError, match="overlaps"):
        permutation.forward_bytes(0, 4, prefix=1 << 47)
    with pytest.raises(ConfigurationError, match="64-bit"):
        permutation.forward_bytes(0, 4, prefix=1 << 64)


@pytest.mark.parametrize("server_id", [True, False, 1.0, "1"])
def test_an_id_that_is_not_an_int_is_refused(server_id: object) -> None:
    # a bool is an int to Python, never an id to a load balancer
    with pytest.raises(ConfigurationError, match="server id"):
        TokenAllocator(SECRET, server_id=server_id)  # type: ignore[arg-type]


def test_a_layout_that_is_not_a_token_layout_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="TokenLayout"):
        TokenAllocator(SECRET, layout=5)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="TokenLayout"):
        token_fields(bytes(8), 5)  # type: ignore[arg-type]


# 64-bit tokens stay what they were


def test_64_bit_tokens_are_pinned() -> None:
    # Made before 32-bit tokens existed: a server that restarts with its
    # secret and counter must go on with the very same tokens.
    default = TokenAllocator(SECRET, server_id=0x12, worker_id=0x34)
    assert [default.allocate().hex() for _ in range(3)] == [
        "12349999b0c8c9e1",
        "123404127ef7e811",
        "1234ab40a3953475",
    ]
    no_ids = TokenAllocator(SECRET, layout=TokenLayout(0, 0), start=1000)
    assert [no_ids.allocate().hex() for _ in range(3)] == [
        "499e9b48d20d7ac9",
        "b533f94460aa672f",
        "acf3a87b838644a4",
    ]
    wide_ids = TokenAllocator(
        SECRET,
        layout=TokenLayout(12, 4),
        server_id=0xABC,
        worker_id=5,
        start=2**40,
    )
    assert [wide_ids.allocate().hex() for _ in range(2)] == [
        "abc5309bc70e79b6",
        "abc599b9c55cf7ee",
    ]


# 32-bit tokens (the rotation profile, E)

NARROW = TokenLayout(0, 0, token_bits=32)


def test_token_width_sets_length_and_serial() -> None:
    assert TokenLayout().token_bits == 64
    assert TokenLayout().token_length == 8
    assert (NARROW.token_length, NARROW.serial_bits) == (4, 32)
    layout = TokenLayout(8, 8, token_bits=32)
    assert (layout.token_length, layout.serial_bits) == (4, 16)


@pytest.mark.parametrize(
    "token_bits", [0, 16, 48, 128, -64, True, 64.0, "64", None]
)
def test_token_width_is_32_or_64(token_bits: Any) -> None:
    with pytest.raises(ConfigurationError, match="32 or 64"):
        TokenLayout(0, 0, token_bits=token_bits)


@pytest.mark.parametrize(
    ("server_bits", "worker_bits"), [(17, 0), (0, 17), (9, 8), (16, 1)]
)
def test_32_bit_layout_must_leave_16_serial_bits(
    server_bits: int, worker_bits: int
) -> None:
    with pytest.raises(ConfigurationError, match="at least 16"):
        TokenLayout(server_bits, worker_bits, token_bits=32)


def test_32_bit_server_id_is_the_leading_bits() -> None:
    layout = TokenLayout(8, 8, token_bits=32)
    allocator = TokenAllocator(
        SECRET, layout=layout, server_id=0x5A, worker_id=0xC3
    )
    token = allocator.allocate()
    assert token[:2] == b"\x5a\xc3"
    assert allocator.permutation.bits == 16


@pytest.mark.parametrize(
    ("token", "layout", "message"),
    [
        (bytes(4), TokenLayout(), "64-bit .* 4 bytes.*token_bits=32"),
        (bytes(8), NARROW, "32-bit .* 8 bytes.*token_bits=64"),
        (bytes(5), TokenLayout(), "8-byte tokens, got 5 bytes$"),
        (bytes(3), NARROW, "4-byte tokens, got 3 bytes$"),
        ("1234", NARROW, "bytes, got str"),
    ],
)
def test_token_fields_says_which_width_a_token_needs(
    token: Any, layout: TokenLayout, message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        token_fields(token, layout)


def test_32_bit_tokens_are_unique_and_counted() -> None:
    allocator = TokenAllocator(SECRET, layout=NARROW)
    issued = [allocator.allocate() for _ in range(300_000)]
    assert {len(token) for token in issued} == {4}
    assert len(set(issued)) == len(issued)
    assert allocator.live == 300_000
    for token in issued[:1000]:
        allocator.release(token)
    assert allocator.live == 299_000


def test_a_16_bit_serial_covers_its_space_then_runs_out() -> None:
    layout = TokenLayout(8, 8, token_bits=32)
    allocator = TokenAllocator(SECRET, layout=layout, server_id=1, worker_id=2)
    issued = [allocator.allocate() for _ in range(2**16)]
    assert {token[:2] for token in issued} == {b"\x01\x02"}
    serials = [int.from_bytes(token[2:], "big") for token in issued]
    # every serial once, in an order that is not the counter's
    assert sorted(serials) == list(range(2**16))
    assert serials != sorted(serials)
    with pytest.raises(TokenError, match=r"exhausted: all 2\*\*16"):
        allocator.allocate()


def test_32_bit_exhaustion_from_a_late_start() -> None:
    layout = TokenLayout(8, 8, token_bits=32)
    allocator = TokenAllocator(SECRET, layout=layout, start=2**16 - 2)
    assert len({allocator.allocate(), allocator.allocate()}) == 2
    for _ in range(2):
        with pytest.raises(TokenError, match="exhausted"):
            allocator.allocate()
    assert TokenAllocator(SECRET, layout=layout, start=2**16).live == 0
    with pytest.raises(ConfigurationError, match="start"):
        TokenAllocator(SECRET, layout=layout, start=2**16 + 1)


def test_32_bit_batches_are_the_one_by_one_sequence() -> None:
    # a 24-bit serial splits its batches where the low part wraps, so
    # this run crosses batch and piece boundaries
    layout = TokenLayout(4, 4, token_bits=32)
    start = 1000
    count = 2 * tokens_module.ALLOCATION_BATCH + 77
    allocator = TokenAllocator(
        SECRET, layout=layout, server_id=3, worker_id=4, start=start
    )
    permutation = allocator.permutation
    prefix = (3 << 4 | 4) << 24
    issued = [allocator.allocate() for _ in range(count)]
    expected = [
        (prefix | permutation.forward(counter)).to_bytes(4, "big")
        for counter in range(start, start + count)
    ]
    assert issued == expected
    resumed = TokenAllocator(
        SECRET, layout=layout, server_id=3, worker_id=4, start=start + 500
    )
    assert resumed.allocate() == issued[500]


def test_32_bit_serials_do_not_look_like_a_counter() -> None:
    allocator = TokenAllocator(SECRET, layout=NARROW)
    values = [int.from_bytes(allocator.allocate()) for _ in range(4000)]
    steps = {b - a for a, b in itertools.pairwise(values)}
    assert len(steps) > 3900
    for bit in range(32):
        ones = sum(value >> bit & 1 for value in values)
        assert 1800 < ones < 2200, bit


def test_32_and_64_bit_allocators_with_one_secret_are_unrelated() -> None:
    # Same secret, same id widths and ids: only the token width differs.
    # A 64-bit allocator's tweak is its id widths and ids (pinned above
    # through its tokens); the 32-bit one's must add its width, or both
    # would run the same round keys.
    wide = TokenAllocator(SECRET, layout=TokenLayout(0, 0))
    narrow = TokenAllocator(SECRET, layout=NARROW)
    ids_only = struct.pack(">BBII", 0, 0, 0, 0)
    assert wide.permutation.forward_many(0, 64) == SerialPermutation(
        SECRET, 64, tweak=ids_only
    ).forward_many(0, 64)
    same_keys = SerialPermutation(SECRET, 32, tweak=ids_only)
    assert narrow.permutation.forward_many(0, 64) != (
        same_keys.forward_many(0, 64)
    )
    # and the narrow tokens are not the wide ones cut short
    narrow_tokens = [narrow.allocate() for _ in range(1000)]
    wide_tokens = [wide.allocate() for _ in range(1000)]
    assert not set(narrow_tokens) & {token[:4] for token in wide_tokens}
    assert not set(narrow_tokens) & {token[4:] for token in wide_tokens}


def test_32_bit_allocators_of_other_ids_are_unrelated() -> None:
    layout = TokenLayout(0, 8, token_bits=32)

    def serials(worker_id: int) -> set[int]:
        allocator = TokenAllocator(SECRET, layout=layout, worker_id=worker_id)
        return {int.from_bytes(allocator.allocate()[1:]) for _ in range(200)}

    # were the ids not in the tweak, both would be the same 200 serials
    assert not serials(1) & serials(2)


# forward_bytes at both lengths


def test_forward_bytes_makes_4_byte_values() -> None:
    permutation = SerialPermutation(SECRET, 24)
    prefix = 0xAB << 24
    blobs = permutation.forward_bytes(5000, 300, prefix=prefix, length=4)
    assert [int.from_bytes(blob) for blob in blobs] == [
        prefix | image for image in permutation.forward_many(5000, 300)
    ]
    assert {len(blob) for blob in blobs} == {4}
    assert permutation.forward_bytes(0, 0, length=4) == ()


@pytest.mark.parametrize("length", [4, 8])
def test_forward_bytes_keeps_a_prefix_beside_a_narrow_serial(
    length: int,
) -> None:
    # below 32 serial bits the prefix shares the low word with it
    permutation = SerialPermutation(SECRET, 8)
    prefix = 0xCDAB << 8
    blobs = permutation.forward_bytes(0, 256, prefix=prefix, length=length)
    assert [int.from_bytes(blob) for blob in blobs] == [
        prefix | image for image in permutation.forward_many(0, 256)
    ]


@pytest.mark.parametrize(
    ("bits", "arguments", "message"),
    [
        (24, {"length": 5}, "4 or 8"),
        (24, {"length": True}, "4 or 8"),
        (24, {"length": 4.0}, "4 or 8"),
        (33, {"length": 4}, "33-bit value does not fit in 4 bytes"),
        (24, {"length": 4, "prefix": 1 << 32}, "32-bit"),
        (24, {"length": 4, "prefix": 1 << 23}, "overlaps"),
    ],
)
def test_forward_bytes_checks_its_length(
    bits: int, arguments: dict[str, Any], message: str
) -> None:
    permutation = SerialPermutation(SECRET, bits)
    with pytest.raises(ConfigurationError, match=message):
        permutation.forward_bytes(0, 4, **arguments)
