"""``mptls bench``: mptls measured side by side with what users would pick.

Each scenario (one module each, listed in
:data:`mptls.bench.common.SCENARIO_MODULES`) runs its variants in
interleaved rounds and reports per-round ratios with their median and
spread (:mod:`mptls.bench.harness`). :func:`run_scenarios` runs the ones
asked for, shows each as a table and writes its JSON (and PNG).

The benchmarks send traffic only to loopback or into network namespaces
they create and remove; every run is bounded in size and time, and
every process they start is stopped by its PID.
"""

from __future__ import annotations

import asyncio
import importlib
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

from rich.console import Console

from mptls.bench.common import SCENARIO_MODULES, BenchOptions, machine
from mptls.bench.harness import ScenarioResult
from mptls.bench.report import render, write_json, write_png
from mptls.bench.stacks import write_pki
from mptls.errors import ConfigurationError

__all__ = ["BenchOptions", "ScenarioResult", "run_scenarios", "scenario"]


def scenario(name: str) -> ModuleType:
    """The module of scenario ``name``."""
    if name not in SCENARIO_MODULES:
        raise ConfigurationError(
            f"unknown scenario {name!r}; choose from "
            + ", ".join(SCENARIO_MODULES)
        )
    return importlib.import_module(f"mptls.bench.{name}")


def run_scenarios(
    names: Sequence[str],
    options: BenchOptions,
    *,
    output: Path,
    console: Console,
    plot: bool = False,
) -> list[ScenarioResult]:
    """Run ``names`` in order; show, and write JSON (and PNG) to
    ``output``."""
    modules = [scenario(name) for name in names]
    host = machine()
    results = []
    with tempfile.TemporaryDirectory(prefix="mptls-bench-") as directory:
        pki = write_pki(Path(directory))
        for module in modules:
            console.print(f"[bold]running {module.NAME}[/bold] ...")
            result: ScenarioResult = asyncio.run(module.run(options, pki))
            render(console, result)
            write_json(output, result, host)
            if plot and not result.skipped and result.variants:
                write_png(output, result)
            results.append(result)
    return results
