"""mptls: secure multipath connections.

TLS over Multipath TCP, with the MPTCP keys taken from the TLS exporter.
``open_connection`` and ``start_server`` are drop-ins for the asyncio
functions of the same name and give real asyncio streams.
"""

from typing import TYPE_CHECKING, Any

from mptls.backends.base import KeyInstall, MptcpInfo, SubflowInfo
from mptls.errors import (
    AddressError,
    BackendError,
    CertificateError,
    ConfigurationError,
    ConnectError,
    ConnectRefusedError,
    FramingError,
    HandshakeIncompleteError,
    HandshakeTimeoutError,
    HostLookupError,
    JoinRefusedError,
    JoinTimeoutError,
    KeysUnavailableError,
    MptlsError,
    MptlsTimeoutError,
    NotMptlsPeerError,
    OptionError,
    PathError,
    PathsLostError,
    PeerResetError,
    ProtocolError,
    SocketInUseError,
    TLSError,
    TokenError,
)
from mptls.tls.keys import KeyMaterial

if TYPE_CHECKING:
    from mptls.aio.streams import (
        create_connection,
        create_server,
        open_connection,
        start_server,
    )
    from mptls.tls.config import TLSConfig

# the stream functions pull in pyOpenSSL and asyncio; import them on first
# use so that the sans-I/O core and the CLI's fast paths stay light
_LAZY = {
    "create_connection": "mptls.aio.streams",
    "create_server": "mptls.aio.streams",
    "open_connection": "mptls.aio.streams",
    "start_server": "mptls.aio.streams",
    "TLSConfig": "mptls.tls.config",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mptls' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "AddressError",
    "BackendError",
    "CertificateError",
    "ConfigurationError",
    "ConnectError",
    "ConnectRefusedError",
    "FramingError",
    "HandshakeIncompleteError",
    "HandshakeTimeoutError",
    "HostLookupError",
    "JoinRefusedError",
    "JoinTimeoutError",
    "KeyInstall",
    "KeyMaterial",
    "KeysUnavailableError",
    "MptcpInfo",
    "MptlsError",
    "MptlsTimeoutError",
    "NotMptlsPeerError",
    "OptionError",
    "PathError",
    "PathsLostError",
    "PeerResetError",
    "ProtocolError",
    "SocketInUseError",
    "SubflowInfo",
    "TLSConfig",
    "TLSError",
    "TokenError",
    "__version__",
    "create_connection",
    "create_server",
    "open_connection",
    "start_server",
]
