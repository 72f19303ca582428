"""Showing and keeping results: rich tables, JSON files, optional PNGs.

The JSON file of a scenario holds every sample, so that a reader can
recompute any median or ratio; the table shows medians with their
spread. matplotlib is an optional extra (``pip install mptls[plot]``):
without it, asking for a plot is an error the user can act on. Nothing
here measures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from mptls.bench.harness import Goal, ScenarioResult
from mptls.errors import ConfigurationError


def _figure(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def _verdict(goal: Goal, *, quick: bool) -> str:
    if goal.met is None:
        if quick:
            why = "quick run"
        elif goal.value is None or math.isnan(goal.value):
            why = "no figure"
        else:
            why = "shown for comparison"
        return f"[dim]not judged ({why})[/dim]"
    return "[green]met[/green]" if goal.met else "[red]not met[/red]"


def render(console: Console, result: ScenarioResult) -> None:
    """One scenario: variants, ratios, goals, notes."""
    if result.skipped:
        console.print(
            f"[bold]{result.title}[/bold]: skipped: {result.skipped}"
        )
        return
    better = "higher" if result.higher_is_better else "lower"
    table = Table(
        title=f"{result.title} ({result.unit}, {better} is better; "
        f"{result.rounds} interleaved "
        f"{'round' if result.rounds == 1 else 'rounds'})",
        title_justify="left",
    )
    table.add_column("variant")
    table.add_column("median", justify="right")
    table.add_column("min", justify="right")
    table.add_column("max", justify="right")
    table.add_column("spread", justify="right")
    table.add_column("what")
    for variant in result.variants:
        spread = variant.spread
        table.add_row(
            variant.name,
            _figure(spread.median),
            _figure(spread.low),
            _figure(spread.high),
            f"{spread.relative:.0%}",
            variant.description,
        )
    console.print(table)

    if result.ratios:
        ratios = Table(title="ratios, round by round", title_justify="left")
        for column in ("ratio", "median", "min", "max"):
            ratios.add_column(
                column, justify="left" if column == "ratio" else "right"
            )
        for ratio in result.ratios:
            spread = ratio.spread
            ratios.add_row(
                f"{ratio.variant} / {ratio.baseline}",
                f"{spread.median:.3f}",
                f"{spread.low:.3f}",
                f"{spread.high:.3f}",
            )
        console.print(ratios)
    for goal in result.goals:
        console.print(
            f"goal: {goal.name}: {_figure(goal.value)} "
            f"(target {goal.target}) {_verdict(goal, quick=result.quick)}"
            + (f" - {goal.note}" if goal.note else "")
        )
    for note in result.notes:
        console.print(f"note: {note}")


def write_json(
    directory: Path, result: ScenarioResult, machine: dict[str, Any]
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.name}.json"
    document = {**result.as_dict(), "machine": machine}
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return path


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_png(directory: Path, result: ScenarioResult) -> Path:
    """A box of samples per variant (needs the ``plot`` extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as exc:
        raise ConfigurationError(
            "--plot needs matplotlib: pip install 'mptls[plot]'"
        ) from exc
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{result.name}.png"
    figure, axes = pyplot.subplots(figsize=(8, 4.5))
    names = [variant.name for variant in result.variants]
    axes.boxplot([variant.samples for variant in result.variants])
    axes.set_xticks(range(1, len(names) + 1), names, rotation=30, ha="right")
    axes.set_ylabel(result.unit)
    axes.set_title(result.title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path
