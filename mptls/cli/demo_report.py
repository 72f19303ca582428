"""How ``mptls demo`` looks on a terminal: a progress bar and a report.

Rendering only: it reads a finished :class:`DemoReport` and prints it.
It must never print key material; the report it reads holds none, only
the keys' fingerprints.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

from mptls.backends.base import SubflowInfo
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


def _address(address: tuple[str, int] | None) -> str:
    if address is None:
        return "-"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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


def subflow_table(report: DemoReport) -> Table:
    """Each subflow's bytes as the client sent and the server received
    them (TLS records and framing included)."""
    table = Table(box=box.SIMPLE_HEAD, title="subflows")
    for heading in ("id", "client", "server", "state"):
        table.add_column(heading)
    for heading in ("sent", "share", "received", "rtt"):
        table.add_column(heading, justify="right")

    client = report.client.info.subflows
    total_sent = sum(subflow.bytes_sent for subflow in client)
    for subflow in client:
        peer = _server_view(subflow, report.server.info.subflows)
        received = peer.bytes_received if peer else None
        rtt = f"{subflow.rtt_ms:.2f} ms" if subflow.rtt_ms else "-"
        table.add_row(
            str(subflow.subflow_id),
            _address(subflow.local_address),
            _address(subflow.remote_address),
            subflow.state + (" (backup)" if subflow.backup else ""),
            human_bytes(subflow.bytes_sent),
            _share(subflow.bytes_sent, total_sent),
            human_bytes(received) if received is not None else "-",
            rtt,
        )
    return table


def _key_lines(report: DemoReport) -> list[str]:
    client, server = report.client.info, report.server.info
    if client.key_fingerprint is None and server.key_fingerprint is None:
        reason = client.keys_reason or "the backend installed no TLS keys"
        return [f"keys        not from TLS: {reason}"]
    agree = _YES if report.fingerprints_match else _NO
    lines = [
        "keys        from the TLS exporter (EXPORTER-MPTCP)",
        f"fingerprint client {client.key_fingerprint or '-'}  "
        f"server {server.key_fingerprint or '-'}  match {agree}",
    ]
    if not client.keys_installed:
        lines.append(f"            not installed: {client.keys_reason}")
    return lines


def summary_lines(report: DemoReport) -> list[str]:
    """The connection facts, one per line."""
    client = report.client.info
    tls = " ".join(
        part
        for part in (report.client.tls_version, report.client.cipher)
        if part
    )
    lines = [
        f"file        {report.payload.description}",
        f"backend     {client.backend}    mode {client.mode}"
        + ("  [red](fell back to TCP)[/]" if client.fallback else ""),
        f"tokens      client {client.local_token or '-'}  "
        f"server {client.remote_token or '-'}",
        f"tls         {tls or '-'}",
        *_key_lines(report),
        f"transfer    {human_bytes(report.client.sent)} in "
        f"{report.client.seconds:.2f} s, "
        f"{human_bytes(report.throughput)}/s "
        f"({report.throughput * 8 / 1e6:.0f} Mbit/s)",
        f"sha256      {report.client.sha256}",
        f"            match {_YES if report.sha256_match else _NO}",
    ]
    return lines


def render_report(console: Console, report: DemoReport) -> None:
    verdict = "[green]OK[/]" if report.ok else "[red]FAILED[/]"
    console.print(
        Panel(
            Group("\n".join(summary_lines(report)), subflow_table(report)),
            title=f"mptls demo: {verdict}",
            expand=False,
        )
    )
