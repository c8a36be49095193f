"""The embedded demo: train retention gates on the tiny model, then sweep five policies over budgets.

Runs on a CPU with no network:
1. `train.py` with its defaults (the tiny synthetic-task model and its recipe),
2. `evaluate.py` for the full cache and, as one Hydra multirun, for streamingllm, h2o, snapkv and
   trimkv at each budget,
3. prints the method x budget accuracy table and writes it (markdown and JSON) with an
   accuracy-vs-budget PNG under the output folder,
4. draws retention and kept-token heatmaps of one sample for the trained gates
   (scripts/plot_retention.py) at the smallest budget.

Usage: python scripts/demo.py [--budgets 48 64 128 192] [--limit 200] [--out outputs/demo]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from trimkv.evaluation.tables import collect_metrics, markdown_table, plot_accuracy_vs_budget  # noqa: E402
from trimkv.utils.io import atomic_write_json, atomic_write_text  # noqa: E402

POLICIES = ["streamingllm", "h2o", "snapkv", "trimkv"]
SNAPKV_WINDOW = 32  # conf/method/snapkv.yaml; SnapKV always keeps its window, so it must fit in a budget


def run(arguments: list[str]) -> None:
    print("+ " + " ".join(arguments), flush=True)
    subprocess.run([sys.executable, *arguments], cwd=REPO, check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=int, nargs="+", default=[48, 64, 128, 192],
                        help="KV budgets per layer and head to sweep (tokens)")
    parser.add_argument("--limit", type=int, default=200, help="evaluation problems per cell")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "demo", help="output folder")
    parser.add_argument("--train-overrides", nargs="*", default=[], help="extra Hydra overrides for train.py")
    parser.add_argument("--no-heatmaps", action="store_true", help="skip the retention heatmaps")
    args = parser.parse_args()
    if any(budget < SNAPKV_WINDOW for budget in args.budgets):
        parser.error(f"--budgets must be at least {SNAPKV_WINDOW} (SnapKV's observation window), got {args.budgets}")

    out = args.out.resolve()
    started = time.perf_counter()
    train_dir = out / "train"
    run(["train.py", f"hydra.run.dir={train_dir}", *args.train_overrides])
    train_seconds = time.perf_counter() - started

    sweep_dir = out / "sweep"
    # The gates are new, so results of an earlier demo in this folder must not be resumed.
    shutil.rmtree(sweep_dir, ignore_errors=True)
    common = [f"limit={args.limit}", "num_threads=1"]
    run(["evaluate.py", "method=full", f"hydra.run.dir={sweep_dir / 'full'}", *common])
    run(["evaluate.py", "-m", "method=" + ",".join(POLICIES), "budget=" + ",".join(map(str, args.budgets)),
         f"gates={train_dir / 'gates'}", f"hydra.sweep.dir={sweep_dir}", *common])
    if not args.no_heatmaps:
        run(["scripts/plot_retention.py", "--gates", str(train_dir / "gates"), "--budget", str(min(args.budgets)),
             "--out", str(out / "retention")])

    results = collect_metrics(sweep_dir)
    table = markdown_table(results, task="synthetic")
    plot = plot_accuracy_vs_budget(results, out / "accuracy_vs_budget.png", task="synthetic",
                                   title=f"synthetic task, tiny Qwen3, {args.limit} problems")
    total_seconds = time.perf_counter() - started
    atomic_write_text(out / "table.md", table + "\n")
    atomic_write_json(out / "results.json", {
        "budgets": args.budgets,
        "limit": args.limit,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(total_seconds, 1),
        "results": [{key: m[key] for key in ("method", "budget", "accuracy", "mean_retained", "peak_retained")}
                    for m in results],
    })
    print()
    print(f"Accuracy (%) on {args.limit} synthetic problems; gate training {train_seconds:.0f} s, total {total_seconds:.0f} s")
    print(table)
    print(f"\nwrote {out / 'table.md'}, {out / 'results.json'} and {plot}")


if __name__ == "__main__":
    main()
