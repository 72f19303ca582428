"""Shared fixtures: the known-answer vectors.

``tests/vectors.json`` is a copy of the project's shared vectors file, so
that the tests run on a clean clone. The shared file next to the
repository is used only when the copy is missing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

_LOCAL_VECTORS = Path(__file__).parent / "vectors.json"
_SHARED_VECTORS = Path(__file__).parents[2] / "shared" / "vectors.json"


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    """The parsed vectors.json: Linux KUnit HMACs, token/IDSN, exporters."""
    path = _LOCAL_VECTORS if _LOCAL_VECTORS.exists() else _SHARED_VECTORS
    with path.open(encoding="utf-8") as file:
        loaded: dict[str, Any] = json.load(file)
    return loaded
