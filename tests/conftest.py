"""Shared fixtures: the known-answer vectors, a test PKI, a namespace lab,
the keys a test's TLS engines export.

``tests/vectors.json`` is a copy of the project's shared vectors file, so
that the tests run on a clean clone. The shared file next to the
repository is used only when the copy is missing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import netns
import pytest
from pki import Pki, make_pki

from mptls.tls.engine import TLSEngine
from mptls.tls.keys import KeyMaterial

_LOCAL_VECTORS = Path(__file__).parent / "vectors.json"
_SHARED_VECTORS = Path(__file__).parents[2] / "shared" / "vectors.json"


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    """The parsed vectors.json: Linux KUnit HMACs, token/IDSN, exporters."""
    path = _LOCAL_VECTORS if _LOCAL_VECTORS.exists() else _SHARED_VECTORS
    with path.open(encoding="utf-8") as file:
        loaded: dict[str, Any] = json.load(file)
    return loaded


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and a server identity for 127.0.0.1; modules that need
    another PKI define their own ``pki``."""
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def topology() -> Iterator[netns.Topology]:
    """Two namespaces joined by two paths, or a skip where they cannot
    be made; torn down after the test."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with netns.topology(2) as built:
        yield built


@pytest.fixture
def exported(monkeypatch: pytest.MonkeyPatch) -> list[KeyMaterial]:
    """Every key generation any TLS engine of this test exports: the
    secrets a test then looks for in logs, reprs and errors."""
    keys: list[KeyMaterial] = []
    export: Callable[..., KeyMaterial] = TLSEngine.export_keys

    def recording(engine: TLSEngine, *, generation: int = 0) -> KeyMaterial:
        made = export(engine, generation=generation)
        keys.append(made)
        return made

    monkeypatch.setattr(TLSEngine, "export_keys", recording)
    return keys
