"""``mptls demo``: the command line of the product's main demonstration.

It picks the payload, runs :func:`mptls.cli.transfer.run_demo` and shows
the report. The payload it builds lives in a temporary directory that is
removed afterwards; it must never leave files behind.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from rich.console import Console

from mptls.backends.kernel.pathmanager import (
    has_net_admin,
    missing_capability_reason,
)
from mptls.cli.archive import Payload, existing_payload, stdlib_archive
from mptls.cli.common import (
    ExitStatus,
    UsageError,
    add_backend_arguments,
    add_pcap_argument,
    check_path_count,
    human_bytes,
    option_file,
    parse_paths,
    pcap_capture,
    print_json,
    sigterm_as_interrupt,
    stdout_console,
    summarize_capture,
    until_terminated,
)
from mptls.cli.demo_report import render_report, transfer_progress
from mptls.cli.transfer import (
    DEFAULT_PATHS,
    DemoReport,
    DemoSettings,
    Progress,
    run_demo,
)
from mptls.errors import MptlsError, ProtocolError
from mptls.trace import Capture


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="send a real file over two loopback paths and check it",
        description=(
            "Start a server and a client in this process on loopback, send "
            "a file of at least 50 MB (a tar of Python's standard library "
            "unless --file) over one subflow per local address, and check "
            "the SHA-256 on both ends."
        ),
    )
    parser.add_argument("--file", help="send this file instead")
    add_backend_arguments(parser)
    parser.add_argument(
        "--manage-paths",
        action="store_true",
        help="kernel backend: add the extra --paths as kernel subflow "
        "endpoints (changes the kernel's endpoint table)",
    )
    parser.add_argument(
        "--paths",
        default=DEFAULT_PATHS,
        help=f"client's local addresses, first = first subflow "
        f"(default: {DEFAULT_PATHS})",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        help="give up after this many seconds (default: 300)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the report as JSON"
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="no progress bar and no 'sending' line: the report alone",
    )
    add_pcap_argument(
        parser,
        "of both ends (the server and the client run in this process, so "
        "the one capture holds each frame once, as its sender wrote it)",
    )
    parser.set_defaults(run=run)


async def _send(
    console: Console,
    quiet: bool,
    settings: DemoSettings,
    payload: Payload,
    progress: Progress,
) -> DemoReport:
    """The transfer, announced once it runs: from then on SIGTERM ends
    it in order (:func:`until_terminated`). Before that, SIGTERM raises
    wherever the event loop's start happens to be."""
    if not quiet:
        console.print(f"sending {payload.description}", markup=False)
    return await run_demo(settings, payload, progress)


def run(args: argparse.Namespace) -> ExitStatus:
    settings = DemoSettings(
        backend=args.backend,
        mode=args.mode,
        paths=parse_paths(args.paths),
        timeout=args.timeout,
        manage_paths=args.manage_paths,
        rotate_every=args.rotate_every,
    )
    check_path_count(settings.paths, args.backend)
    if args.backend == "kernel" and args.manage_paths and not has_net_admin():
        # refused before "sending ...": the kernel connect would fail
        # on it only once the demo had started
        raise UsageError(f"--manage-paths: {missing_capability_reason()}")
    given = (
        option_file(args.file, "--file", "file")
        if args.file is not None
        else None
    )
    console = stdout_console()
    quiet = args.quiet or args.json

    with (
        # the archive is tens of MB: SIGTERM must not leave it behind
        sigterm_as_interrupt(),
        pcap_capture(args.pcap, args.backend, {"--file": given}) as capture,
        tempfile.TemporaryDirectory(prefix="mptls-demo-") as directory,
    ):
        if given is None:
            payload = stdlib_archive(Path(directory))
        else:
            payload = existing_payload(given)
        with transfer_progress(console, payload.size, quiet) as progress:
            report = asyncio.run(
                until_terminated(
                    _send(console, quiet, settings, payload, progress)
                )
            )

    if args.json:
        document = report.as_dict()
        if capture is not None:
            document["pcap"] = _capture_summary(capture)
        print_json(document)
    else:
        render_report(console, report)
        if capture is not None:
            console.print(
                summarize_capture(capture, " of both ends"), markup=False
            )
    if not report.sha256_match:
        raise ProtocolError("SHA-256 mismatch: the file did not arrive intact")
    if report.idle_paths:
        raise MptlsError(idle_paths_reason(report, given is not None))
    if not report.ok:
        raise MptlsError("the two ends disagree on the key fingerprint")
    return ExitStatus.OK


def idle_paths_reason(report: DemoReport, file_given: bool) -> str:
    """Why the demo failed for its idle paths, in one line.

    A path whose subflow joined but carried nothing is still a failure,
    for the demo shows every path carrying data; but it was said not to
    have opened or joined, which sent the user to debug a join that had
    worked, where the file had fit on the other paths.
    """
    joined = report.joined_idle_paths
    unjoined = report.unjoined_idle_paths
    reasons = []
    if unjoined:
        reasons.append(
            f"path {', '.join(unjoined)} never carried data: its subflow "
            "did not open or join (run with --debug to see why)"
        )
    if joined:
        hint = (
            "send a larger --file, or leave it out for the 50 MB archive"
            if file_given
            else "a larger file spreads over more paths"
        )
        reasons.append(
            f"path {', '.join(joined)} joined but carried no data: the "
            f"other paths took the whole {human_bytes(report.payload.size)}"
            f" file ({hint})"
        )
    return "; ".join(reasons)


def _capture_summary(capture: Capture) -> dict[str, Any]:
    """What ``--json`` says of the capture: ``seen_twice`` equal to
    ``received`` shows that every frame one end received, the other end
    sent in this process."""
    return {
        "file": str(capture.path),
        "frames": capture.frames,
        "sent": capture.sent,
        "received": capture.received,
        "seen_twice": capture.seen_twice,
        "stopped": capture.stopped_by,
    }
