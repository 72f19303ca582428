"""Mode E keys, sans I/O: confirmation with NEW_KEY, and rotation.

:class:`RotationMixin` runs the external-key part of
draft-baerts-tcpm-mptcpext with the picks of protocol.md section 11
(items 12 and 14). A connection has two key slots, K = 0 and K = 1;
generation n of the TLS exporter's keys lives in slot ``n & 1``. The
MP_CAPABLE exchange leaves no key at all: the adapter installs
generation 0 when TLS completes and generation n when the core asks for
it (:class:`~mptls.mptcp.events.KeysRequested`). An installed key is
*pending*: our NEW_KEY for it goes out, again and again with a doubling
interval, and it becomes *active* once the peer's NEW_KEY with a
matching tag has come too. Then it is the current key; the other slot
keeps the generation before, which still verifies the joins and
ADD_ADDRs that name its K, until the next rotation replaces it. A key
the peer does not confirm within ``join_timeout`` is dropped.

A NEW_KEY that matches nothing costs at most one exporter call per
generation (or per ``join_timeout`` while rotations fail): it can make
the core ask for the next generation, and its tag is only compared,
never trusted. The keys it brought are kept aside and start this end's
own rotation to that generation, if it asks for one.

It must never perform I/O, read a clock or draw randomness itself, and
no key or tag may reach a log line, an event or an error.
"""

from __future__ import annotations

import logging
from hmac import compare_digest

from mptls.errors import ConfigurationError, KeysUnavailableError, MptlsError
from mptls.mptcp import events as ev
from mptls.mptcp.config import Mode
from mptls.mptcp.crypto import new_key_tag
from mptls.mptcp.options import NewKey
from mptls.mptcp.scheduler import Subflow
from mptls.mptcp.state import ConnectionState, KeySlot
from mptls.tls.keys import MAX_GENERATION, KeyMaterial

__all__ = ["RotationMixin"]

logger = logging.getLogger("mptls.mptcp")

# how often generation 0 is tried again after the peer did not confirm
# it, a join_timeout apart: the peer may have confirmed it while every
# one of its NEW_KEYs was lost, and then only a new NEW_KEY of ours
# brings its answer
FIRST_KEY_RETRIES = 3

# how often an active key's NEW_KEY goes out again for a peer that
# keeps sending its own: each answer may be lost with its subflow, and
# a peer left unconfirmed drops the generation this end already uses
NEW_KEY_ANSWERS = 3


class RotationMixin(ConnectionState):
    """The two key slots of mode E and the NEW_KEY exchange."""

    @property
    def key_generation(self) -> int | None:
        """Mode E: the active key generation, None before the first."""
        return self._generation

    @property
    def first_keys_pending(self) -> bool:
        """Mode E: generation 0 is installed and waits for the peer."""
        return self._generation is None and self._pending == 0

    # the next generation, asked for

    def request_rotation(self) -> int:
        """Ask for the next key generation; the generation under way.

        Emits :class:`~mptls.mptcp.events.KeysRequested` unless a
        rotation is already asked for or pending, in which case that
        one's generation comes back and nothing more happens. Raises
        :class:`~mptls.errors.ConfigurationError` outside mode E and
        :class:`~mptls.errors.KeysUnavailableError` before generation 0
        is active and once the connection is closed.
        """
        self._check_rotation_allowed()
        current = self._generation
        if current is None:
            reason = self._keys_reason() or "no key generation is active"
            if self._pending is not None:
                # right after the TLS handshake the first keys may still
                # wait for the peer's NEW_KEY, about a round trip
                reason += (
                    ": there is no generation to rotate from yet; ask "
                    "again once key_generation is set (in "
                    "get_extra_info('mptcp') on a transport)"
                )
            raise KeysUnavailableError(reason)
        if self._pending is not None:
            return self._pending
        if self._requested is not None:
            return self._claim_request(self._requested)
        if current >= MAX_GENERATION:
            raise MptlsError("every key generation of the connection is used")
        return self._ask_keys(current + 1)

    def _check_rotation_allowed(self) -> None:
        mode = self.mode
        if mode is None and self.config.mode is Mode.E:
            raise KeysUnavailableError("the MPTCP handshake is not complete")
        if mode is not Mode.E:
            runs = "no mode yet" if mode is None else f"mode {mode.value}"
            raise ConfigurationError(
                f"only mode E rotates keys; this connection runs {runs}"
            )
        if self._closed:
            raise KeysUnavailableError(
                "the connection is closed: no keys to rotate"
            )

    def _claim_request(self, generation: int) -> int:
        """This end wants ``generation`` too: its keys start a rotation.

        Asked for by a peer's NEW_KEY alone, they would be put aside if
        that tag did not match them, and this end's rotation with them.
        """
        self._requested_by_peer = False
        return generation

    def _next_generation(self) -> int:
        return 0 if self._generation is None else self._generation + 1

    def _ask_keys(self, generation: int, *, by_peer: bool = False) -> int:
        """Ask the adapter for ``generation``; it has join_timeout.

        ``by_peer``: only a peer's NEW_KEY asked for it, so the keys are
        taken only if that NEW_KEY's tag matches them. This end asking
        for the generation whose keys a forged NEW_KEY brought takes
        those, kept aside: no second exporter call.
        """
        spare = self._spare_keys
        if (
            not by_peer
            and spare is not None
            and spare.generation == generation
        ):
            logger.debug(
                "[%s] key generation %d taken from the keys kept aside",
                self._tag(),
                generation,
            )
            self._install_rotation_keys(spare)
            return generation
        self._requested = generation
        self._requested_by_peer = by_peer
        self._requested_until = self._now + self.config.join_timeout
        logger.debug(
            "[%s] asking for key generation %d", self._tag(), generation
        )
        self._events.append(ev.KeysRequested(generation))
        return generation

    # keys in

    def _install_rotation_keys(self, keys: KeyMaterial) -> bool:
        """Take generation n keys if n is the next one and none pends."""
        generation = keys.generation
        if (
            self._closed
            or self._pending is not None
            or generation != self._next_generation()
        ):
            return False
        key_id = generation & 1
        tag, self._peer_tags[key_id] = self._peer_tags[key_id], None
        matched = tag is not None and self._peer_tag_matches(keys, tag)
        deadline = self._now + self.config.join_timeout
        if self._requested == generation:
            # the clock started when the core asked for them
            deadline = self._requested_until
            if self._requested_by_peer and not matched:
                # the NEW_KEY that asked for them was not the peer's: a
                # forgery starts no rotation and replaces no slot. The
                # keys wait for the peer's own NEW_KEY, if one comes
                self._requested = None
                self._spare_keys = keys
                logger.debug(
                    "[%s] the NEW_KEY that asked for key generation %d "
                    "does not match it: not taken",
                    self._tag(),
                    generation,
                )
                return False
        slot = KeySlot(keys, deadline=deadline, rto=self.config.join_rto)
        previous = self._slots[key_id]
        if previous is not None and previous.active:
            slot.replaced = previous.keys
        # this replaces generation n - 2: joins naming its K now wait
        self._slots[key_id] = slot
        self._requested = None
        self._spare_keys = None
        if matched:
            # the peer sent its NEW_KEY first: it asked for this one
            slot.confirmed = True
        logger.info(
            "[%s] key generation %d installed (fingerprint %s)",
            self._tag(),
            generation,
            keys.fingerprint(),
        )
        self._send_new_key(key_id)
        return True

    # NEW_KEY out

    def _our_tag(self, keys: KeyMaterial) -> bytes:
        local, remote = self._local_token or b"", self._remote_token or b""
        return new_key_tag(local, remote, keys)

    def _peer_tag_matches(self, keys: KeyMaterial, tag: bytes) -> bool:
        # protocol.md section 11 item 12: the sender's token first
        local, remote = self._local_token or b"", self._remote_token or b""
        return compare_digest(new_key_tag(remote, local, keys), tag)

    def _key_subflow(self, avoid: int | None) -> Subflow | None:
        """A subflow for a NEW_KEY: another than ``avoid`` if one works."""
        usable = [s for s in self._subflows.values() if s.carries_data]
        preferred = [
            s for s in usable if s.subflow_id != avoid and not s.suspect
        ]
        choice = preferred or usable
        return choice[0] if choice else None

    def _send_new_key(self, key_id: int, *, again: bool = False) -> None:
        """Queue our NEW_KEY for slot ``key_id`` on a working subflow.

        A pending key is timed for its retransmission and becomes active
        here if the peer's NEW_KEY already confirmed it. With no subflow
        to carry it, it waits for the next one (``send_due``).
        """
        slot = self._slots[key_id]
        if slot is None:
            return
        target = self._key_subflow(slot.sent_on if again else None)
        if target is None:
            slot.send_due = True
            slot.retransmit_at = None
            return
        option = NewKey(key_id=key_id, tag=self._our_tag(slot.keys))
        target.outbox.append(self._option_segment(target, option))
        slot.send_due = False
        slot.sent_on = target.subflow_id
        if slot.active:
            return
        slot.retransmit_at = self._now + slot.rto
        if slot.confirmed:
            self._activate(key_id)

    def _emit_due_new_keys(self) -> None:
        """NEW_KEYs that waited for a subflow able to carry them."""
        for key_id, slot in enumerate(self._slots):
            if slot is not None and slot.send_due and not self._closed:
                self._send_new_key(key_id)

    # NEW_KEY in

    def _on_new_key(self, subflow: Subflow, option: NewKey) -> None:
        if self.mode is not Mode.E:
            logger.debug("[%s] NEW_KEY outside mode E ignored", self._tag())
            return
        key_id = option.key_id & 1
        slot = self._slots[key_id]
        if slot is not None and self._peer_tag_matches(slot.keys, option.tag):
            self._on_matching_new_key(key_id, slot)
        elif slot is not None and not slot.active:
            # draft-baerts: a NEW_KEY that matches no stored key is
            # discarded (a forgery, or a stale rotation)
            logger.debug(
                "[%s] NEW_KEY does not match the pending keys", self._tag()
            )
        else:
            self._on_unknown_new_key(key_id, option.tag)

    def _on_matching_new_key(self, key_id: int, slot: KeySlot) -> None:
        if slot.active:
            # the peer goes on sending: it did not hear ours (its subflow
            # may have died with it). Answered a few times, a join_rto
            # apart, on another subflow where there is one: an active
            # peer that heard ours answers each answer in turn
            last = slot.answered_at
            since = None if last is None else self._now - last
            if since is not None and since >= self.config.join_timeout:
                # quiet for as long as a peer waits for a confirmation:
                # no echo, but a peer that dropped this generation and
                # tries it again; unanswered, it never could
                slot.answers = 0
            spaced = since is None or since >= self.config.join_rto
            if slot.answers < NEW_KEY_ANSWERS and spaced:
                slot.answers += 1
                slot.answered_at = self._now
                self._send_new_key(key_id, again=True)
            return
        slot.confirmed = True
        if slot.sent:
            self._activate(key_id)
        else:
            self._send_new_key(key_id)

    def _on_unknown_new_key(self, key_id: int, tag: bytes) -> None:
        """A NEW_KEY for keys we do not have: maybe the peer's rotation.

        Only the slot of the next generation can hold what the peer
        starts; its tag is kept (the latest one) and checked when those
        keys come. They are asked for unless they are already asked for
        or pending, and not before generation 0 was installed (TLS
        brings that one). Keys asked for this way are taken only if the
        tag matches them; otherwise they are kept aside, and a later
        NEW_KEY is checked against them with no new request. So a
        forger's NEW_KEYs cost one exporter call per generation and
        start nothing, while the peer's own still starts its rotation.
        """
        generation = self._next_generation()
        if key_id != generation & 1 or generation > MAX_GENERATION:
            logger.debug("[%s] NEW_KEY matches no key", self._tag())
            return
        spare = self._spare_keys
        if spare is not None and spare.generation == generation:
            if self._peer_tag_matches(spare, tag):
                self._peer_tags[key_id] = tag
                self._install_rotation_keys(spare)
            return
        self._peer_tags[key_id] = tag
        first_not_yet = (
            self._generation is None and not self._first_keys_failed
        )
        if first_not_yet or self._requested is not None:
            return
        self._ask_keys(generation, by_peer=True)

    # activation and failure

    def _activate(self, key_id: int) -> None:
        slot = self._slots[key_id]
        if slot is None:
            return
        slot.active = True
        slot.retransmit_at = None
        slot.send_due = False
        # the peer confirmed these keys after it had the generation
        # before them: it tags no fast close with the one they replaced
        slot.replaced = None
        self._generation = slot.generation
        self._first_keys_failed = False
        self._rotation_waits_since = None
        self._schedule_rotation()
        fingerprint = slot.keys.fingerprint()
        logger.info(
            "[%s] key generation %d active (fingerprint %s)",
            self._tag(),
            slot.generation,
            fingerprint,
        )
        self._events.append(ev.KeysActivated(slot.generation, fingerprint))
        # joins that named this K waited for it
        self._answer_held_joins()

    def _schedule_rotation(self) -> None:
        interval = self.config.key_rotation_interval
        active = self._generation is not None
        self._rotate_at = (
            self._now + interval if interval is not None and active else None
        )

    def _rotation_failed(self, generation: int, reason: str) -> None:
        if generation == 0:
            self._first_keys_failed = True
            if self._first_retries < FIRST_KEY_RETRIES:
                self._first_retries += 1
                self._first_retry_at = self._now + self.config.join_timeout
        self._peer_tags[generation & 1] = None
        logger.info(
            "[%s] key generation %d dropped: %s",
            self._tag(),
            generation,
            reason,
        )
        self._events.append(ev.KeyRotationFailed(generation, reason))
        self._schedule_rotation()

    # timers

    def _rotation_deadlines(self) -> list[float]:
        """When :meth:`_handle_rotation_timers` has work next."""
        times: list[float] = []
        for slot in self._slots:
            if slot is not None and not slot.active:
                times.append(slot.deadline)
                if slot.retransmit_at is not None:
                    times.append(slot.retransmit_at)
        if self._requested is not None:
            times.append(self._requested_until)
        if self._rotate_at is not None:
            times.append(self._rotate_at)
        if self._first_retry_at is not None:
            times.append(self._first_retry_at)
        return times

    def _handle_rotation_timers(self, now: float) -> None:
        """Retransmit NEW_KEY, drop late keys, start periodic rotations."""
        for key_id, slot in enumerate(self._slots):
            if slot is None or slot.active:
                continue
            if now >= slot.deadline:
                self._drop_pending(key_id, slot)
            elif slot.retransmit_at is not None and now >= slot.retransmit_at:
                slot.rto *= 2
                self._send_new_key(key_id, again=True)
        requested = self._requested
        if requested is not None and now >= self._requested_until:
            self._requested = None
            self._rotation_failed(
                requested,
                f"the keys of generation {requested} were not installed "
                f"within {self.config.join_timeout} s",
            )
        if self._rotate_at is not None and now >= self._rotate_at:
            self._rotate_at = None
            self._periodic_rotation()
        retry_at = self._first_retry_at
        if retry_at is not None and now >= retry_at:
            self._first_retry_at = None
            self._retry_first_keys()

    def _retry_first_keys(self) -> None:
        """Generation 0 failed a while ago: ask for it once more, unless
        a peer's NEW_KEY has brought it (or asked for it) since."""
        if (
            self._generation is None
            and self._first_keys_failed
            and self._pending is None
            and self._requested is None
        ):
            self._ask_keys(0)

    def _drop_pending(self, key_id: int, slot: KeySlot) -> None:
        self._slots[key_id] = None
        generation = slot.generation
        # joins held for these keys would wait for nothing now
        self._refuse_held_joins(
            key_id,
            "keys rotated while the join waited: key generation "
            f"{generation}, which its K names, was dropped unconfirmed",
        )
        self._rotation_failed(
            generation,
            f"the peer did not confirm key generation {generation} "
            f"(NEW_KEY) within {self.config.join_timeout} s",
        )

    def _periodic_rotation(self) -> None:
        """key_rotation_interval passed: the next generation, unless one
        is under way already (its end schedules the next).

        None once this end has closed its side (DATA_FIN): the keys it
        has serve the close, and a peer that keeps its own side open
        would otherwise see this end rotate until the close times out.
        A rotation the peer starts is still followed.
        """
        if self._send.fin_wanted:
            return
        current = self._generation
        if self._requested is not None:
            self._claim_request(self._requested)
            return
        if (
            self._pending is not None
            or current is None
            or current >= MAX_GENERATION
        ):
            return
        if self._join_under_way() and self._may_wait_for_joins():
            # a join keeps the keys its K names until it is up, at most
            # join_timeout; rotations at a shorter interval than its
            # handshake would take them away each time. Look again an
            # interval later.
            self._schedule_rotation()
            return
        self._rotation_waits_since = None
        self._ask_keys(current + 1)

    def _may_wait_for_joins(self) -> bool:
        """Whether a periodic rotation due now may wait for joins.

        One join is over within join_timeout, so the wait ends then at
        the latest. Joins that follow one another (forged SYNs with a
        token read off the first subflow need no keys) would otherwise
        hold every periodic rotation off for good.
        """
        since = self._rotation_waits_since
        if since is None:
            self._rotation_waits_since = self._now
            return True
        return self._now - since < self.config.join_timeout

    def _join_under_way(self) -> bool:
        """Whether a join of this connection holds keys it has not
        finished with (its handshake is not over)."""
        return any(
            subflow.live and subflow.keys is not None
            for subflow in self._subflows.values()
        )
