"""How ``mptls demo`` looks on a terminal: a progress bar and a report.

Rendering only: it reads a finished :class:`DemoReport` and prints it.
It must never print key material; the report it reads holds none, only
the keys' fingerprints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mptls.backends.base import MptcpInfo, SubflowInfo, format_address
from mptls.cli.common import human_bytes
from mptls.cli.transfer import DemoReport
from mptls.cli.transfer import Progress as ProgressCallback

_YES = "[green]yes[/]"
_NO = "[red]no[/]"


@contextlib.contextmanager
def transfer_progress(
    console: Console, total: int, quiet: bool
) -> Iterator[ProgressCallback]:
    """A progress bar of bytes received, as a callback taking the count.

    Rich leaves the bar out by itself when the console is not a terminal;
    ``quiet`` leaves it out everywhere.
    """
    bar = Progress(
        TextColumn("[bold]transfer[/]"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=quiet or not console.is_terminal,
        transient=False,
    )
    task = bar.add_task("transfer", total=total)
    with bar:
        yield lambda received: bar.update(task, completed=received)


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def _server_view(
    subflow: SubflowInfo, server: tuple[SubflowInfo, ...]
) -> SubflowInfo | None:
    """The server's record of the client's subflow, matched by address."""
    for candidate in server:
        if candidate.remote_address == subflow.local_address:
            return candidate
    return None


# why the shares are uneven, by backend: the userspace scheduler
# (mptls.mptcp.scheduler) fills the lowest-RTT subflow first and spills
# to the others; on the kernel backend the kernel spreads the packets
_SCHEDULERS = {
    "userspace": "each write goes to the subflow with the lowest "
    "round-trip time that has room; the others carry what it cannot take",
    "kernel": "the kernel's MPTCP scheduler (net.mptcp.scheduler) picks "
    "the subflow of each packet",
}


def subflow_table(report: DemoReport) -> Table:
    """Each subflow's bytes as the client sent and the server received
    them (TLS records and framing included)."""
    table = Table(
        box=box.SIMPLE_HEAD,
        title="subflows",
        show_edge=False,
        caption=_SCHEDULERS.get(report.client.info.backend),
    )
    table.add_column("id", no_wrap=True)
    table.add_column("client -> server", overflow="fold")
    for heading in ("sent", "share", "received", "rtt"):
        table.add_column(heading, justify="right", no_wrap=True)

    client = report.client.info.subflows
    total_sent = sum(subflow.bytes_sent for subflow in client)
    for subflow in client:
        peer = _server_view(subflow, report.server.info.subflows)
        received = peer.bytes_received if peer else None
        rtt = f"{subflow.rtt_ms:.2f} ms" if subflow.rtt_ms else "-"
        table.add_row(
            f"{subflow.subflow_id}{' backup' if subflow.backup else ''}",
            f"{format_address(subflow.local_address)} -> "
            f"{format_address(subflow.remote_address)}",
            human_bytes(subflow.bytes_sent),
            _share(subflow.bytes_sent, total_sent),
            human_bytes(received) if received is not None else "-",
            rtt,
        )
    return table


Row = tuple[str, str]


def _key_rows(report: DemoReport) -> list[Row]:
    client, server = report.client.info, report.server.info
    if client.key_fingerprint is None and server.key_fingerprint is None:
        reason = client.keys_reason or "the backend installed no TLS keys"
        return [("keys", f"not from TLS: {reason}")]
    agree = _YES if report.fingerprints_match else _NO
    if report.generations_differ:
        # looked at on either side of a rotation: no match to expect
        agree = "-"
    source = "from the TLS exporter (EXPORTER-MPTCP)"
    if not client.keys_installed:
        # the kernel backend exports them but no released kernel takes
        # them: the subflows run on the kernel's own keys
        reason = client.keys_reason or "the backend did not take them"
        source = f"exported (EXPORTER-MPTCP), not installed: {reason}"
    return [
        ("keys", source),
        (
            "fingerprint",
            f"client {client.key_fingerprint or '-'}{_generation(client)}  "
            f"server {server.key_fingerprint or '-'}{_generation(server)}  "
            f"match {agree}",
        ),
    ]


def _generation(info: MptcpInfo) -> str:
    """`` (generation n)`` where the backend rotates keys (E mode)."""
    if info.key_generation is None:
        return ""
    return f" (generation {info.key_generation})"


def summary_rows(report: DemoReport) -> list[Row]:
    """The connection facts, a label and a value each."""
    client, server = report.client.info, report.server.info
    tls = (report.client.tls_version or "-", report.client.cipher or "")
    return [
        # a path of the user's: "[" in it is no markup
        ("file", escape(report.payload.description)),
        (
            "backend",
            f"{client.backend}    mode {client.mode}"
            + ("  [red](fell back to TCP)[/]" if client.fallback else ""),
        ),
        (
            "tokens",
            f"client {client.local_token or '-'}  "
            f"server {server.local_token or client.remote_token or '-'}",
        ),
        ("tls", " ".join(tls).strip()),
        *_key_rows(report),
        (
            "transfer",
            f"{human_bytes(report.client.sent)} in "
            f"{report.client.seconds:.2f} s, "
            f"{human_bytes(report.throughput)}/s "
            f"({report.throughput * 8 / 1e6:.0f} Mbit/s)",
        ),
        ("sha256", report.client.sha256),
        ("", f"match {_YES if report.sha256_match else _NO}"),
        *_path_rows(report),
    ]


def _path_rows(report: DemoReport) -> list[Row]:
    joined = report.joined_idle_paths
    unjoined = report.unjoined_idle_paths
    rows: list[Row] = []
    if unjoined:
        rows.append(
            ("paths", f"[red]never carried data: {', '.join(unjoined)}[/]")
        )
    if joined:
        rows.append(
            ("paths", f"[red]joined, carried no data: {', '.join(joined)}[/]")
        )
    return rows


def render_report(console: Console, report: DemoReport) -> None:
    verdict = "[green]OK[/]" if report.ok else "[red]FAILED[/]"
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column(overflow="fold")
    for label, value in summary_rows(report):
        summary.add_row(label, value)
    console.rule(f"mptls demo: {verdict}")
    console.print(summary)
    console.print(subflow_table(report))
