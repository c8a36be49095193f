"""LongProc (Ye et al., 2025, arXiv 2501.05414): long procedural generation tasks.

Six tasks are registered, each at the output-length tiers LongProc releases:

| task                         | tiers          | metric (see longproc_eval.py)               |
|------------------------------|----------------|---------------------------------------------|
| `longproc_countdown`         | 0.5k, 2k, 8k   | the `<Solution>` equations reach the target |
| `longproc_path_traversal`    | 0.5k, 2k, 8k   | exact match of the `<Route>`                |
| `longproc_tom_tracking`      | 0.5k, 2k, 8k   | every step of the belief trace matches      |
| `longproc_pseudo_to_code`    | 0.5k, 2k       | the C++ passes the first 10 test cases      |
| `longproc_html_to_tsv`       | 0.5k, 2k, 8k   | row-level F1 against the gold TSV           |
| `longproc_travel_planning`   | 2k, 8k         | the `<Plan>` cities and days match the gold |

Travel planning's search and metric are in longproc_travel.py.

Data comes from a local folder in the layout of LongProc's GitHub release when `task.data_path`
is set: `<data_path>/<task>/<task>_<tier>.json`, the task's `prompts.yaml` next to it, and for
HTML to TSV the pages under `<data_path>/html_to_tsv/webpage/`. Travel planning is released
as one file for both tiers, `<data_path>/travel_planning/travel_planning_all.json`. A tier takes
the records whose `estimated_output_tokens` lies in [0, 2048) for 2k or [4096, 8192) for 8k,
and the prompt's examples come from `travel_planning_icl_examples.json` in the same folder.
Prompts are built from the `USER_PROMPT` template of that `prompts.yaml`, filled with the same
record fields as LongProc's `longproc/longproc_data.py` (princeton-pli/LongProc, commit 78e873a).
Without `data_path`, the config `<task>_<tier>` of the Hub dataset `task.hub_path`
(PrincetonPLI/LongProc) is read. Its rows contain the prompt already built (`input_prompt`),
the gold output (`reference_output`) and a JSON `metadata` string.

NOTE: the Hub path has not been run here (no network). The metadata keys it reads (`nums`,
`target`, `testcases`, and `ground_truth_cities` and `ground_truth_durations` for travel
planning) are the ones lm-evaluation-harness's LongProc port reads from it
(`lm_eval/tasks/longproc/metrics.py`).

Sample ids are the 0-based record index in the data file for local files (for travel planning,
the index in `travel_planning_all.json`) and the row's `id` for the Hub.
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path
from typing import Any

import yaml
from hydra.utils import to_absolute_path
from omegaconf import DictConfig, OmegaConf

from trimkv.tasks.base import Sample, Task, register_task
from trimkv.tasks.grading import answer_region
from trimkv.tasks.longproc_eval import (
    EvalOutput,
    countdown_demonstration,
    countdown_examples,
    evaluate_countdown,
    evaluate_html_to_tsv,
    evaluate_path_traversal,
    evaluate_tom_tracking,
    extract_cpp_code,
)
from trimkv.tasks.longproc_travel import (
    evaluate_travel_planning,
    travel_planning_demonstration,
    travel_planning_examples,
)
from trimkv.tasks.metrics import DetailedGradeResult, summarize_metrics
from trimkv.tasks.sandbox import CppSandbox, SandboxLimits
from trimkv.utils.io import DataFileError, read_json_list

logger = logging.getLogger(__name__)

LONGPROC_HUB_PATH = "PrincetonPLI/LongProc"

# The `estimated_output_tokens` range [low, high) of each travel planning tier, as LongProc selects them.
TRAVEL_PLANNING_OUTPUT_TOKENS = {"2k": (0, 2048), "8k": (4096, 8192)}

# The headers that LongProc's pseudocode prompt lists as already included. Its evaluator
# (`longproc/spoc_evaluator.py`) prepends exactly this text to the generated code.
SPOC_HEADER = (
    "#include <cstdio>\n"
    "#include <iostream>\n"
    "#include <vector>\n"
    "#include <algorithm>\n"
    "#include <numeric>\n"
    "#include <cmath>\n"
    "#include <cstring>\n"
    "#include <set>\n"
    "#include <map>\n"
    "#include <queue>\n"
    "#include <stack>\n"
    "#include <list>\n"
    "#include <fstream>\n"
    "#include <climits>\n"
    "#include <cassert>\n"
    "#include <iomanip>\n"
    "#include <sstream>\n"
    "#include <bitset>\n"
    "using namespace std;\n"
)


class LongProcTask(Task):
    """One LongProc task. Subclasses name the task, its tiers, prompt fields and evaluator.

    Config keys besides the common ones: `tier`, `data_path`, `hub_path`, `split` and
    `strip_thinking`. With `strip_thinking`, only the text after the last `</think>` is graded.
    LongProc's parsers take the first tag or every `- ` line of the whole completion, so they
    would otherwise parse a reasoning block as the output.
    """

    longproc_name: str = ""
    tiers: tuple[str, ...] = ("0.5k", "2k", "8k")

    def __init__(self, cfg: Any):
        # Task.format_prompt reads keys as attributes, which a plain dict does not support.
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.create(dict(cfg))
        super().__init__(cfg)
        self.tier = str(cfg.get("tier", self.tiers[0]))
        if self.tier not in self.tiers:
            raise ValueError(
                f"task {self.name!r} has no tier {self.tier!r}; choose one of {', '.join(self.tiers)} "
                f"(set task.tier=...)"
            )

    @property
    def dataset_name(self) -> str:
        """LongProc's name for this task and tier, such as `countdown_0.5k`."""
        return f"{self.longproc_name}_{self.tier}"

    # Loading

    def load(self, limit: int | None = None) -> list[Sample]:
        _check_limit(limit)
        data_path = self.cfg.get("data_path")
        if data_path:
            # A relative path is taken from the directory the run started in, even when Hydra
            # has changed into its output directory (hydra.job.chdir=true).
            root = Path(to_absolute_path(str(Path(data_path).expanduser())))
            samples, source = self._load_local(root, limit)
        else:
            samples, source = self._load_hub(limit)
        logger.info("loaded %d %s samples from %s", len(samples), self.dataset_name, source)
        return samples

    def _load_local(self, root: Path, limit: int | None) -> tuple[list[Sample], str]:
        folder = root / self.longproc_name
        data_file, records = self.local_records(folder)
        template = _read_prompt_template(folder / "prompts.yaml")
        if limit is not None:
            records = records[:limit]

        samples = []
        for index, record in records:
            where = f"{data_file}: record {index + 1}"
            if not isinstance(record, dict):
                raise DataFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
            fields = self.prompt_fields(record, folder, where)
            try:
                prompt = template.format(**fields)
            except KeyError as error:
                raise DataFileError(
                    f"{folder / 'prompts.yaml'}: USER_PROMPT uses the field {error.args[0]!r}, which "
                    f"{self.dataset_name} records do not provide (fields: {', '.join(sorted(fields))})"
                ) from None
            samples.append(
                Sample(
                    id=str(index),
                    question=prompt,
                    answer=self.reference_output(record, where),
                    meta=self.local_meta(record, where),
                )
            )
        return samples, str(data_file)

    def _load_hub(self, limit: int | None) -> tuple[list[Sample], str]:
        # Imported here because importing `datasets` takes about a second and a run that
        # reads a local folder never needs it.
        import datasets

        hub_path = self.cfg.get("hub_path") or LONGPROC_HUB_PATH
        split = self.cfg.get("split") or "test"
        source = f"{hub_path} (config {self.dataset_name}, split {split})"
        try:
            dataset = datasets.load_dataset(hub_path, self.dataset_name, split=split)
        except (OSError, ValueError) as error:
            # OSError covers ConnectionError (offline, no network) and DatasetNotFoundError;
            # ValueError covers an unknown split or config.
            raise DataFileError(
                f"failed to load {source} from the Hugging Face Hub: {error}. Check network access, "
                f"or set task.data_path to a local copy of LongProc's data/ folder "
                f"(github.com/princeton-pli/LongProc)"
            ) from error

        rows = [dict(row) for row in dataset]
        if limit is not None:
            rows = rows[:limit]
        samples = []
        for index, row in enumerate(rows):
            where = f"{source}: row {index + 1}"
            try:
                metadata = json.loads(_field(row, "metadata", where) or "{}")
            except json.JSONDecodeError as error:
                raise DataFileError(f"{where}: the metadata column is not valid JSON ({error.msg})") from None
            samples.append(
                Sample(
                    id=str(row.get("id", index)),
                    question=str(_field(row, "input_prompt", where)),
                    answer=str(_field(row, "reference_output", where)),
                    meta=self.hub_meta(metadata, where),
                )
            )
        return samples, source

    # Hooks for each task

    def local_records(self, folder: Path) -> tuple[Path, list[tuple[int, Any]]]:
        """Read this tier's records from the task folder; return the file and (index, record) pairs."""
        data_file = folder / f"{self.dataset_name}.json"
        hint = ("set task.data_path to the folder that contains <task>/<task>_<tier>.json (LongProc's data/ "
                "folder), or check task.tier")
        records = read_json_list(data_file, "records", hint, name="LongProc data file")
        return data_file, list(enumerate(records))

    def prompt_fields(self, record: dict, folder: Path, where: str) -> dict[str, Any]:
        """Return the values that fill the task's USER_PROMPT template for one local record."""
        raise NotImplementedError

    def reference_output(self, record: dict, where: str) -> str:
        """Return the gold output of one local record."""
        raise NotImplementedError

    def local_meta(self, record: dict, where: str) -> dict[str, Any]:
        """Return the fields of a local record that grading needs, beyond the gold output."""
        return {}

    def hub_meta(self, metadata: dict, where: str) -> dict[str, Any]:
        """Return the fields of a Hub row's metadata that grading needs, beyond the gold output."""
        return {}

    def evaluate(self, text: str, sample: Sample) -> EvalOutput:
        raise NotImplementedError

    # Grading

    def grade(self, completion: str, sample: Sample) -> DetailedGradeResult:
        text = answer_region(completion) if self.cfg.get("strip_thinking", True) else completion
        metrics, parsed, error = self.evaluate(text, sample)
        primary = metrics["f1"] if "f1" in metrics else metrics["accuracy"]
        return DetailedGradeResult(
            extracted=parsed,
            correct=primary == 1.0,
            score=primary,
            metrics=dict(metrics),
            error=error,
        )

    def summarize(self, results: list) -> dict[str, float | int | None]:
        """Average each LongProc metric over the graded samples."""
        return summarize_metrics(results)


@register_task("longproc_countdown")
class CountdownTask(LongProcTask):
    """Countdown: combine four numbers with + - * / to reach a target, searching step by step.

    The prompt's in-context examples and each record's gold search procedure are generated by
    the same search LongProc runs (`longproc_eval.countdown_demonstration`).
    """

    longproc_name = "countdown"

    def prompt_fields(self, record, folder, where):
        return {
            "demonstration": _countdown_examples(),
            "nums": _field(record, "nums", where),
            "target": _field(record, "target", where),
        }

    def reference_output(self, record, where):
        try:
            _, procedure = countdown_demonstration(_field(record, "nums", where), _field(record, "target", where))
        except ValueError as error:
            raise DataFileError(f"{where}: {error}; fix or remove that record") from None
        return procedure

    def local_meta(self, record, where):
        return {"nums": list(_field(record, "nums", where)), "target": _field(record, "target", where)}

    def hub_meta(self, metadata, where):
        return self.local_meta(metadata, where)

    def evaluate(self, text, sample):
        return evaluate_countdown(text, sample.meta["nums"], sample.meta["target"], sample.answer)


@register_task("longproc_path_traversal")
class PathTraversalTask(LongProcTask):
    """Path traversal: follow one-way connections between cities and write the route."""

    longproc_name = "path_traversal"

    def prompt_fields(self, record, folder, where):
        source, destination = _city_pair(record, where)
        return {"city_context": _field(record, "context_nl", where), "src_city": source, "dst_city": destination}

    def reference_output(self, record, where):
        return str(_field(record, "answer_nl", where))

    def evaluate(self, text, sample):
        return evaluate_path_traversal(text, sample.answer)


@register_task("longproc_tom_tracking")
class TomTrackingTask(LongProcTask):
    """Theory-of-mind tracking: trace where an agent believes an object is, step by step."""

    longproc_name = "tom_tracking"

    def prompt_fields(self, record, folder, where):
        return {
            "story_components": _field(record, "story_components", where),
            "story": _field(record, "story", where),
            "question": _field(record, "question", where),
        }

    def reference_output(self, record, where):
        return str(_field(record, "solution", where))

    def evaluate(self, text, sample):
        return evaluate_tom_tracking(text, sample.answer)


@register_task("longproc_pseudo_to_code")
class PseudoToCodeTask(LongProcTask):
    """Pseudocode to code (from SPoC): translate pseudocode line by line into C++.

    The completion's ```cpp block is compiled and run on the record's first
    `sandbox.max_test_cases` test cases (LongProc checks 10) by `sandbox.CppSandbox`.
    """

    longproc_name = "pseudo_to_code"
    tiers = ("0.5k", "2k")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._sandbox: CppSandbox | None = None

    def prompt_fields(self, record, folder, where):
        return {"pseudocode": "\n".join(_field(record, "pseudocode_lines", where))}

    def reference_output(self, record, where):
        return "\n".join(_field(record, "code_lines", where))

    def local_meta(self, record, where):
        meta = {"testcases": _field(record, "testcases", where)}
        if "problem_id" in record:
            meta["problem_id"] = record["problem_id"]
        return meta

    def hub_meta(self, metadata, where):
        return self.local_meta(metadata, where)

    @property
    def sandbox(self) -> CppSandbox:
        """The C++ sandbox configured by `task.sandbox`, created on first use."""
        if self._sandbox is None:
            settings = self.cfg.get("sandbox") or {}
            limit_keys = ("timeout_s", "cpu_time_s", "memory_mb", "output_limit_mb", "compile_timeout_s")
            limits = SandboxLimits(**{key: settings[key] for key in limit_keys if settings.get(key) is not None})
            self._sandbox = CppSandbox(
                header=SPOC_HEADER,
                compiler=settings.get("compiler") or "g++",
                compile_flags=list(settings.get("compile_flags") or ["-std=c++11", "-O"]),
                limits=limits,
                isolate_network=bool(settings.get("isolate_network", True)),
                precompiled_header=bool(settings.get("precompiled_header", True)),
            )
        return self._sandbox

    def evaluate(self, text, sample):
        code = extract_cpp_code(text)
        if code is None:
            return {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": 0.0}, None, "no ```cpp block"

        settings = self.cfg.get("sandbox") or {}
        max_test_cases = int(settings.get("max_test_cases") or 10)
        result = self.sandbox.run(code, sample.meta["testcases"][:max_test_cases])
        accuracy = 1.0 if result.passed else 0.0
        error = None if result.passed else f"{result.status}: {result.detail}"
        # LongProc reports partial accuracy equal to accuracy for this task.
        return {"accuracy": accuracy, "partial_accuracy": accuracy, "extraction_rate": 1.0}, code, error


@register_task("longproc_html_to_tsv")
class HtmlToTsvTask(LongProcTask):
    """HTML to TSV: extract the listed properties of every item on a web page into a table."""

    longproc_name = "html_to_tsv"

    def prompt_fields(self, record, folder, where):
        page = folder / str(_field(record, "html_path", where))
        if not page.is_file():
            raise DataFileError(
                f"{where}: the web page {page} is missing; LongProc's html_to_tsv folder must "
                f"contain the webpage/ pages next to {self.dataset_name}.json"
            )
        return {
            "html_str": page.read_text(encoding="utf-8"),
            "task_topic": _field(record, "task_topic", where),
            "task_description": _field(record, "task_description", where),
            "tsv_header": _field(record, "tsv_header", where),
            "filtering_instruction": _field(record, "filtering_instruction", where),
        }

    def reference_output(self, record, where):
        return str(_field(record, "gt", where))

    def local_meta(self, record, where):
        return {key: record[key] for key in ("task_id", "website_id") if key in record}

    def evaluate(self, text, sample):
        return evaluate_html_to_tsv(text, sample.answer)


@register_task("longproc_travel_planning")
class TravelPlanningTask(LongProcTask):
    """Travel planning: order the cities of a trip under fixed dates and one-way flights, by search.

    The prompt's in-context examples and each record's gold solving procedure are generated by
    the same depth-first search LongProc runs (`longproc_travel.travel_planning_demonstration`).
    """

    longproc_name = "travel_planning"
    tiers = ("2k", "8k")

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self._demonstration: str | None = None

    def local_records(self, folder):
        data_file = folder / "travel_planning_all.json"
        hint = ("set task.data_path to the folder that contains travel_planning/travel_planning_all.json "
                "(LongProc's data/ folder)")
        records = read_json_list(data_file, "records", hint, name="LongProc data file")
        self._demonstration = _travel_planning_examples(folder / "travel_planning_icl_examples.json")

        low, high = TRAVEL_PLANNING_OUTPUT_TOKENS[self.tier]
        chosen = []
        for index, record in enumerate(records):
            where = f"{data_file}: record {index + 1}"
            if not isinstance(record, dict):
                raise DataFileError(f"{where}: expected a JSON object, got {type(record).__name__}")
            tokens = _field(record, "estimated_output_tokens", where)
            if isinstance(tokens, bool) or not isinstance(tokens, (int, float)):
                raise DataFileError(f"{where}: estimated_output_tokens must be a number, got {tokens!r}")
            if low <= tokens < high:
                chosen.append((index, record))
        return data_file, chosen

    def prompt_fields(self, record, folder, where):
        # LongProc fills {demonstration} first and {problem} in a second format call. One call
        # gives the same text as long as the examples contain no braces, as LongProc's do.
        return {"demonstration": self._demonstration, "problem": _field(record, "disambig_question_text", where)}

    def reference_output(self, record, where):
        try:
            return travel_planning_demonstration(record)
        except ValueError as error:
            raise DataFileError(f"{where}: {error}; fix or remove that record") from None

    def local_meta(self, record, where):
        meta = _travel_gold_stays(record, where)
        if "id" in record:
            meta["record_id"] = record["id"]
        return meta

    def hub_meta(self, metadata, where):
        return _travel_gold_stays(metadata, where)

    def _load_hub(self, limit):
        samples, source = super()._load_hub(limit)
        for sample in samples:
            if "<Solving Procedure>" not in sample.answer:
                raise DataFileError(
                    f"{source}: row id {sample.id}: reference_output has no <Solving Procedure> block, which "
                    f"partial accuracy compares against; check task.hub_path and task.tier"
                )
        return samples, source

    def evaluate(self, text, sample):
        return evaluate_travel_planning(text, sample.meta["cities"], sample.meta["durations"], sample.answer)


def _travel_planning_examples(path: Path) -> str:
    hint = "LongProc ships travel_planning_icl_examples.json next to travel_planning_all.json"
    records = read_json_list(path, "example records", hint, name="LongProc in-context examples file")
    try:
        return travel_planning_examples(records)
    except ValueError as error:
        raise DataFileError(f"{path}: {error}; restore the file from LongProc's data/ folder") from None


def _travel_gold_stays(record: dict, where: str) -> dict[str, Any]:
    """Parse the gold `ground_truth_cities` (`A**B`) and `ground_truth_durations` (`3**4`)."""
    cities_text = _field(record, "ground_truth_cities", where)
    durations_text = _field(record, "ground_truth_durations", where)
    cities = [city for city in str(cities_text).split("**") if city]
    try:
        durations = [int(days) for days in str(durations_text).split("**") if days]
    except ValueError:
        raise DataFileError(
            f"{where}: ground_truth_durations must be whole numbers joined by '**', got {durations_text!r}"
        ) from None
    if not cities or len(cities) != len(durations):
        raise DataFileError(
            f"{where}: ground_truth_cities {cities_text!r} and ground_truth_durations {durations_text!r} "
            f"must list the same positive number of stays"
        )
    return {"cities": cities, "durations": durations}


@functools.lru_cache(maxsize=1)
def _countdown_examples() -> str:
    return countdown_examples()


def _city_pair(record: dict, where: str) -> tuple[str, str]:
    pair = _field(record, "question_repr", where)
    if not isinstance(pair, list) or len(pair) != 2:
        raise DataFileError(f"{where}: question_repr must be [source city, destination city], got {pair!r}")
    return str(pair[0]), str(pair[1])


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record or record[name] is None:
        fields = ", ".join(sorted(record)) or "none"
        raise DataFileError(
            f"{where}: missing field {name!r} (fields present: {fields}); "
            f"check that the file is the LongProc release this task expects"
        )
    return record[name]




def _read_prompt_template(path: Path) -> str:
    if not path.is_file():
        raise DataFileError(f"LongProc prompt file not found: {path}; it ships next to each task's data files")
    try:
        prompts = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise DataFileError(f"{path}: malformed YAML ({error})") from None
    if not isinstance(prompts, dict) or not isinstance(prompts.get("USER_PROMPT"), str):
        raise DataFileError(f"{path}: expected a USER_PROMPT string")
    return prompts["USER_PROMPT"]


def _check_limit(limit: int | None) -> None:
    if limit is None:
        return
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r} (set limit=null for all samples)")
