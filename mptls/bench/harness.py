"""Interleaved A/B runs, their statistics and the goals they are held to.

The machines these benchmarks run on are noisy: one figure can move by a
factor of four from one run to the next. So no figure stands alone.
Every variant of a scenario runs once per round, in the same order
(A B C, A B C, ...), and each comparison is the median of the per-round
ratios against the baseline of the same round, with its spread. Slow
drifts of the machine then hit both sides of a ratio alike.

This module measures nothing itself and must never sleep or read a
clock: the variants time themselves.
"""

from __future__ import annotations

import inspect
import statistics
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

SCHEMA = "mptls-bench/1"

Measure = Callable[[], float | Awaitable[float]]


@dataclass(frozen=True, slots=True)
class Variant:
    """One contender of a scenario; ``measure`` returns one figure."""

    name: str
    measure: Measure
    description: str = ""


@dataclass(frozen=True, slots=True)
class Spread:
    """Median, lowest and highest of a set of figures."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            return cls(float("nan"), float("nan"), float("nan"))
        return cls(statistics.median(values), min(values), max(values))

    @property
    def relative(self) -> float:
        """(high - low) / median: 0 for a steady figure."""
        if not self.median:
            return float("nan")
        return (self.high - self.low) / abs(self.median)

    def as_dict(self) -> dict[str, float]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "spread": self.relative,
        }


@dataclass(frozen=True, slots=True)
class VariantResult:
    """Every figure one variant gave, round by round."""

    name: str
    samples: tuple[float, ...]
    description: str = ""

    @property
    def spread(self) -> Spread:
        return Spread.of(self.samples)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "samples": list(self.samples),
            **self.spread.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class Ratio:
    """``variant / baseline``, round by round; above 1 means "more"."""

    variant: str
    baseline: str
    values: tuple[float, ...]

    @property
    def spread(self) -> Spread:
        return Spread.of(self.values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "baseline": self.baseline,
            "values": list(self.values),
            **self.spread.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class Goal:
    """A target from the issue and whether this run met it.

    ``met`` is ``None`` when the run could not judge (quick mode, or the
    figure is missing).
    """

    name: str
    value: float | None
    target: str
    met: bool | None
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "target": self.target,
            "met": self.met,
            "note": self.note,
        }


def at_least(
    name: str, value: float | None, threshold: float, *, judge: bool = True
) -> Goal:
    """A goal met when ``value >= threshold``."""
    met = None if value is None or not judge else value >= threshold
    return Goal(name, value, f">= {threshold:g}", met)


def at_most(
    name: str, value: float | None, threshold: float, *, judge: bool = True
) -> Goal:
    """A goal met when ``value <= threshold``."""
    met = None if value is None or not judge else value <= threshold
    return Goal(name, value, f"<= {threshold:g}", met)


@dataclass
class ScenarioResult:
    """What one scenario found: figures, ratios, goals and notes."""

    name: str
    title: str
    unit: str
    higher_is_better: bool
    rounds: int
    quick: bool
    variants: list[VariantResult] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    skipped: str | None = None

    def variant(self, name: str) -> VariantResult:
        for result in self.variants:
            if result.name == name:
                return result
        raise KeyError(name)

    def ratio(self, variant: str, baseline: str) -> Ratio:
        for ratio in self.ratios:
            if ratio.variant == variant and ratio.baseline == baseline:
                return ratio
        raise KeyError((variant, baseline))

    def add_ratio(self, variant: str, baseline: str) -> Ratio:
        """Per-round ratios of two variants already measured."""
        ratio = paired_ratio(self.variant(variant), self.variant(baseline))
        self.ratios.append(ratio)
        return ratio

    def as_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "scenario": self.name,
            "title": self.title,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "rounds": self.rounds,
            "quick": self.quick,
            "skipped": self.skipped,
            "variants": [variant.as_dict() for variant in self.variants],
            "ratios": [ratio.as_dict() for ratio in self.ratios],
            "goals": [goal.as_dict() for goal in self.goals],
            "notes": list(self.notes),
            "details": self.details,
        }


def paired_ratio(variant: VariantResult, baseline: VariantResult) -> Ratio:
    """Round ``i`` of ``variant`` over round ``i`` of ``baseline``."""
    values = tuple(
        a / b
        for a, b in zip(variant.samples, baseline.samples, strict=False)
        if b
    )
    return Ratio(variant.name, baseline.name, values)


async def _measure_once(variant: Variant) -> float:
    outcome = variant.measure()
    if inspect.isawaitable(outcome):
        outcome = await outcome
    value = float(outcome)
    if not value > 0:
        raise ValueError(f"{variant.name} measured {value!r}")
    return value


async def interleave(
    variants: Sequence[Variant],
    rounds: int,
    *,
    warmup: bool = True,
    on_sample: Callable[[str, int, float], None] | None = None,
) -> list[VariantResult]:
    """Run every variant once per round, A B C A B C ...

    A first unrecorded round (``warmup``) lets imports, caches and TCP
    settle, so that round 1 is not the odd one out.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    if warmup:
        for variant in variants:
            await _measure_once(variant)
    samples: dict[str, list[float]] = {v.name: [] for v in variants}
    for number in range(rounds):
        for variant in variants:
            value = await _measure_once(variant)
            samples[variant.name].append(value)
            if on_sample is not None:
                on_sample(variant.name, number, value)
    return [
        VariantResult(v.name, tuple(samples[v.name]), v.description)
        for v in variants
    ]
