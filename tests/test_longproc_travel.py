"""Tests for LongProc's travel planning task on small trips written here in LongProc's schema.

The shared data folder has no travel planning data, so `write_travel_folder` lays out a
`travel_planning/` folder as LongProc releases it: `travel_planning_all.json` (both tiers, chosen
by `estimated_output_tokens`), `travel_planning_icl_examples.json` and a short `prompts.yaml`
with the same `{demonstration}` and `{problem}` fields as LongProc's. The expected solving
procedures below were written out by hand from LongProc's search rules (commit 78e873a,
`longproc/travel_planning_evaluator.py`).
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import trimkv.tasks.longproc  # noqa: F401  (registers the longproc_* tasks)
from trimkv.tasks.base import build_task
from trimkv.tasks.longproc import TravelPlanningTask
from trimkv.tasks.longproc_travel import (
    evaluate_travel_planning,
    parse_travel_plan,
    travel_planning_demonstration,
    travel_procedure_progress,
)
from trimkv.utils.io import DataFileError

CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "task"

# Two cities, no fixed schedule. Oslo is tried first, but there is no flight from Oslo to Rome.
TWO_CITIES = {
    "ground_truth_cities": "Rome**Oslo",
    "ground_truth_durations": "3**2",
    "num_cities": 2,
    "total_days": 4,
    "constraints": [
        {"type": "duration", "city": "Oslo", "num_days": 2},
        {"type": "duration", "city": "Rome", "num_days": 3},
    ],
    "connected_cities": [["Rome", "Oslo"]],
    "disambig_question_text": (
        "You plan to visit 2 European cities for 4 days in total. You would like to visit Oslo for 2 days. "
        "You would like to visit Rome for 3 days.\n\nHere are the cities that have direct flights:\n"
        "from Rome to Oslo.\n\nFind a trip plan of visiting the cities for 4 days by taking direct flights "
        "to commute between them."
    ),
    "ground_truth_plan": (
        "Here is the trip plan for visiting the 2 European cities for 4 days:\n\n"
        "**Day 1-3:** Arriving in Rome and visit Rome for 3 days.\n"
        "**Day 3:** Fly from Rome to Oslo.\n"
        "**Day 3-4:** Visit Oslo for 2 days."
    ),
    "id": "two_cities",
}

TWO_CITIES_PROCEDURE = """\
<Solving Procedure>
Read the requirements and identify the cities that have fixed schedules and the cities that need to be arranged.
* City: Oslo, Duration: 2 days.
* City: Rome, Duration: 3 days.

Cities that have fixed schedules: None.

Cities needing arrangement:
* City: Oslo, Duration: 2 days.
* City: Rome, Duration: 3 days.

Current day: 1. Current plan: [].
Check whether the city with an arrival day of Day 1 - is fixed.
No. Consider possible options from cities needing arrangement: [Oslo, Rome] and explore these options in order.
 |- Try arranging to visit Oslo from Day 1. Duration: 2 days. Schedule: Day 1 - 2.
 |- Check for direct flight from the starting point to Oslo.
 |- Yes.
 |- Check whether this arrangement is compatible with the next fixed schedule after Day 1: None.
 |- No following fixed schedules. This arrangement is compatible.
 |- This arrangement is feasible for now. Continue to arrange the rest of the plan.
  |- Current day: 2. Current plan: [Oslo].
  |- Check whether the city with an arrival day of Day 2 - is fixed.
  |- No. Consider possible options from cities needing arrangement: [Rome] and explore these options in order.
   |- Try arranging to visit Rome from Day 2. Duration: 3 days. Schedule: Day 2 - 4.
   |- Check for direct flight from Oslo to Rome.
   |- No. Drop this branch.
   |- Fail to arrange any option on day 2 in the current arrangement. Drop this branch.
 |- Try arranging to visit Rome from Day 1. Duration: 3 days. Schedule: Day 1 - 3.
 |- Check for direct flight from the starting point to Rome.
 |- Yes.
 |- Check whether this arrangement is compatible with the next fixed schedule after Day 1: None.
 |- No following fixed schedules. This arrangement is compatible.
 |- This arrangement is feasible for now. Continue to arrange the rest of the plan.
  |- Current day: 3. Current plan: [Rome].
  |- Check whether the city with an arrival day of Day 3 - is fixed.
  |- No. Consider possible options from cities needing arrangement: [Oslo] and explore these options in order.
   |- Try arranging to visit Oslo from Day 3. Duration: 2 days. Schedule: Day 3 - 4.
   |- Check for direct flight from Rome to Oslo.
   |- Yes.
   |- Check whether this arrangement is compatible with the next fixed schedule after Day 3: None.
   |- No following fixed schedules. This arrangement is compatible.
   |- This arrangement is feasible for now. Continue to arrange the rest of the plan.
    |- Current day: 4. Current plan: [Rome, Oslo].
    |- All 2 cities are arranged. Complete plan is found!
</Solving Procedure>

Output the plan in the required format:
<Plan>
**Day 1-3:** Arriving in Rome and visit Rome for 3 days.
**Day 3:** Fly from Rome to Oslo.
**Day 3-4:** Visit Oslo for 2 days.
</Plan>"""

# Three cities, Vienna fixed on days 4-5. Berlin first would make Paris leave after Vienna starts.
FIXED_VIENNA = {
    "ground_truth_cities": "Paris**Vienna**Berlin",
    "ground_truth_durations": "4**2**2",
    "num_cities": 3,
    "total_days": 6,
    "constraints": [
        {"type": "duration", "city": "Berlin", "num_days": 2},
        {"type": "duration", "city": "Paris", "num_days": 4},
        {"type": "duration", "city": "Vienna", "num_days": 2},
        {"type": "fixed", "city": "Vienna", "start_day": 4, "end_day": 5},
    ],
    "connected_cities": [["Berlin", "Paris"], ["Paris", "Vienna"], ["Vienna", "Berlin"]],
    "disambig_question_text": (
        "You plan to visit 3 European cities for 6 days in total. You would like to visit Berlin for 2 days. "
        "You would like to visit Paris for 4 days. You would like to visit Vienna for 2 days. You have a "
        "concert in Vienna between day 4 and day 5.\n\nHere are the cities that have direct flights:\n"
        "from Berlin to Paris, from Paris to Vienna, from Vienna to Berlin.\n\nFind a trip plan of visiting "
        "the cities for 6 days by taking direct flights to commute between them."
    ),
    "ground_truth_plan": (
        "Here is the trip plan for visiting the 3 European cities for 6 days:\n\n"
        "**Day 1-4:** Arriving in Paris and visit Paris for 4 days.\n"
        "**Day 4:** Fly from Paris to Vienna.\n"
        "**Day 4-5:** Visit Vienna for 2 days.\n"
        "**Day 5:** Fly from Vienna to Berlin.\n"
        "**Day 5-6:** Visit Berlin for 2 days."
    ),
    "id": "fixed_vienna",
}

FIXED_VIENNA_PROCEDURE = """\
<Solving Procedure>
Read the requirements and identify the cities that have fixed schedules and the cities that need to be arranged.
* City: Berlin, Duration: 2 days.
* City: Paris, Duration: 4 days.
* City: Vienna, Duration: 2 days, Fixed Schedule: Day 4 - 5.

Cities that have fixed schedules (sorted by their arrival days):
* City: Vienna, Fixed Schedule: Day 4 - 5.

Cities needing arrangement:
* City: Berlin, Duration: 2 days.
* City: Paris, Duration: 4 days.

Current day: 1. Current plan: [].
Check whether the city with an arrival day of Day 1 - is fixed.
No. Consider possible options from cities needing arrangement: [Berlin, Paris] and explore these options in order.
 |- Try arranging to visit Berlin from Day 1. Duration: 2 days. Schedule: Day 1 - 2.
 |- Check for direct flight from the starting point to Berlin.
 |- Yes.
 |- Check whether this arrangement is compatible with the next fixed schedule after Day 1: Vienna (Day 4 - 5).
 |- The departure day of Berlin is Day 2. The arrival day of Vienna is Day 4. Day 2 is not later than (<=) Day 4. This arrangement is compatible.
 |- This arrangement is feasible for now. Continue to arrange the rest of the plan.
  |- Current day: 2. Current plan: [Berlin].
  |- Check whether the city with an arrival day of Day 2 - is fixed.
  |- No. Consider possible options from cities needing arrangement: [Paris] and explore these options in order.
   |- Try arranging to visit Paris from Day 2. Duration: 4 days. Schedule: Day 2 - 5.
   |- Check for direct flight from Berlin to Paris.
   |- Yes.
   |- Check whether this arrangement is compatible with the next fixed schedule after Day 2: Vienna (Day 4 - 5).
   |- The departure day of Paris is Day 5. The arrival day of Vienna is Day 4. Day 5 is later than (>) Day 4. This arrangement is incompatible. Drop this branch.
   |- Fail to arrange any option on day 2 in the current arrangement. Drop this branch.
 |- Try arranging to visit Paris from Day 1. Duration: 4 days. Schedule: Day 1 - 4.
 |- Check for direct flight from the starting point to Paris.
 |- Yes.
 |- Check whether this arrangement is compatible with the next fixed schedule after Day 1: Vienna (Day 4 - 5).
 |- The departure day of Paris is Day 4. The arrival day of Vienna is Day 4. Day 4 is not later than (<=) Day 4. This arrangement is compatible.
 |- This arrangement is feasible for now. Continue to arrange the rest of the plan.
  |- Current day: 4. Current plan: [Paris].
  |- Check whether the city with an arrival day of Day 4 - is fixed.
  |- Yes. The city with an arrival day of Day 4 - is fixed: Vienna.
   |- Try arranging to visit Vienna from Day 4. Duration: 2 days. Schedule: Day 4 - 5.
   |- Check for direct flight from Paris to Vienna.
   |- Yes.
   |- Check whether this arrangement is compatible with the next fixed schedule after Day 4: None.
   |- No following fixed schedules. This arrangement is compatible.
   |- This arrangement is feasible for now. Continue to arrange the rest of the plan.
    |- Current day: 5. Current plan: [Paris, Vienna].
    |- Check whether the city with an arrival day of Day 5 - is fixed.
    |- No. Consider possible options from cities needing arrangement: [Berlin] and explore these options in order.
     |- Try arranging to visit Berlin from Day 5. Duration: 2 days. Schedule: Day 5 - 6.
     |- Check for direct flight from Vienna to Berlin.
     |- Yes.
     |- Check whether this arrangement is compatible with the next fixed schedule after Day 5: None.
     |- No following fixed schedules. This arrangement is compatible.
     |- This arrangement is feasible for now. Continue to arrange the rest of the plan.
      |- Current day: 6. Current plan: [Paris, Vienna, Berlin].
      |- All 3 cities are arranged. Complete plan is found!
</Solving Procedure>

Output the plan in the required format:
<Plan>
**Day 1-4:** Arriving in Paris and visit Paris for 4 days.
**Day 4:** Fly from Paris to Vienna.
**Day 4-5:** Visit Vienna for 2 days.
**Day 5:** Fly from Vienna to Berlin.
**Day 5-6:** Visit Berlin for 2 days.
</Plan>"""

# A shortened USER_PROMPT with the fields of LongProc's travel planning template.
PROMPTS_YAML = """\
USER_PROMPT: |-
  TASK:
  Your task is to create a trip plan.

  EXAMPLES:
  {demonstration}

  YOUR TASK:
  Now, make a trip plan according to the following constraints.

  {problem}
"""

# (record, id, estimated output tokens): the 2k tier takes [0, 2048), the 8k tier [4096, 8192).
DATA_RECORDS = [
    (FIXED_VIENNA, "r0", 0),
    (TWO_CITIES, "r1", 3000),
    (FIXED_VIENNA, "r2", 2047),
    (TWO_CITIES, "r3", 4096),
    (FIXED_VIENNA, "r4", 8191),
    (TWO_CITIES, "r5", 8192),
    (TWO_CITIES, "r6", 1500),
    (TWO_CITIES, "r7", 2048),
    (FIXED_VIENNA, "r8", 4095),
]
TIER_INDICES = {"2k": ["0", "2", "6"], "8k": ["3", "4"]}


def travel_records() -> list[dict]:
    return [
        {**record, "id": record_id, "estimated_output_tokens": tokens} for record, record_id, tokens in DATA_RECORDS
    ]


def write_travel_folder(root: Path, records: list | None = None, examples: list | None = None) -> Path:
    """Lay out `root/travel_planning/` as LongProc's data/ folder does; return root."""
    folder = root / "travel_planning"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prompts.yaml").write_text(PROMPTS_YAML, encoding="utf-8")
    examples = [TWO_CITIES, FIXED_VIENNA] if examples is None else examples
    (folder / "travel_planning_icl_examples.json").write_text(json.dumps(examples), encoding="utf-8")
    records = travel_records() if records is None else records
    (folder / "travel_planning_all.json").write_text(json.dumps(records, indent=2), encoding="utf-8")
    return root


def travel_config(data_path: Path | str | None, **overrides):
    config = OmegaConf.load(CONF_DIR / "longproc_travel_planning.yaml")
    config.data_path = None if data_path is None else str(data_path)
    for key, value in overrides.items():
        OmegaConf.update(config, key, value)
    return config


def load_travel(tmp_path: Path, tier: str = "2k"):
    task = build_task(travel_config(write_travel_folder(tmp_path), tier=tier))
    return task, task.load()


def procedure_lines(text: str) -> list[str]:
    """The non-blank lines LongProc compares, without the plan instruction line."""
    return [line for line in text.split("\n") if line.strip() and line != "Output the plan in the required format:"]


# The gold procedure


@pytest.mark.parametrize(
    ("record", "expected"), [(TWO_CITIES, TWO_CITIES_PROCEDURE), (FIXED_VIENNA, FIXED_VIENNA_PROCEDURE)]
)
def test_demonstration_matches_hand_trace(record, expected):
    assert travel_planning_demonstration(record) == expected


def test_fixed_cities_sorted_by_arrival():
    record = {
        "num_cities": 3,
        "constraints": [
            {"type": "duration", "city": "Lisbon", "num_days": 3},
            {"type": "fixed", "city": "Lisbon", "start_day": 3, "end_day": 5},
            {"type": "duration", "city": "Madrid", "num_days": 3},
            {"type": "fixed", "city": "Madrid", "start_day": 1, "end_day": 3},
            {"type": "duration", "city": "Porto", "num_days": 2},
        ],
        "connected_cities": [["Madrid", "Lisbon"], ["Lisbon", "Porto"]],
        "ground_truth_plan": (
            "Here is the trip plan for visiting the 3 European cities for 6 days:\n\n"
            "**Day 1-3:** Arriving in Madrid and visit Madrid for 3 days.\n**Day 3:** Fly from Madrid to Lisbon.\n"
            "**Day 3-5:** Visit Lisbon for 3 days.\n**Day 5:** Fly from Lisbon to Porto.\n"
            "**Day 5-6:** Visit Porto for 2 days."
        ),
    }

    procedure = travel_planning_demonstration(record)
    assert (
        "* City: Lisbon, Duration: 3 days, Fixed Schedule: Day 3 - 5.\n"
        "* City: Madrid, Duration: 3 days, Fixed Schedule: Day 1 - 3.\n"
        "* City: Porto, Duration: 2 days.\n\n"
        "Cities that have fixed schedules (sorted by their arrival days):\n"
        "* City: Madrid, Fixed Schedule: Day 1 - 3.\n"
        "* City: Lisbon, Fixed Schedule: Day 3 - 5.\n\n"
        "Cities needing arrangement:\n"
        "* City: Porto, Duration: 2 days.\n\n"
        "Current day: 1. Current plan: [].\n"
        "Check whether the city with an arrival day of Day 1 - is fixed.\n"
        "Yes. The city with an arrival day of Day 1 - is fixed: Madrid.\n"
    ) in procedure
    next_fixed = " |- Check whether this arrangement is compatible with the next fixed schedule after Day 1: Lisbon (Day 3 - 5).\n"
    assert next_fixed in procedure


def test_demonstration_checks_ground_truth_plan():
    record = {**FIXED_VIENNA, "ground_truth_plan": FIXED_VIENNA["ground_truth_plan"].replace("Berlin for 2", "Berlin for 3")}

    with pytest.raises(ValueError, match="ground_truth_plan gives"):
        travel_planning_demonstration(record)


def test_demonstration_without_plan_fails():
    record = {**TWO_CITIES, "connected_cities": []}

    with pytest.raises(ValueError, match="finds no plan"):
        travel_planning_demonstration(record)


# Loading and prompts


def test_prompt_fills_template(tmp_path):
    task, samples = load_travel(tmp_path)
    demonstration = (
        f"# Example\n{TWO_CITIES['disambig_question_text']}\n\n{TWO_CITIES_PROCEDURE}\n\n"
        f"# Example\n{FIXED_VIENNA['disambig_question_text']}\n\n{FIXED_VIENNA_PROCEDURE}"
    )
    opening = "TASK:\nYour task is to create a trip plan.\n\nEXAMPLES:\n"
    closing = "\n\nYOUR TASK:\nNow, make a trip plan according to the following constraints.\n\n"

    assert isinstance(task, TravelPlanningTask)
    assert samples[0].question == opening + demonstration + closing + FIXED_VIENNA["disambig_question_text"]
    assert samples[2].id == "6"
    assert samples[2].question == opening + demonstration + closing + TWO_CITIES["disambig_question_text"]


@pytest.mark.parametrize("tier", ["2k", "8k"])
def test_tier_selects_by_output_tokens(tmp_path, tier):
    task, samples = load_travel(tmp_path, tier)

    assert task.dataset_name == f"travel_planning_{tier}"
    assert [sample.id for sample in samples] == TIER_INDICES[tier]
    for sample in samples:
        record = DATA_RECORDS[int(sample.id)][0]
        assert sample.meta["record_id"] == f"r{sample.id}"
        assert sample.meta["cities"] == record["ground_truth_cities"].split("**")
        assert sample.meta["durations"] == [int(days) for days in record["ground_truth_durations"].split("**")]
        assert sample.answer == (TWO_CITIES_PROCEDURE if record is TWO_CITIES else FIXED_VIENNA_PROCEDURE)


def test_limit_applies_after_tier_filter(tmp_path):
    task = build_task(travel_config(write_travel_folder(tmp_path), tier="8k"))

    assert [sample.id for sample in task.load(limit=1)] == ["3"]


# Grading


@pytest.mark.parametrize("tier", ["2k", "8k"])
def test_gold_output_scores_full(tmp_path, tier):
    task, samples = load_travel(tmp_path, tier)

    for sample in samples:
        for completion in (sample.answer, "Let me solve it.\n\n" + sample.answer):
            result = task.grade(completion, sample)
            assert result.correct, (sample.id, result.error)
            assert result.metrics == {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}


def test_wrong_duration_scores_zero(tmp_path):
    task, samples = load_travel(tmp_path)
    sample = samples[0]  # Paris, Vienna, Berlin
    gold_line = "**Day 5-6:** Visit Berlin for 2 days."
    corrupted = sample.answer.replace(gold_line, "**Day 5-7:** Visit Berlin for 3 days.")
    assert corrupted != sample.answer

    result = task.grade(corrupted, sample)
    lines = procedure_lines(sample.answer)
    assert not result.correct
    assert result.metrics["accuracy"] == 0.0
    assert result.metrics["extraction_rate"] == 1.0
    assert result.metrics["partial_accuracy"] == pytest.approx(lines.index(gold_line) / len(lines))
    assert result.error == "stay 3 is ('Berlin', 3), expected ('Berlin', 2)"


def test_wrong_city_scores_zero(tmp_path):
    task, samples = load_travel(tmp_path)
    sample = samples[0]
    corrupted = sample.answer.replace("**Day 5:** Fly from Vienna to Berlin.", "**Day 5:** Fly from Vienna to Munich.")
    assert corrupted != sample.answer

    result = task.grade(corrupted, sample)
    assert result.metrics["accuracy"] == 0.0
    assert result.metrics["extraction_rate"] == 1.0
    assert 0.0 < result.metrics["partial_accuracy"] < 1.0
    assert "Munich" in result.error


def test_wrong_first_city_scores_zero():
    plan = "**Day 1-4:** Arriving in Vienna and visit Vienna for 4 days.\n**Day 4:** Fly from Vienna to Paris.\n**Day 4-6:** Visit Paris for 3 days."
    completion = f"<Plan>\n{plan}\n</Plan>"

    metrics, parsed, error = evaluate_travel_planning(completion, ["Paris", "Vienna"], [4, 3], FIXED_VIENNA_PROCEDURE)
    assert parsed == plan
    assert metrics == {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": 1.0}
    assert error == "stay 1 is ('Vienna', 4), expected ('Paris', 4)"


def test_missing_plan_tag_gives_no_extraction(tmp_path):
    task, samples = load_travel(tmp_path)
    sample = samples[0]
    untagged = sample.answer.replace("<Plan>", "Plan:")

    result = task.grade(untagged, sample)
    assert result.metrics["extraction_rate"] == 0.0
    assert result.metrics["accuracy"] == 0.0
    assert result.extracted is None
    assert result.error == "no <Plan> block"
    # "Plan:" and "<Plan>" normalise to the same words, so the whole procedure still matches;
    # LongProc's index counts the last matched line as not reached.
    lines = procedure_lines(sample.answer)
    assert result.metrics["partial_accuracy"] == pytest.approx((len(lines) - 1) / len(lines))


def test_cut_off_procedure_scores_partial(tmp_path):
    task, samples = load_travel(tmp_path)
    sample = samples[0]
    lines = procedure_lines(sample.answer)
    first_ten = "\n".join(lines[:10])

    result = task.grade(first_ten, sample)
    assert result.metrics == {
        "accuracy": 0.0,
        "partial_accuracy": pytest.approx(9 / len(lines)),
        "extraction_rate": 0.0,
    }


def test_procedure_progress_normalises_lines():
    gold = TWO_CITIES_PROCEDURE
    lines = procedure_lines(gold)
    full = (len(lines) - 1) / len(lines)
    # Case, punctuation, articles and extra words around a gold line are ignored.
    loose = gold.replace("Current day: 1. Current plan: [].", "CURRENT DAY 1, current plan - the []").replace(
        " |- Yes.", " |- Yes! There is one."
    )
    assert loose.count("There is one") == 3

    assert travel_procedure_progress(loose, gold) == pytest.approx(full)
    assert travel_procedure_progress(gold.replace(" |- Yes.", " |- No."), gold) < full
    # The text before <Solving Procedure> is skipped, and a second tag ends the procedure.
    assert travel_procedure_progress("Intro line\n" + gold, gold) == pytest.approx(full)
    second_tag_at = lines.index("  |- Current day: 3. Current plan: [Rome].")
    cut = gold.replace(lines[second_tag_at], "<Solving Procedure>")
    assert travel_procedure_progress(cut, gold) == pytest.approx((second_tag_at - 1) / len(lines))
    assert travel_procedure_progress("", gold) == 0.0


def test_plan_parser_rules():
    two_stays = "**Day 1-3:** Arriving in Rome and visit Rome for 3 days.\n**Day 3:** Fly from Rome to Oslo.\n**Day 3-4:** Visit Oslo for 2 days."

    assert parse_travel_plan(two_stays) == [("Rome", 3), ("Oslo", 2)]
    # Without a flight line nothing can be read, even for a one-city trip.
    assert parse_travel_plan("**Day 1-3:** Arriving in Rome and visit Rome for 3 days.") == []
    # The last day range sets the last stay's length, not the day count written after it.
    assert parse_travel_plan(two_stays.replace("3-4:** Visit Oslo for 2", "3-6:** Visit Oslo for 2")) == [("Rome", 3), ("Oslo", 4)]
    # A stated trip length stops the parser at the range that ends on it.
    stated = "Trip to 2 European cities for 4 days.\n" + two_stays + "\n**Day 5-9:** Visit Oslo again."
    assert parse_travel_plan(stated) == [("Rome", 3), ("Oslo", 2)]


def test_extra_stays_after_gold_still_count():
    # LongProc compares only as many stays as the gold plan has.
    plan = (
        "**Day 1-3:** Arriving in Rome and visit Rome for 3 days.\n**Day 3:** Fly from Rome to Oslo.\n"
        "**Day 3-4:** Visit Oslo for 2 days.\n**Day 4:** Fly from Oslo to Bergen.\n**Day 4-5:** Visit Bergen for 2 days."
    )

    metrics, _, _ = evaluate_travel_planning(f"<Plan>{plan}</Plan>", ["Rome", "Oslo"], [3, 2], TWO_CITIES_PROCEDURE)
    assert metrics["accuracy"] == 1.0


def test_grading_reads_text_after_thinking(tmp_path):
    task, samples = load_travel(tmp_path)
    sample = samples[0]
    draft = "<think>\n<Plan>\n**Day 1-2:** Arriving in Berlin.\n</Plan>\n</think>\n"

    assert task.grade(draft + sample.answer, sample).correct
    raw = build_task(travel_config(tmp_path, strip_thinking=False))
    assert not raw.grade(draft + sample.answer, sample).correct


# Errors and configs


def test_unknown_tier_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"no tier '0\.5k'; choose one of 2k, 8k"):
        build_task(travel_config(tmp_path, tier="0.5k"))


def test_missing_data_file_is_named(tmp_path):
    with pytest.raises(DataFileError, match=r"not found: .*travel_planning_all\.json .*task\.data_path"):
        build_task(travel_config(tmp_path)).load()


def test_missing_examples_file_is_named(tmp_path):
    write_travel_folder(tmp_path)
    (tmp_path / "travel_planning" / "travel_planning_icl_examples.json").unlink()

    with pytest.raises(DataFileError, match=r"in-context examples file not found: .*travel_planning_icl_examples\.json"):
        build_task(travel_config(tmp_path)).load()


def test_malformed_example_is_named(tmp_path):
    berlin, paris, vienna, vienna_fixed = FIXED_VIENNA["constraints"]
    broken = {**FIXED_VIENNA, "constraints": [vienna_fixed, berlin, paris, vienna]}
    write_travel_folder(tmp_path, examples=[TWO_CITIES, broken])

    with pytest.raises(DataFileError, match=r"icl_examples\.json: example 2: constraints\[3\]: Vienna has a fixed schedule"):
        build_task(travel_config(tmp_path)).load()


def test_malformed_json_names_line(tmp_path):
    write_travel_folder(tmp_path)
    (tmp_path / "travel_planning" / "travel_planning_all.json").write_text('[\n{"id": "x",\n  oops}\n]', encoding="utf-8")

    with pytest.raises(DataFileError, match=r"travel_planning_all\.json:3:"):
        build_task(travel_config(tmp_path)).load()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"estimated_output_tokens": None}, r"record 3: missing field 'estimated_output_tokens'"),
        ({"estimated_output_tokens": "short"}, r"record 3: estimated_output_tokens must be a number, got 'short'"),
        ({"disambig_question_text": None}, r"record 3: missing field 'disambig_question_text'"),
        ({"ground_truth_durations": "4**two**2"}, r"record 3: ground_truth_durations must be whole numbers"),
        ({"ground_truth_cities": "Paris**Vienna"}, r"record 3: .*must list the same positive number of stays"),
        ({"num_cities": "3"}, r"record 3: .*'num_cities' must be of type int, got '3'; fix or remove"),
        ({"connected_cities": [["Paris"]]}, r"record 3: connected_cities\[0\] must be a \[from city, to city\] pair"),
        ({"ground_truth_plan": "no blank line"}, r"record 3: ground_truth_plan must have an introduction"),
    ],
)
def test_malformed_record_is_named(tmp_path, change, message):
    records = travel_records()
    records[2] = {**records[2], **change}
    write_travel_folder(tmp_path, records=records)

    with pytest.raises(DataFileError, match=message):
        build_task(travel_config(tmp_path)).load()


def test_hub_offline_error_names_data_path():
    task = build_task(travel_config(None, tier="8k"))

    with pytest.raises(DataFileError, match=r"(?s)PrincetonPLI/LongProc \(config travel_planning_8k.*task\.data_path"):
        task.load(limit=1)


def hub_rows() -> list[dict]:
    rows = []
    for index, record in enumerate((FIXED_VIENNA, TWO_CITIES)):
        metadata = {key: record[key] for key in ("ground_truth_cities", "ground_truth_durations", "id")}
        rows.append({
            "id": f"hub{index}",
            "input_prompt": record["disambig_question_text"],
            "reference_output": travel_planning_demonstration(record),
            "metadata": json.dumps(metadata),
        })
    return rows


def fake_datasets(monkeypatch, rows: list[dict], calls: list) -> None:
    """Install a `datasets` module whose load_dataset returns `rows`, recording its arguments."""

    def load_dataset(path, name, split):
        calls.append((path, name, split))
        return rows

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_rows_read_metadata(monkeypatch):
    calls = []
    fake_datasets(monkeypatch, hub_rows(), calls)
    task = build_task(travel_config(None))

    samples = task.load()
    assert calls == [("PrincetonPLI/LongProc", "travel_planning_2k", "test")]
    assert [sample.id for sample in samples] == ["hub0", "hub1"]
    assert samples[1].meta == {"cities": ["Rome", "Oslo"], "durations": [3, 2]}
    assert task.grade(samples[0].answer, samples[0]).correct
    assert not task.grade(samples[1].answer, samples[0]).correct


def test_hub_row_without_procedure_is_rejected(monkeypatch):
    rows = hub_rows()
    rows[1]["reference_output"] = "<Plan>\n**Day 1-3:** Arriving in Rome.\n</Plan>"
    fake_datasets(monkeypatch, rows, [])

    with pytest.raises(DataFileError, match=r"row id hub1: reference_output has no <Solving Procedure>"):
        build_task(travel_config(None)).load()


def test_config_is_greedy_with_long_generation():
    config = OmegaConf.load(CONF_DIR / "longproc_travel_planning.yaml")
    countdown = OmegaConf.load(CONF_DIR / "longproc_countdown.yaml")

    assert config.name == "longproc_travel_planning"
    assert config.tier == "2k"
    assert set(config) == set(countdown)
    assert config.generation == countdown.generation
    assert config.generation.do_sample is False
    assert config.generation.max_new_tokens == 32768
