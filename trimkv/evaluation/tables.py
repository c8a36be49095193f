"""Collect evaluation results from run folders into method x budget tables and accuracy plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from trimkv.utils.io import atomic_write_bytes

FULL = "full"
LATEX_NAMES = {"streamingllm": "StreamingLLM", "h2o": "H2O", "snapkv": "SnapKV", "trimkv": "TRIM-KV",
               "rkv": "R-KV", "keydiff": "KeyDiff", "knorm": "K-norm"}


def collect_metrics(root: str | Path) -> list[dict[str, Any]]:
    """Every `metrics.json` below `root` (a run or multirun folder), sorted by path."""
    results = []
    for path in sorted(Path(root).rglob("metrics.json")):
        metrics = json.loads(path.read_text())
        metrics["run_dir"] = str(path.parent)
        results.append(metrics)
    return results


def tasks_of(results: Iterable[dict[str, Any]]) -> list[str]:
    return sorted({str(metrics.get("task")) for metrics in results})


def _method_name(metrics: dict[str, Any]) -> str:
    method = metrics.get("method")
    return method.get("name") if isinstance(method, dict) else str(method)


def accuracy_grid(results: Iterable[dict[str, Any]], task: str | None = None):
    """Return (methods, budgets, grid, full) for one task.

    grid[method][budget] is the accuracy; the full cache (budget-independent) is returned apart as
    `full` (None when missing). When a method was run more than once at a budget, the last run wins.
    """
    grid: dict[str, dict[int, float]] = defaultdict(dict)
    full = None
    for metrics in results:
        if task is not None and metrics.get("task") != task:
            continue
        name = _method_name(metrics)
        if name == FULL:
            full = metrics["accuracy"]
            continue
        grid[name][int(metrics["budget"])] = metrics["accuracy"]
    budgets = sorted({budget for row in grid.values() for budget in row})
    order = ["streamingllm", "h2o", "snapkv", "trimkv"]
    methods = [m for m in order if m in grid] + sorted(m for m in grid if m not in order)
    return methods, budgets, dict(grid), full


def markdown_table(results: Iterable[dict[str, Any]], task: str | None = None, percent: bool = True) -> str:
    """A markdown table, methods as rows and budgets as columns, with a full-cache row."""
    methods, budgets, grid, full = accuracy_grid(results, task)
    scale = 100.0 if percent else 1.0
    header = "| method | " + " | ".join(f"M={budget}" for budget in budgets) + " |"
    lines = [header, "|---|" + "---|" * len(budgets)]
    if full is not None:
        lines.append("| full cache | " + " | ".join(f"{full * scale:.1f}" for _ in budgets) + " |")
    for method in methods:
        cells = [f"{grid[method][b] * scale:.1f}" if b in grid[method] else "-" for b in budgets]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def latex_table(results: Iterable[dict[str, Any]], task: str | None = None, caption: str | None = None) -> str:
    """A booktabs LaTeX table (accuracy in %), the best method per budget in bold."""
    methods, budgets, grid, full = accuracy_grid(results, task)
    lines = ["\\begin{table}[t]", "\\centering", "\\begin{tabular}{l" + "r" * len(budgets) + "}", "\\toprule",
             "Method & " + " & ".join(f"$M={budget}$" for budget in budgets) + " \\\\", "\\midrule"]
    if full is not None:
        lines.append("Full cache & " + " & ".join(f"{100 * full:.1f}" for _ in budgets) + " \\\\")
        lines.append("\\midrule")
    best = {b: max((grid[m][b] for m in methods if b in grid[m]), default=None) for b in budgets}
    for method in methods:
        cells = []
        for budget in budgets:
            if budget not in grid[method]:
                cells.append("--")
                continue
            value = f"{100 * grid[method][budget]:.1f}"
            cells.append(f"\\textbf{{{value}}}" if grid[method][budget] == best[budget] else value)
        lines.append(f"{LATEX_NAMES.get(method, method)} & " + " & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    if caption:
        lines.append(f"\\caption{{{caption}}}")
    lines.append("\\end{table}")
    return "\n".join(lines)


def plot_accuracy_vs_budget(results: Iterable[dict[str, Any]], path: str | Path, task: str | None = None,
                            title: str | None = None) -> Path:
    """Write a PNG of accuracy against budget (log2 x axis), one line per method, full cache dashed."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods, budgets, grid, full = accuracy_grid(list(results), task)
    figure, axis = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    for method in methods:
        xs = [b for b in budgets if b in grid[method]]
        axis.plot(xs, [100 * grid[method][b] for b in xs], marker="o", label=method)
    if full is not None:
        axis.axhline(100 * full, color="black", linestyle="--", linewidth=1, label="full cache")
    if budgets:
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
    axis.set_xlabel("KV budget per layer and head (tokens)")
    axis.set_ylabel("accuracy (%)")
    axis.set_ylim(-2, 102)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
