"""MPTCP key material taken from the TLS exporter.

draft-paasch-mptcp-tls-authentication: 16 bytes of
``TLS-Exporter("EXPORTER-MPTCP", no context, 16)``; Key-A (bytes 0-7)
belongs to the MPTCP initiator, Key-B (bytes 8-15) to the responder.

A :class:`KeyMaterial` never shows its bytes: its ``repr`` and ``str``
name only the generation and a short fingerprint, so it can be logged or
traced by mistake without leaking anything usable.
"""

from __future__ import annotations

import hashlib
import hmac

from mptls.errors import ConfigurationError

EXPORTER_LABEL = b"EXPORTER-MPTCP"
EXPORTER_LENGTH = 16
KEY_LENGTH = 8
# generations are exporter contexts uint32(n)
MAX_GENERATION = 0xFFFFFFFF


class KeyMaterial:
    """Key-A and Key-B for one MPTCP connection.

    ``generation`` is 0 for the draft's no-context keys and n >= 1 for
    rotated keys exported with context ``uint32(n)``.
    """

    __slots__ = ("_ekm", "generation")

    def __init__(
        self, exporter_output: bytes | bytearray, *, generation: int = 0
    ) -> None:
        if not isinstance(exporter_output, bytes | bytearray):
            raise ConfigurationError(
                "exporter output must be bytes, got "
                f"{type(exporter_output).__name__}"
            )
        if len(exporter_output) != EXPORTER_LENGTH:
            raise ConfigurationError(
                f"exporter output must be {EXPORTER_LENGTH} bytes, "
                f"got {len(exporter_output)}"
            )
        if (
            isinstance(generation, bool)
            or not isinstance(generation, int)
            or not 0 <= generation <= MAX_GENERATION
        ):
            raise ConfigurationError(
                f"generation must be an integer from 0 to {MAX_GENERATION}"
            )
        self._ekm = bytes(exporter_output)
        self.generation = generation

    @property
    def key_a(self) -> bytes:
        """The MPTCP initiator's key (exporter bytes 0-7)."""
        return self._ekm[:KEY_LENGTH]

    @property
    def key_b(self) -> bytes:
        """The MPTCP responder's key (exporter bytes 8-15)."""
        return self._ekm[KEY_LENGTH:]

    def fingerprint(self) -> str:
        """A short, one-way tag that both ends can compare.

        Eight hex digits of a hash over a fixed label and the keys: enough
        to show two ends agree, useless for recovering the keys.
        """
        digest = hashlib.sha256(b"mptls key fingerprint\x00" + self._ekm)
        return digest.hexdigest()[:8]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyMaterial):
            return NotImplemented
        return (
            hmac.compare_digest(self._ekm, other._ekm)
            and self.generation == other.generation
        )

    def __hash__(self) -> int:
        return hash((self.fingerprint(), self.generation))

    def __repr__(self) -> str:
        return (
            f"<KeyMaterial generation={self.generation} "
            f"fingerprint={self.fingerprint()}>"
        )

    __str__ = __repr__

    def __reduce__(self) -> tuple[object, ...]:
        # a pickle would be a copy of the keys on disk or on the wire
        raise TypeError("KeyMaterial cannot be pickled")
