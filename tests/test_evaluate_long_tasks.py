"""evaluate.py on LongMemEval (judge on 127.0.0.1) and LongProc: task metrics reach metrics.json."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from test_longmemeval import API_KEY, API_KEY_ENV, RECORDS, JudgeServer
from test_longproc_travel import write_travel_folder
from test_evaluate_cli import REPO
from trimkv.evaluation.runner import evaluate


def compose_evaluate(*overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


@pytest.fixture
def judge(monkeypatch):
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(API_KEY_ENV, API_KEY)
    server = JudgeServer()
    yield server
    server.stop()


def test_longmemeval_reports_judge_accuracy(qwen3_model_dir, qwen3_tokenizer_dir, judge, tmp_path):
    data = tmp_path / "longmemeval_oracle.json"
    data.write_text(json.dumps(RECORDS))
    cfg = compose_evaluate(
        "model=qwen3", f"model.path={qwen3_model_dir}", f"model.tokenizer={qwen3_tokenizer_dir}", "task=longmemeval",
        f"task.data_path={data}", f"task.judge.base_url={judge.base_url}", "task.judge.model=test-judge",
        f"task.judge.api_key_env={API_KEY_ENV}", f"task.judge.cache_dir={tmp_path / 'judge'}",
        "task.generation.max_new_tokens=4", "method=snapkv", "budget=64", "method.params.window=16",
        "limit=3", "num_threads=1",
    )
    metrics = evaluate(cfg, tmp_path / "run")
    assert metrics["judge_judged"] == 3 and metrics["judge_unjudged"] == 0
    assert len(judge.requests) == 3
    # A random-weight model never answers correctly, so the judge says no to every sample.
    assert metrics["accuracy"] == metrics["judge_accuracy"] == 0.0
    assert "containment" in metrics and "correct_rate" in metrics
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["judge_judged"] == 3
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert all("judge_accuracy" in sample["metrics"] for sample in samples)


def test_longproc_countdown_reports_task_metrics(qwen3_model_dir, qwen3_tokenizer_dir, shared_dir, tmp_path):
    cfg = compose_evaluate(
        "model=qwen3", f"model.path={qwen3_model_dir}", f"model.tokenizer={qwen3_tokenizer_dir}",
        "task=longproc_countdown", f"task.data_path={shared_dir / 'data' / 'longproc'}",
        "task.generation.max_new_tokens=4", "method=h2o", "budget=128", "limit=2", "num_threads=1",
    )
    metrics = evaluate(cfg, tmp_path / "run")
    assert metrics["num_problems"] == 2 and metrics["accuracy"] == 0.0
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert all(sample["prompt_tokens"] > 128 for sample in samples)  # the prompt overflows the budget
    assert all(sample["kv"]["retained_peak"] <= 129 for sample in samples)
    for name in samples[0]["metrics"]:
        assert name in metrics, name


def test_longproc_travel_planning_reports_task_metrics(qwen3_model_dir, qwen3_tokenizer_dir, tmp_path):
    data = write_travel_folder(tmp_path / "longproc")
    cfg = compose_evaluate(
        "model=qwen3", f"model.path={qwen3_model_dir}", f"model.tokenizer={qwen3_tokenizer_dir}",
        "task=longproc_travel_planning", f"task.data_path={data}", "task.tier=8k",
        "task.generation.max_new_tokens=4", "method=streamingllm", "budget=128", "limit=2", "num_threads=1",
    )
    metrics = evaluate(cfg, tmp_path / "run")
    assert metrics["num_problems"] == 2
    assert metrics["accuracy"] == 0.0
    # The four greedy tokens of the random-weight model contain no <Plan> block.
    assert metrics["extraction_rate"] == 0.0
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert sorted(sample["id"] for sample in samples) == ["3", "4"]  # the 8k records of the folder
    assert all(sample["prompt_tokens"] > 128 for sample in samples)
    for name in samples[0]["metrics"]:
        assert name in metrics, name
