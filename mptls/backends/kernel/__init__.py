"""The kernel backend: TLS over Linux MPTCP sockets (``IPPROTO_MPTCP``).

``mptls.backends.kernel.probe.probe()`` reports what the running kernel
offers; the backend class lives in :mod:`mptls.backends.kernel.backend`.
"""

from mptls.backends.kernel.backend import KernelBackend

__all__ = ["KernelBackend"]
