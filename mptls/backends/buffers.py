"""One receive buffer per thread, reused by every socket read of mptls.

asyncio hands a plain protocol a fresh bytes object per read (256 KiB):
above malloc's mmap threshold, so new pages, faulted in and zeroed, on
every read. A buffered protocol reads into this buffer instead. Whoever
is handed a view of it must copy what it keeps before it returns: the
next read, of any connection on the same thread, overwrites it.
"""

from __future__ import annotations

import threading

__all__ = ["READ_SIZE", "read_buffer"]

# A bulk transfer's read brings up to this much, so a receiver wakes up
# and acknowledges half as often as with asyncio's 256 KiB; 512 KiB stays
# in cache, where 1 MiB cost the receiver more system time than it saved
READ_SIZE = 512 * 1024

_buffers = threading.local()


def read_buffer() -> memoryview:
    """This thread's receive buffer (made on first use)."""
    buffer: memoryview | None = getattr(_buffers, "buffer", None)
    if buffer is None:
        buffer = _buffers.buffer = memoryview(bytearray(READ_SIZE))
    return buffer
