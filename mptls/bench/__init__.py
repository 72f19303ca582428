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
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from rich.console import Console

from mptls.bench.common import SCENARIO_MODULES, BenchOptions, machine
from mptls.bench.harness import ScenarioResult
from mptls.bench.report import render, write_json, write_png
from mptls.bench.stacks import write_pki
from mptls.errors import ConfigurationError

__all__ = [
    "BenchOptions",
    "RunRecord",
    "ScenarioResult",
    "WriteFailure",
    "run_scenarios",
    "scenario",
]


@dataclass(frozen=True, slots=True)
class WriteFailure:
    """A result file that could not be written, and where its samples
    went instead (``None`` when they could not be kept anywhere)."""

    scenario: str
    path: Path
    reason: str
    kept: Path | None


@dataclass(slots=True)
class RunRecord:
    """What a run has written so far; filled as it goes, so that an
    interrupted run can still say which files it left behind."""

    written: list[Path] = field(default_factory=list)
    failures: list[WriteFailure] = field(default_factory=list)


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
    record: RunRecord | None = None,
) -> list[ScenarioResult]:
    """Run ``names`` in order; show, and write JSON (and PNG) to
    ``output``, noting in ``record`` what was written and what failed."""
    modules = [scenario(name) for name in names]
    host = machine()
    record = RunRecord() if record is None else record
    results = []
    with tempfile.TemporaryDirectory(prefix="mptls-bench-") as directory:
        pki = write_pki(Path(directory))
        for module in modules:
            console.print(f"[bold]running {module.NAME}[/bold] ...")
            result: ScenarioResult = asyncio.run(module.run(options, pki))
            render(console, result)
            _keep(output, result, host, record, plot=plot)
            results.append(result)
    return results


def _keep(
    output: Path,
    result: ScenarioResult,
    host: dict[str, Any],
    record: RunRecord,
    *,
    plot: bool,
) -> None:
    """Write a scenario's files; a file that cannot be written is noted
    in ``record`` and does not stop the scenarios after it."""
    path = output / f"{result.name}.json"
    try:
        record.written.append(write_json(output, result, host))
    except OSError as exc:
        document = {**result.as_dict(), "machine": host}
        record.failures.append(
            WriteFailure(result.name, path, _reason(exc), _spare(document))
        )
        return
    if plot and not result.skipped and result.variants:
        path = output / f"{result.name}.png"
        try:
            record.written.append(write_png(output, result))
        except OSError as exc:
            record.failures.append(
                WriteFailure(result.name, path, _reason(exc), None)
            )


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _spare(document: dict[str, Any]) -> Path | None:
    """The samples of a file that could not be written, in a temporary
    file instead: a measurement of minutes must not be thrown away."""
    try:
        with tempfile.NamedTemporaryFile(
            "w",
            prefix=f"mptls-bench-{document['scenario']}-",
            suffix=".json",
            delete=False,
            encoding="utf-8",
        ) as spare:
            spare.write(json.dumps(document, indent=2) + "\n")
    except OSError:
        return None
    return Path(spare.name)
