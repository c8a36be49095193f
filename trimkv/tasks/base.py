"""The task interface shared by every benchmark: load samples, build prompts, grade completions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Sample:
    """One benchmark problem.

    `id` is unique within the task; `question` is the text put in the prompt; `answer` is the
    gold final answer used for grading.
    """

    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class GradeResult:
    """The answer extracted from a completion (None when none was found) and whether it is correct.

    `score` is the sample's value of a graded metric in [0, 1], such as LongProc's row-level F1
    for HTML to TSV. None means the metric is `correct` itself, so the score is float(correct).
    """

    extracted: str | None
    correct: bool
    score: float | None = None


class Task(ABC):
    """A benchmark. Subclasses load samples and grade completions; prompts come from the config.

    `cfg` is the `task` config node. Fields used here: `name`, `prompt_template` (a str.format
    template with `{question}`), `system_prompt` (optional), `chat_template` (wrap the prompt in the
    tokenizer's chat template when it has one) and `enable_thinking` (passed to the chat template).
    """

    name: str = ""

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abstractmethod
    def load(self, limit: int | None = None) -> list[Sample]:
        """Return the first `limit` samples (all of them when `limit` is None)."""

    # Name of the summary metric reported as a run's `accuracy` instead of the mean of `correct`
    # (None keeps the mean of `score`, or of `correct` when a task sets no score).
    primary_metric: str | None = None

    @abstractmethod
    def grade(self, completion: str, sample: Sample) -> GradeResult:
        """Grade one generated completion against the sample's gold answer."""

    def summarize(self, results: list) -> dict:
        """Return task-specific run metrics from the grade results (objects with `metrics`)."""
        return {}

    def format_prompt(self, sample: Sample, tokenizer: Any) -> str:
        """Return the full prompt text, with the chat template applied when configured."""
        template = self.cfg.get("prompt_template") or "{question}"
        user_text = template.format(question=sample.question)
        use_chat = bool(self.cfg.get("chat_template", True)) and getattr(tokenizer, "chat_template", None)
        if not use_chat:
            return user_text
        messages = []
        if self.cfg.get("system_prompt"):
            messages.append({"role": "system", "content": self.cfg.system_prompt})
        messages.append({"role": "user", "content": user_text})
        return tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=bool(self.cfg.get("enable_thinking", False)),
        )


TASK_REGISTRY: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    def decorator(cls: type[Task]) -> type[Task]:
        cls.name = name
        TASK_REGISTRY[name] = cls
        return cls

    return decorator


def build_task(cfg: Any) -> Task:
    """Instantiate the task named by `cfg.name`."""
    # Importing the package registers every built-in task.
    import trimkv.tasks  # noqa: F401

    name = cfg.name
    if name not in TASK_REGISTRY:
        known = ", ".join(sorted(TASK_REGISTRY))
        raise ValueError(f"unknown task {name!r}; choose one of: {known} (set task=<name>)")
    return TASK_REGISTRY[name](cfg)
