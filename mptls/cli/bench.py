"""``mptls bench``: run the side-by-side benchmarks from the command line.

It parses the choices, runs :func:`mptls.bench.run_scenarios` and exits
1 when a scenario's figures are not sane (a goal not met is a result,
not a failure). It must never aim traffic anywhere but loopback and the
namespaces the scenarios create themselves.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from mptls.cli.common import ExitStatus, UsageError, stdout_console

# --quick moves a few MiB per transfer: enough to prove the harness runs,
# far too little for a figure (a 2 MiB transfer over two shaped paths
# ends before the second subflow carries its share)
QUICK_NOTE = (
    "quick run: smoke figures, not results. Tiny transfers and two rounds "
    "check that every scenario runs; their speeds, shares and ratios say "
    "nothing about mptls. Run without --quick for figures."
)


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
            + ". The namespace and kernel scenarios need root."
        ),
    )
    parser.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="which scenarios to run (default: all)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes and two rounds: smoke figures that check the "
        "harness, not results",
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
        raise UsageError(
            f"--output {text}: cannot create: {exc.strerror or exc}"
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


def written_files(
    output: Path, names: list[str], plotted: list[str]
) -> list[str]:
    """The files a run wrote, as the bench's report names them."""
    files = [f"{name}.json" for name in names]
    files += [f"{name}.png" for name in plotted]
    return [os.path.join(output, file) for file in files]


def run(args: argparse.Namespace) -> ExitStatus:
    from mptls.bench import run_scenarios
    from mptls.bench.common import SCENARIO_MODULES, BenchOptions

    names = args.scenarios or list(SCENARIO_MODULES)
    unknown = [name for name in names if name not in SCENARIO_MODULES]
    if unknown:
        raise UsageError(
            f"unknown scenario {unknown[0]!r}; choose from "
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
    if args.quick:
        console.print(f"[bold yellow]{QUICK_NOTE}[/]")
    results = run_scenarios(
        names,
        options,
        output=output,
        console=console,
        plot=args.plot,
    )
    plotted = [
        result.name
        for result in results
        if args.plot and not result.skipped and result.variants
    ]
    files = written_files(output, [r.name for r in results], plotted)
    # a run replaces the files of the scenarios it ran: say which
    console.print(f"wrote {', '.join(files)}", markup=False, soft_wrap=True)
    if args.quick:
        # said again under the tables, where the figures are read
        console.print(f"[bold yellow]{QUICK_NOTE}[/]")
    return ExitStatus.OK
