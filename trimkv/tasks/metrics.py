"""Grade results that carry named per-sample metrics, and their averages over a run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from trimkv.tasks.base import GradeResult


@dataclass
class DetailedGradeResult(GradeResult):
    """A GradeResult with the task's named per-sample metrics.

    `metrics` maps a metric name to the sample's value, or to None when the sample has no value
    for it (an LLM judge that never answered). `error` is a short reason why the sample failed,
    for logs; it is None when the sample passed or when there is nothing to report.
    """

    metrics: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None


def summarize_metrics(results: Sequence[GradeResult]) -> dict[str, float | int | None]:
    """Average each named metric over the results that have a value for it.

    Returns `<name>` (the mean, or None when no result has a value) for every metric name, and
    `<name>_missing` (the number of results whose value is None) for names that some results
    lack. Results without a `metrics` field are skipped.
    """
    values: dict[str, list[float]] = {}
    missing: dict[str, int] = {}
    for result in results:
        for name, value in getattr(result, "metrics", {}).items():
            values.setdefault(name, [])
            if value is None:
                missing[name] = missing.get(name, 0) + 1
            else:
                values[name].append(float(value))

    summary: dict[str, float | int | None] = {}
    for name, observed in values.items():
        summary[name] = sum(observed) / len(observed) if observed else None
        if name in missing:
            summary[f"{name}_missing"] = missing[name]
    return summary
