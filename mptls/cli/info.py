"""``mptls info``: what this machine's kernel offers for MPTCP.

It shows the kernel probe's report as it is, whatever fields the probe
grows; it never changes a setting and never opens a connection beyond
what the probe itself does.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from rich import box
from rich.table import Table

from mptls.cli.common import ExitStatus, print_json, stdout_console
from mptls.errors import BackendError


def load_report() -> dict[str, Any]:
    """Run the kernel probe and return its report as plain data."""
    try:
        from mptls.backends.kernel.probe import probe
    except ImportError as exc:
        raise BackendError(
            "the kernel probe is not available in this installation"
        ) from exc
    return probe().as_dict()


def _label(key: str) -> str:
    """A field name for people; dotted names (sysctls) stay as they are."""
    return key if "." in key else key.replace("_", " ")


def _cell(value: Any) -> Any:
    """A value as a table cell: nested mappings become nested tables."""
    if isinstance(value, Mapping):
        return report_table(value)
    if isinstance(value, bool):
        return "[green]yes[/]" if value else "[red]no[/]"
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        if not value:
            return "none"
        if all(isinstance(item, Mapping) for item in value):
            return _rows_table(value)
        return "\n".join(str(item) for item in value)
    return str(value)


def _rows_table(rows: list[Mapping[str, Any]] | tuple[Any, ...]) -> Table:
    """A list of records (endpoints, say) as one table with a header."""
    columns: list[str] = []
    for row in rows:
        columns.extend(key for key in row if key not in columns)
    table = Table(box=box.SIMPLE, show_edge=False)
    for column in columns:
        table.add_column(_label(column))
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    return table


def report_table(report: Mapping[str, Any], title: str | None = None) -> Table:
    """A report as a two-column table of names and values."""
    table = Table(
        box=box.SIMPLE, show_header=False, title=title, pad_edge=False
    )
    # a name (a sysctl, say) is never split: its column is as wide as the
    # longest; the values fold into what is left
    width = max((len(_label(key)) for key in report), default=0)
    table.add_column(style="bold", no_wrap=True, min_width=width)
    table.add_column(overflow="fold")
    for key, value in report.items():
        table.add_row(_label(key), _cell(value))
    return table


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = subparsers.add_parser(
        "info",
        help="what the kernel offers for MPTCP",
        description="Probe the running kernel: MPTCP enabled, path "
        "manager, endpoints, limits, the MPTCP socket options that work, "
        "and whether it can take external (TLS-derived) keys.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> ExitStatus:
    report = load_report()
    if args.json:
        print_json(report)
    else:
        stdout_console().print(report_table(report, "kernel MPTCP"))
    return ExitStatus.OK
