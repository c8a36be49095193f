"""Paper-style tables and plots from evaluation results.

Reads every metrics.json below a multirun folder (or the runs of a W&B project) and writes, per
task, a methods x budgets table with the full-cache row in markdown and LaTeX, and an
accuracy-vs-budget PNG.

Usage:
    python scripts/make_tables.py multirun/evaluate/math_tables --out tables/math
    python scripts/make_tables.py --wandb <entity>/<project> --out tables/math
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trimkv.evaluation.tables import (  # noqa: E402
    collect_metrics,
    latex_table,
    markdown_table,
    plot_accuracy_vs_budget,
    tasks_of,
)
from trimkv.utils.io import atomic_write_text  # noqa: E402


def metrics_from_wandb(project: str) -> list[dict]:
    """Summary metrics of every finished evaluate.py run in a W&B project."""
    import wandb

    results = []
    for run in wandb.Api().runs(project, filters={"jobType": "evaluate", "state": "finished"}):
        config, summary = run.config, run.summary
        if "accuracy" not in summary:
            continue
        method = config.get("method", {})
        results.append({"task": config.get("task", {}).get("name"), "method": {"name": method.get("name")},
                        "budget": config.get("budget"), "accuracy": summary["accuracy"], "run_dir": run.path})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", nargs="?", type=Path, help="a multirun (or run) folder holding metrics.json files")
    parser.add_argument("--wandb", metavar="ENTITY/PROJECT", help="read results from a W&B project instead")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the tables and plots")
    args = parser.parse_args()
    if (args.root is None) == (args.wandb is None):
        parser.error("give either a results folder or --wandb ENTITY/PROJECT")
    if args.root is not None and not args.root.is_dir():
        parser.error(f"results folder not found: {args.root}")

    results = metrics_from_wandb(args.wandb) if args.wandb else collect_metrics(args.root)
    if not results:
        parser.error(f"no metrics.json found below {args.root}" if args.root else f"no finished runs in {args.wandb}")
    for task in tasks_of(results):
        markdown = markdown_table(results, task)
        atomic_write_text(args.out / f"{task}.md", f"Accuracy (%) on {task}\n\n{markdown}\n")
        atomic_write_text(args.out / f"{task}.tex", latex_table(results, task, caption=f"Accuracy (\\%) on {task}.") + "\n")
        plot_accuracy_vs_budget(results, args.out / f"{task}.png", task, title=task)
        print(f"## {task}\n\n{markdown}\n")
    print(f"wrote tables and plots for {len(tasks_of(results))} task(s) to {args.out}")


if __name__ == "__main__":
    main()
