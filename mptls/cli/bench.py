"""``mptls bench``: run the side-by-side benchmarks from the command line.

It parses the choices, runs :func:`mptls.bench.run_scenarios` and exits
1 when a scenario's figures are not sane (a goal not met is a result,
not a failure). It must never aim traffic anywhere but loopback and the
namespaces the scenarios create themselves.
"""

from __future__ import annotations

import argparse
import errno
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mptls.cli.common import (
    ExitStatus,
    UsageError,
    printable,
    stdout_console,
)
from mptls.errors import shown_value

if TYPE_CHECKING:
    from rich.console import Console

    from mptls.bench import RunRecord

# --quick moves a few MiB per transfer: enough to prove the harness runs,
# far too little for a figure (a 2 MiB transfer over two shaped paths
# ends before the second subflow carries its share)
QUICK_NOTE = (
    "quick run: smoke figures, not results. Tiny transfers and {rounds} "
    "check that every scenario runs; their speeds, shares and ratios say "
    "nothing about mptls. Run without --quick for figures."
)

# mkdir's errors in plain words; ENOENT after parents=True means the
# file system itself refuses new entries (/proc, /sys)
_MKDIR_REASONS = {
    errno.ENOENT: "the file system there does not allow new directories",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
    errno.ENOSPC: "no space left on the device",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
}


def quick_note(rounds: int | None) -> str:
    """The quick run's warning, with the rounds it really runs."""
    if rounds is None:
        text = "two rounds"
    else:
        text = f"{rounds} round" + ("" if rounds == 1 else "s")
    return QUICK_NOTE.format(rounds=text)


def add_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    from mptls.bench.common import SCENARIO_MODULES

    parser = subparsers.add_parser(
        "bench",
        help="benchmark mptls side by side with asyncio ssl, TCP and "
        "kernel MPTCP",
        description=(
            "Run benchmark scenarios with interleaved rounds (A B A B ...) "
            "and report medians, spreads and per-round ratios. Scenarios: "
            + ", ".join(SCENARIO_MODULES)
            + ". paths needs root; kernel needs Linux with MPTCP enabled."
        ),
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="which scenarios to run, each once, in the order given "
        "(default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes, and two rounds unless --rounds is given: smoke "
        "figures that check the harness, not results",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        help="interleaved rounds per scenario, 1 to 100",
    )
    parser.add_argument(
        "--output",
        help="directory for the JSON (and PNG) files "
        "(default: ./bench-results)",
    )
    parser.add_argument(
        "--plot", action="store_true", help="also write a PNG per scenario"
    )
    parser.set_defaults(run=run)


def output_directory(text: str | None) -> Path:
    """The ``--output`` directory, created and proven writable before
    any scenario runs: a bad one must not throw a finished measurement
    away."""
    if text is None:
        text = "bench-results"
    if not text:
        raise UsageError("--output needs a directory name")
    path = Path(text)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        # a file, or a symlink to nothing (mkdir does not follow it)
        raise UsageError(f"--output {text} is not a directory") from None
    except OSError as exc:
        reason = _MKDIR_REASONS.get(exc.errno or 0, exc.strerror or str(exc))
        where = exc.filename or text
        raise UsageError(
            f"--output {text}: could not create the directory {where}: "
            f"{reason}"
        ) from None
    if not path.is_dir():
        raise UsageError(f"--output {text} is not a directory")
    try:
        # a real write: os.access says yes to root on a read-only mount
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(
            f"--output {text} is not writable: {exc.strerror or exc}"
        ) from None
    return path


def report_files(console: Console, record: RunRecord) -> None:
    """Name the files a run wrote (it replaced them) and the ones it
    could not write, with the OS's reason and where the samples went."""
    if record.written:
        console.print(
            f"wrote {_shown_paths(record.written)}",
            markup=False,
            soft_wrap=True,
        )
    for failure in record.failures:
        kept = (
            f"; its samples are in {printable(str(failure.kept))}"
            if failure.kept is not None
            else ""
        )
        print(
            f"mptls: error: {failure.scenario}: could not write "
            f"{printable(str(failure.path))}: {failure.reason}{kept}",
            file=sys.stderr,
        )


def _shown_paths(paths: Sequence[Path]) -> str:
    """The files, comma-separated, as a terminal may show them: the
    --output directory is the user's, and an escape sequence in its
    name would steer the terminal."""
    return ", ".join(printable(str(path)) for path in paths)


def interrupted(record: RunRecord) -> str:
    """The one line an interrupted run ends with."""
    if record.written:
        files = _shown_paths(record.written)
        return f"mptls: interrupted; wrote {files} before the interrupt"
    return "mptls: interrupted; no result files were written"


def run(args: argparse.Namespace) -> ExitStatus:
    from mptls.bench import RunRecord, run_scenarios
    from mptls.bench.common import SCENARIO_MODULES, BenchOptions

    # each scenario once, in the order first given
    names = list(dict.fromkeys(args.scenarios or SCENARIO_MODULES))
    unknown = [name for name in names if name not in SCENARIO_MODULES]
    if unknown:
        raise UsageError(
            f"unknown scenario {shown_value(unknown[0])}; choose from "
            + ", ".join(SCENARIO_MODULES)
        )
    if args.rounds is not None and not 1 <= args.rounds <= 100:
        raise UsageError("--rounds must be 1 to 100")
    output = output_directory(args.output)
    if args.plot:
        from mptls.bench.report import plot_available

        if not plot_available():
            raise UsageError(
                "--plot needs matplotlib: pip install 'mptls[plot]'"
            )
    options = BenchOptions(quick=args.quick, rounds=args.rounds)
    console = stdout_console()
    note = quick_note(args.rounds)
    if args.quick:
        console.print(f"[bold yellow]{note}[/]")
    record = RunRecord()
    try:
        run_scenarios(
            names,
            options,
            output=output,
            console=console,
            plot=args.plot,
            record=record,
        )
    except KeyboardInterrupt:
        # Ctrl-C: the scenario's own cleanup ran on the way out; one
        # line says what is left in --output
        print(interrupted(record), file=sys.stderr)
        return ExitStatus.INTERRUPTED
    # a run replaces the files of the scenarios it ran: say which
    report_files(console, record)
    if args.quick:
        # said again under the tables, where the figures are read
        console.print(f"[bold yellow]{note}[/]")
    return ExitStatus.FAILURE if record.failures else ExitStatus.OK
