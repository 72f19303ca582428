"""What every scenario shares: its options, loops, units and the registry.

A scenario is a module with ``NAME``, ``TITLE`` and ``async def run(
options) -> ScenarioResult``; :data:`SCENARIO_MODULES` lists them in the
order ``mptls bench`` runs them. Each client-side measurement runs on a
fresh event loop in a worker thread (:func:`in_fresh_loop`): the same
way for every stack, on asyncio's loop or uvloop's, and, for the
namespace scenarios, inside the client namespace.

Nothing here may aim traffic anywhere: the scenarios pick loopback or
addresses of namespaces they created.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import platform
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mptls.bench.netns import Namespace, unavailable_reason

T = TypeVar("T")

MIB = 1 << 20
MB = 1e6

# the loopback scenarios' server address, and the client's two local
# addresses when a connection should get a second subflow
HOST = "127.0.0.1"
PATHS = ("127.0.0.1", "127.0.0.2")

SCENARIO_MODULES = (
    "bulk",
    "paths",
    "kernel",
    "connect",
    "tokens",
    "memory",
    "keys",
)


@dataclass(frozen=True, slots=True)
class BenchOptions:
    """How big and how often: the command line's choices."""

    quick: bool = False
    rounds: int | None = None

    def rounds_or(self, full: int, quick: int = 2) -> int:
        if self.rounds is not None:
            return self.rounds
        return quick if self.quick else full

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def namespaces_reason() -> str | None:
    """Why the namespace scenarios cannot run here, or ``None``."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    import shutil

    if shutil.which("tc") is None:
        return "needs iproute2's tc command"
    return None


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind == "uvloop":
        import uvloop

        return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def _run_in_loop(
    kind: str,
    factory: Callable[[], Awaitable[T]],
    namespace: Namespace | None,
) -> T:
    async def main() -> T:
        return await factory()

    entered = namespace.entered() if namespace else contextlib.nullcontext()
    with entered:
        loop = _new_loop(kind)
        try:
            return loop.run_until_complete(main())
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


async def in_fresh_loop(
    factory: Callable[[], Awaitable[T]],
    *,
    loop: str = "asyncio",
    namespace: Namespace | None = None,
) -> T:
    """Run ``factory()`` on a new loop in a worker thread and wait for it."""
    return await asyncio.to_thread(_run_in_loop, loop, factory, namespace)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import os

    model = ""
    with (
        contextlib.suppress(OSError),
        open("/proc/cpuinfo", encoding="utf-8") as cpuinfo,
    ):
        for line in cpuinfo:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    from OpenSSL import SSL

    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "cpu": model,
        "cpus": os.cpu_count(),
        "stdlib_openssl": ssl.OPENSSL_VERSION,
        "pyopenssl_openssl": SSL.SSLeay_version(SSL.SSLEAY_VERSION).decode(),
        "uvloop": uvloop_available(),
    }
