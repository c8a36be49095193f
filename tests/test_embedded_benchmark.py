"""A reduced embedded benchmark: gate training and the sweep on the committed tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_reduced_demo_separates_trimkv_from_recency(tmp_path):
    out = tmp_path / "demo"
    # 120 gate-training steps (the demo trains 750) and 60 problems per cell (the demo uses 200).
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "demo.py"), "--budgets", "64", "192", "--limit", "60",
                             "--out", str(out), "--train-overrides", "data.num_examples=960"],
                            capture_output=True, text=True, cwd=REPO, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]

    results = json.loads((out / "results.json").read_text())["results"]
    accuracy = {(r["method"]["name"], r["budget"]): r["accuracy"] for r in results}
    full = next(value for (method, _), value in accuracy.items() if method == "full")
    assert full >= 0.95
    assert accuracy[("trimkv", 64)] > accuracy[("streamingllm", 64)]
    # At 64 tokens no recent window reaches back to the needed assignments.
    assert accuracy[("streamingllm", 64)] <= 0.05
    for method in ("streamingllm", "h2o", "snapkv", "trimkv"):
        assert (method, 192) in accuracy
    assert "| trimkv |" in (out / "table.md").read_text()
    assert (out / "accuracy_vs_budget.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "retention").glob("*.png"))[:1] == ["layer0_head0.png"]
