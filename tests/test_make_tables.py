"""scripts/make_tables.py on a results folder with known values."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

KNOWN = {("gsm8k", "full", 512): 0.95, ("gsm8k", "streamingllm", 64): 0.10, ("gsm8k", "streamingllm", 128): 0.305,
         ("gsm8k", "trimkv", 64): 0.71, ("gsm8k", "trimkv", 128): 0.93, ("gsm8k", "snapkv", 128): 0.30,
         ("aime24", "full", 512): 0.655, ("aime24", "trimkv", 512): 0.61, ("aime24", "h2o", 512): 0.02}


def write_results(root: Path) -> None:
    for index, ((task, method, budget), accuracy) in enumerate(KNOWN.items()):
        folder = root / task / "qwen3" / f"{method}_b{budget}_buf128_seed0"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(
            {"task": task, "method": {"name": method}, "budget": budget, "accuracy": accuracy}))


def test_tables_and_plots_hold_the_known_values(tmp_path):
    write_results(tmp_path / "multirun")
    out = tmp_path / "tables"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tables.py"), str(tmp_path / "multirun"),
                             "--out", str(out)], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr

    gsm8k = (out / "gsm8k.md").read_text().splitlines()
    assert "| method | M=64 | M=128 |" in gsm8k
    assert "| full cache | 95.0 | 95.0 |" in gsm8k
    assert "| streamingllm | 10.0 | 30.5 |" in gsm8k
    assert "| snapkv | - | 30.0 |" in gsm8k
    assert "| trimkv | 71.0 | 93.0 |" in gsm8k
    # Row order follows the paper: heuristics first, TRIM-KV last.
    rows = [line.split("|")[1].strip() for line in gsm8k if line.startswith("| ") and "M=" not in line]
    assert rows == ["full cache", "streamingllm", "snapkv", "trimkv"]

    latex = (out / "gsm8k.tex").read_text()
    assert "Full cache & 95.0 & 95.0" in latex
    assert "TRIM-KV & \\textbf{71.0} & \\textbf{93.0}" in latex
    assert "StreamingLLM & 10.0 & 30.5" in latex
    aime = (out / "aime24.md").read_text()
    assert "| full cache | 65.5 |" in aime and "| h2o | 2.0 |" in aime and "| trimkv | 61.0 |" in aime
    for task in ("gsm8k", "aime24"):
        assert (out / f"{task}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_results_folder_is_an_error(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "make_tables.py"), str(tmp_path / "none"),
                             "--out", str(tmp_path / "t")], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and "results folder not found" in result.stderr
