"""Scenario 5: token allocation, mptls's against RFC 8684's.

RFC 8684 (section 3.1) makes a token from a random key: the top 32 bits
of SHA-256(key). A host must check it against every live token and draw
again on a clash, so it keeps a table of them. mptls's tokens are chosen
by their owner, unique by construction (:mod:`mptls.mptcp.tokens`): no
table, no retry. Both are timed in CPU seconds per token with 1k, 100k
and 1M live connections, each side holding that many tokens. Beside
them, the floor: a bare counter recorded in the same kind of table,
which is what any allocator that keeps its live tokens pays at least.
Then a token that carries an 8-bit server id:
RFC 8684 can only draw keys until the hash's top byte is that id (about
256 draws); mptls writes the id into the token.

Pure CPU work: nothing here touches a socket.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Callable

from mptls.bench.common import BenchOptions
from mptls.bench.harness import (
    ScenarioResult,
    Variant,
    at_least,
    at_most,
    interleave,
)
from mptls.bench.stacks import Pki
from mptls.mptcp.tokens import TokenAllocator, token_fields

NAME = "tokens"
TITLE = "Token allocation"
KEY_LENGTH = 8
SERVER_ID = 0xA5
BATCH = 1024


class Rfc8684Table:
    """RFC 8684's way: random keys, hashed, checked against live tokens."""

    def __init__(self, live: int) -> None:
        pool = os.urandom(4 * live)
        self.live = {pool[i : i + 4] for i in range(0, len(pool), 4)}
        self.draws = 0

    def allocate(self, server_id: int | None = None) -> bytes:
        """Draw keys until the token is free (and, given ``server_id``,
        its top byte is that id)."""
        while True:
            key = secrets.token_bytes(KEY_LENGTH)
            self.draws += 1
            token = hashlib.sha256(key).digest()[:4]
            if server_id is not None and token[0] != server_id:
                continue
            if token not in self.live:
                self.live.add(token)
                return token

    def release(self, token: bytes) -> None:
        self.live.discard(token)


def _cpu_per_token(allocate: Callable[[], object], count: int) -> float:
    """CPU microseconds per token."""
    started = time.process_time()
    for _ in range(count):
        allocate()
    return (time.process_time() - started) / count * 1e6


def _rfc(table: Rfc8684Table, count: int, server_id: int | None) -> float:
    made: list[bytes] = []
    cost = _cpu_per_token(
        lambda: made.append(table.allocate(server_id)), count
    )
    # keep the live count where it was for the next round
    for token in made:
        table.release(token)
    return cost


def _mptls(allocator: TokenAllocator, count: int) -> float:
    """``allocate()`` one at a time, then the same tokens released."""
    made: list[bytes] = []
    cost = _cpu_per_token(lambda: made.append(allocator.allocate()), count)
    for token in made:
        allocator.release(token)
    return cost


class CounterTable:
    """The floor: the next counter value, recorded as a live token."""

    def __init__(self, live: int) -> None:
        self.next = 1 << 40
        self.live = {self._make() for _ in range(live)}

    def _make(self) -> bytes:
        self.next += 1
        return self.next.to_bytes(KEY_LENGTH, "big")

    def allocate(self) -> bytes:
        token = self._make()
        self.live.add(token)
        return token

    def release(self, token: bytes) -> None:
        self.live.discard(token)


def _floor(table: CounterTable, count: int) -> float:
    made: list[bytes] = []
    cost = _cpu_per_token(lambda: made.append(table.allocate()), count)
    for token in made:
        table.release(token)
    return cost


def _mptls_batch(allocator: TokenAllocator, count: int) -> float:
    """Serials made in batches (``forward_many``), as a busy server would."""
    permutation = allocator.permutation
    started = time.process_time()
    start = 0
    while start < count:
        permutation.forward_many(start, min(BATCH, count - start))
        start += BATCH
    return (time.process_time() - started) / count * 1e6


def _variants(live: int, count: int) -> list[Variant]:
    table = Rfc8684Table(live)
    floor = CounterTable(live)
    allocator = TokenAllocator(secrets.token_bytes(32))
    # the allocator holds as many live tokens as the RFC 8684 table
    for _ in range(live):
        allocator.allocate()
    return [
        Variant(
            f"rfc8684@{live}",
            lambda: _rfc(table, count, server_id=None),
            f"RFC 8684 key, hash, check against {live} live, retry",
        ),
        Variant(
            f"mptls@{live}",
            lambda: _mptls(allocator, count),
            "mptls TokenAllocator.allocate(), one token at a time",
        ),
        Variant(
            f"mptls-batch@{live}",
            lambda: _mptls_batch(allocator, count),
            f"mptls serials in batches of {BATCH} (forward_many)",
        ),
        Variant(
            f"floor@{live}",
            lambda: _floor(floor, count),
            f"a bare counter recorded among {live} live tokens",
        ),
    ]


def _server_id_variants(
    count: int,
) -> tuple[list[Variant], Rfc8684Table, TokenAllocator]:
    table = Rfc8684Table(1000)
    allocator = TokenAllocator(secrets.token_bytes(32), server_id=SERVER_ID)
    return (
        [
            Variant(
                "rfc8684+server-id",
                lambda: _rfc(table, count, server_id=SERVER_ID),
                "RFC 8684: draw keys until the hash's top byte is the id",
            ),
            Variant(
                "mptls+server-id",
                lambda: _cpu_per_token(allocator.allocate, count),
                "mptls: the id is written into the token",
            ),
        ],
        table,
        allocator,
    )


async def run(options: BenchOptions, pki: Pki) -> ScenarioResult:
    del pki
    lives = (1_000, 10_000) if options.quick else (1_000, 100_000, 1_000_000)
    count = options.size(20_000, 1_000)
    rounds = options.rounds_or(5)
    result = ScenarioResult(
        NAME, TITLE, "CPU us/token", False, rounds, options.quick
    )
    result.details["tokens_per_sample"] = count
    for live in lives:
        result.variants += await interleave(_variants(live, count), rounds)
        result.add_ratio(f"rfc8684@{live}", f"mptls@{live}")
        result.add_ratio(f"rfc8684@{live}", f"mptls-batch@{live}")
        result.add_ratio(f"rfc8684@{live}", f"floor@{live}")

    id_count = options.size(500, 50)
    variants, table, allocator = _server_id_variants(id_count)
    result.variants += await interleave(variants, rounds, warmup=False)
    result.add_ratio("rfc8684+server-id", "mptls+server-id")
    draws = table.draws / (rounds * id_count)
    ids_ok = token_fields(allocator.allocate()).server_id == SERVER_ID
    result.details["rfc8684_draws_per_server_id_token"] = draws
    _goals(result, lives[-1], draws, ids_ok, judge=not options.quick)
    return result


def _goals(
    result: ScenarioResult,
    live: int,
    draws: float,
    ids_ok: bool,
    *,
    judge: bool,
) -> None:
    for variant in (f"mptls@{live}", f"mptls-batch@{live}"):
        ratio = result.ratio(f"rfc8684@{live}", variant).spread.median
        result.goals.append(
            at_least(
                f"RFC 8684 CPU / {variant} CPU at {live} live",
                ratio,
                10.0,
                judge=judge and live == 1_000_000,
            )
        )
    floor = result.ratio(f"rfc8684@{live}", f"floor@{live}").spread.median
    result.notes.append(
        f"a bare counter recorded among {live} live tokens costs "
        f"{floor:.1f}x less CPU than RFC 8684: the most any allocator "
        "that keeps its live tokens can show"
    )
    searches = 0.0 if ids_ok else float("nan")
    goal = at_most("mptls draws to carry a server id", searches, 0.0)
    result.goals.append(goal)
    result.notes.append(
        f"RFC 8684 drew {draws:.0f} keys per token to carry an 8-bit "
        "server id; mptls writes the id into the token (no search)"
    )
