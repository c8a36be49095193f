"""evaluate.py end to end on real GSM8K records, Hydra composition, and bad input."""

from __future__ import annotations

import json
import re
import subprocess
import time
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from transformers import AutoModelForCausalLM

from trimkv.evaluation.runner import evaluate
from trimkv.gates import attach_gates, gate_config_for, save_gates

REPO = Path(__file__).resolve().parents[1]
METHODS = ["full", "streamingllm", "h2o", "snapkv", "trimkv"]


def run_script(script, *overrides):
    return subprocess.run([sys.executable, str(REPO / script), *overrides], capture_output=True, text=True,
                          cwd=REPO, timeout=900)


def compose_evaluate(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


@pytest.fixture(scope="module")
def random_gates(qwen3_model_dir, tmp_path_factory):
    model = AutoModelForCausalLM.from_pretrained(qwen3_model_dir)
    config = gate_config_for(model, intermediate_size=16, bias_init=2.0)
    attach_gates(model, config)
    return save_gates(model, tmp_path_factory.mktemp("gates") / "gates", config, {"budget": 48})


def test_evaluate_gsm8k_records_with_every_method(qwen3_model_dir, qwen3_tokenizer_dir, shared_dir, random_gates, tmp_path):
    budget = 48
    result = run_script(
        "evaluate.py", "-m", "model=qwen3", f"model.path={qwen3_model_dir}", f"model.tokenizer={qwen3_tokenizer_dir}",
        "task=gsm8k", f"task.data_path={shared_dir / 'data' / 'gsm8k' / 'test.jsonl'}", "limit=3",
        "task.generation.n_samples=2", "task.generation.max_new_tokens=6", f"budget={budget}", "buffer=2",
        f"gates={random_gates}", "num_threads=1", "method=" + ",".join(METHODS), f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    job_dirs = {json.loads(path.read_text())["method"]["name"]: path.parent for path in tmp_path.rglob("metrics.json")}
    assert sorted(job_dirs) == sorted(METHODS)
    assert job_dirs["h2o"] == tmp_path / "gsm8k" / "qwen3" / "h2o_b48_buf2_seed0"

    for method, job_dir in job_dirs.items():
        metrics = json.loads((job_dir / "metrics.json").read_text())
        samples = [json.loads(line) for line in (job_dir / "samples.jsonl").read_text().splitlines()]
        assert metrics["method"]["name"] == method
        assert metrics["num_problems"] == 3 and metrics["num_samples"] == 6 == len(samples)
        assert 0.0 <= metrics["accuracy"] <= 1.0
        assert sorted((s["id"], s["sample"]) for s in samples) == [(i, k) for i in ("0", "1", "2") for k in (0, 1)]
        for sample in samples:
            assert set(sample) >= {"task", "id", "sample", "completion", "extracted", "correct", "tokens_generated", "kv"}
            assert 1 <= sample["tokens_generated"] <= 6
            prompt_tokens = sample["prompt_tokens"]
            assert prompt_tokens > budget + 2  # every prompt overflows the budget
            if method == "full":
                assert sample["kv"]["retained_peak"] >= prompt_tokens
            else:
                assert sample["kv"]["retained_peak"] <= budget + 2
                assert sample["kv"]["evictions"] > 0


def test_multirun_sweeps_methods_and_budgets(synthetic_model_dir, tmp_path):
    result = run_script("evaluate.py", "-m", f"model.path={synthetic_model_dir}", "limit=2", "num_threads=1",
                        "method=h2o,snapkv,streamingllm", "method.params.window=8", "budget=64,128",
                        f"hydra.sweep.dir={tmp_path}")
    # snapkv is the only method with a `window`; the override fails loudly for the others.
    assert result.returncode != 0 and "window" in result.stderr

    result = run_script("evaluate.py", "-m", f"model.path={synthetic_model_dir}", "limit=2", "num_threads=1",
                        "method=h2o,snapkv,streamingllm", "budget=64,128", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = [json.loads(p.read_text()) for p in sorted(tmp_path.rglob("metrics.json"))]
    assert sorted((m["method"]["name"], m["budget"]) for m in metrics) == sorted(
        (method, budget) for method in ("h2o", "snapkv", "streamingllm") for budget in (64, 128))


@pytest.mark.parametrize("override, listed", [("model=nonexistent", "tiny"), ("method=nonexistent", "snapkv"),
                                              ("task=nonexistent", "gsm8k")])
def test_unknown_group_option_lists_the_choices(override, listed):
    result = run_script("evaluate.py", override)
    assert result.returncode != 0
    assert "Could not find" in result.stderr and listed in result.stderr


@pytest.mark.parametrize("overrides, message", [
    (["budget=0"], "budget must be a positive integer, got 0"),
    (["budget=-5"], "budget must be a positive integer, got -5"),
    (["buffer=-1"], "buffer must be an integer >= 0, got -1"),
    (["method=snapkv", "budget=16", "method.params.window=32"], "method.window=32 is larger than budget=16"),
    (["method=streamingllm", "budget=4", "method.params.n_sink=4"], "n_sink=4"),
    (["method=trimkv"], "gates="),
    (["limit=0"], "limit must be a positive integer or null, got 0"),
])
def test_invalid_settings_fail_fast_with_the_fix(overrides, message, tmp_path):
    cfg = compose_evaluate(*overrides)
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluate(cfg, tmp_path)


def test_invalid_budget_exits_with_one_line(tmp_path):
    result = run_script("evaluate.py", "budget=0", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    errors = [line for line in (result.stdout + result.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "budget must be a positive integer, got 0 (e.g. budget=512)" in errors[0]


def test_gates_for_another_model_are_rejected(synthetic_model_dir, random_gates, tmp_path):
    cfg = compose_evaluate(f"model.path={synthetic_model_dir}", "method=trimkv", f"gates={random_gates}", "limit=1")
    with pytest.raises(ValueError, match="trained for a different model: hidden size 32 vs the model's 64"):
        evaluate(cfg, tmp_path)


def test_missing_data_file_and_malformed_line_are_named(synthetic_model_dir, tmp_path):
    cfg = compose_evaluate(f"model.path={synthetic_model_dir}", "task=gsm8k", f"task.data_path={tmp_path / 'none.jsonl'}")
    with pytest.raises(Exception, match="none.jsonl"):
        evaluate(cfg, tmp_path / "missing")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "1+1?", "answer": "#### 2"}\n{"question": oops}\n')
    cfg = compose_evaluate(f"model.path={synthetic_model_dir}", "task=gsm8k", f"task.data_path={broken}")
    with pytest.raises(Exception, match=r"broken.jsonl:2"):
        evaluate(cfg, tmp_path / "malformed")


def test_killed_run_resumes_without_losing_or_duplicating_samples(synthetic_model_dir, tmp_path):
    common = [f"model.path={synthetic_model_dir}", "limit=24", "batch_size=2", "num_threads=1", "method=h2o",
              "budget=32", "task.generation.do_sample=true", "task.generation.temperature=1.0"]
    reference_dir = tmp_path / "uninterrupted"
    assert run_script("evaluate.py", *common, f"hydra.run.dir={reference_dir}").returncode == 0

    resumed_dir = tmp_path / "resumed"
    process = subprocess.Popen([sys.executable, str(REPO / "evaluate.py"), *common, f"hydra.run.dir={resumed_dir}"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = resumed_dir / "samples.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not samples.exists() or len(samples.read_text().splitlines()) < 6):
        time.sleep(0.05)
    process.kill()
    process.wait()
    written = len(samples.read_text().splitlines())
    assert 6 <= written < 24, written  # killed mid-run
    # A torn last line, as a kill during a write leaves it.
    with samples.open("a") as handle:
        handle.write('{"task": "synthetic", "id": "synth')

    result = run_script("evaluate.py", *common, f"hydra.run.dir={resumed_dir}")
    assert result.returncode == 0, result.stderr[-2000:]
    reference = json.loads((reference_dir / "metrics.json").read_text())
    resumed = json.loads((resumed_dir / "metrics.json").read_text())
    assert resumed["samples_resumed"] >= 6
    for key in ("accuracy", "num_problems", "num_samples", "mean_retained", "peak_retained"):
        assert resumed[key] == reference[key], key

    def keyed(path):
        return {(r["id"], r["sample"]): r["completion"] for r in map(json.loads, path.read_text().splitlines())}

    resumed_records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(resumed_records) == 24 == len({(r["id"], r["sample"]) for r in resumed_records})
    assert keyed(samples) == keyed(reference_dir / "samples.jsonl")


def test_rerun_with_other_settings_in_same_folder_is_rejected(synthetic_model_dir, tmp_path):
    cfg = compose_evaluate(f"model.path={synthetic_model_dir}", "limit=2", "num_threads=1")
    evaluate(cfg, tmp_path)
    changed = compose_evaluate(f"model.path={synthetic_model_dir}", "limit=2", "num_threads=1", "budget=99")
    with pytest.raises(ValueError, match="different settings.*budget"):
        evaluate(changed, tmp_path)


def save_random_gates(model_dir, folder, seed):
    from trimkv.gates import attach_gates, gate_config_for, save_gates

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = gate_config_for(model, intermediate_size=16, bias_init=2.0)
    gates = attach_gates(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gate in gates:
            gate.linear2.weight.copy_(torch.randn(gate.linear2.weight.shape, generator=generator))
    save_gates(model, folder, config, {})


def test_rerun_with_retrained_gates_rejected(synthetic_model_dir, tmp_path):
    gates = tmp_path / "gates"
    save_random_gates(synthetic_model_dir, gates, seed=0)
    overrides = [f"model.path={synthetic_model_dir}", "limit=1", "num_threads=1", "method=trimkv", "budget=16",
                 f"gates={gates}"]
    evaluate(compose_evaluate(*overrides), tmp_path / "run")
    evaluate(compose_evaluate(*overrides), tmp_path / "run")  # Same gates: the rerun resumes.

    save_random_gates(synthetic_model_dir, gates, seed=1)
    with pytest.raises(ValueError, match="different settings.*gates_sha256"):
        evaluate(compose_evaluate(*overrides), tmp_path / "run")


def test_wandb_offline_run_records_metrics(synthetic_model_dir, tmp_path, monkeypatch):
    from test_training_wandb import read_wandb_records

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = compose_evaluate(f"model.path={synthetic_model_dir}", "limit=2", "num_threads=1", "logger=wandb",
                           "logger.project=trimkv-test", "method=h2o", "budget=32")
    metrics = evaluate(cfg, tmp_path)
    logs = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(logs) == 1
    records = read_wandb_records(logs[0])
    summary = {item.key: json.loads(item.value_json) for record in records
               if record.WhichOneof("record_type") == "summary" for item in record.summary.update}
    assert summary["accuracy"] == metrics["accuracy"]
    assert summary["num_problems"] == 2
    logged = {item.key or "/".join(item.nested_key) for record in records
              if record.WhichOneof("record_type") == "history" for item in record.history.item}
    assert "samples/_type" in logged  # the sample table
    config = {item.key: item.value_json for record in records if record.WhichOneof("record_type") == "run"
              for item in record.run.config.update}
    assert '"h2o"' in config["method"] and config["budget"] == "32"
