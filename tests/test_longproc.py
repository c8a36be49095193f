"""Tests for the LongProc tasks on the real 0.5k files, their prompts, metrics and C++ sandbox.

The data lives outside the repository, in `shared/data/longproc` next to it (LongProc's 0.5k
tier with its prompts.yaml files and web pages). The 2k tier is not there, so the tier test
builds a small file in the same format. Nothing here touches the network; the sandbox test
that checks network isolation talks to a server it starts on 127.0.0.1.
"""

from __future__ import annotations

import json
import shutil
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

import trimkv.tasks.longproc  # noqa: F401  (registers the longproc_* tasks)
from trimkv.tasks.base import Sample, build_task
from trimkv.tasks.longproc import (
    SPOC_HEADER,
    CountdownTask,
    HtmlToTsvTask,
    PathTraversalTask,
    PseudoToCodeTask,
    TomTrackingTask,
)
from trimkv.tasks.longproc_eval import (
    check_countdown_solution,
    countdown_demonstration,
    evaluate_html_to_tsv,
)
from trimkv.tasks.sandbox import CppSandbox, SandboxLimits, network_isolation_available
from trimkv.utils.io import DataFileError

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "longproc"
CONF_DIR = REPO_ROOT / "conf" / "task"

TASKS = {
    "countdown": CountdownTask,
    "path_traversal": PathTraversalTask,
    "tom_tracking": TomTrackingTask,
    "pseudo_to_code": PseudoToCodeTask,
    "html_to_tsv": HtmlToTsvTask,
}
RECORD_COUNTS = {"countdown": 200, "path_traversal": 200, "tom_tracking": 200, "pseudo_to_code": 199, "html_to_tsv": 100}

# Compiling and running all 199 gold programs takes about 50 s on 2 busy cores, so the test
# runs every 4th one (50 programs).
PSEUDO_TO_CODE_STRIDE = 4


def require_path(path: Path) -> Path:
    if not path.exists():
        pytest.fail(f"test input not found: {path}; these tests need the shared data folder next to the repository")
    return path


def task_config(name: str, data_path: Path | str | None = DATA_DIR, **overrides):
    config = OmegaConf.load(CONF_DIR / f"longproc_{name}.yaml")
    config.data_path = None if data_path is None else str(data_path)
    for key, value in overrides.items():
        OmegaConf.update(config, key, value)
    return config


def raw_records(name: str) -> list[dict]:
    return json.loads(require_path(DATA_DIR / name / f"{name}_0.5k.json").read_text(encoding="utf-8"))


def gold_completion(name: str, sample: Sample) -> str:
    """Wrap the gold output in the markers that the task's prompt requests."""
    if name == "path_traversal":
        return f"<Route>\n{sample.answer}\n</Route>"
    if name == "html_to_tsv":
        return f"```tsv\n{sample.answer}\n```"
    if name == "pseudo_to_code":
        return f"```cpp\n{sample.answer}\n```"
    return sample.answer


@pytest.fixture(scope="module")
def loaded() -> dict[str, tuple]:
    """Each task built from its config and reading the shared 0.5k file, with all its samples."""
    require_path(DATA_DIR)
    result = {}
    for name in TASKS:
        task = build_task(task_config(name))
        result[name] = (task, task.load())
    return result


@pytest.fixture(scope="module")
def sandbox() -> CppSandbox:
    # The wall-clock limit is well above the CPU limit so that a busy machine cannot turn a
    # CPU-limit kill into a timeout.
    return CppSandbox(header=SPOC_HEADER, limits=SandboxLimits(timeout_s=10.0, cpu_time_s=1, memory_mb=512))


# Loading and prompts


@pytest.mark.parametrize("name", list(TASKS))
def test_loader_parses_every_record(loaded, name):
    task, samples = loaded[name]

    assert isinstance(task, TASKS[name])
    assert task.dataset_name == f"{name}_0.5k"
    assert len(samples) == RECORD_COUNTS[name]
    assert [sample.id for sample in samples] == [str(i) for i in range(len(samples))]
    for sample in samples:
        assert sample.question.strip(), sample.id
        assert sample.answer.strip(), sample.id


@pytest.mark.parametrize("name", list(TASKS))
def test_prompt_fills_template_from_prompts_yaml(loaded, name):
    _, samples = loaded[name]
    template = yaml.safe_load((DATA_DIR / name / "prompts.yaml").read_text(encoding="utf-8"))["USER_PROMPT"]
    # The template's text up to its first field and after its last field frames every prompt.
    opening = template.split("{", 1)[0]
    closing = template.rsplit("}", 1)[1]

    for sample in samples:
        assert sample.question.startswith(opening), sample.id
        assert sample.question.endswith(closing), sample.id


def test_prompts_contain_record_inputs(loaded):
    countdown = raw_records("countdown")
    for record, sample in zip(countdown, loaded["countdown"][1]):
        assert f"Numbers: {record['nums']}\nTarget: {record['target']}" in sample.question

    paths = raw_records("path_traversal")
    for record, sample in zip(paths, loaded["path_traversal"][1]):
        source, destination = record["question_repr"]
        assert record["context_nl"] in sample.question
        assert f"Now find the route from {source} to {destination} based on" in sample.question

    stories = raw_records("tom_tracking")
    for record, sample in zip(stories, loaded["tom_tracking"][1]):
        assert f"[STORY]\n{record['story']}\n\n[QUESTION]\n{record['question']}\n" in sample.question

    programs = raw_records("pseudo_to_code")
    for record, sample in zip(programs, loaded["pseudo_to_code"][1]):
        assert "[PSEUDOCODE]:\n" + "\n".join(record["pseudocode_lines"]) + "\n\n[CODE]:" in sample.question

    pages = raw_records("html_to_tsv")
    for record, sample in zip(pages, loaded["html_to_tsv"][1]):
        page = (DATA_DIR / "html_to_tsv" / record["html_path"]).read_text(encoding="utf-8")
        assert f"```html\n{page}\n```" in sample.question
        assert f"```tsv\n{record['tsv_header']}\n{{Your TSV output}}\n```" in sample.question
        assert f"about {record['task_topic']}, extract" in sample.question


def test_countdown_prompt_has_two_search_examples(loaded):
    _, samples = loaded["countdown"]
    prompt = samples[0].question

    assert "# Example\nNumbers: [40, 19, 23, 7]\nTarget: 29\n\n# Search Procedure\nInitial number set: [40, 19, 23, 7]" in prompt
    assert "# Example\nNumbers: [9, 16, 6, 18]\nTarget: 12\n\n# Search Procedure\n" in prompt
    assert prompt.count("<Solution>") == 3  # two examples and the instruction
    assert "{demonstration}" not in prompt


def test_countdown_search_matches_record_demonstrations():
    # The files store each problem's search procedure in LongProc's earlier wrapping
    # (<Search Procedure> tags); the search text itself must match ours byte for byte.
    for index, record in enumerate(raw_records("countdown")):
        steps, procedure = countdown_demonstration(record["nums"], record["target"])
        rewrapped = procedure.replace("# Search Procedure\n", "<Search Procedure>\n", 1).replace(
            "\n\nNow we have found", "\n</Search Procedure>\n\nNow we have found", 1
        )
        assert rewrapped == record["demonstration"], index
        assert "\n".join(steps) == record["solution_text"], index


# Gold outputs


@pytest.mark.parametrize("name", ["countdown", "path_traversal", "tom_tracking", "html_to_tsv"])
def test_gold_output_scores_full(loaded, name):
    task, samples = loaded[name]

    for sample in samples:
        result = task.grade(gold_completion(name, sample), sample)
        assert result.correct, (sample.id, result.error)
        assert result.score == 1.0, sample.id
        assert set(result.metrics.values()) == {1.0}, (sample.id, result.metrics)


def test_countdown_record_demonstration_scores_full(loaded):
    task, samples = loaded["countdown"]

    for record, sample in zip(raw_records("countdown"), samples):
        assert task.grade(record["demonstration"], sample).correct, sample.id


def test_pseudo_to_code_gold_programs_pass(loaded):
    task, samples = loaded["pseudo_to_code"]
    chosen = samples[::PSEUDO_TO_CODE_STRIDE]

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda sample: task.grade(gold_completion("pseudo_to_code", sample), sample), chosen))
    failures = [(sample.id, result.error) for sample, result in zip(chosen, results) if not result.correct]
    assert not failures
    assert len(chosen) == 50


# Corrupted outputs


def test_countdown_wrong_steps_score_zero(loaded):
    task, samples = loaded["countdown"]
    sample = samples[0]  # numbers [21, 16, 17, 26], target 46
    gold = sample.answer
    assert task.grade(gold, sample).correct

    wrong_result = gold.replace("<Solution>\n21 + 16 = 37\n37 - 17 = 20", "<Solution>\n21 + 16 = 37\n37 - 17 = 21")
    wrong_number = gold.replace("<Solution>\n21 + 16 = 37", "<Solution>\n21 + 15 = 36")
    wrong_target = gold.replace("37 - 17 = 20\n26 + 20 = 46\n</Solution>", "37 - 17 = 20\n26 - 20 = 6\n</Solution>")
    for corrupted in (wrong_result, wrong_number, wrong_target):
        assert corrupted != gold
        result = task.grade(corrupted, sample)
        assert not result.correct
        assert result.score == 0.0
        assert result.metrics["extraction_rate"] == 1.0

    missing = task.grade(gold.replace("<Solution>", "Solution:"), sample)
    assert missing.metrics["extraction_rate"] == 0.0
    assert not missing.correct


def test_countdown_search_progress_is_partial(loaded):
    task, samples = loaded["countdown"]
    sample = samples[0]
    lines = sample.answer.split("\n")
    # Change the first "Try" line that adds a number to the set into dropping that branch.
    index = next(i for i, line in enumerate(lines) if "|- Try" in line and "Add " in line)
    lines[index] = lines[index].split(". Add ")[0] + ". drop this branch."
    corrupted = "\n".join(lines).split("Now we have found")[0]

    result = task.grade(corrupted, sample)
    assert not result.correct
    assert 0.0 < result.metrics["partial_accuracy"] < 1.0


def test_check_countdown_solution_rules():
    numbers, target = [21, 16, 17, 26], 46

    assert check_countdown_solution(numbers, target, "21 + 16 = 37\n37 - 17 = 20\n26 + 20 = 46")
    assert check_countdown_solution([6, 3, 4, 8], 8, "6 / 3 = 2\n4 * 2 = 8\n8 * 8 = 64") is False
    assert check_countdown_solution([6, 3, 4, 8], 64, "6 / 3 = 2\n4 * 2 = 8\n8 * 8 = 64")
    # Non-integer division, two equations, reused number, leading zero, division by zero.
    assert not check_countdown_solution([7, 2, 1, 1], 5, "7 / 2 = 3\n3 + 1 = 4\n4 + 1 = 5")
    assert not check_countdown_solution(numbers, target, "21 + 16 = 37\n37 + 9 = 46")
    assert not check_countdown_solution(numbers, target, "21 + 21 = 42\n42 - 17 = 25\n25 + 21 = 46")
    assert not check_countdown_solution(numbers, target, "021 + 16 = 37\n37 - 17 = 20\n26 + 20 = 46")
    assert not check_countdown_solution([5, 0, 1, 1], 5, "5 / 0 = 0\n0 + 1 = 1\n1 + 1 = 2")


def test_path_traversal_changed_step(loaded):
    task, samples = loaded["path_traversal"]
    sample = samples[0]
    gold_lines = sample.answer.split("\n")
    changed = list(gold_lines)
    changed[2] = changed[2].replace("take a", "take the", 1)
    dropped = gold_lines[:2] + gold_lines[3:]

    changed_result = task.grade("<Route>\n" + "\n".join(changed) + "\n</Route>", sample)
    dropped_result = task.grade("<Route>\n" + "\n".join(dropped) + "\n</Route>", sample)
    no_route = task.grade("\n".join(gold_lines), sample)

    assert not changed_result.correct
    # LongProc counts the wrong step as reached: 3 of the gold lines.
    assert changed_result.metrics["partial_accuracy"] == pytest.approx(3 / len(gold_lines))
    assert not dropped_result.correct
    assert dropped_result.metrics["partial_accuracy"] < 1.0
    assert no_route.metrics["extraction_rate"] == 0.0
    assert not no_route.correct


def test_tom_tracking_changed_belief(loaded):
    task, samples = loaded["tom_tracking"]
    sample = samples[0]
    lines = sample.answer.split("\n")
    step_lines = [i for i, line in enumerate(lines) if line.startswith("- Step")]
    middle = step_lines[len(step_lines) // 2]
    lines[middle] = lines[middle].replace("True", "False") if "True" in lines[middle] else lines[middle].replace("False", "True")

    result = task.grade("\n".join(lines), sample)
    assert not result.correct
    assert result.metrics["partial_accuracy"] == pytest.approx(len(step_lines) // 2 / len(step_lines))
    # Case and spacing are normalised away, so this variant is still right.
    assert task.grade(sample.answer.upper().replace(": ", ":   "), sample).correct


def test_html_to_tsv_dropped_row_lowers_f1(loaded):
    task, samples = loaded["html_to_tsv"]
    sample = next(s for s in samples if len(s.answer.strip().split("\n")) >= 6)
    lines = sample.answer.strip().split("\n")
    rows = len(lines) - 1
    dropped = "\n".join(lines[:2] + lines[3:])

    result = task.grade(f"```tsv\n{dropped}\n```", sample)
    assert not result.correct
    assert result.metrics["precision"] == 1.0
    assert result.metrics["recall"] == pytest.approx((rows - 1) / rows)
    assert result.score == pytest.approx(2 * (rows - 1) / (2 * rows - 1))


def test_html_to_tsv_table_rules():
    gold = "name\tprice\nThe Apple\t$1.00\nPear\t2"

    # Normalisation ignores case, punctuation, articles and spacing.
    assert evaluate_html_to_tsv("```tsv\nName\tPrice\napple\t1.00\nPear\t2\n```", gold)[0]["f1"] == 1.0
    # A trailing remark with the wrong number of cells is dropped, not counted.
    assert evaluate_html_to_tsv("```tsv\nname\tprice\nThe Apple\t$1.00\nPear\t2\nThat is all.\n```", gold)[0]["f1"] == 1.0
    # A table with another number of columns cannot be compared and scores 0.
    wide = evaluate_html_to_tsv("```tsv\nname\tprice\tx\nThe Apple\t$1.00\t1\n```", gold)
    assert wide[0] == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "extraction_rate": 0.0}
    # A header without rows scores 0.
    assert evaluate_html_to_tsv("```tsv\nname\tprice\n```", gold)[0]["f1"] == 0.0


# The C++ sandbox


def test_pseudo_to_code_compile_error(loaded):
    task, samples = loaded["pseudo_to_code"]
    sample = samples[0]
    broken = sample.answer.replace(";", "", 1)

    result = task.grade(f"```cpp\n{broken}\n```", sample)
    assert not result.correct
    assert result.metrics["extraction_rate"] == 1.0
    assert result.error.startswith("compile_error")


def test_pseudo_to_code_wrong_answer(loaded):
    task, samples = loaded["pseudo_to_code"]
    sample = samples[0]  # prints max - min of three numbers
    wrong = sample.answer.replace("k = x[2] - x[0];", "k = x[2] - x[1];")
    assert wrong != sample.answer

    result = task.grade(f"```cpp\n{wrong}\n```", sample)
    assert not result.correct
    assert result.error.startswith("wrong_answer")


def test_pseudo_to_code_without_code_block(loaded):
    task, samples = loaded["pseudo_to_code"]

    result = task.grade(samples[0].answer, samples[0])
    assert not result.correct
    assert result.metrics["extraction_rate"] == 0.0


def test_sandbox_kills_infinite_loop_at_cpu_limit(sandbox):
    result = sandbox.run("int main() { volatile long n = 0; while (true) { n++; } }", [(["1"], ["1"])])

    assert result.status == "cpu_time_exceeded"
    assert result.test_case == 0


def test_sandbox_kills_sleeping_program_at_wall_limit():
    short_wall = CppSandbox(header=SPOC_HEADER, limits=SandboxLimits(timeout_s=1.0, cpu_time_s=5), precompiled_header=False)
    code = "#include <unistd.h>\nint main() { sleep(30); cout << 1 << endl; }"

    result = short_wall.run(code, [(["1"], ["1"])])
    assert result.status == "timeout"


def test_sandbox_stops_memory_hog(sandbox):
    # The size comes from stdin so that the compiler cannot elide the allocation.
    code = "int main() { long n; cin >> n; vector<char> v(n << 20, 1); cout << (int) v[n] << endl; }"

    assert sandbox.run(code, [(["8"], ["1"])]).passed
    hog = sandbox.run(code, [(["4096"], ["1"])])
    assert hog.status == "runtime_error"


def test_sandbox_limits_output_size():
    small_output = CppSandbox(
        header=SPOC_HEADER, limits=SandboxLimits(output_limit_mb=1, timeout_s=10), precompiled_header=False
    )

    result = small_output.run('int main() { while (true) cout << "0123456789"; }', [(["1"], ["1"])])
    assert result.status == "output_limit_exceeded"


def test_sandbox_runs_with_empty_environment(sandbox):
    code = '#include <cstdlib>\nint main() { cout << (getenv("PATH") == NULL ? "empty" : "set") << endl; }'

    assert sandbox.run(code, [([""], ["empty"])]).passed


def test_sandbox_checks_every_test_case_in_order(sandbox):
    code = "int main() { int x; cin >> x; cout << (x < 3 ? x + 1 : x) << endl; }"
    cases = [(["1"], ["2"]), (["2"], ["3"]), (["5"], ["6"])]

    result = sandbox.run(code, cases)
    assert result.status == "wrong_answer"
    assert result.test_case == 2


def test_sandbox_blocks_network():
    if not network_isolation_available():
        pytest.skip("unshare --net is unavailable here, so programs run with the host network")

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    accepted = []

    def accept_one():
        listener.settimeout(10)
        try:
            connection, _ = listener.accept()
            accepted.append(True)
            connection.close()
        except OSError:
            pass

    code = (
        "#include <sys/socket.h>\n#include <netinet/in.h>\n#include <arpa/inet.h>\n#include <unistd.h>\n"
        "int main() { int s = socket(AF_INET, SOCK_STREAM, 0); sockaddr_in a{}; a.sin_family = AF_INET;"
        f" a.sin_port = htons({port}); inet_pton(AF_INET, \"127.0.0.1\", &a.sin_addr);"
        ' cout << (connect(s, (sockaddr*) &a, sizeof a) == 0 ? "connected" : "blocked") << endl; close(s); }'
    )
    isolated = CppSandbox(header=SPOC_HEADER, isolate_network=True, precompiled_header=False)
    open_network = CppSandbox(header=SPOC_HEADER, isolate_network=False, precompiled_header=False)
    thread = threading.Thread(target=accept_one)
    thread.start()
    try:
        assert isolated.run(code, [([""], ["blocked"])]).passed
        # The same program reaches the server without isolation, so the check above can fail.
        assert open_network.run(code, [([""], ["connected"])]).passed
    finally:
        thread.join(timeout=15)
        listener.close()
    assert accepted == [True]


def test_sandbox_rejects_invalid_limits():
    with pytest.raises(ValueError, match="cpu_time_s"):
        SandboxLimits(cpu_time_s=0)


# Reasoning blocks


def test_grading_reads_text_after_thinking(loaded):
    task, samples = loaded["path_traversal"]
    sample = samples[0]
    route = f"<Route>\n{sample.answer}\n</Route>"
    draft = "<think>\nI will mark it with <Route> and </Route> tags.\n</think>\n"

    assert task.grade(draft + route, sample).correct
    raw = build_task(task_config("path_traversal", strip_thinking=False))
    assert not raw.grade(draft + route, sample).correct


# Tiers, errors and configs


def test_tier_selects_file(tmp_path):
    folder = tmp_path / "countdown"
    folder.mkdir()
    shutil.copy(DATA_DIR / "countdown" / "prompts.yaml", folder / "prompts.yaml")
    records = raw_records("countdown")[:3]
    (folder / "countdown_2k.json").write_text(json.dumps(records), encoding="utf-8")

    task = build_task(task_config("countdown", tmp_path, tier="2k"))
    samples = task.load()
    assert task.dataset_name == "countdown_2k"
    assert len(samples) == 3
    assert task.grade(samples[2].answer, samples[2]).correct

    with pytest.raises(DataFileError, match="countdown_8k.json"):
        build_task(task_config("countdown", tmp_path, tier="8k")).load()


def test_unknown_tier_is_rejected():
    with pytest.raises(ValueError, match=r"no tier '8k'.*0\.5k, 2k"):
        build_task(task_config("pseudo_to_code", tier="8k"))


def test_limit_returns_first_samples(loaded):
    _, samples = loaded["tom_tracking"]
    task = build_task(task_config("tom_tracking"))

    first = task.load(limit=3)
    assert [s.question for s in first] == [s.question for s in samples[:3]]
    with pytest.raises(ValueError, match="limit"):
        task.load(limit=0)


def test_malformed_file_names_line(tmp_path):
    folder = tmp_path / "path_traversal"
    folder.mkdir()
    shutil.copy(DATA_DIR / "path_traversal" / "prompts.yaml", folder / "prompts.yaml")
    (folder / "path_traversal_0.5k.json").write_text('[\n{"context_nl": "x",\n  oops}\n]', encoding="utf-8")

    with pytest.raises(DataFileError, match=r"path_traversal_0\.5k\.json:3:"):
        build_task(task_config("path_traversal", tmp_path)).load()


def test_missing_field_names_record(tmp_path):
    folder = tmp_path / "tom_tracking"
    folder.mkdir()
    shutil.copy(DATA_DIR / "tom_tracking" / "prompts.yaml", folder / "prompts.yaml")
    records = raw_records("tom_tracking")[:2]
    del records[1]["story"]
    (folder / "tom_tracking_0.5k.json").write_text(json.dumps(records), encoding="utf-8")

    with pytest.raises(DataFileError, match=r"record 2: missing field 'story'"):
        build_task(task_config("tom_tracking", tmp_path)).load()


def test_missing_web_page_is_named(tmp_path):
    folder = tmp_path / "html_to_tsv"
    folder.mkdir()
    shutil.copy(DATA_DIR / "html_to_tsv" / "prompts.yaml", folder / "prompts.yaml")
    (folder / "html_to_tsv_0.5k.json").write_text(json.dumps(raw_records("html_to_tsv")[:1]), encoding="utf-8")

    with pytest.raises(DataFileError, match=r"web page .*W309_0\.5k_1\.html is missing"):
        build_task(task_config("html_to_tsv", tmp_path)).load()


def test_hub_offline_error_names_data_path():
    task = build_task(task_config("countdown", data_path=None))

    with pytest.raises(DataFileError, match=r"(?s)PrincetonPLI/LongProc \(config countdown_0\.5k.*task\.data_path"):
        task.load(limit=1)


@pytest.mark.parametrize("name", list(TASKS))
def test_config_is_greedy_with_long_generation(name):
    config = OmegaConf.load(CONF_DIR / f"longproc_{name}.yaml")
    math_keys = set(OmegaConf.load(CONF_DIR / "gsm8k.yaml"))
    math_generation_keys = set(OmegaConf.load(CONF_DIR / "gsm8k.yaml").generation)

    assert config.name == f"longproc_{name}"
    assert config.tier == "0.5k"
    assert math_keys - {"hub_config"} <= set(config)
    assert set(config.generation) == math_generation_keys
    assert config.generation.do_sample is False
    assert config.generation.n_samples == 1
    assert config.generation.max_new_tokens == 32768


def test_pseudo_to_code_config_matches_longproc_compiler():
    sandbox_config = OmegaConf.load(CONF_DIR / "longproc_pseudo_to_code.yaml").sandbox

    assert list(sandbox_config.compile_flags) == ["-std=c++11", "-O"]
    assert sandbox_config.max_test_cases == 10
    assert sandbox_config.timeout_s == 3.0


def test_summarize_averages_metrics(loaded):
    task, samples = loaded["html_to_tsv"]
    results = [task.grade(gold_completion("html_to_tsv", sample), sample) for sample in samples[:2]]
    results.append(task.grade("no table here", samples[2]))

    summary = task.summarize(results)
    assert summary["f1"] == pytest.approx(2 / 3)
    assert summary["extraction_rate"] == pytest.approx(2 / 3)
