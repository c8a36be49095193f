"""An LLM judge over an OpenAI-compatible chat-completions endpoint, with LongMemEval's prompts.

The prompts, the request (one user message, temperature 0, at most 10 tokens) and the verdict
rule (`yes` anywhere in the lower-cased reply) are LongMemEval's. They come from
`src/evaluation/evaluate_qa.py` in xiaowu0162/LongMemEval (commit 9e0b455), so scores are
comparable with LongMemEval's own evaluation when the same judge model is used.

`LLMJudge` sends requests with `urllib.request` and:

- retries connection errors, timeouts, HTTP 429 and 5xx with exponential backoff
  (`backoff_s * 2**attempt`, or the server's Retry-After when it is longer, at most 60 s);
- stores every verdict in an append-only JSONL cache keyed by a hash of model and prompt, so
  a rerun never sends the same request twice;
- returns None (unjudged) when a request still fails after its retries or gets a reply it
  cannot read. None is never a wrong verdict: callers report it separately.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any

from trimkv.utils.io import append_jsonl

logger = logging.getLogger(__name__)

CACHE_FILE_NAME = "judge_cache.jsonl"

# Upper bound on one wait between attempts, whatever Retry-After requests.
MAX_BACKOFF_S = 60.0

# LongMemEval's judge prompts, verbatim (including the space before each blank line in some).
# The fields are, in order: question, gold answer (or rubric, or explanation), model response.
_DEFAULT_TEMPLATE = "I will give you a question, a correct answer, and a response from a model. Please answer yes if the response contains the correct answer. Otherwise, answer no. If the response is equivalent to the correct answer or contains all the intermediate steps to get the correct answer, you should also answer yes. If the response only contains a subset of the information required by the answer, answer no. \n\nQuestion: {}\n\nCorrect Answer: {}\n\nModel Response: {}\n\nIs the model response correct? Answer yes or no only."
_TEMPORAL_TEMPLATE = "I will give you a question, a correct answer, and a response from a model. Please answer yes if the response contains the correct answer. Otherwise, answer no. If the response is equivalent to the correct answer or contains all the intermediate steps to get the correct answer, you should also answer yes. If the response only contains a subset of the information required by the answer, answer no. In addition, do not penalize off-by-one errors for the number of days. If the question asks for the number of days/weeks/months, etc., and the model makes off-by-one errors (e.g., predicting 19 days when the answer is 18), the model's response is still correct. \n\nQuestion: {}\n\nCorrect Answer: {}\n\nModel Response: {}\n\nIs the model response correct? Answer yes or no only."
_KNOWLEDGE_UPDATE_TEMPLATE = "I will give you a question, a correct answer, and a response from a model. Please answer yes if the response contains the correct answer. Otherwise, answer no. If the response contains some previous information along with an updated answer, the response should be considered as correct as long as the updated answer is the required answer.\n\nQuestion: {}\n\nCorrect Answer: {}\n\nModel Response: {}\n\nIs the model response correct? Answer yes or no only."
_PREFERENCE_TEMPLATE = "I will give you a question, a rubric for desired personalized response, and a response from a model. Please answer yes if the response satisfies the desired response. Otherwise, answer no. The model does not need to reflect all the points in the rubric. The response is correct as long as it recalls and utilizes the user's personal information correctly.\n\nQuestion: {}\n\nRubric: {}\n\nModel Response: {}\n\nIs the model response correct? Answer yes or no only."
_ABSTENTION_TEMPLATE = "I will give you an unanswerable question, an explanation, and a response from a model. Please answer yes if the model correctly identifies the question as unanswerable. The model could say that the information is incomplete, or some other information is given but the asked information is not.\n\nQuestion: {}\n\nExplanation: {}\n\nModel Response: {}\n\nDoes the model correctly identify the question as unanswerable? Answer yes or no only."

JUDGE_TEMPLATES = {
    "single-session-user": _DEFAULT_TEMPLATE,
    "single-session-assistant": _DEFAULT_TEMPLATE,
    "multi-session": _DEFAULT_TEMPLATE,
    "temporal-reasoning": _TEMPORAL_TEMPLATE,
    "knowledge-update": _KNOWLEDGE_UPDATE_TEMPLATE,
    "single-session-preference": _PREFERENCE_TEMPLATE,
}


def judge_prompt(question_type: str, question: str, answer: str, response: str, abstention: bool) -> str:
    """Build LongMemEval's judge prompt for one response.

    Abstention questions (LongMemEval marks them by a question id ending in `_abs`) use the
    abstention prompt whatever their type. Raises ValueError for an unknown question type.
    """
    if abstention:
        return _ABSTENTION_TEMPLATE.format(question, answer, response)
    if question_type not in JUDGE_TEMPLATES:
        known = ", ".join(sorted(JUDGE_TEMPLATES))
        raise ValueError(f"unknown LongMemEval question type {question_type!r}; expected one of: {known}")
    return JUDGE_TEMPLATES[question_type].format(question, answer, response)


@dataclass(frozen=True)
class JudgeConfig:
    """Settings of the judge endpoint; `judge` in conf/task/longmemeval.yaml.

    `base_url` is the API root that `/chat/completions` is appended to, such as
    `https://api.openai.com/v1`. `api_key_env` names the environment variable that contains
    the key. When it is null or the variable is unset, requests carry no key, which is enough
    for a local vLLM server. `max_retries` counts retries after the first attempt. After
    `max_consecutive_failures` samples in a row end unjudged, the judge stops sending requests
    and leaves the remaining samples unjudged, so a dead endpoint does not cost every sample
    its full backoff.
    """

    base_url: str
    model: str
    api_key_env: str | None = "OPENAI_API_KEY"
    max_retries: int = 5
    backoff_s: float = 2.0
    timeout_s: float = 60.0
    max_tokens: int = 10
    max_consecutive_failures: int = 5

    def __post_init__(self):
        if not self.base_url or not self.model:
            raise ValueError(
                f"the judge needs base_url and model, got base_url={self.base_url!r}, model={self.model!r} "
                f"(set task.judge.base_url and task.judge.model, or task.judge.enabled=false)"
            )
        for name in ("max_retries", "max_consecutive_failures", "max_tokens"):
            value = getattr(self, name)
            minimum = 0 if name == "max_retries" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"judge.{name} must be an integer >= {minimum}, got {value!r}")
        for name in ("backoff_s", "timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"judge.{name} must be a non-negative number of seconds, got {value!r}")

    @classmethod
    def from_mapping(cls, settings: Any) -> JudgeConfig:
        """Build from a config node or dict, ignoring the keys the client does not use."""
        names = cls.__dataclass_fields__
        values = {key: settings[key] for key in settings if key in names and settings[key] is not None}
        return cls(**values)


class _RequestFailed(Exception):
    """A failed request attempt; `retryable` is True when another attempt may succeed."""

    def __init__(self, message: str, retryable: bool, retry_after_s: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class LLMJudge:
    """Asks a chat model for yes/no verdicts, with retries and a persistent verdict cache.

    Safe to call from several threads. Each verdict is appended to
    `<cache_dir>/judge_cache.jsonl` as soon as it arrives.
    """

    def __init__(self, config: JudgeConfig, cache_dir: str | os.PathLike):
        self.config = config
        self.cache_path = Path(cache_dir) / CACHE_FILE_NAME
        self._lock = threading.Lock()
        self._cache: dict[str, bool] = self._read_cache()
        self._consecutive_failures = 0
        self._stopped_reason: str | None = None
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._api_key = os.environ.get(config.api_key_env) if config.api_key_env else None
        if config.api_key_env and not self._api_key:
            logger.warning(
                "environment variable %s is not set; judge requests to %s carry no API key",
                config.api_key_env,
                self._url,
            )
        logger.info(
            "judge %s at %s; %d cached verdicts in %s", config.model, self._url, len(self._cache), self.cache_path
        )

    @property
    def cached_verdicts(self) -> int:
        return len(self._cache)

    def verdict(self, prompt: str, sample_id: str = "") -> bool | None:
        """Return the judge's verdict on `prompt` (True for yes), or None when it is unjudged."""
        key = self.cache_key(prompt)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            if self._stopped_reason is not None:
                return None

        try:
            reply = self._complete(prompt, sample_id)
        except _RequestFailed as error:
            self._record_failure(str(error), sample_id)
            return None

        label = "yes" in reply.lower()
        with self._lock:
            self._consecutive_failures = 0
            self._cache[key] = label
            record = {"key": key, "model": self.config.model, "id": sample_id, "verdict": label, "reply": reply}
            append_jsonl(self.cache_path, [record])
        return label

    def cache_key(self, prompt: str) -> str:
        """SHA-256 of the model name and the prompt; a changed prompt or model is asked anew."""
        return hashlib.sha256(json.dumps([self.config.model, prompt]).encode("utf-8")).hexdigest()

    # Requests

    def _complete(self, prompt: str, sample_id: str) -> str:
        payload = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": prompt}],
            "n": 1,
            "temperature": 0,
            "max_tokens": self.config.max_tokens,
        }
        body = json.dumps(payload).encode("utf-8")
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            try:
                return self._post(body)
            except _RequestFailed as error:
                if not error.retryable or attempt == attempts - 1:
                    raise
                wait_s = self.config.backoff_s * 2**attempt
                if error.retry_after_s is not None:
                    wait_s = max(wait_s, error.retry_after_s)
                wait_s = min(wait_s, MAX_BACKOFF_S)
                logger.info(
                    "judge request for sample %s failed (%s); retry %d of %d in %.1f s",
                    sample_id or "?",
                    error,
                    attempt + 1,
                    self.config.max_retries,
                    wait_s,
                )
                time.sleep(wait_s)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _post(self, body: bytes) -> str:
        """Send one request; return the reply text, stripped, or raise _RequestFailed."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        request = urllib.request.Request(self._url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            status = error.code
            detail = error.read()[:200].decode("utf-8", errors="replace")
            retryable = status == 429 or status >= 500
            retry_after = _retry_after_seconds(error.headers.get("Retry-After"))
            raise _RequestFailed(f"HTTP {status}: {detail}", retryable, retry_after) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException) as error:
            # URLError wraps refused connections and DNS failures; the others are timeouts
            # and connections dropped mid-response.
            reason = getattr(error, "reason", error)
            raise _RequestFailed(f"connection failed: {reason}", retryable=True) from None

        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise _RequestFailed(f"unreadable reply: {raw[:200]!r}", retryable=False) from None
        if not isinstance(content, str):
            raise _RequestFailed(f"the reply has no text content: {raw[:200]!r}", retryable=False)
        return content.strip()

    def _record_failure(self, message: str, sample_id: str) -> None:
        with self._lock:
            self._consecutive_failures += 1
            logger.warning("judge left sample %s unjudged: %s", sample_id or "?", message)
            if self._consecutive_failures >= self.config.max_consecutive_failures and self._stopped_reason is None:
                self._stopped_reason = message
                logger.error(
                    "the judge failed %d samples in a row (last error: %s); the remaining samples are left "
                    "unjudged. Rerun after fixing the endpoint: cached verdicts are kept in %s",
                    self._consecutive_failures,
                    message,
                    self.cache_path,
                )

    # Cache

    def _read_cache(self) -> dict[str, bool]:
        cache: dict[str, bool] = {}
        if not self.cache_path.is_file():
            return cache
        with self.cache_path.open("r", encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    cache[str(record["key"])] = bool(record["verdict"])
                except (ValueError, KeyError, TypeError):
                    # A run killed mid-write leaves a torn last line; that verdict is asked again.
                    logger.warning("%s:%d: skipping a malformed judge cache line", self.cache_path, line_number)
        return cache


def _retry_after_seconds(value: str | None) -> float | None:
    """Seconds from a Retry-After header given in seconds; None for dates or no header."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def default_cache_dir() -> Path:
    """Return the run's output directory under Hydra, else the current working directory."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        # HydraConfig.get() raises ValueError outside a Hydra run.
        return Path.cwd()
