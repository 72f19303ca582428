"""``mptls bench``: run the side-by-side benchmarks from the command line.

It parses the choices, runs :func:`mptls.bench.run_scenarios` and exits
1 when a scenario's figures are not sane (a goal not met is a result,
not a failure). It must never aim traffic anywhere but loopback and the
namespaces the scenarios create themselves.
"""

from __future__ import annotations

import argparse
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
        "--rounds", type=int, help="interleaved rounds per scenario"
    )
    parser.add_argument(
        "--output",
        type=Path,
        help="directory for the JSON (and PNG) files "
        "(default: ./bench-results)",
    )
    parser.add_argument(
        "--plot", action="store_true", help="also write a PNG per scenario"
    )
    parser.set_defaults(run=run)


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
    run_scenarios(
        names,
        options,
        output=args.output or Path("bench-results"),
        console=console,
        plot=args.plot,
    )
    if args.quick:
        # said again under the tables, where the figures are read
        console.print(f"[bold yellow]{QUICK_NOTE}[/]")
    return ExitStatus.OK
