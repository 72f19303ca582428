"""MPTCP backends: what carries the subflows under the TLS layer.

``userspace`` (the default) runs MPTCP in this process over one TCP
connection per subflow; ``kernel`` uses Linux MPTCP sockets.
"""

from __future__ import annotations

from mptls.backends.base import (
    Backend,
    KeyDerivation,
    KeyInstall,
    MptcpInfo,
    SubflowInfo,
)
from mptls.errors import ConfigurationError, shown_value

__all__ = [
    "BACKENDS",
    "Backend",
    "KeyDerivation",
    "KeyInstall",
    "MptcpInfo",
    "SubflowInfo",
    "get_backend",
]

BACKENDS = ("userspace", "kernel")


def get_backend(name: str) -> Backend:
    """A backend by name: ``"userspace"`` or ``"kernel"``."""
    if name == "userspace":
        from mptls.backends.userspace import UserspaceBackend

        return UserspaceBackend()
    if name == "kernel":
        from mptls.backends.kernel import KernelBackend

        return KernelBackend()
    raise ConfigurationError(
        f"unknown backend {shown_value(name)}; choose one of "
        + ", ".join(BACKENDS)
    )
