"""Tests for the GSM8K, MATH-500 and AIME24 tasks on the real benchmark files.

The data files live outside the repository, in `shared/data` next to it, and the Qwen3
tokenizer in `shared/models/qwen3-tokenizer`. conftest.py turns on the Hugging Face offline
mode, so nothing here touches the network.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from trimkv.tasks.base import Sample, build_task
from trimkv.tasks.grading import (
    answer_region,
    extract_gsm8k_answer,
    is_equivalent,
    last_boxed,
    last_number,
    pass_at_1,
)
from trimkv.tasks.math import AIME24Task, GSM8KTask, Math500Task
from trimkv.utils.io import DataFileError

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"
DATA_DIR = SHARED_DIR / "data"
TOKENIZER_DIR = SHARED_DIR / "models" / "qwen3-tokenizer"
CONF_DIR = REPO_ROOT / "conf" / "task"

TASKS = {"gsm8k": GSM8KTask, "math500": Math500Task, "aime24": AIME24Task}
RECORD_COUNTS = {"gsm8k": 1319, "math500": 500, "aime24": 30}

# The R-KV math prompt (Zefan-Cai/R-KV, HuggingFace/run_math.py) after str.format, written
# out here independently of the configs so that a changed byte in a config fails a test.
RKV_PROMPT = (
    "You are given a math problem.\n\nProblem: {question}\n\n You need to solve the problem step "
    "by step. First, you need to provide the chain-of-thought, then provide the final answer.\n\n "
    "Provide the final answer in the format: Final answer:  \\boxed{{}}"
)


def require_path(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test input not found: {path}; these tests need the shared data folder next to the repository")
    return path


def task_config(name: str, data_path: Path | None = None):
    config = OmegaConf.load(CONF_DIR / f"{name}.yaml")
    if data_path is not None:
        config.data_path = str(data_path)
    return config


def data_file(name: str) -> Path:
    return require_path(DATA_DIR / name / "test.jsonl")


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple]:
    """Each task built from its config and reading the shared file, with all its samples."""
    result = {}
    for name in TASKS:
        task = build_task(task_config(name, data_file(name)))
        result[name] = (task, task.load())
    return result


def boxed_completion(answer: str) -> str:
    return f"<think>\nLet me work this out.\n</think>\n\nThe steps are done.\n\nFinal answer:  \\boxed{{{answer}}}"


def changed_answer(gold: str, other_golds: list[str]) -> str:
    """A wrong answer for `gold`: the number plus one, or the next different gold in the file."""
    if re.fullmatch(r"-?\d+(\.\d+)?", gold):
        return str(Decimal(gold) + 1)
    start = other_golds.index(gold)
    for offset in range(1, len(other_golds)):
        candidate = other_golds[(start + offset) % len(other_golds)]
        if candidate.replace(" ", "") != gold.replace(" ", ""):
            return candidate
    raise AssertionError(f"no other gold answer differs from {gold!r}")


# Loading


@pytest.mark.parametrize("name", list(TASKS))
def test_loader_parses_every_record(loaded, name):
    task, samples = loaded[name]

    assert isinstance(task, TASKS[name])
    assert len(samples) == RECORD_COUNTS[name]
    assert len({sample.id for sample in samples}) == len(samples)
    for sample in samples:
        assert sample.question.strip(), sample.id
        assert sample.answer.strip(), sample.id


def test_gsm8k_gold_is_number_after_hashes(loaded):
    _, samples = loaded["gsm8k"]

    assert samples[0].id == "0"
    assert samples[0].answer == "18"
    assert samples[0].meta["solution"].endswith("#### 18")
    for sample in samples:
        assert re.fullmatch(r"-?\d+", sample.answer), (sample.id, sample.answer)
    # The file writes this answer as "#### 1,450,000", and the loader must drop the commas.
    assert "1450000" in {sample.answer for sample in samples}


def test_math500_and_aime24_fields(loaded):
    _, math_samples = loaded["math500"]
    _, aime_samples = loaded["aime24"]

    assert math_samples[0].id == "0"
    assert math_samples[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math_samples[0].meta["subject"] == "Precalculus"
    assert aime_samples[0].id == "60"
    assert aime_samples[0].answer == "204"
    assert aime_samples[7].answer == "025"
    assert aime_samples[0].meta["url"].endswith("2024_AIME_I_Problems/Problem_1")


def test_limit_returns_first_problems(loaded):
    task, samples = loaded["math500"]

    first = task.load(limit=5)
    assert [sample.id for sample in first] == [sample.id for sample in samples[:5]]
    assert len(task.load(limit=10_000)) == len(samples)


@pytest.mark.parametrize("limit", [0, -1, 2.5, True])
def test_limit_rejects_invalid_value(loaded, limit):
    task, _ = loaded["aime24"]

    with pytest.raises(ValueError, match=re.escape(repr(limit))):
        task.load(limit=limit)


def test_relative_data_path_from_working_directory(monkeypatch):
    monkeypatch.chdir(require_path(DATA_DIR))

    samples = GSM8KTask(task_config("gsm8k", Path("gsm8k/test.jsonl"))).load(limit=2)

    assert [sample.answer for sample in samples] == ["18", "3"]


def test_capitalised_hub_fields(tmp_path):
    # Maxwell-Jia/AIME_2024 on the Hub spells its fields ID, Problem, Solution, Answer.
    path = tmp_path / "aime.jsonl"
    record = {"ID": "2024-I-1", "Problem": "Find x.", "Solution": "x is 204.", "Answer": 204}
    path.write_text(json.dumps(record) + "\n")

    [sample] = AIME24Task(task_config("aime24", path)).load()

    assert sample.id == "2024-I-1"
    assert sample.question == "Find x."
    assert sample.answer == "204"
    assert sample.meta["solution"] == "x is 204."


def test_hub_loader_reads_configured_split(monkeypatch):
    import datasets
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(
            [{"question": "One plus one?", "answer": "1 + 1 = 2\n#### 2"}, {"question": "Two?", "answer": "#### 2"}]
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    samples = build_task(task_config("gsm8k")).load(limit=1)

    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(sample.id, sample.answer) for sample in samples] == [("0", "2")]


def test_hub_offline_error_suggests_data_path(monkeypatch):
    import datasets
    import huggingface_hub.constants

    # The offline flags are read when these modules are imported, so set them directly too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = task_config("aime24")
    config.hub_path = "trimkv-tests/no-such-dataset"

    with pytest.raises(DataFileError) as error:
        build_task(config).load()

    assert "trimkv-tests/no-such-dataset" in str(error.value)
    assert "task.data_path=" in str(error.value)


# Bad input


def test_missing_data_file_names_path(tmp_path):
    path = tmp_path / "absent" / "test.jsonl"

    with pytest.raises(DataFileError, match=re.escape(str(path))):
        GSM8KTask(task_config("gsm8k", path)).load()


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "math.jsonl"
    good = json.dumps({"problem": "1+1?", "answer": "2"})
    path.write_text(f"{good}\n{good}\n{{\"problem\": \"broken\n")

    with pytest.raises(DataFileError, match=re.escape(f"{path}:3")):
        Math500Task(task_config("math500", path)).load()


def test_missing_field_names_record_and_field(tmp_path):
    path = tmp_path / "math.jsonl"
    lines = [json.dumps({"problem": "1+1?", "answer": "2"}), json.dumps({"problem": "2+2?"})]
    path.write_text("\n".join(lines) + "\n")

    with pytest.raises(DataFileError) as error:
        Math500Task(task_config("math500", path)).load()

    message = str(error.value)
    assert f"{path}: record 2" in message
    assert "'answer'" in message


def test_gsm8k_solution_without_hashes_rejected(tmp_path):
    path = tmp_path / "gsm8k.jsonl"
    path.write_text(json.dumps({"question": "Q?", "answer": "The answer is 4."}) + "\n")

    with pytest.raises(DataFileError, match="record 1.*####"):
        GSM8KTask(task_config("gsm8k", path)).load()


def test_duplicate_ids_rejected(tmp_path):
    path = tmp_path / "aime.jsonl"
    record = json.dumps({"id": 7, "problem": "P", "answer": "1"})
    path.write_text(f"{record}\n{record}\n")

    with pytest.raises(DataFileError, match="'7'"):
        AIME24Task(task_config("aime24", path)).load()


# Configs and prompts


@pytest.mark.parametrize(
    ("name", "hub", "n_samples", "max_length"),
    [
        ("gsm8k", ("openai/gsm8k", "main", "test"), 8, 16384),
        ("math500", ("HuggingFaceH4/MATH-500", None, "test"), 8, 16384),
        ("aime24", ("Maxwell-Jia/AIME_2024", None, "train"), 64, 32768),
    ],
)
def test_config_follows_paper_protocol(name, hub, n_samples, max_length):
    config = task_config(name)
    generation = config.generation

    assert config.name == name
    assert config.data_path is None
    assert (config.hub_path, config.hub_config, config.split) == hub
    assert (TASKS[name].hub_path, TASKS[name].hub_config, TASKS[name].split) == hub
    assert config.prompt_template.format(question="{question}") == RKV_PROMPT.format(question="{question}")
    assert config.system_prompt is None
    assert config.chat_template is True
    assert config.enable_thinking is True
    assert generation.do_sample is True
    assert generation.temperature == 0.6
    assert generation.top_p == 0.95
    assert generation.top_k is None
    assert generation.n_samples == n_samples
    assert generation.max_length == max_length
    assert generation.max_new_tokens is None


@pytest.fixture(scope="module")
def qwen3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(require_path(TOKENIZER_DIR))


def test_prompt_uses_qwen3_chat_template_with_thinking(loaded, qwen3_tokenizer):
    task, samples = loaded["math500"]
    # A problem with LaTeX braces, which str.format must leave alone.
    sample = next(sample for sample in samples if "\\frac{" in sample.question)

    prompt = task.format_prompt(sample, qwen3_tokenizer)

    expected_user_text = RKV_PROMPT.format(question=sample.question)
    assert prompt == f"<|im_start|>user\n{expected_user_text}<|im_end|>\n<|im_start|>assistant\n"
    # With thinking off the Qwen3 template closes an empty think block instead.
    assert "<think>" not in prompt


def test_prompt_with_thinking_off_closes_think_block(loaded, qwen3_tokenizer):
    config = task_config("aime24", data_file("aime24"))
    config.enable_thinking = False
    task = build_task(config)
    sample = loaded["aime24"][1][0]

    prompt = task.format_prompt(sample, qwen3_tokenizer)

    assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


# Grading against every gold answer


@pytest.mark.parametrize("name", list(TASKS))
def test_gold_answers_grade_correct(loaded, name):
    task, samples = loaded[name]

    failures = [
        (sample.id, sample.answer, result.extracted)
        for sample in samples
        if not (result := task.grade(boxed_completion(sample.answer), sample)).correct
    ]

    assert failures == []


def test_gsm8k_reference_solutions_grade_correct(loaded):
    # The reference solutions end in GSM8K's own "#### 1,450,000" style, with no \boxed.
    task, samples = loaded["gsm8k"]

    failures = [sample.id for sample in samples if not task.grade(sample.meta["solution"], sample).correct]

    assert failures == []


@pytest.mark.parametrize("name", list(TASKS))
def test_changed_answers_grade_wrong(loaded, name):
    task, samples = loaded[name]
    golds = [sample.answer for sample in samples]

    accepted = []
    for sample in samples:
        wrong = changed_answer(sample.answer, golds)
        if task.grade(boxed_completion(wrong), sample).correct:
            accepted.append((sample.id, sample.answer, wrong))

    assert accepted == []


# Extraction and equivalence details


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("$\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{1} and later \\boxed{2}", "2"),
        ("\\fbox{7}", "7"),
        ("\\fboxsep=2pt then \\boxed{9}", "9"),
        ("the answer is $\\boxed 5$.", "5"),
        ("\\boxed{3} then a cut-off \\boxed{\\frac{2", "3"),
        ("\\boxed{4} and the instruction \\boxed{}", "4"),
        ("no box here", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#### 1,450,000", "1450000"),
        ("5 - 3 = 2 apples.", "2"),
        ("She owes -12 dollars", "-12"),
        ("It costs $18.50.", "18.50"),
        ("\\boxed{70,000} after 12 steps", "70000"),
        ("no digits", None),
    ],
)
def test_gsm8k_answer_extraction(text, expected):
    assert extract_gsm8k_answer(text) == expected


def test_last_number_none_without_digits():
    assert last_number("a - b . c") is None


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac{1}{2}"),
        ("(3,\\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("25", "025"),
        ("\\$18", "18"),
        ("5", "x=5"),
        ("\\text{Evelyn}", "\\text{Evelyn}"),
        ("4210_5", "4210_{5}"),
        # math-verify reads a numeral without its base subscript as the same number.
        ("52", "52_8"),
    ],
)
def test_equivalent_forms_accepted(predicted, gold):
    assert is_equivalent(predicted, gold)


@pytest.mark.parametrize(
    ("predicted", "gold"),
    [
        ("0.51", "\\frac{1}{2}"),
        ("(3, \\pi)", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("52_9", "52_8"),
        ("53_8", "52_8"),
        ("1,-2,3", "1,-2"),
    ],
)
def test_different_values_rejected(predicted, gold):
    assert not is_equivalent(predicted, gold)


def test_grading_reads_text_after_last_think_end():
    task = Math500Task(task_config("math500"))
    sample = Sample(id="0", question="q", answer="\\frac{1}{2}")

    final_after = "<think>maybe \\boxed{3}</think> draft </think> so \\boxed{\\frac12}"
    final_inside = "<think>it is \\boxed{\\frac{1}{2}}</think> so \\boxed{3}"
    only_inside = "<think>it is \\boxed{\\frac{1}{2}}</think> That is all."
    result = task.grade(final_after, sample)

    assert answer_region(final_after) == " so \\boxed{\\frac12}"
    assert result.correct
    assert result.extracted == "\\frac12"
    assert not task.grade(final_inside, sample).correct
    assert task.grade(only_inside, sample).extracted is None


def test_grading_without_think_end_reads_all():
    task = AIME24Task(task_config("aime24"))
    sample = Sample(id="60", question="q", answer="204")

    assert task.grade("<think>cut off after \\boxed{204}", sample).correct
    missing = task.grade("<think>no answer yet", sample)
    assert missing.extracted is None
    assert not missing.correct


def test_grading_works_off_main_thread(loaded):
    # math-verify's timeouts use signal.alarm, which raises ValueError outside the main thread.
    task, samples = loaded["math500"]
    sample = samples[0]

    with ThreadPoolExecutor(max_workers=1) as pool:
        result = pool.submit(task.grade, boxed_completion(sample.answer), sample).result()

    assert result.correct


def test_pass_at_1_averages_samples_then_problems():
    assert pass_at_1([[True, False], [True, True]]) == 0.75
    assert pass_at_1([[True], [False, False, True, True]]) == 0.75
    with pytest.raises(ValueError, match="problem 1"):
        pass_at_1([[True], []])
    with pytest.raises(ValueError):
        pass_at_1([])


def test_package_import_registers_math_tasks():
    # build_task relies on `import trimkv.tasks` registering every built-in task, so check it
    # in a fresh interpreter where no test has imported trimkv.tasks.math yet.
    code = "import trimkv.tasks.base as base, trimkv.tasks; print(' '.join(sorted(base.TASK_REGISTRY)))"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)

    registered = completed.stdout.split()
    for name in TASKS:
        assert name in registered, f"trimkv/tasks/__init__.py must import trimkv.tasks.math; registered: {registered}"
