"""The math benchmarks GSM8K, MATH-500 and AIME24: loaders and graders.

Each task reads a local JSONL file when `task.data_path` is set, else the split named by
`task.hub_path`, `task.hub_config` and `task.split` from the Hugging Face Hub. Field names are
matched as written, capitalised or upper-case, so the Hub's AIME 2024 copy
(`ID`, `Problem`, `Solution`, `Answer`) loads like the lower-case files.

A sample's id is the record's own id field when the dataset has one (`id` for AIME24,
`unique_id` for the Hub's MATH-500), else its 0-based position in the file or split.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from trimkv.tasks.base import GradeResult, Sample, Task, register_task
from trimkv.tasks.grading import (
    answer_region,
    extract_gsm8k_answer,
    gsm8k_gold_answer,
    is_equivalent,
    last_boxed,
)
from trimkv.utils.io import DataFileError, read_jsonl

logger = logging.getLogger(__name__)


class MathTask(Task):
    """A math benchmark whose completions end in a `\\boxed{}` final answer.

    Subclasses set the Hub defaults and the record fields. The config keys `hub_path`,
    `hub_config` and `split` fall back to these class attributes only when the key is absent.
    An explicit null is kept, because a Hub dataset may have no config name.
    """

    hub_path: str = ""
    hub_config: str | None = None
    split: str = "test"
    question_field: str = "problem"
    answer_field: str = "answer"
    id_field: str | None = None
    # Sample.meta key -> record field, copied when the record has that field.
    meta_fields: dict[str, str] = {}

    def __init__(self, cfg: Any):
        # Task.format_prompt reads keys as attributes, which a plain dict does not support.
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(dict(cfg))
        super().__init__(cfg)

    def load(self, limit: int | None = None) -> list[Sample]:
        _check_limit(limit)
        records, source = self._read_records()
        if limit is not None:
            records = records[:limit]

        samples = [self._to_sample(record, index, source) for index, record in enumerate(records)]
        _check_unique_ids(samples, source)
        logger.info("loaded %d %s problems from %s", len(samples), self.name, source)
        return samples

    def grade(self, completion: str, sample: Sample) -> GradeResult:
        extracted = last_boxed(answer_region(completion))
        correct = extracted is not None and is_equivalent(extracted, sample.answer)
        return GradeResult(extracted=extracted, correct=correct)

    def gold_answer(self, record: dict, where: str) -> str:
        """Return the gold final answer of one record as a string; `where` names the record in errors."""
        return str(_get_field(record, self.answer_field, where)).strip()

    def _read_records(self) -> tuple[list[dict], str]:
        data_path = self.cfg.get("data_path")
        if data_path:
            # A relative path is taken from the directory the run started in, even when Hydra
            # has changed into its output directory (hydra.job.chdir=true).
            path = Path(to_absolute_path(str(Path(data_path).expanduser())))
            return read_jsonl(path), str(path)
        return self._read_hub_records()

    def _read_hub_records(self) -> tuple[list[dict], str]:
        # Imported here because importing `datasets` takes about a second and a run that
        # reads a local file never needs it.
        import datasets

        hub_path = self.cfg.get("hub_path", self.hub_path)
        hub_config = self.cfg.get("hub_config", self.hub_config)
        split = self.cfg.get("split", self.split)
        source = f"{hub_path} (config {hub_config}, split {split})"
        if not hub_path:
            raise DataFileError(
                f"task {self.name!r} has neither task.data_path nor task.hub_path set; "
                f"set task.data_path=/path/to/test.jsonl or task.hub_path=<Hub dataset name>"
            )
        try:
            dataset = datasets.load_dataset(hub_path, hub_config, split=split)
        except (OSError, ValueError) as error:
            # OSError covers ConnectionError (offline, no network) and DatasetNotFoundError;
            # ValueError covers an unknown split or config.
            raise DataFileError(
                f"failed to load {source} from the Hugging Face Hub: {error}. "
                f"Check network access and the dataset name, or set "
                f"task.data_path=/path/to/test.jsonl to read a local JSONL file"
            ) from error
        return [dict(row) for row in dataset], source

    def _to_sample(self, record: dict, index: int, source: str) -> Sample:
        where = f"{source}: record {index + 1}"
        question = str(_get_field(record, self.question_field, where))
        answer = self.gold_answer(record, where)
        if not answer:
            raise DataFileError(f"{where}: the gold answer is empty; fix or remove that record")

        sample_id = str(index)
        if self.id_field is not None and _find_key(record, self.id_field) is not None:
            sample_id = str(_get_field(record, self.id_field, where))

        meta = {}
        for meta_key, field_name in self.meta_fields.items():
            key = _find_key(record, field_name)
            if key is not None:
                meta[meta_key] = record[key]
        return Sample(id=sample_id, question=question, answer=answer, meta=meta)


@register_task("gsm8k")
class GSM8KTask(MathTask):
    """GSM8K (Cobbe et al., 2021): grade-school word problems with integer answers.

    The gold answer is the number after `####` in the reference solution, commas removed. A
    completion's answer is its last `\\boxed{}`, else its last number, so a completion in
    GSM8K's own `#### 18` style is graded too.
    """

    hub_path = "openai/gsm8k"
    hub_config = "main"
    split = "test"
    question_field = "question"
    answer_field = "answer"
    meta_fields = {"solution": "answer"}

    def gold_answer(self, record: dict, where: str) -> str:
        solution = str(_get_field(record, self.answer_field, where))
        try:
            return gsm8k_gold_answer(solution)
        except ValueError as error:
            raise DataFileError(f"{where}: {error}") from None

    def grade(self, completion: str, sample: Sample) -> GradeResult:
        extracted = extract_gsm8k_answer(answer_region(completion))
        correct = extracted is not None and is_equivalent(extracted, sample.answer)
        return GradeResult(extracted=extracted, correct=correct)


@register_task("math500")
class Math500Task(MathTask):
    """MATH-500: the 500 MATH test problems (Hendrycks et al., 2021) chosen for PRM800K."""

    hub_path = "HuggingFaceH4/MATH-500"
    hub_config = None
    split = "test"
    question_field = "problem"
    answer_field = "answer"
    id_field = "unique_id"
    meta_fields = {"solution": "solution", "subject": "subject", "level": "level"}


@register_task("aime24")
class AIME24Task(MathTask):
    """AIME 2024, contests I and II: 30 problems, each with an integer answer from 0 to 999."""

    # This Hub copy has a single split, named `train`.
    hub_path = "Maxwell-Jia/AIME_2024"
    hub_config = None
    split = "train"
    question_field = "problem"
    answer_field = "answer"
    id_field = "id"
    meta_fields = {"solution": "solution", "url": "url"}


def _find_key(record: dict, name: str) -> str | None:
    """Return the key under which `record` stores field `name` (as written, Capitalised or UPPER)."""
    for key in (name, name.capitalize(), name.upper()):
        if key in record:
            return key
    return None


def _get_field(record: dict, name: str, where: str) -> Any:
    key = _find_key(record, name)
    if key is None or record[key] is None:
        fields = ", ".join(sorted(record)) or "none"
        raise DataFileError(
            f"{where}: missing field {name!r} (fields present: {fields}); "
            f"check that the file or Hub dataset is the one this task expects"
        )
    return record[key]


def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r} (set limit=null for all problems)")


def _check_unique_ids(samples: list[Sample], source: str) -> None:
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise DataFileError(f"{source}: sample id {sample.id!r} occurs more than once; ids must be unique")
        seen.add(sample.id)
