"""LongMemEval (Wu et al., ICLR 2025, arXiv 2410.10813): question answering over long chat histories.

`task.variant` picks LongMemEval_S (`s`, about 40 sessions and 115K Llama-3 tokens of history
per question) or the oracle variant (`oracle`, only the evidence sessions). The data is a JSON
list of 500 questions, read from `task.data_path` when set. Otherwise it is downloaded from the
Hub dataset `task.hub_path`, by default xiaowu0162/longmemeval-cleaned, the release that
LongMemEval's README links; `task.hub_file` overrides the file name.

The prompt follows LongMemEval's long-context baseline (`src/generation/run_generation.py`,
xiaowu0162/LongMemEval at commit 9e0b455, full-history-session reading): every haystack
session in date order, each under `### Session i:` with its `Session Date:`, then the current
date and the question. Sessions are written as JSON (`history_format: json`, LongMemEval's
recommended format) or as `role: content` lines (`nl`). With `cot: true` the prompt requests
step-by-step answers, as LongMemEval's recommended `con` reading does.

Grading reports two metrics per sample:

- `judge_accuracy`: the LLM judge's verdict with LongMemEval's prompt for the question type
  (trimkv/tasks/judge.py), None when the judge did not answer (unjudged, not wrong);
- `containment`: whether the normalised gold answer occurs as whole words in the normalised
  response. It needs no network, but it is only a rough check: abstention answers are
  explanations and preference answers are rubrics, which responses rarely contain verbatim.

`summarize()` reports `judge_accuracy` over judged samples, the judged and unjudged counts,
`containment`, and both metrics per question type.
"""

from __future__ import annotations

import json
import logging
import re
import string
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from trimkv.tasks.base import Sample, Task, register_task
from trimkv.tasks.grading import answer_region
from trimkv.tasks.judge import JUDGE_TEMPLATES, JudgeConfig, LLMJudge, default_cache_dir, judge_prompt
from trimkv.tasks.metrics import DetailedGradeResult, summarize_metrics
from trimkv.utils.io import DataFileError, read_json_list

logger = logging.getLogger(__name__)

LONGMEMEVAL_HUB_PATH = "xiaowu0162/longmemeval-cleaned"
LONGMEMEVAL_HUB_FILES = {"s": "longmemeval_s_cleaned.json", "oracle": "longmemeval_oracle.json"}

# LongMemEval's reading prompts, verbatim. The fields are the history, the current date and
# the question.
COT_PROMPT = "I will give you several history chats between you and a user. Please answer the question based on the relevant chat history. Answer the question step by step: first extract all the relevant information, and then reason over the information to get the answer.\n\n\nHistory Chats:\n\n{}\n\nCurrent Date: {}\nQuestion: {}\nAnswer (step by step):"
DIRECT_PROMPT = "I will give you several history chats between you and a user. Please answer the question based on the relevant chat history.\n\n\nHistory Chats:\n\n{}\n\nCurrent Date: {}\nQuestion: {}\nAnswer:"

HISTORY_FORMATS = ("json", "nl")

_REQUIRED_FIELDS = ("question_id", "question_type", "question", "answer", "question_date", "haystack_dates", "haystack_sessions")


def format_history(dates: list[str], sessions: list[list[dict]], history_format: str = "json") -> str:
    """Write the chat history as LongMemEval's full-history-session reader does.

    Sessions are sorted by their date strings with a stable sort, as LongMemEval does, and
    numbered from 1. The dates read `YYYY/MM/DD (Day) HH:MM`, so text order is time order. The
    `has_answer` evidence labels are dropped from the turns so that the model cannot see them.
    """
    if history_format not in HISTORY_FORMATS:
        raise ValueError(f"history_format must be one of {HISTORY_FORMATS}, got {history_format!r} (set task.history_format)")

    ordered = sorted(zip(dates, sessions), key=lambda pair: pair[0])
    parts = []
    for number, (date, session) in enumerate(ordered, start=1):
        turns = [{key: value for key, value in turn.items() if key != "has_answer"} for turn in session]
        if history_format == "json":
            content = "\n" + json.dumps(turns)
        else:
            content = "".join(f"\n\n{turn['role']}: {turn['content'].strip()}" for turn in turns)
        parts.append(f"\n### Session {number}:\nSession Date: {date}\nSession Content:\n{content}\n")
    return "".join(parts)


def build_prompt(record: dict, history_format: str = "json", cot: bool = True) -> str:
    """Build the user message for one LongMemEval record: history, current date, question.

    NOTE: LongMemEval truncates the history to the reader's context length minus the
    generation length minus 1,000 tokens. Nothing is truncated here, so the model must fit the
    whole history, which is about 115K Llama-3 tokens for LongMemEval_S.
    """
    history = format_history(record["haystack_dates"], record["haystack_sessions"], history_format)
    template = COT_PROMPT if cot else DIRECT_PROMPT
    return template.format(history, record["question_date"], record["question"])


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Normalise text as SQuAD does: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_contained(response: str, gold: str) -> bool:
    """Check whether the normalised gold text occurs in the normalised response as whole words.

    Whole words, so a gold `3` is not found in `13`. An empty normalised gold is never found.
    """
    gold_words = normalize_answer(gold)
    if not gold_words:
        return False
    return f" {gold_words} " in f" {normalize_answer(response)} "


@register_task("longmemeval")
class LongMemEvalTask(Task):
    """LongMemEval_S or oracle, graded by an LLM judge and by answer containment.

    Config keys besides the common ones: `variant`, `data_path`, `hub_path`, `hub_file`,
    `history_format`, `cot`, `strip_thinking` (grade only the text after the last `</think>`)
    and `judge`. The `judge` keys are those of `judge.JudgeConfig` plus `enabled` and
    `cache_dir`, where a null cache_dir means the run's output directory.
    """

    # A sample the judge never answered grades as not correct, so the run's accuracy is the
    # judge accuracy over judged samples instead of the mean of `correct`.
    primary_metric = "judge_accuracy"

    def __init__(self, cfg: Any):
        # Task.format_prompt reads keys as attributes, which a plain dict does not support.
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(dict(cfg))
        super().__init__(cfg)
        self.variant = str(cfg.get("variant", "s"))
        if self.variant not in LONGMEMEVAL_HUB_FILES:
            raise ValueError(f"unknown LongMemEval variant {self.variant!r}; choose s or oracle (set task.variant=s)")
        self.history_format = str(cfg.get("history_format", "json"))
        if self.history_format not in HISTORY_FORMATS:
            raise ValueError(f"history_format must be json or nl, got {self.history_format!r} (set task.history_format=json)")

        # The judge settings are checked now, so that a bad endpoint config fails before generation.
        settings = cfg.get("judge")
        self._judge_config = JudgeConfig.from_mapping(settings) if settings and settings.get("enabled", True) else None
        self._judge: LLMJudge | None = None

    # Loading

    def load(self, limit: int | None = None) -> list[Sample]:
        _check_limit(limit)
        records, source = self._read_records()
        if limit is not None:
            records = records[:limit]

        cot = bool(self.cfg.get("cot", True))
        samples = []
        seen: set[str] = set()
        for index, record in enumerate(records):
            where = f"{source}: record {index + 1}"
            _check_record(record, where)
            question_id = str(record["question_id"])
            if question_id in seen:
                raise DataFileError(f"{where}: question_id {question_id!r} occurs more than once; ids must be unique")
            seen.add(question_id)
            samples.append(
                Sample(
                    id=question_id,
                    question=build_prompt(record, self.history_format, cot),
                    answer=str(record["answer"]),
                    meta={
                        "question_type": record["question_type"],
                        "question": record["question"],
                        "question_date": record["question_date"],
                        # LongMemEval marks unanswerable questions by this id suffix.
                        "abstention": "_abs" in question_id,
                        "num_sessions": len(record["haystack_sessions"]),
                    },
                )
            )
        logger.info("loaded %d LongMemEval (%s) questions from %s", len(samples), self.variant, source)
        return samples

    def _read_records(self) -> tuple[list, str]:
        data_path = self.cfg.get("data_path")
        if data_path:
            # A relative path is taken from the directory the run started in, even when Hydra
            # has changed into its output directory (hydra.job.chdir=true).
            path = Path(to_absolute_path(str(Path(data_path).expanduser())))
        else:
            path = self._download()
        hint = "check task.data_path, or set it to null to download from the Hub"
        return read_json_list(path, "questions", hint, name="LongMemEval data file"), str(path)

    def _download(self) -> Path:
        # Imported here because a run that reads a local file never needs the Hub client.
        from huggingface_hub import hf_hub_download

        hub_path = self.cfg.get("hub_path") or LONGMEMEVAL_HUB_PATH
        file_name = self.cfg.get("hub_file") or LONGMEMEVAL_HUB_FILES[self.variant]
        try:
            return Path(hf_hub_download(repo_id=hub_path, filename=file_name, repo_type="dataset"))
        except (OSError, ValueError) as error:
            # OSError covers connection errors and missing files (the Hub client's HTTP errors
            # derive from it); ValueError covers offline mode without a cached copy.
            raise DataFileError(
                f"failed to download {file_name} from the Hugging Face Hub dataset {hub_path}: {error}. "
                f"Check network access, or download it and set task.data_path=/path/to/{file_name}"
            ) from error

    # Grading

    @property
    def judge(self) -> LLMJudge | None:
        """The LLM judge configured by `task.judge`, created on first use; None when disabled."""
        if self._judge_config is None:
            return None
        if self._judge is None:
            cache_dir = self.cfg.judge.get("cache_dir")
            cache_dir = Path(to_absolute_path(str(cache_dir))) if cache_dir else default_cache_dir()
            self._judge = LLMJudge(self._judge_config, cache_dir)
        return self._judge

    def grade(self, completion: str, sample: Sample) -> DetailedGradeResult:
        response = answer_region(completion) if self.cfg.get("strip_thinking", True) else completion
        response = response.strip()
        question_type = sample.meta["question_type"]
        metrics: dict[str, float | None] = {}

        contained = answer_contained(response, sample.answer)
        metrics["containment"] = float(contained)
        metrics[f"containment/{question_type}"] = float(contained)

        verdict = None
        error = None
        judge = self.judge
        if judge is not None:
            prompt = judge_prompt(question_type, sample.meta["question"], sample.answer, response, sample.meta["abstention"])
            verdict = judge.verdict(prompt, sample.id)
            value = None if verdict is None else float(verdict)
            metrics["judge_accuracy"] = value
            metrics[f"judge_accuracy/{question_type}"] = value
            if verdict is None:
                error = "unjudged: the judge did not answer"

        # NOTE: `correct` is False for an unjudged sample, because it is a bool; report
        # `summarize()`, whose judge_accuracy leaves unjudged samples out.
        return DetailedGradeResult(extracted=response, correct=bool(verdict), metrics=metrics, error=error)

    def summarize(self, results: list) -> dict[str, float | int | None]:
        """Judge accuracy over judged samples, judged and unjudged counts, and containment."""
        summary = summarize_metrics(results)
        judged_values = [r.metrics.get("judge_accuracy") for r in results if "judge_accuracy" in getattr(r, "metrics", {})]
        if judged_values:
            summary["judge_judged"] = sum(value is not None for value in judged_values)
            summary["judge_unjudged"] = sum(value is None for value in judged_values)
            summary.pop("judge_accuracy_missing", None)
        return summary


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for name in _REQUIRED_FIELDS:
        if name not in record or record[name] is None:
            present = ", ".join(sorted(record)) or "none"
            raise DataFileError(f"{where}: missing field {name!r} (fields present: {present}); is this a LongMemEval file?")

    question_type = record["question_type"]
    if question_type not in JUDGE_TEMPLATES:
        known = ", ".join(sorted(JUDGE_TEMPLATES))
        raise DataFileError(f"{where}: unknown question_type {question_type!r}; expected one of: {known}")

    dates, sessions = record["haystack_dates"], record["haystack_sessions"]
    if not isinstance(dates, list) or not isinstance(sessions, list) or len(dates) != len(sessions):
        raise DataFileError(f"{where}: haystack_dates and haystack_sessions must be lists of the same length")
    for number, session in enumerate(sessions, start=1):
        if not isinstance(session, list):
            raise DataFileError(f"{where}: session {number} must be a list of turns, got {type(session).__name__}")
        for turn in session:
            if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or not isinstance(turn.get("content"), str):
                raise DataFileError(f"{where}: session {number} has a turn without string role and content: {turn!r:.200}")




def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r} (set limit=null for all questions)")
