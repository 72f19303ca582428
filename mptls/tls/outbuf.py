"""Reused buffers for the TLS layer's output.

A bulk sender's ciphertext leaves OpenSSL in one buffer per application
write (about 256 KiB) that the multipath transport keeps until the
peer's Data ACK covers it: up to the 4 MiB window and as much again
waiting, freed in the order they were made. Buffers that size come from
malloc's heap or from fresh ``mmap`` pages, and in that pattern the heap
is trimmed and grown again all the time: every page faulted in and
zeroed by the kernel anew (about 0.04 s of the sender's CPU per GB). A
list of free buffers of one size makes them once.

They come back in bursts: a sender that reads a run of Data ACKs at
once frees most of a window (13 to 18 buffers on loopback) in one go,
then writes as many. So while any buffer is out, the list keeps up to
:data:`BUSY_KEEP` (a window's worth, with room); once every buffer is
back, it keeps only ``keep``, so that a process between transfers holds
little.

A buffer goes back to the list only when nothing refers to its memory
any more (cffi calls :meth:`OutputPool.release` when the owning cdata
dies); it must never be handed out while a view of it is alive.
"""

from __future__ import annotations

from typing import Any

from OpenSSL._util import ffi as _ffi

# the records of a 256 KiB write (16 of 16 KiB, 22 bytes of header and
# tag each) with room to spare; larger outputs are not pooled
POOLED_SIZE = 320 * 1024
# smaller outputs (handshake, alerts, short writes) come from the heap,
# where malloc keeps them cheap
POOLED_MIN = 64 * 1024
# free buffers kept once every buffer is back: enough for the next
# transfer to start without a fault; more would only hold idle memory
_KEEP = 8
# free buffers kept while any is out (10 MiB at most): more than one
# window's worth, which is what a burst of Data ACKs returns
BUSY_KEEP = 32

_RAW = _ffi.new_allocator(should_clear_after_alloc=False)


class OutputPool:
    """Free buffers of :data:`POOLED_SIZE` bytes for cffi to allocate."""

    def __init__(self, keep: int = _KEEP, busy_keep: int = BUSY_KEEP) -> None:
        self._keep = keep
        self._busy_keep = max(keep, busy_keep)
        self._free: list[Any] = []
        # the owning cdata of each buffer handed out, by its address
        self._lent: dict[int, Any] = {}
        self.allocate = _ffi.new_allocator(
            alloc=self._take, free=self.release, should_clear_after_alloc=False
        )

    def _take(self, size: int) -> Any:
        if size > POOLED_SIZE:
            raise MemoryError(f"{size} bytes do not fit a pooled buffer")
        try:
            owner = self._free.pop()
        except IndexError:
            owner = _RAW("char[]", POOLED_SIZE)
        pointer = _ffi.cast("void *", owner)
        self._lent[int(_ffi.cast("uintptr_t", pointer))] = owner
        return pointer

    def release(self, pointer: Any) -> None:
        """Take a buffer back: cffi calls this when its cdata dies."""
        owner = self._lent.pop(int(_ffi.cast("uintptr_t", pointer)), None)
        if owner is None:
            return
        free = self._free
        if self._lent:
            # mid-transfer: the next writes take these back
            if len(free) < self._busy_keep:
                free.append(owner)
            return
        # every buffer is back: keep only a few
        del free[self._keep :]
        if len(free) < self._keep:
            free.append(owner)

    @property
    def idle(self) -> int:
        """Free buffers held for the next outputs."""
        return len(self._free)

    @property
    def lent(self) -> int:
        """Buffers whose memory something still refers to."""
        return len(self._lent)


OUTPUT_POOL = OutputPool()
