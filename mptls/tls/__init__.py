"""The TLS layer: a sans-I/O engine, its settings, MPTCP keys from TLS.

Public names: :class:`TLSEngine`, :class:`TLSConfig`, :class:`TLSVersion`,
:func:`to_openssl_context`, :func:`export_mptcp_keys`,
:class:`KeyMaterial`. Importing this package must stay cheap and must not
load OpenSSL (the sans-I/O core imports :mod:`mptls.tls.keys` through it),
so every name but :class:`KeyMaterial` is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mptls.tls.keys import KeyMaterial

if TYPE_CHECKING:
    from mptls.tls.config import TLSConfig, TLSVersion, to_openssl_context
    from mptls.tls.engine import TLSEngine
    from mptls.tls.exporter import export_mptcp_keys

_LAZY = {
    "TLSConfig": "mptls.tls.config",
    "TLSVersion": "mptls.tls.config",
    "to_openssl_context": "mptls.tls.config",
    "TLSEngine": "mptls.tls.engine",
    "export_mptcp_keys": "mptls.tls.exporter",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'mptls.tls' has no attribute {name!r}")
    value = getattr(importlib.import_module(module_name), name)
    globals()[name] = value
    return value


__all__ = [
    "KeyMaterial",
    "TLSConfig",
    "TLSEngine",
    "TLSVersion",
    "export_mptcp_keys",
    "to_openssl_context",
]
