"""The lm-eval plugin: offline GSM8K runs through lm-evaluation-harness with every eviction method.

The task reads real GSM8K records from the shared data folder through a local-file task YAML
written at test time (lm-eval resolves `data_files` as given, so the path must be absolute).
The model is a tiny random-weight Qwen3 with the real Qwen3 tokenizer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from helpers import POLICIES, POLICY_PARAMS
from trimkv.gates import attach_gates, gate_config_for, gate_state_dict, gates_of, save_gates
from trimkv.integrations.lm_eval import TrimKVLM

TASK = "tiny_gsm8k"
BUDGET, BUFFER = 24, 4
LIMIT = 3
TASK_MAX_GEN_TOKS = 5
THINK_END_TOKEN = 151668  # "</think>" in the Qwen3 tokenizer
BIASED_TOKEN = 1000

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_name: null
dataset_kwargs:
  data_files:
    test: {data_file}
  cache_dir: {cache_dir}
test_split: test
output_type: generate_until
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer.split('####')[-1].strip()}}}}"
generation_kwargs:
  until: ["Question:"]
  do_sample: false
  max_gen_toks: {max_gen_toks}
{extra_generation}metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_task(folder: Path, task: str, data_file: Path, extra_generation: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{task}.yaml").write_text(TASK_YAML.format(
        task=task, data_file=data_file, cache_dir=folder / "datasets-cache", max_gen_toks=TASK_MAX_GEN_TOKS,
        extra_generation=extra_generation,
    ))
    return folder


@pytest.fixture(scope="module")
def gsm8k_file(shared_dir) -> Path:
    return shared_dir / "data" / "gsm8k" / "test.jsonl"


@pytest.fixture(scope="module")
def task_folder(tmp_path_factory, gsm8k_file) -> Path:
    return write_task(tmp_path_factory.mktemp("lm-eval-tasks"), TASK, gsm8k_file)


@pytest.fixture(scope="module")
def task_manager(task_folder) -> TaskManager:
    return TaskManager(include_path=str(task_folder), include_defaults=False)


@pytest.fixture(scope="module")
def random_gates(qwen3_model_dir, tmp_path_factory) -> Path:
    model = AutoModelForCausalLM.from_pretrained(qwen3_model_dir)
    config = gate_config_for(model, intermediate_size=16, bias_init=2.0)
    attach_gates(model, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for tensor in gate_state_dict(model).values():
            tensor.copy_(torch.randn(tensor.shape, generator=generator))
    return save_gates(model, tmp_path_factory.mktemp("gates") / "gates", config, {"base_model": "tiny-qwen3"})


def make_lm(model_dir, method, gates=None, **kwargs) -> TrimKVLM:
    settings = {f"method.{name}": value for name, value in POLICY_PARAMS[method].items()}
    return TrimKVLM(pretrained=str(model_dir), method=method, budget=BUDGET, buffer=BUFFER,
                    gates=gates if method == "trimkv" else None, device="cpu", dtype="float32", batch_size=2,
                    **settings, **kwargs)


def responses(results: dict, task: str = TASK) -> list[str]:
    return [sample["resps"][0][0] for sample in results["samples"][task]]


@pytest.mark.parametrize("method", POLICIES)
def test_every_method_evaluates_gsm8k_under_eviction(method, qwen3_model_dir, task_manager, random_gates):
    lm = make_lm(qwen3_model_dir, method, gates=random_gates)
    results = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=task_manager, limit=LIMIT, log_samples=True)

    assert results["results"][TASK]["sample_len"] == LIMIT
    assert "exact_match,none" in results["results"][TASK]
    assert len(responses(results)) == LIMIT
    assert results["config"]["trimkv"]["method"]["name"] == method
    # Batches of 2 and 1: one fresh cache per generate call.
    assert len(lm.cache_stats) == 2
    for stats in lm.cache_stats:
        if method == "full":
            assert stats["evictions"] == 0
        else:
            assert stats["evictions"] > 0
            assert max(stats["retained_peak"]) <= BUDGET + BUFFER
    if method == "trimkv":
        assert len(gates_of(lm.model)) == len(lm.model.model.layers)


def test_thinking_output_is_cut_at_think_end_token(qwen3_model_dir, tmp_path, gsm8k_file):
    # A sequence bias makes greedy decoding alternate "</think>", BIASED_TOKEN, "</think>", ...
    # With the model's max_gen_toks=8 the output ends in BIASED_TOKEN, and HFLM keeps only what
    # follows the last "</think>"; with the task's 5 tokens it would end in "</think>".
    bias = f"  sequence_bias: [[[{THINK_END_TOKEN}], 100.0], [[{THINK_END_TOKEN}, {BIASED_TOKEN}], 200.0]]\n"
    folder = write_task(tmp_path / "tasks", "tiny_gsm8k_thinking", gsm8k_file, extra_generation=bias)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    tokenizer = AutoTokenizer.from_pretrained(qwen3_model_dir)
    expected = tokenizer.decode([BIASED_TOKEN]).strip()

    for enable_thinking in (True, False):
        lm = make_lm(qwen3_model_dir, "snapkv", enable_thinking=enable_thinking, think_end_token=THINK_END_TOKEN,
                     max_gen_toks=8)
        results = lm_eval.simple_evaluate(model=lm, tasks=["tiny_gsm8k_thinking"], task_manager=manager, limit=2,
                                          log_samples=True, apply_chat_template=True)
        prompts = [sample["arguments"][0][0] for sample in results["samples"]["tiny_gsm8k_thinking"]]

        assert responses(results, "tiny_gsm8k_thinking") == [expected, expected]
        assert all(stats["evictions"] > 0 for stats in lm.cache_stats)
        # Qwen3's chat template opens an empty thinking block only when thinking is disabled.
        for prompt in prompts:
            assert ("<think>\n\n</think>" in prompt) is not enable_thinking


def test_explicit_lengths_replace_defaults(qwen3_model_dir):
    lm = make_lm(qwen3_model_dir, "h2o", max_length=8192, max_gen_toks=4096)
    assert lm.max_length == 8192  # the tiny model's config sets 2048
    assert lm.max_gen_toks == 4096

    default = make_lm(qwen3_model_dir, "h2o")
    assert default.max_length == 2048
    assert default.max_gen_toks == 256


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"method": "snapkv"}, "method=snapkv needs a budget"),
        ({"method": "trimkv", "budget": 64}, "method=trimkv needs trained retention gates"),
        ({"method": "lru", "budget": 64}, "unknown eviction method 'lru'"),
        ({"method": "snapkv", "budget": 64, "method.window": 128}, "method.window=128 is larger than budget=64"),
        ({"method": "knorm", "budget": 0}, "budget must be a positive integer, got 0"),
        ({"method": "knorm", "budget": 64, "max_gen_toks": 4096, "max_length": 2048},
         "max_gen_toks=4096 leaves no room for the prompt within max_length=2048"),
    ],
)
def test_invalid_model_arguments_fail_before_loading(settings, message):
    with pytest.raises(ValueError, match=message):
        TrimKVLM(pretrained="/nonexistent/model", device="cpu", **settings)


def test_command_line_runs_trimkv_with_gates(qwen3_model_dir, task_folder, random_gates, tmp_path):
    script = Path(sys.executable).parent / "trimkv-lm-eval"
    assert script.is_file(), f"{script} is missing; reinstall the package with `pip install -e .[dev]`"
    model_args = (f"pretrained={qwen3_model_dir},method=trimkv,budget={BUDGET},buffer={BUFFER},gates={random_gates},"
                  "dtype=float32,max_gen_toks=6,max_length=1024")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [str(script), "--model", "trimkv", "--model_args", model_args, "--tasks", TASK,
         "--include_path", str(task_folder), "--limit", str(LIMIT), "--device", "cpu", "--batch_size", "2",
         "--output_path", str(tmp_path / "out"), "--log_samples"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    [results_file] = (tmp_path / "out").rglob("results_*.json")
    results = json.loads(results_file.read_text())
    assert results["results"][TASK]["sample_len"] == LIMIT
    assert results["config"]["model"] == "trimkv"
    assert results["config"]["trimkv"]["method"]["name"] == "trimkv"
    assert results["config"]["trimkv"]["budget"] == BUDGET
    [samples_file] = (tmp_path / "out").rglob(f"samples_{TASK}_*.jsonl")
    assert len(samples_file.read_text().splitlines()) == LIMIT
