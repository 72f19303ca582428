"""The one place where TLS-derived keys meet the kernel.

mptls derives Key-A and Key-B from the TLS exporter and offers them to
the backend once the handshake is complete. For the kernel backend that
means handing them to the kernel's MPTCP connection so that MP_JOIN and
ADD_ADDR are authenticated with them. No released Linux kernel can take
them (none up to 6.18 has such an interface), and none documents a way
to ask; so :func:`detect` returns :class:`NoKernelKeys`, which says so.

A kernel patched to take external keys gets a :class:`KernelKeyHook` of
its own, :class:`SocketOptionKeys` being the shape for a socket option,
passed to ``KernelBackend(key_hook=...)``. This module must never try
an option number that the running kernel does not document: a future
option with that number could mean something else. It never logs, keeps
or puts into an error any key byte.
"""

from __future__ import annotations

import abc
import errno
import logging
import platform
import socket
from dataclasses import dataclass

from mptls.backends.base import KeyInstall
from mptls.tls.keys import KeyMaterial

logger = logging.getLogger("mptls.backends.kernel.keys")

# The newest release checked for an external-key interface.
CHECKED_UP_TO = "6.18"


@dataclass(frozen=True, slots=True)
class KeySupport:
    """Whether a kernel can take TLS-derived keys, and why (not)."""

    supported: bool
    reason: str


class KernelKeyHook(abc.ABC):
    """How TLS-derived keys reach a kernel MPTCP connection."""

    @abc.abstractmethod
    def support(self) -> KeySupport:
        """What this hook can do on the running kernel."""

    @abc.abstractmethod
    def install(self, sock: socket.socket, keys: KeyMaterial) -> KeyInstall:
        """Hand ``keys`` to the connection behind ``sock``."""


class NoKernelKeys(KernelKeyHook):
    """The running kernel has no interface for external keys."""

    def __init__(self, release: str | None = None) -> None:
        self._release = release or platform.release()

    def support(self) -> KeySupport:
        return KeySupport(
            False,
            f"Linux {self._release} offers no interface to take external "
            f"MPTCP keys (no released kernel does, checked up to "
            f"{CHECKED_UP_TO}); the kernel keeps its own RFC 8684 keys, "
            "sent in the clear in MP_CAPABLE, and authenticates joins "
            "with those",
        )

    def install(self, sock: socket.socket, keys: KeyMaterial) -> KeyInstall:
        return KeyInstall(installed=False, reason=self.support().reason)


class SocketOptionKeys(KernelKeyHook):
    """Keys handed over with a socket option of a patched kernel.

    ``level`` and ``option`` come from that kernel's own documentation;
    mptls has no default for them. The option value is Key-A followed by
    Key-B, 16 bytes, as the exporter gives them.
    """

    def __init__(self, level: int, option: int, *, kernel: str) -> None:
        self.level = level
        self.option = option
        self.kernel = kernel

    def support(self) -> KeySupport:
        return KeySupport(
            True,
            f"configured for {self.kernel}: socket option {self.option} "
            f"at level {self.level}",
        )

    def install(self, sock: socket.socket, keys: KeyMaterial) -> KeyInstall:
        try:
            sock.setsockopt(self.level, self.option, keys.key_a + keys.key_b)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            logger.warning(
                "the kernel refused the keys (option %d): %s",
                self.option,
                name,
            )
            return KeyInstall(
                installed=False,
                reason=f"the kernel refused socket option {self.option} "
                f"({name}); it is not {self.kernel}",
            )
        logger.info("keys %s installed in the kernel", keys.fingerprint())
        return KeyInstall(
            installed=True, reason=f"installed via {self.kernel}"
        )


def detect() -> KernelKeyHook:
    """The hook for the running kernel.

    Released kernels document no external-key interface to probe for,
    so the honest answer is always :class:`NoKernelKeys`; a patched
    kernel is named by passing its hook to the backend explicitly.
    """
    return NoKernelKeys()
