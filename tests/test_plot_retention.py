"""scripts/plot_retention.py draws the kept-token matrices the cache actually recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trimkv.analysis.retention import retention_matrix, run_token_by_token
from trimkv.cache import enable_eviction
from trimkv.gates import attach_gates, gate_config_for, load_gates, save_gates, set_gate_mode

REPO = Path(__file__).resolve().parents[1]
TEXT = "F Q C K | so the B 3 it C 1 then ? B 3 as K 4 the Q 8 and F 2 of > F 2 2 Q 8 0 C 1 1 K 4 5"


def test_plot_shows_the_recorded_evictions(synthetic_model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(synthetic_model_dir)
    config = gate_config_for(model, intermediate_size=16, bias_init=2.0)
    gates = attach_gates(model, config)
    with torch.no_grad():
        for gate in gates:
            gate.linear2.weight.normal_(std=0.5)
    save_gates(model, tmp_path / "gates", config, {})

    out = tmp_path / "plots"
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_retention.py"), "--model",
                             str(synthetic_model_dir), "--gates", str(tmp_path / "gates"), "--text", TEXT,
                             "--budget", "10", "--policies", "trimkv", "streamingllm", "--out", str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    images = sorted(p.name for p in out.glob("*.png"))
    assert images == ["layer0_head0.png", "layer0_head1.png", "layer1_head0.png", "layer1_head1.png"]
    assert all((out / name).read_bytes()[:4] == b"\x89PNG" for name in images)

    # The cache's own record, read independently of the plotting code.
    tokenizer = AutoTokenizer.from_pretrained(synthetic_model_dir)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    fresh = AutoModelForCausalLM.from_pretrained(synthetic_model_dir)
    enable_eviction(fresh)
    load_gates(fresh, tmp_path / "gates")
    set_gate_mode(fresh, "score")
    drawn = json.loads((out / "kept.json").read_text())
    for policy, params in (("trimkv", {}), ("streamingllm", {"n_sink": 4})):
        cache, log_beta = run_token_by_token(fresh, ids, policy, 10, **params)
        for layer_index, layer in enumerate(cache.layers):
            for head in range(2):
                expected = [[0] * ids.shape[1] for _ in layer.history]
                for step, positions in enumerate(layer.history):
                    for position in positions[0, head].tolist():
                        if position >= 0:
                            expected[step][position] = 1
                assert drawn[policy][layer_index][head] == expected, (policy, layer_index, head)
        evicted = sum(row.count(0) for row in drawn[policy][0][0][-1:])
        assert evicted == ids.shape[1] - 10  # the last step holds exactly the budget
    # The retention heatmap is beta^(t-i): 1 on the diagonal, decaying below it.
    retention = retention_matrix(log_beta[0])
    assert torch.allclose(retention[:, 5, 5], torch.ones(2))
    assert torch.allclose(retention[0, 9, 4], torch.exp(5 * log_beta[0][0, 4]))
    assert float(retention[0, 4, 9]) == 0.0
