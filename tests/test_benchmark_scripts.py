"""The benchmark scripts run end to end at small sizes and write the results they promise.

The speed and memory targets are judged from the numbers these scripts print on a quiet machine
(docs/training.md, docs/benchmarks.md). These tests check only their outputs and built-in checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_script(*arguments: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *arguments], cwd=REPO, capture_output=True, text=True, env=environment,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_bench_training_writes_every_path(tmp_path):
    out = tmp_path / "bench.json"
    result = run_script("scripts/bench_training.py", "--lengths", "256", "--repeats", "1",
                        "--paths", "plain", "efficient", "--out", str(out))
    record = json.loads(out.read_text())
    cells = {(row["path"], row["length"]) for row in record["results"]}
    assert cells == {("plain", 256), ("efficient", 256)}
    for row in record["results"]:
        assert row["step_seconds"] > 0
        assert row["peak_mib"] >= 0
        assert row["device"] == "cpu"
    assert "efficient step / plain forward+backward" in result.stdout
    assert not list(tmp_path.glob("*.tmp*"))


def test_decode_benchmark_writes_table_json_and_plot(tmp_path):
    run_script("scripts/benchmark.py", "--contexts", "96", "--batches", "1", "2", "--policies", "full",
               "streamingllm", "trimkv", "--budget", "32", "--buffer", "8", "--steps", "6", "--block", "3",
               "--threads", "1", "--out", str(tmp_path))
    record = json.loads((tmp_path / "benchmark.json").read_text())
    assert (tmp_path / "benchmark.md").read_text().count("\n") > 3
    assert (tmp_path / "benchmark.png").stat().st_size > 0
    text = json.dumps(record)
    for policy in ("full", "streamingllm", "trimkv"):
        assert policy in text
