"""Tests for the LongMemEval task: loading, the history prompt, the LLM judge client and metrics.

LongMemEval's data is on the Hugging Face Hub only, so the tests write a small file in its
format. The judge talks to an OpenAI-compatible server that each test starts on 127.0.0.1;
proxy variables are removed so that no request leaves this machine.
"""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import trimkv.tasks.longmemeval  # noqa: F401  (registers the longmemeval task)
from trimkv.tasks.base import build_task
from trimkv.tasks.judge import CACHE_FILE_NAME, JudgeConfig, LLMJudge, judge_prompt
from trimkv.tasks.longmemeval import (
    COT_PROMPT,
    LongMemEvalTask,
    answer_contained,
    format_history,
    normalize_answer,
)
from trimkv.utils.io import DataFileError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = REPO_ROOT / "conf" / "task"
API_KEY_ENV = "TRIMKV_TEST_JUDGE_KEY"
API_KEY = "sk-test-0123456789"

# Three questions in LongMemEval's format. The sessions of the first are out of date order in
# the file, as in LongMemEval's oracle file, and some turns carry the `has_answer` label.
RECORDS = [
    {
        "question_id": "q_temporal",
        "question_type": "temporal-reasoning",
        "question": "How many days passed between buying the bike and the first ride?",
        "answer": "3 days",
        "question_date": "2023/06/10 (Sat) 09:00",
        "haystack_session_ids": ["s_ride", "s_bike", "s_weather"],
        "haystack_dates": ["2023/05/23 (Tue) 18:30", "2023/05/20 (Sat) 10:15", "2023/05/21 (Sun) 08:00"],
        "haystack_sessions": [
            [
                {"role": "user", "content": "I finally took my first ride today!", "has_answer": True},
                {"role": "assistant", "content": "Congratulations on the first ride."},
            ],
            [
                {"role": "user", "content": "I bought a red bike this morning.", "has_answer": True},
                {"role": "assistant", "content": "Enjoy the new bike!"},
            ],
            [{"role": "user", "content": "Will it rain tomorrow?"}, {"role": "assistant", "content": "Probably not."}],
        ],
        "answer_session_ids": ["s_ride", "s_bike"],
    },
    {
        "question_id": "q_update",
        "question_type": "knowledge-update",
        "question": "Where do I work now?",
        "answer": "the Acme library",
        "question_date": "2023/08/01 (Tue) 12:00",
        "haystack_session_ids": ["s_job1", "s_job2"],
        "haystack_dates": ["2023/02/01 (Wed) 09:00", "2023/07/01 (Sat) 09:00"],
        "haystack_sessions": [
            [{"role": "user", "content": "I work at a bakery."}, {"role": "assistant", "content": "Nice."}],
            [{"role": "user", "content": "I moved to the Acme library.", "has_answer": True}],
        ],
        "answer_session_ids": ["s_job2"],
    },
    {
        "question_id": "q_pet_abs",
        "question_type": "single-session-user",
        "question": "What is the name of my cat?",
        "answer": "You did not mention a cat; you only mentioned a dog named Rex.",
        "question_date": "2023/09/01 (Fri) 12:00",
        "haystack_session_ids": ["s_dog"],
        "haystack_dates": ["2023/08/15 (Tue) 17:00"],
        "haystack_sessions": [[{"role": "user", "content": "My dog Rex loves the park."}]],
        "answer_session_ids": ["s_dog"],
    },
]

RIGHT = {
    "q_temporal": "The bike was bought on May 20 and first ridden on May 23, so 3 days passed.",
    "q_update": "You now work at the Acme library.",
    "q_pet_abs": "You never told me about a cat; I cannot answer that.",
}
WRONG = {
    "q_temporal": "About a week.",
    "q_update": "You work at a bakery.",
    "q_pet_abs": "Your cat is called Rex.",
}


class JudgeServer:
    """An OpenAI-compatible /v1/chat/completions endpoint on 127.0.0.1 that grades like a judge.

    It replies "Yes." when every word of the gold answer occurs in the model response, else
    "No.". For the abstention prompt it replies "Yes." when the response contains "cannot" or
    "never". `fail_with` lists HTTP statuses to return, one per request, before replying normally.
    """

    def __init__(self, fail_with: tuple[int, ...] = ()):
        self.requests: list[dict] = []
        self.fail_with = list(fail_with)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                length = int(self.headers["Content-Length"])
                payload = json.loads(self.rfile.read(length))
                server.requests.append({"path": self.path, "headers": dict(self.headers), "payload": payload})
                if self.path != "/v1/chat/completions":
                    self._reply(404, {"error": "not found"})
                elif server.fail_with:
                    self._reply(server.fail_with.pop(0), {"error": "try again"})
                else:
                    verdict = server.grade(payload["messages"][0]["content"])
                    self._reply(200, {"choices": [{"index": 0, "message": {"role": "assistant", "content": verdict}}]})

            def _reply(self, status, body):
                data = json.dumps(body).encode("utf-8")
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    @staticmethod
    def grade(prompt: str) -> str:
        response = prompt.split("\n\nModel Response: ")[1].split("\n\n")[0].lower()
        if "unanswerable question" in prompt:
            return "Yes." if "cannot" in response or "never" in response else "No."
        gold = re.search(r"Correct Answer: (.*?)\n\n", prompt, re.S).group(1).lower()
        words = re.findall(r"\w+", gold)
        return "Yes." if all(word in response for word in words) else "No."

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(API_KEY_ENV, API_KEY)


@pytest.fixture
def server():
    judge_server = JudgeServer()
    yield judge_server
    judge_server.stop()


@pytest.fixture
def data_file(tmp_path) -> Path:
    path = tmp_path / "longmemeval_oracle.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    return path


def task_config(data_path, base_url: str = "http://127.0.0.1:9/v1", cache_dir=None, **overrides):
    config = OmegaConf.load(CONF_DIR / "longmemeval.yaml")
    config.data_path = str(data_path)
    config.judge.base_url = base_url
    config.judge.model = "test-judge"
    config.judge.api_key_env = API_KEY_ENV
    config.judge.max_retries = 2
    config.judge.backoff_s = 0.01
    config.judge.timeout_s = 5
    config.judge.cache_dir = None if cache_dir is None else str(cache_dir)
    for key, value in overrides.items():
        OmegaConf.update(config, key, value)
    return config


def grade_all(task, completions: dict[str, str]):
    samples = task.load()
    return samples, [task.grade(completions[sample.id], sample) for sample in samples]


def stopped_server_url() -> str:
    """The URL of a server that was started and stopped, so its port refuses connections."""
    stopped = JudgeServer()
    url = stopped.base_url
    stopped.stop()
    return url


# Loading and prompts


def test_loader_reads_questions(data_file):
    task = build_task(task_config(data_file))
    samples = task.load()

    assert isinstance(task, LongMemEvalTask)
    assert [s.id for s in samples] == ["q_temporal", "q_update", "q_pet_abs"]
    assert [s.answer for s in samples] == [r["answer"] for r in RECORDS]
    assert [s.meta["question_type"] for s in samples] == ["temporal-reasoning", "knowledge-update", "single-session-user"]
    assert [s.meta["abstention"] for s in samples] == [False, False, True]
    assert [s.meta["num_sessions"] for s in samples] == [3, 2, 1]
    assert len(task.load(limit=2)) == 2


def test_context_lists_sessions_in_date_order(data_file):
    sample = build_task(task_config(data_file)).load()[0]
    prompt = sample.question

    # Dates 05/20 (bike), 05/21 (weather), 05/23 (ride), whatever the file order.
    positions = [prompt.index(text) for text in ("red bike", "rain tomorrow", "first ride today")]
    assert positions == sorted(positions)
    for number, date in enumerate(["2023/05/20 (Sat) 10:15", "2023/05/21 (Sun) 08:00", "2023/05/23 (Tue) 18:30"], start=1):
        assert f"\n### Session {number}:\nSession Date: {date}\nSession Content:\n\n[" in prompt
    assert "### Session 4:" not in prompt
    assert "has_answer" not in prompt


def test_context_ends_with_question(data_file):
    sample = build_task(task_config(data_file)).load()[0]
    record = RECORDS[0]

    assert sample.question.startswith("I will give you several history chats between you and a user.")
    assert sample.question.endswith(
        f"\n\nCurrent Date: {record['question_date']}\nQuestion: {record['question']}\nAnswer (step by step):"
    )


def test_context_formats(data_file):
    record = RECORDS[0]
    session = [{"role": "user", "content": "I bought a red bike this morning."}, {"role": "assistant", "content": "Enjoy the new bike!"}]

    json_history = format_history(record["haystack_dates"], record["haystack_sessions"], "json")
    nl_history = format_history(record["haystack_dates"], record["haystack_sessions"], "nl")
    assert "Session Content:\n\n" + json.dumps(session) + "\n" in json_history
    assert "Session Content:\n\n\nuser: I bought a red bike this morning.\n\nassistant: Enjoy the new bike!\n" in nl_history

    direct = build_task(task_config(data_file, cot=False, history_format="nl")).load()[0]
    assert direct.question.endswith(f"Question: {record['question']}\nAnswer:")
    assert "\n\nuser: I finally took my first ride today!" in direct.question
    assert COT_PROMPT.startswith("I will give you several history chats")


def test_malformed_file_names_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n{"question_id": "x",\n oops}]', encoding="utf-8")

    with pytest.raises(DataFileError, match=r"broken\.json:3:"):
        build_task(task_config(path)).load()


def test_invalid_records_are_named(tmp_path):
    missing = [dict(RECORDS[0])]
    del missing[0]["question_date"]
    unknown = [dict(RECORDS[1], question_type="trivia")]
    for name, records, message in [
        ("missing.json", missing, r"record 1: missing field 'question_date'"),
        ("unknown.json", unknown, r"record 1: unknown question_type 'trivia'"),
    ]:
        path = tmp_path / name
        path.write_text(json.dumps(records), encoding="utf-8")
        with pytest.raises(DataFileError, match=message):
            build_task(task_config(path)).load()


def test_hub_offline_error_names_data_path(tmp_path):
    config = task_config(tmp_path / "unused.json")
    config.data_path = None

    with pytest.raises(DataFileError, match=r"(?s)longmemeval_s_cleaned\.json.*task\.data_path"):
        build_task(config).load()


def test_invalid_variant_is_rejected(data_file):
    with pytest.raises(ValueError, match="variant 'm'"):
        build_task(task_config(data_file, variant="m"))


# The judge


def test_judge_verdicts(server, data_file, tmp_path):
    task = build_task(task_config(data_file, server.base_url, tmp_path / "cache"))

    samples, right = grade_all(task, RIGHT)
    _, wrong = grade_all(task, WRONG)

    assert [r.metrics["judge_accuracy"] for r in right] == [1.0, 1.0, 1.0]
    assert [r.correct for r in right] == [True, True, True]
    assert [r.metrics["judge_accuracy"] for r in wrong] == [0.0, 0.0, 0.0]
    assert [r.correct for r in wrong] == [False, False, False]
    assert len(server.requests) == 6


def test_judge_request_uses_longmemeval_prompt(server, data_file, tmp_path):
    task = build_task(task_config(data_file, server.base_url, tmp_path / "cache"))
    samples = task.load()

    task.grade("<think>\ndraft\n</think>\n  " + RIGHT["q_pet_abs"] + "  ", samples[2])
    request = server.requests[0]
    expected_prompt = judge_prompt(
        "single-session-user", RECORDS[2]["question"], RECORDS[2]["answer"], RIGHT["q_pet_abs"], abstention=True
    )
    assert request["path"] == "/v1/chat/completions"
    assert request["payload"] == {
        "model": "test-judge",
        "messages": [{"role": "user", "content": expected_prompt}],
        "n": 1,
        "temperature": 0,
        "max_tokens": 10,
    }
    assert request["headers"]["Authorization"] == f"Bearer {API_KEY}"
    assert expected_prompt.startswith("I will give you an unanswerable question, an explanation")


def test_judge_prompt_per_question_type():
    prompts = {
        question_type: judge_prompt(question_type, "Q", "A", "R", abstention=False)
        for question_type in ("single-session-user", "temporal-reasoning", "knowledge-update", "single-session-preference")
    }

    assert "do not penalize off-by-one errors" in prompts["temporal-reasoning"]
    assert "updated answer is the required answer" in prompts["knowledge-update"]
    assert "\n\nRubric: A\n\n" in prompts["single-session-preference"]
    assert prompts["single-session-user"] == judge_prompt("multi-session", "Q", "A", "R", abstention=False)
    assert prompts["single-session-user"].endswith("Question: Q\n\nCorrect Answer: A\n\nModel Response: R\n\nIs the model response correct? Answer yes or no only.")
    with pytest.raises(ValueError, match="unknown LongMemEval question type 'trivia'"):
        judge_prompt("trivia", "Q", "A", "R", abstention=False)


def test_judge_retries_server_errors(data_file, tmp_path):
    flaky = JudgeServer(fail_with=(500, 500))
    try:
        task = build_task(task_config(data_file, flaky.base_url, tmp_path / "cache"))
        samples = task.load()
        result = task.grade(RIGHT["q_update"], samples[1])
    finally:
        flaky.stop()

    assert result.metrics["judge_accuracy"] == 1.0
    assert len(flaky.requests) == 3


def test_judge_retries_rate_limit(data_file, tmp_path):
    limited = JudgeServer(fail_with=(429, 503))
    try:
        task = build_task(task_config(data_file, limited.base_url, tmp_path / "cache"))
        result = task.grade(WRONG["q_update"], task.load()[1])
    finally:
        limited.stop()

    assert result.metrics["judge_accuracy"] == 0.0
    assert len(limited.requests) == 3


def test_judge_gives_up_after_retries(data_file, tmp_path):
    failing = JudgeServer(fail_with=(500,) * 10)
    try:
        task = build_task(task_config(data_file, failing.base_url, tmp_path / "cache"))
        result = task.grade(RIGHT["q_update"], task.load()[1])
    finally:
        failing.stop()

    assert len(failing.requests) == 3  # the first attempt and max_retries=2 retries
    assert result.metrics["judge_accuracy"] is None
    assert result.error.startswith("unjudged")


def test_judge_does_not_retry_client_errors(data_file, tmp_path):
    rejecting = JudgeServer(fail_with=(400, 400, 400))
    try:
        task = build_task(task_config(data_file, rejecting.base_url, tmp_path / "cache"))
        result = task.grade(RIGHT["q_update"], task.load()[1])
    finally:
        rejecting.stop()

    assert len(rejecting.requests) == 1
    assert result.metrics["judge_accuracy"] is None


def test_stopped_server_leaves_samples_unjudged(data_file, tmp_path):
    task = build_task(task_config(data_file, stopped_server_url(), tmp_path / "cache"))

    samples, results = grade_all(task, RIGHT)
    summary = task.summarize(results)

    assert [r.metrics["judge_accuracy"] for r in results] == [None, None, None]
    # Unjudged is not wrong: judge accuracy has no value, and containment is still reported.
    assert summary["judge_accuracy"] is None
    assert summary["judge_judged"] == 0
    assert summary["judge_unjudged"] == 3
    assert summary["containment"] == pytest.approx(2 / 3)
    assert not (tmp_path / "cache" / CACHE_FILE_NAME).exists()


def test_judge_stops_after_consecutive_failures(data_file, tmp_path):
    failing = JudgeServer(fail_with=(503,) * 20)
    try:
        config = task_config(data_file, failing.base_url, tmp_path / "cache")
        config.judge.max_consecutive_failures = 2
        task = build_task(config)
        _, results = grade_all(task, RIGHT)
    finally:
        failing.stop()

    assert [r.metrics["judge_accuracy"] for r in results] == [None, None, None]
    # Two samples with three attempts each; the third sample sends nothing.
    assert len(failing.requests) == 6


def test_cached_verdicts_need_no_requests(server, data_file, tmp_path):
    cache_dir = tmp_path / "cache"
    first = build_task(task_config(data_file, server.base_url, cache_dir))
    _, first_results = grade_all(first, {**RIGHT, "q_update": WRONG["q_update"]})
    first_verdicts = [r.metrics["judge_accuracy"] for r in first_results]
    assert first_verdicts == [1.0, 0.0, 1.0]
    assert len(server.requests) == 3
    assert len((cache_dir / CACHE_FILE_NAME).read_text(encoding="utf-8").splitlines()) == 3

    # With the endpoint down, a rerun gets every verdict from the cache.
    rerun = build_task(task_config(data_file, stopped_server_url(), cache_dir))
    _, rerun_results = grade_all(rerun, {**RIGHT, "q_update": WRONG["q_update"]})
    assert [r.metrics["judge_accuracy"] for r in rerun_results] == first_verdicts

    # Against the live server, a rerun sends no request.
    again = build_task(task_config(data_file, server.base_url, cache_dir))
    grade_all(again, {**RIGHT, "q_update": WRONG["q_update"]})
    assert len(server.requests) == 3

    # A different response is a different prompt and is asked.
    again.grade("Something else entirely.", again.load()[0])
    assert len(server.requests) == 4


def test_cache_skips_torn_line(server, tmp_path):
    cache_dir = tmp_path / "cache"
    config = JudgeConfig(base_url=server.base_url, model="test-judge", api_key_env=None, backoff_s=0.01)
    prompt = judge_prompt("multi-session", "Q", "blue", "It is blue.", abstention=False)
    assert LLMJudge(config, cache_dir).verdict(prompt, "a") is True
    with (cache_dir / CACHE_FILE_NAME).open("a", encoding="utf-8") as handle:
        handle.write('{"key": "abc", "verd')

    reloaded = LLMJudge(config, cache_dir)
    assert reloaded.cached_verdicts == 1
    assert reloaded.verdict(prompt, "a") is True
    assert len(server.requests) == 1


def test_api_key_is_not_logged(data_file, tmp_path, caplog):
    caplog.set_level("DEBUG")
    task = build_task(task_config(data_file, stopped_server_url(), tmp_path / "cache"))
    task.grade(RIGHT["q_update"], task.load()[1])

    assert "unjudged" in caplog.text
    assert API_KEY not in caplog.text


def test_judge_config_rejects_missing_model(data_file):
    with pytest.raises(ValueError, match="task.judge.model"):
        JudgeConfig(base_url="http://127.0.0.1:9/v1", model="")
    # The task checks its judge settings when it is built, before any generation.
    with pytest.raises(ValueError, match="task.judge.model"):
        build_task(task_config(data_file, **{"judge.model": ""}))


# Offline metric and summary


def test_containment_metric():
    assert normalize_answer("The  Acme, Library!") == "acme library"
    assert answer_contained("You now work at the Acme library.", "the Acme library")
    assert answer_contained("It took 3 days.", "3 days")
    assert not answer_contained("It took 13 days.", "3 days")
    assert not answer_contained("About a week.", "3 days")
    assert not answer_contained("anything", "a")  # nothing is left of the gold after normalisation


def test_disabled_judge_reports_containment_only(server, data_file, tmp_path):
    task = build_task(task_config(data_file, server.base_url, tmp_path / "cache", **{"judge.enabled": False}))

    _, results = grade_all(task, RIGHT)
    summary = task.summarize(results)
    assert server.requests == []
    assert [r.metrics["containment"] for r in results] == [1.0, 1.0, 0.0]
    assert "judge_accuracy" not in summary
    assert summary["containment"] == pytest.approx(2 / 3)


def test_summary_counts_judged_and_unjudged(server, data_file, tmp_path):
    task = build_task(task_config(data_file, server.base_url, tmp_path / "cache"))
    samples, results = grade_all(task, {**RIGHT, "q_update": WRONG["q_update"]})
    down = build_task(task_config(data_file, stopped_server_url(), tmp_path / "other-cache"))
    results.append(down.grade(RIGHT["q_update"], samples[1]))

    summary = task.summarize(results)
    assert summary["judge_accuracy"] == pytest.approx(2 / 3)
    assert summary["judge_judged"] == 3
    assert summary["judge_unjudged"] == 1
    assert summary["judge_accuracy/knowledge-update"] == 0.0
    assert summary["judge_accuracy/knowledge-update_missing"] == 1
    assert summary["containment"] == pytest.approx(2 / 4)


def test_config_keys_match_other_tasks():
    config = OmegaConf.load(CONF_DIR / "longmemeval.yaml")
    math_config = OmegaConf.load(CONF_DIR / "gsm8k.yaml")

    assert set(math_config) - {"hub_config", "split"} <= set(config)
    assert set(config.generation) == set(math_config.generation)
    assert config.generation.do_sample is False
    assert config.generation.n_samples == 1
    assert config.variant == "s"
    assert dict(config.judge) == {
        "enabled": True,
        "base_url": "https://api.openai.com/v1",
        "model": "gpt-4o-2024-08-06",
        "api_key_env": "OPENAI_API_KEY",
        "max_retries": 5,
        "backoff_s": 2.0,
        "timeout_s": 60,
        "max_consecutive_failures": 5,
        "cache_dir": None,
    }
