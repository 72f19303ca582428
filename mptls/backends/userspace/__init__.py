"""The userspace backend: MPTCP in this process over TCP connections."""

from mptls.backends.userspace.backend import UserspaceBackend

__all__ = ["UserspaceBackend"]
