"""Joins and address announcements of one connection, sans I/O.

:class:`JoinsMixin` runs MP_JOIN on both sides (RFC 8684 section 3.2,
docs/wire.md "Joins"): the initiator opens and checks joins, the
responder answers, checks the third ACK and refuses what it must.
It also sends and checks ADD_ADDR, REMOVE_ADDR and MP_PRIO (section
3.4). Joins and ADD_ADDR are keyed by the TLS-derived keys in G mode,
by the key their K bit names in mode E (draft-baerts-tcpm-mptcpext),
and by cleartext keys only when the user allowed them.

It must never perform I/O, read a clock or draw randomness itself, and
no key, nonce or HMAC may reach a log line, an event or an error.
"""

from __future__ import annotations

import logging
from hmac import compare_digest
from ipaddress import IPv4Address, IPv6Address

from mptls.errors import (
    ConfigurationError,
    JoinRefusedError,
    KeysUnavailableError,
    MptlsError,
    shown_value,
)
from mptls.mptcp import events as ev
from mptls.mptcp.config import Mode
from mptls.mptcp.crypto import add_addr_hmac, join_hmac
from mptls.mptcp.framing import Flag, Segment
from mptls.mptcp.options import (
    AddAddr,
    MpJoinAck,
    MpJoinSyn,
    MpJoinSynAck,
    MpPrio,
    NewKey,
    RemoveAddr,
    ResetReason,
)
from mptls.mptcp.scheduler import Subflow, SubflowState
from mptls.mptcp.state import ConnectionState, options_of
from mptls.tls.keys import KeyMaterial

__all__ = ["JoinsMixin"]

logger = logging.getLogger("mptls.mptcp")

_S = SubflowState


class JoinsMixin(ConnectionState):
    """MP_JOIN both ways and the address options."""

    # joins, initiator side (RFC 8684 section 3.2, docs/wire.md "Joins")

    def open_subflow(
        self, now: float, *, backup: bool = False, address_id: int = 0
    ) -> int:
        """Start a join on a TCP connection the adapter just opened.

        ``address_id`` is the id of the local address the TCP connection
        left from (RFC 8684 section 3.2): 0 for the first subflow's, one
        id of its own for each other address. The core knows no
        addresses; the adapter, which does, picks it.
        """
        _check_address_id(address_id)
        if not self.is_initiator:
            raise MptlsError("only the initiator opens subflows")
        if self._closed:
            raise MptlsError("the connection is closed")
        keys = self._join_keys()
        if keys is None:
            raise KeysUnavailableError(self._keys_reason() or "no join keys")
        if self._live_count() >= self.config.max_subflows:
            raise MptlsError(
                f"already {self.config.max_subflows} subflows (max_subflows)"
            )
        subflow_id = self._new_subflow_id()
        nonce = int.from_bytes(self._random(4), "big")
        # mode E: the current key, named by its K
        key_id = self._current_key_id()
        option = MpJoinSyn(
            token=self._remote_token or b"",
            nonce=nonce,
            address_id=address_id,
            backup=backup,
            key_id=key_id,
        )
        # the data-level receive window, as every other frame carries it
        # (RFC 8684 section 3.3.5): a SYN saying 0 read as a closed window
        syn = Segment(
            flags=Flag.SYN, options=(option,), window=self._receive.window()
        )
        subflow = Subflow(
            subflow_id,
            _S.SYN_SENT,
            is_join=True,
            backup=backup,
            address_id=address_id,
            local_nonce=nonce,
            key_id=key_id,
            keys=self._active_keys(key_id) if self.mode is Mode.E else None,
            syn=syn,
            rto=self.config.join_rto,
            retransmit_at=now + self.config.join_rto,
            deadline=now + self.config.join_timeout,
        )
        subflow.outbox.append(syn)
        self._subflows[subflow_id] = subflow
        return subflow_id

    def _on_join_syn_ack(self, subflow: Subflow, segment: Segment) -> None:
        option = options_of(segment).get(MpJoinSynAck)
        if (
            not isinstance(option, MpJoinSynAck)
            or segment.flags & (Flag.SYN | Flag.ACK) != Flag.SYN | Flag.ACK
        ):
            self._refuse_join(subflow, "SYN|ACK without MP_JOIN")
            return
        if self.mode is Mode.E and option.key_id != subflow.key_id:
            # draft-baerts: the SYN's K governs the join; the SYN|ACK
            # echoes it (protocol.md section 11 item 13)
            self._refuse_join(subflow, "SYN|ACK names another key (K)")
            return
        keys = self._syn_ack_keys(subflow, option)
        if keys is None:
            if self._join_keys_rotated_out(subflow):
                self._refuse_join(
                    subflow,
                    "keys rotated while the join waited: the SYN|ACK may "
                    "use a generation this end no longer holds",
                    transient=True,
                )
            else:
                self._refuse_join(subflow, "bad MP_JOIN HMAC in the SYN|ACK")
            return
        subflow.remote_nonce = option.nonce
        # the id of the address the SYN reached, as the peer numbers it
        subflow.remote_address_id = option.address_id
        self._joined_address_ids.add(option.address_id)
        subflow.retransmit_at = None
        subflow.syn = None
        subflow.set_state(_S.PRE_ESTABLISHED)
        # the peer sends on the join once it has the third ACK
        self._receive.lift_reorder_limit()
        local, remote = keys
        mac = join_hmac(local, remote, subflow.local_nonce, option.nonce)
        subflow.outbox.append(
            self._segment(subflow, Flag.ACK, (MpJoinAck(hmac=mac[:20]),))
        )
        # the last HMAC this end makes for the join
        subflow.keys = None

    def _syn_ack_keys(
        self, subflow: Subflow, option: MpJoinSynAck
    ) -> tuple[bytes, bytes] | None:
        """(local key, remote key) whose HMAC-B the SYN|ACK carries.

        Outside mode E the connection's keys. In mode E the keys the
        join took, or the generation that replaced them in their slot:
        a responder that holds a join SYN while that slot's next keys
        await confirmation answers it with those, the moment they are
        active (:meth:`_answer_held_joins`), and only then. The answer
        cannot say which it used, so each is checked in full; no other
        generation can be the right one. The join goes on with the one
        that matched.
        """
        if self.mode is not Mode.E:
            pair = self._join_keys()
            if pair is not None and self._syn_ack_valid(pair, subflow, option):
                return pair
            return None
        for keys in self._syn_ack_candidates(subflow):
            pair = self._oriented(keys)
            if self._syn_ack_valid(pair, subflow, option):
                subflow.keys = keys
                return pair
        return None

    def _syn_ack_valid(
        self,
        keys: tuple[bytes, bytes],
        subflow: Subflow,
        option: MpJoinSynAck,
    ) -> bool:
        local, remote = keys
        expected = join_hmac(remote, local, option.nonce, subflow.local_nonce)
        return compare_digest(expected[:8], option.hmac)

    def _syn_ack_candidates(self, subflow: Subflow) -> list[KeyMaterial]:
        """Mode E: the join's keys, then their successor in the slot."""
        own = subflow.keys
        if own is None:
            return []
        slot = self._slots[subflow.key_id & 1]
        if slot is not None and slot.generation == own.generation + 2:
            # this end installed it, so the peer may have it active
            return [own, slot.keys]
        return [own]

    def _join_keys_rotated_out(self, subflow: Subflow) -> bool:
        """Mode E: the peer may have answered with keys this end no
        longer holds: its K's slot has moved on by more than one
        rotation since the join took its keys, or lost them."""
        own = subflow.keys
        if self.mode is not Mode.E or own is None:
            return False
        slot = self._slots[subflow.key_id & 1]
        return slot is None or slot.generation > own.generation + 2

    def _refuse_join(
        self, subflow: Subflow, reason: str, *, transient: bool = False
    ) -> None:
        """Reset a join whose SYN|ACK this end cannot take.

        ``transient``: not the path's fault nor, as far as one can tell,
        the peer's (keys rotated meanwhile): a new join may succeed, so
        the connection does not end with it.
        """
        self._events.append(
            ev.JoinRefused(
                subflow.subflow_id,
                reason,
                transient,
                ResetReason.MPTCP_ERROR,
            )
        )
        self._reset_subflow(
            subflow, ResetReason.MPTCP_ERROR, reason, transient=transient
        )
        if not transient and not self._closed and not self._live_count():
            # the peer's HMAC does not match our keys and nothing else is
            # left: no later join can succeed
            self._finish(
                JoinRefusedError(
                    "every subflow is gone and the peer's join answer "
                    f"failed: {reason}"
                )
            )

    # joins, responder side

    def accept_join(
        self, syn: Segment, now: float, *, address_id: int = 0
    ) -> int:
        """Take a join SYN routed here by the Endpoint; the subflow id.

        ``address_id`` is the id of the local address the SYN reached,
        which the SYN|ACK carries (RFC 8684 section 3.2): the adapter
        knows the address, the core only its id. Raises
        :class:`~mptls.errors.JoinRefusedError` whose ``reset_reason``
        and ``transient`` go into the MP_TCPRST of the refusal: a
        refusal of policy is final, one for want of failed-join credit
        or of room (``max_subflows``, ``max_pending_joins``) transient.
        """
        _check_address_id(address_id)
        option = options_of(syn).get(MpJoinSyn)
        if not isinstance(option, MpJoinSyn):
            raise JoinRefusedError("not an MP_JOIN SYN")
        self._now = now
        # policy first: a refusal of policy is final (no T), whatever
        # the connection's load
        if self._closed:
            raise JoinRefusedError("the connection takes no joins now")
        if self.mode is Mode.RFC8684 and not self.config.allow_cleartext_keys:
            raise JoinRefusedError(
                "joins keyed by cleartext keys are not allowed",
                reset_reason=ResetReason.ADMINISTRATIVELY_PROHIBITED,
            )
        if self._join_credit.credit(now) < 1.0:
            # forged joins with a sniffed token cost this connection
            # nothing more than one refusal each while the bucket is
            # dry. T set: the client's own join, refused in the flood,
            # is tried again later rather than never
            raise JoinRefusedError(
                "too many failed joins on this connection; try later",
                reset_reason=ResetReason.ADMINISTRATIVELY_PROHIBITED,
                transient=True,
            )
        pending = sum(
            1
            for s in self._subflows.values()
            if s.state in (_S.WAITING_KEYS, _S.SYN_RECEIVED) and s.is_join
        )
        if (
            self._live_count() >= self.config.max_subflows
            or pending >= self.config.max_pending_joins
        ):
            # T set: a subflow or pending join that ends makes room
            raise JoinRefusedError(
                "too many subflows or pending joins; try later",
                reset_reason=ResetReason.LACK_OF_RESOURCES,
                transient=True,
            )
        subflow_id = self._new_subflow_id()
        subflow = Subflow(
            subflow_id,
            _S.WAITING_KEYS,
            is_join=True,
            backup=option.backup,
            address_id=address_id,
            remote_address_id=option.address_id,
            remote_nonce=option.nonce,
            # the K bit is reserved outside mode E
            key_id=option.key_id if self.mode is Mode.E else 0,
            deadline=now + self.config.join_timeout,
        )
        self._subflows[subflow_id] = subflow
        self._answer_join(subflow, option.nonce)
        return subflow_id

    def _answer_held_joins(self) -> None:
        """Answer the join SYNs that came before the keys, now they came.

        On two paths of different delay a join SYN can overtake the
        third ACK of MP_CAPABLE and the TLS Finished that ride together
        on the first path. Its subflow waits in WAITING_KEYS with the
        SYN's nonce, and gets its SYN|ACK the moment the keys are there
        (at the end of the MPTCP handshake for cleartext keys, at their
        installation in G mode) rather than after the initiator's
        retransmission, ``join_rto`` later.
        """
        for subflow in self._subflows.values():
            held = subflow.remote_nonce
            if subflow.state is _S.WAITING_KEYS and held is not None:
                self._answer_join(subflow, held)

    def _refuse_held_joins(self, key_id: int, reason: str) -> None:
        """Mode E: the pending keys of slot ``key_id`` were dropped.

        A join SYN held for them cannot be answered any more: the
        generation the slot held before is gone, and the one it waited
        for will not come. It is reset now, with T set (RFC 8684
        section 3.6), rather than at its deadline. No
        failed join is counted: its HMAC was never checked, and a new
        join, with the keys in use now, can succeed.
        """
        for subflow in list(self._subflows.values()):
            if subflow.state is _S.WAITING_KEYS and subflow.key_id == key_id:
                self._reset_subflow(
                    subflow, ResetReason.MPTCP_ERROR, reason, transient=True
                )

    def _subflow_keys(self, subflow: Subflow) -> tuple[bytes, bytes] | None:
        """The keys a join uses: in mode E those of the generation it
        took, even if a rotation has replaced them in their slot since
        (the join's deadline bounds how long); else the connection's."""
        if self.mode is not Mode.E:
            return self._join_keys()
        keys = subflow.keys
        return None if keys is None else self._oriented(keys)

    def _take_join_keys(self, subflow: Subflow) -> tuple[bytes, bytes] | None:
        """Keys for the answer to a join SYN, or None to hold it.

        A join waiting for keys takes, in mode E, the generation active
        in the slot its K names when that slot becomes active.
        """
        if subflow.state is _S.WAITING_KEYS and self.mode is Mode.E:
            subflow.keys = self._active_keys(subflow.key_id)
        return self._subflow_keys(subflow)

    def _answer_join(self, subflow: Subflow, nonce: int) -> None:
        keys = self._take_join_keys(subflow)
        if keys is None:
            # draft-paasch-mptcp-application-authentication section 3:
            # a known token before the keys gets no answer (no RST); the
            # SYN's subflow waits, and is answered when the keys come
            # (_answer_held_joins) or when the SYN comes again. In mode
            # E the keys are those of the slot its K names
            logger.debug("[%s] join SYN before keys held", self._tag())
            return
        if subflow.state is _S.WAITING_KEYS:
            subflow.local_nonce = int.from_bytes(self._random(4), "big")
            subflow.set_state(_S.SYN_RECEIVED)
        subflow.remote_nonce = nonce
        # the peer sends data behind its third ACK, before this end has
        # checked it: if the check fails, that data is lost with the
        # join and what the first subflow carries meanwhile waits
        # behind the hole until it is sent again there
        self._receive.lift_reorder_limit()
        local, remote = keys
        mac = join_hmac(local, remote, subflow.local_nonce, nonce)
        reply = MpJoinSynAck(
            hmac=mac[:8],
            nonce=subflow.local_nonce,
            address_id=subflow.address_id,
            key_id=subflow.key_id,
        )
        subflow.outbox.append(
            self._segment(subflow, Flag.SYN | Flag.ACK, (reply,))
        )

    def _on_join_third_ack(self, subflow: Subflow, segment: Segment) -> None:
        option = options_of(segment).get(MpJoinAck)
        keys = self._subflow_keys(subflow)
        if not isinstance(option, MpJoinAck) or keys is None:
            # keys is never None here: the SYN|ACK took them
            self._refuse_peer_join(
                subflow, ResetReason.MPTCP_ERROR, "join ACK without MP_JOIN"
            )
            return
        local, remote = keys
        expected = join_hmac(
            remote, local, subflow.remote_nonce, subflow.local_nonce
        )
        if not compare_digest(expected[:20], option.hmac):
            self._refuse_peer_join(
                subflow,
                ResetReason.MPTCP_ERROR,
                "bad MP_JOIN HMAC in the third ACK",
            )
            return
        subflow.deadline = None
        subflow.keys = None
        if subflow.remote_address_id is not None:
            self._joined_address_ids.add(subflow.remote_address_id)
        subflow.set_state(_S.ESTABLISHED)
        self._path_up(self._now)
        self._events.append(ev.SubflowEstablished(subflow.subflow_id))
        # RFC 8684 section 3.2: this ACK moves the initiator's subflow
        # out of PRE_ESTABLISHED
        subflow.outbox.append(self._ack_segment(subflow))

    def _refuse_peer_join(
        self, subflow: Subflow, reason: int, why: str
    ) -> None:
        """Reset a join the peer started and this end answered."""
        self._peer_join_failed(subflow, why)
        self._reset_subflow(subflow, reason, why)

    def _peer_join_failed(self, subflow: Subflow, why: str) -> None:
        # a failed join costs the bucket one, and the adapter hears why
        # (it knows the peer's address; the core does not)
        self._join_credit.spend(self._now)
        self._events.append(ev.PeerJoinRefused(subflow.subflow_id, why))

    # addresses (RFC 8684 section 3.4)

    def announce(
        self,
        address_id: int,
        address: IPv4Address | IPv6Address,
        port: int | None,
    ) -> None:
        """Queue an ADD_ADDR; only once keys exist (protocol.md 11.10)."""
        if self._closed:
            raise MptlsError("the connection is closed")
        keys = self._join_keys()
        if keys is None:
            raise KeysUnavailableError(self._keys_reason() or "no keys")
        local, remote = keys
        mac = add_addr_hmac(local, remote, address_id, address, port)
        # mode E: keyed by the current key, named by its K
        self._announcements.append(
            AddAddr(
                address_id,
                address,
                port,
                hmac=mac,
                key_id=self._current_key_id(),
            )
        )

    def _emit_announcements(self, out: list[tuple[int, Segment]]) -> None:
        if not self._announcements:
            return
        target = next(
            (s for s in self._subflows.values() if s.carries_data), None
        )
        if target is None:
            return
        for option in self._announcements:
            out.append(
                (target.subflow_id, self._option_segment(target, option))
            )
        self._announcements.clear()

    def _on_path_options(
        self, subflow: Subflow, options: dict[type, object]
    ) -> None:
        add = options.get(AddAddr)
        if isinstance(add, AddAddr):
            self._on_add_addr(subflow, add)
        remove = options.get(RemoveAddr)
        if isinstance(remove, RemoveAddr):
            self._on_remove_addr(remove)
        prio = options.get(MpPrio)
        if isinstance(prio, MpPrio):
            subflow.backup = prio.backup
        new_key = options.get(NewKey)
        if isinstance(new_key, NewKey):
            self._on_new_key(subflow, new_key)

    def _on_remove_addr(self, option: RemoveAddr) -> None:
        """Forget the peer's addresses; reset joins under way from them.

        RFC 8684 section 3.4.2: an id nobody uses is ignored, and a path
        still in use is not torn down by the receiver: the end that
        removed the address closes it. A subflow that carries data is
        such a path (the RFC's keepalive probe has no counterpart on
        this wire; a path that stopped answering is the data-level
        timeout's to reset), and a REMOVE_ADDR has no HMAC: one that
        came, or was forged, on one path must not end another.

        Only an id this end knew is told as :class:`AddressRemoved`,
        once: one the peer announced or a checked join came from, and 0.
        Each frame could name 252 made-up ids, each an event, and the
        same id again and again, each time one more.
        """
        in_use = {
            s.remote_address_id for s in self._subflows.values() if s.live
        }
        for address_id in option.address_ids:
            announced = self._remote_addresses.pop(address_id, None)
            if announced is not None or address_id in self._joined_address_ids:
                self._joined_address_ids.discard(address_id)
                self._events.append(ev.AddressRemoved(address_id))
            if address_id not in in_use:
                continue
            for subflow in list(self._subflows.values()):
                if subflow.live and subflow.remote_address_id == address_id:
                    self._retire(subflow, address_id)

    def _retire(self, subflow: Subflow, address_id: int) -> None:
        why = f"the peer removed its address id {address_id}"
        if subflow.carries_data:
            # RFC 8684 section 3.4.2: a path still in use is not torn
            # down by the receiver; the host that removed the address
            # shuts it down. A REMOVE_ADDR that came (or was forged) on
            # one path must not end a working subflow on another
            logger.debug(
                "[%s] subflow %d kept: %s, and it still works",
                self._tag(),
                subflow.subflow_id,
                why,
            )
            return
        if subflow.is_join:
            self._reset_subflow(subflow, ResetReason.UNSPECIFIED, why)

    def _on_add_addr(self, subflow: Subflow, option: AddAddr) -> None:
        if option.echo:
            return
        # mode E: the keys of its K (ignored as a bad HMAC is if that
        # slot is not active); the other modes have one pair
        keys = self._join_keys(option.key_id)
        if keys is None or option.hmac is None:
            logger.debug("[%s] ADD_ADDR without usable keys", self._tag())
            return
        local, remote = keys
        expected = add_addr_hmac(
            remote, local, option.address_id, option.address, option.port
        )
        # RFC 8684 section 3.4.1: a bad HMAC is ignored silently
        if not compare_digest(expected, option.hmac):
            logger.debug("[%s] ADD_ADDR with a bad HMAC", self._tag())
            return
        address = (option.address, option.port)
        known = self._remote_addresses.get(option.address_id)
        if known is not None and known != address:
            return
        echo = AddAddr(
            option.address_id, option.address, option.port, echo=True
        )
        subflow.outbox.append(self._option_segment(subflow, echo))
        if known is None:
            self._remote_addresses[option.address_id] = address
            self._events.append(
                ev.AddressAnnounced(
                    option.address_id, option.address, option.port
                )
            )


def _check_address_id(address_id: object) -> None:
    # one octet on the wire (RFC 8684 section 3.2)
    if (
        isinstance(address_id, bool)
        or not isinstance(address_id, int)
        or not 0 <= address_id <= 0xFF
    ):
        raise ConfigurationError(
            "address_id must be an int from 0 to 255, got "
            f"{shown_value(address_id)}"
        )
