"""The embedded synthetic benchmark: header-first key-value recall with a running sum.

One sample with 4 header variables, with word-level tokens (the tokenizer adds `<bos>` in front):

    question: F Q C K | so the B=3 it C=1 then ? B 3 as K=4 ... Q=8 ... F=2 ... ? N 6 ... >
    answer:   F 2 2 Q 8 0 C 1 1 K 4 5

- The header (before `|`) lists the `num_queries` variables the answer asks about, so the goal is
  known before the material it needs, as the question comes first in a math problem.
- The body assigns a digit to `num_assignments` distinct variables, each written as one token
  `VAR=DIGIT`. Only the header variables are needed. The other assignments are distractors of the
  same form, and no token marks which assignment is needed: the only way to tell is to compare
  with the header. One token per assignment makes the lookup a single attention step (query `VAR`,
  key `VAR=DIGIT`), which a 2M-parameter model learns in a few CPU minutes. A two-token
  `VAR DIGIT` form needs an induction circuit, and the same model stayed under 2% exact match
  after 18 CPU minutes on it.
- Filler words (lowercase, a separate vocabulary) come before every event and are never needed.
- Recall steps `? VAR DIGIT` repeat the digit of an earlier distractor assignment. They give dense
  lookup supervision during pretraining, and they draw attention to distractors, which misleads
  attention-score eviction (H2O, SnapKV) about which assignments matter later.
- Every needed assignment lies at least `min_needed_distance` tokens before the answer starts,
  so a recency window of that size never contains it.
- The answer is a multi-step trace. For each header variable in header order the model writes
  `VAR DIGIT SUM`, where SUM is the running sum of the digits so far modulo 10. Each step reads the
  header, one far-back assignment and its own previous step, so eviction during decoding matters.

Grading is exact match of the whole trace. The generator is seeded per (split, seed, index), so
the train and eval splits never share a random stream.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

from trimkv.tasks.base import GradeResult, Sample, Task, register_task

# Word classes of the task vocabulary. The tokenizer in trimkv.models.synthetic_tokenizer maps each
# word to one token, so word positions and token positions differ only by the leading <bos>.
HEADER_END = "|"
RECALL_MARK = "?"
ANSWER_START = ">"
SEPARATOR_WORDS = (HEADER_END, RECALL_MARK, ANSWER_START)
DIGIT_WORDS = tuple(str(digit) for digit in range(10))
VARIABLE_WORDS = tuple(chr(code) for code in range(ord("A"), ord("Z") + 1))
ASSIGNMENT_WORDS = tuple(f"{variable}={digit}" for variable in VARIABLE_WORDS for digit in DIGIT_WORDS)
FILLER_WORDS = (
    "the", "and", "so", "then", "of", "to", "in", "it",
    "is", "was", "on", "at", "by", "for", "with", "that",
    "this", "but", "or", "not", "as", "be", "we", "they",
    "from", "all", "there", "here", "now", "just", "very", "also",
)

# Roles of prompt words, stored per word so that analyses (needed tokens, loss masks, probes) never
# re-parse the text.
ROLE_HEADER = "header"
ROLE_HEADER_END = "header_end"
ROLE_FILLER = "filler"
ROLE_ASSIGNMENT = "assignment"  # a needed VAR=DIGIT token
ROLE_DISTRACTOR = "distractor"  # a VAR=DIGIT token of a variable the answer never asks for
ROLE_RECALL_MARK = "recall_mark"
ROLE_RECALL_KEY = "recall_key"
ROLE_RECALL_VALUE = "recall_value"
ROLE_ANSWER_START = "answer_start"
# The question (header variables and its two delimiters) and the needed assignments. A model
# trained on this task failed from the 4th answer step on when ">" was evicted, so ">" is needed.
NEEDED_ROLES = frozenset({ROLE_HEADER, ROLE_HEADER_END, ROLE_ANSWER_START, ROLE_ASSIGNMENT})

SPLITS = ("train", "eval")


def assignment_word(variable: str, digit: int) -> str:
    return f"{variable}={digit}"


@dataclass(frozen=True)
class SyntheticConfig:
    """Lengths and difficulty of generated samples.

    num_queries: header variables, i.e. answer steps (the answer has 3 * num_queries words).
    num_assignments: body assignments, needed ones included; at most the 26 variable names.
    num_recalls: recall steps, each of a different distractor, so at most num_assignments - num_queries.
    filler_min, filler_max: filler words drawn uniformly before each body event.
    min_needed_distance: every needed assignment lies at least this many tokens before the first
        answer token. Extra filler goes after the last needed assignment until this is true.
    num_variables, num_filler_words: how many of the variable names and filler words are used.
    """

    num_queries: int = 4
    num_assignments: int = 12
    num_recalls: int = 6
    filler_min: int = 1
    filler_max: int = 8
    min_needed_distance: int = 64
    num_variables: int = 26
    num_filler_words: int = 32

    def __post_init__(self) -> None:
        checks = [
            (self.num_queries >= 1, f"num_queries must be >= 1, got {self.num_queries}"),
            (
                self.num_queries <= self.num_assignments <= self.num_variables,
                "need num_queries <= num_assignments <= num_variables, got "
                f"{self.num_queries}, {self.num_assignments}, {self.num_variables}",
            ),
            (
                1 <= self.num_variables <= len(VARIABLE_WORDS),
                f"num_variables must be in [1, {len(VARIABLE_WORDS)}], got {self.num_variables}",
            ),
            (
                0 <= self.num_recalls <= self.num_assignments - self.num_queries,
                f"num_recalls must be in [0, num_assignments - num_queries = "
                f"{self.num_assignments - self.num_queries}], got {self.num_recalls}",
            ),
            (
                0 <= self.filler_min <= self.filler_max,
                f"need 0 <= filler_min <= filler_max, got {self.filler_min}, {self.filler_max}",
            ),
            (
                self.min_needed_distance >= 0,
                f"min_needed_distance must be >= 0, got {self.min_needed_distance}",
            ),
            (
                1 <= self.num_filler_words <= len(FILLER_WORDS),
                f"num_filler_words must be in [1, {len(FILLER_WORDS)}], got {self.num_filler_words}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"invalid synthetic task setting: {message}")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> "SyntheticConfig":
        """Build a config from a mapping (a dict or the task's `generator` DictConfig node)."""
        if values is None:
            return cls()
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown synthetic generator setting(s) {unknown}; valid ones are {sorted(known)}"
            )
        return cls(**{name: int(values[name]) for name in values})


@dataclass
class SyntheticExample:
    """One generated sample with the role of every prompt word.

    `needed_positions` are the token positions of the question (header, `|`, `>`) and of the needed
    assignments in the tokenized prompt, counting `<bos>` as position 0.
    `answer_start` is the position of the first answer token in the same numbering.
    """

    prompt_words: list[str]
    prompt_roles: list[str]
    answer_words: list[str]
    queries: list[str]
    values: list[int]
    sums: list[int]
    needed_positions: list[int] = field(default_factory=list)

    @property
    def question(self) -> str:
        return " ".join(self.prompt_words)

    @property
    def answer(self) -> str:
        return " ".join(self.answer_words)

    @property
    def answer_start(self) -> int:
        return len(self.prompt_words) + 1


def _example_rng(split: str, seed: int, index: int) -> random.Random:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
    # A string seed goes through SHA-512 in `random.seed`, so streams do not depend on
    # PYTHONHASHSEED and the split name keeps train and eval streams apart.
    return random.Random(f"trimkv-synthetic/{split}/{seed}/{index}")


def generate_example(cfg: SyntheticConfig, split: str, seed: int, index: int) -> SyntheticExample:
    """Generate sample `index` of the (`split`, `seed`) stream; the same arguments give the same sample."""
    rng = _example_rng(split, seed, index)
    fillers = FILLER_WORDS[: cfg.num_filler_words]

    variables = rng.sample(VARIABLE_WORDS[: cfg.num_variables], cfg.num_assignments)
    digits = {variable: rng.randrange(10) for variable in variables}
    queries = variables[: cfg.num_queries]
    distractors = variables[cfg.num_queries :]

    # Body events in order: one ("assign", variable) per variable in random order, then each
    # recall is inserted at a random slot after its distractor's assignment.
    events: list[tuple[str, str]] = [("assign", variable) for variable in variables]
    rng.shuffle(events)
    for variable in rng.sample(distractors, cfg.num_recalls):
        assigned_at = events.index(("assign", variable))
        events.insert(rng.randint(assigned_at + 1, len(events)), ("recall", variable))

    # gaps[i] is the filler before event i, and the extra last gap comes before the answer start.
    gaps = [
        [rng.choice(fillers) for _ in range(rng.randint(cfg.filler_min, cfg.filler_max))]
        for _ in range(len(events) + 1)
    ]
    last_needed_event = max(i for i, (kind, var) in enumerate(events) if kind == "assign" and var in queries)
    tail_length = sum(len(gaps[i]) for i in range(last_needed_event + 1, len(gaps)))
    for i in range(last_needed_event + 1, len(events)):
        tail_length += 1 if events[i][0] == "assign" else 3
    # The last needed assignment sits 2 + tail_length tokens before the first answer token (the
    # ">" counts too), so pad the tail until that distance reaches min_needed_distance.
    while 2 + tail_length < cfg.min_needed_distance:
        gaps[rng.randint(last_needed_event + 1, len(events))].append(rng.choice(fillers))
        tail_length += 1

    words: list[str] = []
    roles: list[str] = []

    def emit(word: str, role: str) -> None:
        words.append(word)
        roles.append(role)

    for variable in queries:
        emit(variable, ROLE_HEADER)
    emit(HEADER_END, ROLE_HEADER_END)
    for gap, (kind, variable) in zip(gaps, events):
        for word in gap:
            emit(word, ROLE_FILLER)
        digit = str(digits[variable])
        if kind == "recall":
            emit(RECALL_MARK, ROLE_RECALL_MARK)
            emit(variable, ROLE_RECALL_KEY)
            emit(digit, ROLE_RECALL_VALUE)
        elif variable in queries:
            emit(assignment_word(variable, digits[variable]), ROLE_ASSIGNMENT)
        else:
            emit(assignment_word(variable, digits[variable]), ROLE_DISTRACTOR)
    for word in gaps[-1]:
        emit(word, ROLE_FILLER)
    emit(ANSWER_START, ROLE_ANSWER_START)

    values = [digits[variable] for variable in queries]
    sums: list[int] = []
    answer_words: list[str] = []
    running = 0
    for variable, value in zip(queries, values):
        running = (running + value) % 10
        sums.append(running)
        answer_words += [variable, str(value), str(running)]

    needed = [i + 1 for i, role in enumerate(roles) if role in NEEDED_ROLES]
    return SyntheticExample(
        prompt_words=words,
        prompt_roles=roles,
        answer_words=answer_words,
        queries=list(queries),
        values=values,
        sums=sums,
        needed_positions=needed,
    )


def answer_dependencies(example: SyntheticExample) -> list[tuple[int, list[int]]]:
    """List (position being processed, prompt positions it needs) for each far-reaching answer step.

    Positions count `<bos>` as 0. Writing header variable j (while processing the token before it)
    needs header token j, and writing its digit (while processing the variable) needs that
    variable's `VAR=DIGIT` token. The running sum reads only the answer's last three tokens, so it
    is left out.
    """
    assignment_position = {
        example.prompt_words[i].split("=")[0]: i + 1
        for i, role in enumerate(example.prompt_roles)
        if role == ROLE_ASSIGNMENT
    }
    dependencies = []
    for step, variable in enumerate(example.queries):
        variable_position = example.answer_start + 3 * step
        dependencies.append((variable_position - 1, [1 + step]))
        dependencies.append((variable_position, [assignment_position[variable]]))
    return dependencies


def fits_recency_window(example: SyntheticExample, budget: int, num_sinks: int = 4) -> bool:
    """Return whether a sink-plus-recent cache of `budget` tokens contains each needed token when needed.

    At the step that processes position t, the cache contains the positions below `num_sinks` and
    the most recent `budget - num_sinks` positions up to t: StreamingLLM's cache, the current
    token included. When this returns False, StreamingLLM cannot answer the sample from its cache.
    """
    if budget <= num_sinks:
        raise ValueError(f"budget must exceed num_sinks={num_sinks}, got {budget}")
    for position, needed in answer_dependencies(example):
        oldest_kept = position - (budget - num_sinks) + 1
        if any(p >= num_sinks and p < oldest_kept for p in needed):
            return False
    return True


def generator_config(cfg: Any) -> SyntheticConfig:
    """Read the generator settings from a task config node, its `generator` node, or a SyntheticConfig."""
    if isinstance(cfg, SyntheticConfig):
        return cfg
    if cfg is None:
        return SyntheticConfig()
    generator = cfg.get("generator") if hasattr(cfg, "get") else None
    if generator is not None or (hasattr(cfg, "get") and cfg.get("name") is not None):
        return SyntheticConfig.from_mapping(generator)
    return SyntheticConfig.from_mapping(cfg)


def training_records(cfg: Any, n: int, seed: int) -> list[dict]:
    """Return `n` train-split records {"prompt", "completion"} for pretraining or gate distillation.

    `cfg` is the task config node (its `generator` block is read), a generator mapping or a
    SyntheticConfig. The completion has no end-of-sequence token, so the caller appends the
    tokenizer's `eos_token`, which the model must predict to stop.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    generator = generator_config(cfg)
    records = []
    for index in range(n):
        example = generate_example(generator, "train", seed, index)
        records.append({"prompt": example.question, "completion": example.answer})
    return records


def extract_answer(completion: str) -> str | None:
    """Return the generated trace as single-space-joined words, cut at the first end-of-sequence token."""
    words = []
    for word in completion.split():
        if word == "<eos>":
            break
        if word == "<pad>":
            continue
        words.append(word)
    return " ".join(words) if words else None


@register_task("synthetic")
class SyntheticTask(Task):
    """Header-first key-value recall with a running sum; see the module docstring for the format.

    Config fields besides the common ones: `generator` (SyntheticConfig fields), `eval_seed` (seed
    of the eval stream) and `num_samples` (how many samples `load()` returns without a limit).
    """

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.generator = generator_config(cfg)
        self.eval_seed = int(cfg.get("eval_seed", 0))
        self.num_samples = int(cfg.get("num_samples", 500))

    def load(self, limit: int | None = None) -> list[Sample]:
        count = self.num_samples if limit is None else limit
        if count < 0:
            raise ValueError(f"limit must be >= 0, got {count}")
        samples = []
        for index in range(count):
            example = generate_example(self.generator, "eval", self.eval_seed, index)
            samples.append(
                Sample(
                    id=f"synthetic-{self.eval_seed}-{index}",
                    question=example.question,
                    answer=example.answer,
                    meta={
                        "queries": example.queries,
                        "needed_positions": example.needed_positions,
                        "answer_start": example.answer_start,
                    },
                )
            )
        return samples

    def grade(self, completion: str, sample: Sample) -> GradeResult:
        """Exact match of the whole trace; a missing, extra or changed word makes it wrong."""
        extracted = extract_answer(completion)
        return GradeResult(extracted=extracted, correct=extracted == sample.answer)
