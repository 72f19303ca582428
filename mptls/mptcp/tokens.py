"""MPTCP tokens chosen by their owner, unique by construction.

In G mode a token is no longer a hash of a key, so whoever hands it out
must keep it unique (draft-paasch-mptcp-application-authentication,
protocol.md section 11 item 17). G tokens have 64 bits; the rotation
profile's (E, draft-baerts) have 32. A token here is, big-endian::

    [server id][worker id][serial]

The serial is a keyed permutation of a counter. Distinct counters give
distinct serials, so no collision check is needed. Without the secret,
the next serial cannot be predicted from the ones already seen. A load
balancer reads the server and worker ids in the clear to route an
MP_JOIN to the owner of its token (draft-paasch-mptcp-loadbalancer
keeps the same idea but encrypts the whole token).

The permutation is an alternating Feistel network over the two halves
of the serial, with round functions taken from AES. The halves may
differ by one bit, as in FF1 (NIST SP 800-38G), which uses modular
addition where this uses XOR. So any width works, even or odd, with no
cycle walking. The allocator makes its tokens ahead, a batch at a time,
with one AES call per round for the whole batch.

This module imports no random source: the caller passes in the secret.
The secret never appears in a repr or an error message.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import (
    Cipher,
    CipherContext,
    algorithms,
    modes,
)

from mptls.errors import ConfigurationError, TokenError, shown_value

try:
    # cryptography 47 moved CFB here, and warns when it is taken from
    # its old module; here it only chains AES calls (see _forward_piece)
    from cryptography.hazmat.decrepit.ciphers.modes import CFB
except ImportError:  # cryptography before 47
    from cryptography.hazmat.primitives.ciphers.modes import CFB

__all__ = [
    "E_TOKEN_LAYOUT",
    "MAX_BATCH",
    "TOKEN_LENGTH",
    "SerialPermutation",
    "TokenAllocator",
    "TokenFields",
    "TokenLayout",
    "token_fields",
]

# The default width, G mode's; a layout's own is TokenLayout.token_bits.
TOKEN_LENGTH = 8
TOKEN_BITS = 64
MIN_SERIAL_BITS = 32
# The least serial a layout must keep, by token width: a 32-bit token
# with ids in it still gives each worker 2**16 tokens.
_MIN_SERIAL_BITS = {TOKEN_BITS: MIN_SERIAL_BITS, 32: 16}
MIN_SECRET_LENGTH = 16
# Ten rounds, as FF1 uses: at these narrow widths extra rounds are cheap
# and widen the margin over the 4-round Luby-Rackoff bound.
FEISTEL_ROUNDS = 10

_ROUND_KEY_LABEL = b"mptls token serial round key"
_ROUND_KEY_CONTEXT = struct.Struct(">BBII")
_BLOCK = 16
# Tokens an allocator makes at a time: each round of the permutation is
# then one AES call over 32 KiB, and the Python work per token a list
# pop. Measured (mptls bench tokens): about 0.2 us per token in batches
# of 1024, against 6 to 13 us one by one.
ALLOCATION_BATCH = 1024
# The most values one forward_many or forward_bytes call makes. A call
# holds its result and, while a piece of it is made, about 200 bytes
# per value of that piece: a count of 2**40 asked for a piece of 2**32
# values and failed with a MemoryError. Pieces of at most _MAX_PIECE
# values keep a full batch near its result: forward_many(0, MAX_BATCH)
# peaked about 65 MiB above the process, against 200 MiB in one piece.
MAX_BATCH = 1 << 20
# A piece's formats and lanes are cached by its size (see _lanes and
# _blobs). Sized for whole batches, 8 calls of MAX_BATCH values kept
# 300 MiB in those caches after they returned; pieces of 2**13 keep
# under 3 MiB, at the same cost per value.
_MAX_PIECE = 1 << 13


_WORD = 4
_WORD_BITS = 32


@dataclass(frozen=True, slots=True)
class _Lanes:
    """``count`` 4-byte lanes in one big integer, and how to read them.

    A half of a serial has at most 32 bits: a batch's counters start
    in such lanes, and its images end in them when their halves do not
    fill whole bytes. Building these takes longer than a batch's
    rounds, hence the cache.
    """

    # reads 8-byte values as ints
    ints: struct.Struct
    # a 1 in every lane, and 0, 1, 2, ... lane by lane
    ones: int
    ramp: int


@functools.lru_cache(maxsize=8)
def _lanes(count: int) -> _Lanes:
    return _Lanes(
        struct.Struct(f">{count}Q"),
        int.from_bytes(b"\x00\x00\x00\x01" * count),
        int.from_bytes(struct.pack(f">{count}I", *range(count))),
    )


def _byte_size(bits: int) -> int:
    """Bytes that hold a ``bits``-bit value."""
    return (bits + 7) // 8


@functools.lru_cache(maxsize=16)
def _top_mask(bits: int) -> bytes | None:
    """A ``bytes.translate`` table that keeps the bits of a ``bits``-bit
    value's first byte, or None when the value fills whole bytes."""
    top = bits % 8
    if not top:
        return None
    return bytes(byte & ((1 << top) - 1) for byte in range(256))


@functools.lru_cache(maxsize=8)
def _blobs(count: int, length: int) -> struct.Struct:
    """Splits a run of ``count`` values of ``length`` bytes into bytes."""
    return struct.Struct(">" + f"{length}s" * count)


@dataclass(frozen=True, slots=True)
class TokenLayout:
    """How a token is split: server id, worker id, serial.

    ``token_bits`` is 64 (G mode) or 32 (the rotation profile, E). The
    serial gets what is left, and must keep at least 32 bits of a 64-bit
    token, so that one allocator can hand out 2**32 tokens, or 16 bits
    of a 32-bit one.
    """

    server_id_bits: int = 8
    worker_id_bits: int = 8
    token_bits: int = TOKEN_BITS

    def __post_init__(self) -> None:
        width = self.token_bits
        if (
            isinstance(width, bool)
            or not isinstance(width, int)
            or width not in _MIN_SERIAL_BITS
        ):
            raise ConfigurationError(
                f"token_bits must be 32 or 64, not {shown_value(width)}"
            )
        needed = _MIN_SERIAL_BITS[width]
        for name in ("server_id_bits", "worker_id_bits"):
            bits = getattr(self, name)
            if isinstance(bits, bool) or not isinstance(bits, int) or bits < 0:
                raise ConfigurationError(f"{name} must be an int >= 0")
            if bits > width:
                # named alone: the serial width left by a huge one may
                # have too many digits to print
                raise ConfigurationError(
                    f"{name} of {shown_value(bits)} is wider than a "
                    f"{width}-bit token, which keeps at least {needed} "
                    "serial bits"
                )
        if self.serial_bits < needed:
            raise ConfigurationError(
                "server and worker ids leave "
                f"{self.serial_bits} serial bits of a {width}-bit token, "
                f"at least {needed} are needed"
            )

    def check_ids(self, server_id: object, worker_id: object = 0) -> None:
        """Refuse ids that do not fit their bits: before a worker pool
        starts, where each worker's allocator would refuse them."""
        _check_id(server_id, self.server_id_bits, "server id")
        _check_id(worker_id, self.worker_id_bits, "worker id")

    @property
    def serial_bits(self) -> int:
        """Width of the serial: the token's minus the two id widths."""
        return self.token_bits - self.server_id_bits - self.worker_id_bits

    @property
    def token_length(self) -> int:
        """Bytes in a token of this layout: 8, or 4 for 32-bit tokens."""
        return self.token_bits // 8


# mode E's tokens (draft-baerts-tcpm-mptcpext): 32 bits, with no room for
# a server or worker id
E_TOKEN_LAYOUT = TokenLayout(0, 0, token_bits=32)


@dataclass(frozen=True, slots=True)
class TokenFields:
    """What anyone can read from a token without the secret."""

    server_id: int
    worker_id: int


def token_fields(
    token: bytes, layout: TokenLayout = TokenLayout()
) -> TokenFields:
    """The server and worker ids in ``token``, as a load balancer reads.

    The token's length must be the layout's: 4-byte tokens are read with
    a 32-bit layout, 8-byte ones with a 64-bit layout.
    """
    _check_layout(layout)
    if not isinstance(token, bytes | bytearray | memoryview):
        raise ConfigurationError(
            f"a token is bytes, got {type(token).__name__}"
        )
    # as release() takes it: a view of a read buffer, say
    token = bytes(token)
    if len(token) != layout.token_length:
        raise ConfigurationError(_length_mismatch(len(token), layout))
    value = int.from_bytes(token, "big")
    ids = value >> layout.serial_bits
    worker_mask = (1 << layout.worker_id_bits) - 1
    return TokenFields(
        server_id=ids >> layout.worker_id_bits,
        worker_id=ids & worker_mask,
    )


def _length_mismatch(length: int, layout: TokenLayout) -> str:
    """Why a ``length``-byte token does not fit ``layout``, and the fix."""
    message = (
        f"a {layout.token_bits}-bit token layout reads "
        f"{layout.token_length}-byte tokens, got {length} bytes"
    )
    if length * 8 in _MIN_SERIAL_BITS:
        return f"{message}; read those with token_bits={length * 8}"
    return message


class SerialPermutation:
    """A keyed permutation of the integers ``0 .. 2**bits - 1``.

    An alternating Feistel network. The value is split into a high part
    of ``bits // 2`` bits and a low part of the rest. Each round XORs one
    part with an AES-derived function of the other and swaps them, so the
    two part widths trade places from round to round. Round keys come
    from ``key`` and ``tweak`` through HMAC-SHA256.

    A permutation holds AES contexts that serve one call at a time: use
    it from one thread, or put a lock around it.
    """

    __slots__ = ("_bits", "_chains", "_high_bits", "_low_bits", "_rounds")

    def __init__(self, key: bytes, bits: int, *, tweak: bytes = b"") -> None:
        if not isinstance(bits, int) or not 2 <= bits <= TOKEN_BITS:
            raise ConfigurationError(f"serial width must be 2 to {TOKEN_BITS}")
        if not isinstance(key, bytes | bytearray):
            raise ConfigurationError("permutation key must be bytes")
        if len(key) < MIN_SECRET_LENGTH:
            raise ConfigurationError(
                f"permutation key must be at least {MIN_SECRET_LENGTH} bytes"
            )
        if not isinstance(tweak, bytes | bytearray):
            raise ConfigurationError(
                f"permutation tweak must be bytes, got {type(tweak).__name__}"
            )
        self._bits = bits
        self._high_bits = bits // 2
        self._low_bits = bits - bits // 2
        round_keys = [
            _round_key(key, tweak, number) for number in range(FEISTEL_ROUNDS)
        ]
        self._rounds: tuple[CipherContext, ...] = tuple(
            Cipher(algorithms.AES(round_key), modes.ECB()).encryptor()
            for round_key in round_keys
        )
        # the same round functions over a whole batch (_forward_piece)
        self._chains: tuple[CipherContext, ...] = tuple(
            Cipher(algorithms.AES(round_key), CFB(bytes(_BLOCK))).decryptor()
            for round_key in round_keys
        )

    @property
    def bits(self) -> int:
        return self._bits

    def _round_value(self, number: int, value: int, width: int) -> int:
        block = self._rounds[number].update(value.to_bytes(_BLOCK, "big"))
        return int.from_bytes(block, "big") & ((1 << width) - 1)

    def _changing_width(self, number: int) -> int:
        """Width of the part that round ``number`` changes."""
        return self._high_bits if number % 2 == 0 else self._low_bits

    def forward(self, value: int) -> int:
        """The image of ``value``."""
        self._check(value)
        changing = value >> self._low_bits
        other = value & ((1 << self._low_bits) - 1)
        for number in range(FEISTEL_ROUNDS):
            width = self._changing_width(number)
            changed = changing ^ self._round_value(number, other, width)
            changing, other = other, changed
        # An even number of rounds puts the widths back where they began.
        return changing << self._low_bits | other

    def inverse(self, value: int) -> int:
        """The value whose image is ``value``."""
        self._check(value)
        changing = value >> self._low_bits
        other = value & ((1 << self._low_bits) - 1)
        for number in reversed(range(FEISTEL_ROUNDS)):
            width = self._changing_width(number)
            previous = other ^ self._round_value(number, changing, width)
            changing, other = previous, changing
        return changing << self._low_bits | other

    def forward_many(self, start: int, count: int) -> list[int]:
        """``[forward(start), ..., forward(start + count - 1)]``, in bulk.

        Each round is one AES call over the whole batch and a strided
        byte copy per byte of the changed part, all in C (see
        ``_forward_piece``). ``count`` is at most ``MAX_BATCH``, and the
        run must stay inside the ``bits``-bit domain.
        """
        if not self._check_batch(start, count):
            return []
        values: list[int] = []
        for size, images in self._forward_run(start, count):
            values += _lanes(size).ints.unpack(images)
        return values

    def forward_bytes(
        self, start: int, count: int, *, prefix: int = 0, length: int = 8
    ) -> tuple[bytes, ...]:
        """``forward_many`` as big-endian values, ``prefix`` OR-ed in.

        Each value is ``length`` bytes: 8, or 4 for a width of at most
        32 bits. ``prefix`` must fit in them and leave the low ``bits``
        bits clear: the token allocator puts its server and worker ids
        there.
        """
        if (
            isinstance(length, bool)
            or not isinstance(length, int)
            or length not in (_WORD, 2 * _WORD)
        ):
            raise ConfigurationError("length must be 4 or 8 bytes")
        if self._bits > 8 * length:
            raise ConfigurationError(
                f"a {self._bits}-bit value does not fit in {length} bytes"
            )
        if not isinstance(prefix, int) or not 0 <= prefix < 1 << 8 * length:
            raise ConfigurationError(
                f"prefix must be an unsigned {8 * length}-bit int"
            )
        if prefix & ((1 << self._bits) - 1):
            raise ConfigurationError("prefix overlaps the serial bits")
        if not self._check_batch(start, count):
            return ()
        blobs: list[bytes] = []
        for size, images in self._forward_run(start, count, prefix, length):
            blobs += _blobs(size, length).unpack(images)
        return tuple(blobs)

    def _check_batch(self, start: int, count: int) -> bool:
        """Whether there is a batch to make; raises if it is not valid."""
        # a bool is an int, but count=True named a struct format "TrueQ"
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigurationError("count must be an int >= 0")
        if count > MAX_BATCH:
            # checked before anything is made: a huge count asked for
            # gigabytes before it failed with a MemoryError
            raise ConfigurationError(
                f"count must be at most {MAX_BATCH} per call, got "
                f"{shown_value(count)}; ask for a run in several calls"
            )
        end = 1 << self._bits
        # an empty run may start where the domain ends, as range(end, end)
        # does; any other start is checked, whatever the count
        if not (count == 0 and isinstance(start, int) and start == end):
            self._check(start)
        left = end - start
        if count > left:
            raise ConfigurationError(
                f"a run of {count} from start leaves the {self._bits}-bit "
                f"domain: at most {left} values follow it"
            )
        return count > 0

    def _forward_run(
        self, start: int, count: int, prefix: int = 0, length: int = 8
    ) -> list[tuple[int, bytes]]:
        """The images of ``start ..``, as ``length``-byte big-endian values,
        in pieces: how many values each holds, and their bytes.

        A piece of the run keeps one high part, so its low parts are
        consecutive and its lanes can be made with two multiplications.
        Pieces are unpacked one by one, with the formats cached for
        their sizes (see _MAX_PIECE).
        """
        pieces = []
        low_size = 1 << self._low_bits
        end = start + count
        while start < end:
            high, low = divmod(start, low_size)
            size = min(end - start, low_size - low, _MAX_PIECE)
            piece = self._forward_piece(high, low, size, prefix, length)
            pieces.append((size, piece))
            start += size
        return pieces

    def _forward_piece(
        self, high: int, low: int, count: int, prefix: int, length: int
    ) -> bytes:
        # The batch lives in one buffer of 16-byte slots, each holding a
        # part of one value in its last bytes, zeros before them (the
        # block forward() gives AES). A round reads the slots in pairs,
        # [other, changing] per value, and AES in CFB decryption turns
        # each pair into changing ^ AES(other) in one C call: CFB
        # decryption is C[i] ^ E(C[i - 1]). The value's next pair is
        # [changed, other], so the next round's pairs start one slot
        # lower: the changed part goes into the slot just before its
        # pair, which held the previous value's changing part, used by
        # now. Each slot holds parts of one width, so the bytes before
        # them stay zero, and a round moves only the changed part's
        # bytes.
        sizes = (_byte_size(self._high_bits), _byte_size(self._low_bits))
        tops = (_top_mask(self._high_bits), _top_mask(self._low_bits))
        span = 2 * _BLOCK * count
        rounds = len(self._chains)
        slots = bytearray(span + _BLOCK * rounds)
        out = bytearray(span + _BLOCK)
        # round 0's pairs: other is the low part, changing the high one
        base = _BLOCK * rounds
        lanes = _lanes(count)
        ramp = (lanes.ones * low + lanes.ramp).to_bytes(_WORD * count)
        first = base + _BLOCK - sizes[1]
        for plane in range(sizes[1]):
            slots[first + plane : first + span : 2 * _BLOCK] = ramp[
                _WORD - sizes[1] + plane :: _WORD
            ]
        first = base + 2 * _BLOCK - sizes[0]
        for plane, byte in enumerate(high.to_bytes(sizes[0])):
            if byte:
                slots[first + plane : first + span : 2 * _BLOCK] = (
                    bytes((byte,)) * count
                )
        view = memoryview(slots)
        for number, chain in enumerate(self._chains):
            base = _BLOCK * (rounds - number)
            chain.update_into(view[base : base + span], out)
            writes = sizes[number % 2]
            # the changed part ends the pair's second slot in ``out``,
            # and goes to the slot before the pair
            source = 2 * _BLOCK - writes
            target = base - writes
            for plane in range(writes):
                changed = out[source + plane : span : 2 * _BLOCK]
                if plane == 0 and tops[number % 2]:
                    changed = changed.translate(tops[number % 2])
                slots[target + plane : target + span : 2 * _BLOCK] = changed
        # after an even number of rounds: [low, high] from slot 0 on
        high_planes = b"".join(
            slots[2 * _BLOCK - sizes[0] + plane : span : 2 * _BLOCK]
            for plane in range(sizes[0])
        )
        low_planes = b"".join(
            slots[_BLOCK - sizes[1] + plane : span : 2 * _BLOCK]
            for plane in range(sizes[1])
        )
        return self._join_planes(
            lanes,
            high_planes,
            low_planes,
            sizes,
            count,
            prefix,
            length,
        )

    def _join_planes(
        self,
        lanes: _Lanes,
        high: bytes,
        low: bytes,
        sizes: tuple[int, int],
        count: int,
        prefix: int,
        length: int,
    ) -> bytes:
        """The parts' planes as ``length``-byte values, ``prefix`` OR-ed in."""
        high_size, low_size = sizes
        if self._low_bits % 8 == 0 and self._high_bits % 8 == 0:
            # both parts fill whole bytes: each plane is one byte of the
            # value, and the prefix's bytes are constant planes above them
            values = bytearray(length * count)
            serial = length - high_size - low_size
            for index, byte in enumerate(
                (prefix >> self._bits).to_bytes(serial)
            ):
                if byte:
                    values[index::length] = bytes((byte,)) * count
            for offset, planes, size in (
                (serial, high, high_size),
                (serial + high_size, low, low_size),
            ):
                view = memoryview(planes)
                for plane in range(size):
                    values[offset + plane :: length] = view[
                        plane * count : (plane + 1) * count
                    ]
            return bytes(values)
        words = []
        for planes, size in ((high, high_size), (low, low_size)):
            view = memoryview(planes)
            lanes_bytes = bytearray(_WORD * count)
            for plane in range(size):
                lanes_bytes[_WORD - size + plane :: _WORD] = view[
                    plane * count : (plane + 1) * count
                ]
            words.append(int.from_bytes(lanes_bytes))
        return self._join_words(
            lanes, words[0], words[1], count, prefix, length
        )

    def _join_words(
        self,
        lanes: _Lanes,
        high: int,
        low: int,
        count: int,
        prefix: int,
        length: int,
    ) -> bytes:
        """``prefix | high << low_bits | low`` lane by lane, ``length`` bytes.

        ``forward_bytes`` has checked that the value fits the length.
        """
        ones = lanes.ones
        shift = self._low_bits
        # the bits of the high part that fall in the token's low word
        kept = ones * ((1 << (_WORD_BITS - shift)) - 1)
        low_words = (high & kept) << shift | low
        # a prefix reaches the low word only above a serial of < 32 bits
        low_prefix = prefix & ((1 << _WORD_BITS) - 1)
        if low_prefix:
            low_words |= ones * low_prefix
        size = _WORD * count
        if length == _WORD:
            return low_words.to_bytes(size)
        top = ones * ((1 << max(self._bits - _WORD_BITS, 0)) - 1)
        high_words = (high >> (_WORD_BITS - shift)) & top
        high_words |= ones * (prefix >> _WORD_BITS)
        tokens = bytearray(2 * _WORD * count)
        words = memoryview(tokens).cast("I")
        words[0::2] = memoryview(high_words.to_bytes(size)).cast("I")
        words[1::2] = memoryview(low_words.to_bytes(size)).cast("I")
        return bytes(tokens)

    def _check(self, value: int) -> None:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or not 0 <= value < 1 << self._bits
        ):
            raise ConfigurationError(
                f"value outside the {self._bits}-bit domain"
            )

    def __repr__(self) -> str:
        return f"<SerialPermutation bits={self._bits}>"


def _round_key(key: bytes, tweak: bytes, number: int) -> bytes:
    """The AES-256 key of round ``number``.

    AES is used as a function on 16-byte blocks, not for secrecy: it
    maps each round input block to a pseudorandom block. ECB mode, with
    equal inputs giving equal outputs, is exactly what a round function
    needs, and CFB decryption is the same function XOR-ed into the
    next block, which is a Feistel round.
    """
    message = _ROUND_KEY_LABEL + bytes((number,)) + bytes(tweak)
    return hmac.digest(bytes(key), message, hashlib.sha256)


class TokenAllocator:
    """Hands out tokens that never repeat, for one server worker.

    Tokens have the layout's width: 8 bytes, or 4 with ``token_bits=32``.
    ``secret`` (at least 16 bytes, from the caller's random source) keys
    the serial permutation. Every worker's permutation is tweaked by the
    layout and its own ids, so workers that share a secret still get
    unrelated serials, and so do 32-bit and 64-bit allocators.
    ``start`` is the first counter value. A worker that restarts with
    the same secret passes on the counter it had reached.

    An allocator belongs to one thread: event loops in several threads
    that share one put a lock around ``allocate`` and ``release``.
    """

    __slots__ = (
        "_batch",
        "_counter",
        "_layout",
        "_live",
        "_permutation",
        "_prefix",
        "_server_id",
        "_token_length",
        "_worker_id",
    )

    def __init__(
        self,
        secret: bytes,
        *,
        layout: TokenLayout = TokenLayout(),
        server_id: int = 0,
        worker_id: int = 0,
        start: int = 0,
    ) -> None:
        _check_layout(layout)
        layout.check_ids(server_id, worker_id)
        serial_bits = layout.serial_bits
        if (
            isinstance(start, bool)
            or not isinstance(start, int)
            or not 0 <= start <= 1 << serial_bits
        ):
            raise ConfigurationError(
                f"start must be 0 to 2**{serial_bits} for this layout"
            )
        if not isinstance(secret, bytes | bytearray):
            raise ConfigurationError("token secret must be bytes")
        if len(secret) < MIN_SECRET_LENGTH:
            raise ConfigurationError(
                f"token secret must be at least {MIN_SECRET_LENGTH} bytes"
            )
        self._permutation = SerialPermutation(
            bytes(secret),
            serial_bits,
            tweak=_allocator_tweak(layout, server_id, worker_id),
        )
        self._layout = layout
        self._token_length = layout.token_length
        self._server_id = server_id
        self._worker_id = worker_id
        self._prefix = (
            server_id << layout.worker_id_bits | worker_id
        ) << serial_bits
        self._counter = start
        # tokens made ahead for the next counters, the next one last
        self._batch: list[bytes] = []
        self._live: set[bytes] = set()

    @property
    def layout(self) -> TokenLayout:
        return self._layout

    @property
    def server_id(self) -> int:
        return self._server_id

    @property
    def worker_id(self) -> int:
        return self._worker_id

    @property
    def permutation(self) -> SerialPermutation:
        """The keyed serial permutation (its key stays hidden)."""
        return self._permutation

    @property
    def live(self) -> int:
        """Tokens allocated and not yet released."""
        return len(self._live)

    @property
    def next_counter(self) -> int:
        """The counter the next token will use (for a later ``start``)."""
        return self._counter

    def allocate(self) -> bytes:
        """A fresh token that this allocator has never returned.

        It has :attr:`TokenLayout.token_length` bytes, 8 or 4.

        Tokens are made ``ALLOCATION_BATCH`` at a time, for the counters
        that come next; the one returned is always that of
        :attr:`next_counter`, so the sequence is the same as one by one.
        """
        batch = self._batch
        if not batch:
            self._refill()
        token = batch.pop()
        self._counter += 1
        self._live.add(token)
        return token

    def _refill(self) -> None:
        counter = self._counter
        bits = self._permutation.bits
        if counter >> bits:
            raise TokenError(
                f"token space exhausted: all 2**{bits} serials of this "
                "worker are used; restart it with a new worker id or "
                "secret"
            )
        count = min(ALLOCATION_BATCH, (1 << bits) - counter)
        made = self._permutation.forward_bytes(
            counter, count, prefix=self._prefix, length=self._token_length
        )
        self._batch[:] = made[::-1]

    def release(self, token: bytes) -> None:
        """Mark ``token`` as no longer in use. It is never handed out again."""
        if not isinstance(token, bytes | bytearray | memoryview):
            # bytes() of an int makes that many zero bytes: release(10**12)
            # asked for a terabyte before it found no such token
            raise ConfigurationError(
                f"a token is bytes, got {type(token).__name__}"
            )
        try:
            self._live.remove(bytes(token))
        except KeyError:
            raise TokenError(
                "release of a token this allocator does not hold"
            ) from None

    def __repr__(self) -> str:
        return (
            f"<TokenAllocator server_id={self._server_id} "
            f"worker_id={self._worker_id} live={len(self._live)}>"
        )


def _allocator_tweak(
    layout: TokenLayout, server_id: int, worker_id: int
) -> bytes:
    """What sets one allocator's round keys apart from another's.

    The id widths and ids, and the token width: without it a 32-bit and
    a 64-bit allocator with the same ids would run the same round keys
    over serials of different widths. A 64-bit tweak is the ten bytes
    mptls used before 32-bit tokens, so 64-bit tokens stay as they were;
    a 32-bit one has an eleventh byte, so the two never coincide.
    """
    tweak = _ROUND_KEY_CONTEXT.pack(
        layout.server_id_bits, layout.worker_id_bits, server_id, worker_id
    )
    if layout.token_bits == TOKEN_BITS:
        return tweak
    return tweak + bytes((layout.token_bits,))


def _check_layout(layout: object) -> None:
    if not isinstance(layout, TokenLayout):
        raise ConfigurationError(
            f"layout must be a TokenLayout, got {type(layout).__name__}"
        )


def _check_id(value: object, bits: int, what: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not 0 <= value < 1 << bits
    ):
        raise ConfigurationError(
            f"{what} {shown_value(value)} does not fit in {bits} bits"
        )
