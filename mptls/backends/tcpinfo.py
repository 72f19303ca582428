"""Linux's ``struct tcp_info``: the offsets both backends read.

The struct only ever grows at its end (include/uapi/linux/tcp.h), and
the kernel copies at most the size either side knows, so each field is
read by its offset. The kernel backend decodes a subflow snapshot from
these fields; the userspace backend reads a few of them on its flushes
(:func:`packed`: one unpack, no per-field work).
"""

from __future__ import annotations

import struct

__all__ = ["TCP_INFO_FIELDS", "TCP_INFO_STRIDE", "packed"]

# (field, offset, struct format)
TCP_INFO_FIELDS: tuple[tuple[str, int, str], ...] = (
    ("state", 0, "B"),
    ("snd_mss", 16, "I"),
    ("rtt_us", 68, "I"),
    ("rttvar_us", 72, "I"),
    ("snd_cwnd", 80, "I"),
    ("total_retrans", 100, "I"),
    ("bytes_acked", 120, "Q"),
    ("bytes_received", 128, "Q"),
    ("segs_out", 136, "I"),
    ("segs_in", 140, "I"),
    # 4.6
    ("notsent_bytes", 144, "I"),
    # 4.9: bytes per second
    ("delivery_rate", 160, "Q"),
    ("bytes_sent", 200, "Q"),
    ("bytes_retrans", 208, "Q"),
)
# Room for one tcp_info: larger than any kernel's so far (280 bytes in
# 6.18); the kernel copies what it has.
TCP_INFO_STRIDE = 384


def packed(names: tuple[str, ...]) -> struct.Struct:
    """One struct that reads the fields ``names``, in offset order,
    from the start of a ``struct tcp_info`` (padding between them)."""
    chosen = sorted(
        (offset, fmt) for name, offset, fmt in TCP_INFO_FIELDS if name in names
    )
    if len(chosen) != len(names):
        raise ValueError(f"unknown tcp_info fields in {names}")
    layout, end = "=", 0
    for offset, fmt in chosen:
        if offset < end:
            raise ValueError(f"tcp_info fields overlap at {offset}")
        layout += f"{offset - end}x{fmt}" if offset > end else fmt
        end = offset + struct.calcsize("=" + fmt)
    return struct.Struct(layout)
