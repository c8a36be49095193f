"""LongProc's travel planning task: the gold search procedure and its evaluator.

Source: LongProc (Ye et al., 2025, arXiv 2501.05414), princeton-pli/LongProc at commit 78e873a,
files `longproc/travel_planning_evaluator.py` (the verbalized depth-first search that writes
both the in-context demonstrations and each record's gold output, and the two metrics) and
`longproc/longproc_data.py` (`eval_travel_planning`). The code here is our own. It writes the
same procedure text byte for byte and keeps the parsing quirks that change scores, named where
they are kept. The plan parser follows NATURAL PLAN's, which LongProc reuses.

A record describes a trip. Its `constraints` list has one `{"type": "duration", "city",
"num_days"}` entry per city, each followed directly by `{"type": "fixed", "city", "start_day",
"end_day"}` when that city has a fixed schedule. Its `connected_cities` lists one-way flights as
`[from, to]` pairs.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any

from trimkv.tasks.longproc_eval import EvalOutput, extract_between_tags

# The previous stop of the first city. Every city can be reached from it.
_START = "the starting point"
_PLAN_INSTRUCTION = "Output the plan in the required format:"
_PROCEDURE_TAG = "<Solving Procedure>"


@dataclass(frozen=True)
class Stay:
    """One city on the plan: arrival on `start_day`, departure on `end_day`, both counted."""

    city: str
    num_days: int
    start_day: int
    end_day: int


@dataclass
class TravelProblem:
    """The parts of a record that the search reads, checked for type."""

    num_cities: int
    # (city, num_days, fixed stay or None) for each duration constraint, in record order.
    durations: list[tuple[str, int, Stay | None]]
    # Fixed stays sorted by arrival day (a stable sort, so ties keep record order).
    fixed: list[Stay]
    # (city, num_days) of the cities without a fixed schedule, in record order.
    free: list[tuple[str, int]]
    flights: set[tuple[str, str]]


def _require(record: dict, key: str, kind: type, where: str = "") -> Any:
    """Return `record[key]`; raise ValueError, prefixed with `where`, when it is missing or not a `kind`."""
    prefix = f"{where}: " if where else ""
    if key not in record:
        raise ValueError(f"{prefix}missing field {key!r}")
    value = record[key]
    # bool is a subclass of int, but true is never a valid day count.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{prefix}{key!r} must be of type {kind.__name__}, got {value!r}")
    return value


def _fixed_stay(constraint: dict, where: str) -> Stay:
    start = _require(constraint, "start_day", int, where)
    end = _require(constraint, "end_day", int, where)
    if end < start:
        raise ValueError(f"{where}: end_day {end} is before start_day {start}")
    return Stay(_require(constraint, "city", str, where), end - start + 1, start, end)


def parse_travel_problem(record: dict) -> TravelProblem:
    """Check a record's `num_cities`, `constraints` and `connected_cities`; raise ValueError if malformed."""
    num_cities = _require(record, "num_cities", int)
    if num_cities < 1:
        raise ValueError(f"num_cities must be at least 1, got {num_cities}")
    constraints = _require(record, "constraints", list)
    connections = _require(record, "connected_cities", list)

    flights = set()
    for index, pair in enumerate(connections):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(city, str) for city in pair)):
            raise ValueError(f"connected_cities[{index}] must be a [from city, to city] pair, got {pair!r}")
        flights.add((pair[0], pair[1]))

    for index, constraint in enumerate(constraints):
        if not isinstance(constraint, dict) or constraint.get("type") not in ("duration", "fixed"):
            raise ValueError(
                f"constraints[{index}] must be an object of type 'duration' or 'fixed', got {constraint!r}"
            )
    fixed_by_index = {
        index: _fixed_stay(constraint, f"constraints[{index}]")
        for index, constraint in enumerate(constraints)
        if constraint["type"] == "fixed"
    }
    fixed_cities = {stay.city for stay in fixed_by_index.values()}

    durations = []
    free = []
    for index, constraint in enumerate(constraints):
        if constraint["type"] != "duration":
            continue
        where = f"constraints[{index}]"
        city = _require(constraint, "city", str, where)
        num_days = _require(constraint, "num_days", int, where)
        stay = None
        if city in fixed_cities:
            # LongProc reads a city's fixed schedule from the constraint right after its duration.
            stay = fixed_by_index.get(index + 1)
            if stay is None or stay.city != city:
                raise ValueError(
                    f"{where}: {city} has a fixed schedule, which must directly follow its duration constraint"
                )
        else:
            free.append((city, num_days))
        durations.append((city, num_days, stay))

    fixed = sorted(fixed_by_index.values(), key=lambda stay: stay.start_day)
    return TravelProblem(num_cities, durations, fixed, free, flights)


def _indent(level: int) -> str:
    return "" if level == 0 else " " * level + "|- "


def _names(cities: list[str]) -> str:
    """Format city names as LongProc does: `[A, B]`, without quotes."""
    return "[" + ", ".join(cities) + "]"


@dataclass
class _TravelSearch:
    """Depth-first search over the order of stays that writes LongProc's solving log."""

    problem: TravelProblem
    log: list[str] = field(default_factory=list)

    def visit(self, day: int, plan: list[Stay], free: list[tuple[str, int]]) -> list[Stay] | None:
        """Arrange the rest of the trip from `day` on; return the complete plan or None."""
        depth = 2 * len(plan)
        head = _indent(depth)
        self.log.append(f"{head}Current day: {day}. Current plan: {_names([stay.city for stay in plan])}.")
        if len(plan) == self.problem.num_cities:
            self.log.append(f"{head}All {self.problem.num_cities} cities are arranged. Complete plan is found!")
            return plan

        self.log.append(f"{head}Check whether the city with an arrival day of Day {day} - is fixed.")
        fixed_today = next((stay for stay in self.problem.fixed if stay.start_day == day), None)
        if fixed_today is not None:
            self.log.append(f"{head}Yes. The city with an arrival day of Day {day} - is fixed: {fixed_today.city}.")
            options = [fixed_today]
        else:
            self.log.append(
                f"{head}No. Consider possible options from cities needing arrangement: "
                f"{_names([city for city, _ in free])} and explore these options in order."
            )
            options = [Stay(city, num_days, day, day + num_days - 1) for city, num_days in free]

        previous = plan[-1].city if plan else _START
        next_fixed = next((stay for stay in self.problem.fixed if stay.start_day > day), None)
        step = _indent(depth + 1)
        for option in options:
            self.log.append(
                f"{step}Try arranging to visit {option.city} from Day {day}. Duration: {option.num_days} days. "
                f"Schedule: Day {day} - {day + option.num_days - 1}."
            )
            self.log.append(f"{step}Check for direct flight from {previous} to {option.city}.")
            if plan and (previous, option.city) not in self.problem.flights:
                self.log.append(f"{step}No. Drop this branch.")
                continue
            self.log.append(f"{step}Yes.")
            if not self._fits_before(option, next_fixed, day, step):
                continue
            self.log.append(f"{step}This arrangement is feasible for now. Continue to arrange the rest of the plan.")
            rest = [(city, num_days) for city, num_days in free if city != option.city]
            complete = self.visit(option.end_day, plan + [option], rest)
            if complete is not None:
                return complete

        self.log.append(f"{step}Fail to arrange any option on day {day} in the current arrangement. Drop this branch.")
        return None

    def _fits_before(self, option: Stay, next_fixed: Stay | None, day: int, step: str) -> bool:
        """Log and check that `option` departs no later than the next fixed stay arrives."""
        prefix = f"{step}Check whether this arrangement is compatible with the next fixed schedule after Day {day}: "
        if next_fixed is None:
            self.log.append(prefix + "None.")
            self.log.append(f"{step}No following fixed schedules. This arrangement is compatible.")
            return True

        self.log.append(prefix + f"{next_fixed.city} (Day {next_fixed.start_day} - {next_fixed.end_day}).")
        days = (
            f"{step}The departure day of {option.city} is Day {option.end_day}. "
            f"The arrival day of {next_fixed.city} is Day {next_fixed.start_day}. "
        )
        if next_fixed.start_day < option.end_day:
            self.log.append(
                days + f"Day {option.end_day} is later than (>) Day {next_fixed.start_day}. "
                "This arrangement is incompatible. Drop this branch."
            )
            return False
        self.log.append(
            days + f"Day {option.end_day} is not later than (<=) Day {next_fixed.start_day}. "
            "This arrangement is compatible."
        )
        return True


def _requirements_log(problem: TravelProblem) -> list[str]:
    """Write the opening of the solving log: the constraints, then fixed and free cities."""
    lines = [
        "Read the requirements and identify the cities that have fixed schedules and the cities that need to be "
        "arranged."
    ]
    for city, num_days, stay in problem.durations:
        if stay is None:
            lines.append(f"* City: {city}, Duration: {num_days} days.")
        else:
            lines.append(
                f"* City: {city}, Duration: {num_days} days, Fixed Schedule: Day {stay.start_day} - {stay.end_day}."
            )
    lines.append("")

    if problem.fixed:
        lines.append("Cities that have fixed schedules (sorted by their arrival days):")
        lines.extend(f"* City: {s.city}, Fixed Schedule: Day {s.start_day} - {s.end_day}." for s in problem.fixed)
    else:
        lines.append("Cities that have fixed schedules: None.")
    lines.append("")

    if problem.free:
        lines.append("Cities needing arrangement:")
        lines.extend(f"* City: {city}, Duration: {num_days} days." for city, num_days in problem.free)
    else:
        lines.append("Cities needing arrangement: None.")
    lines.append("")
    return lines


def format_travel_plan(plan: list[Stay]) -> str:
    """Write a plan as LongProc's `<Plan>` lines: one line per stay and one per flight."""
    lines = []
    for index, stay in enumerate(plan):
        days = f"**Day {stay.start_day}-{stay.end_day}:**"
        if index == 0:
            lines.append(f"{days} Arriving in {stay.city} and visit {stay.city} for {stay.num_days} days.")
        else:
            lines.append(f"{days} Visit {stay.city} for {stay.num_days} days.")
        if index + 1 < len(plan):
            lines.append(f"**Day {stay.end_day}:** Fly from {stay.city} to {plan[index + 1].city}.")
    return "\n".join(lines)


def travel_planning_demonstration(record: dict) -> str:
    """Return LongProc's gold output for one travel record: the solving log and the plan.

    Raises ValueError when the record is malformed, when the search finds no plan, or when the
    plan found differs from the plan paragraph of `ground_truth_plan` (LongProc asserts that too).
    """
    problem = parse_travel_problem(record)
    search = _TravelSearch(problem)
    search.log.extend(_requirements_log(problem))
    plan = search.visit(1, [], list(problem.free))
    if plan is None:
        raise ValueError("the search finds no plan that meets the constraints")

    plan_text = format_travel_plan(plan)
    gold_plan = _require(record, "ground_truth_plan", str)
    paragraphs = gold_plan.split("\n\n")
    if len(paragraphs) < 2:
        raise ValueError("ground_truth_plan must have an introduction, a blank line, then the plan")
    if paragraphs[1].strip() != plan_text:
        raise ValueError(
            f"the search finds the plan {plan_text!r}, but ground_truth_plan gives {paragraphs[1].strip()!r}"
        )

    log = "\n".join(search.log)
    return f"{_PROCEDURE_TAG}\n{log}\n</Solving Procedure>\n\n{_PLAN_INSTRUCTION}\n<Plan>\n{plan_text}\n</Plan>"


def travel_planning_examples(records: list[dict]) -> str:
    """Build the in-context examples that fill `{demonstration}` in the travel planning prompt."""
    examples = []
    for index, record in enumerate(records):
        try:
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
            problem = _require(record, "disambig_question_text", str)
            examples.append(f"# Example\n{problem}\n\n{travel_planning_demonstration(record)}")
        except ValueError as error:
            raise ValueError(f"example {index + 1}: {error}") from None
    return "\n\n".join(examples)


# Grading

_PLAN_DAYS = re.compile(r"\d+-\d+")
_PLAN_FLIGHT = re.compile(r".*Day (\d+).*from (\w+) to (\w+)")
_PLAN_TOTAL_DAYS = re.compile(r"European cities for (\d+) days")
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def parse_travel_plan(text: str) -> list[tuple[str, int]]:
    """Read (city, days) stays from plan text as NATURAL PLAN's parser does; [] when unreadable.

    Cities come from the `Day N ... from A to B` flight lines, each a single word (`\\w+`).
    Stays run between flight days, the last one up to the end of the last `N-M` day range.
    A plan without a flight therefore parses to [], even for one city. A line `European cities
    for N days` sets the trip length, and the parser stops at a day range that ends on it.
    """
    ranges: list[str] = []
    flights: list[tuple[str, str, str]] = []
    total_days = None
    for line in text.split("\n"):
        total = _PLAN_TOTAL_DAYS.findall(line)
        if total:
            total_days = int(total[0])
        day_range = _PLAN_DAYS.findall(line)
        if day_range:
            ranges.append(day_range[0])
            if int(day_range[0].split("-")[1]) == total_days:
                break
        flight = _PLAN_FLIGHT.findall(line)
        if flight:
            flights.append(flight[0])
    if not ranges or not flights:
        return []

    cities = [flights[0][1]] + [arrival for _, _, arrival in flights]
    boundaries = [1] + [int(day) for day, _, _ in flights] + [int(ranges[-1].split("-")[1])]
    return [(city, boundaries[i + 1] - boundaries[i] + 1) for i, city in enumerate(cities)]


def check_travel_plan(plan_text: str, cities: list[str], durations: list[int]) -> tuple[bool, str | None]:
    """Check the plan's stays against the gold cities and durations; return (correct, error).

    As in LongProc, only the first len(cities) stays are compared, so a plan that continues
    past the gold trip with more stays still counts as correct.
    """
    stays = parse_travel_plan(plan_text)
    for index, (city, days) in enumerate(zip(cities, durations)):
        if index >= len(stays):
            return False, f"the plan has {len(stays)} readable stays, expected {len(cities)}"
        if stays[index] != (city, days):
            return False, f"stay {index + 1} is {stays[index]}, expected {(city, days)}"
    return True, None


def _normalize_line(line: str) -> str:
    """Lower-case, drop punctuation and the articles a, an, the, and collapse whitespace."""
    text = "".join(ch for ch in line.lower() if ch not in string.punctuation)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _procedure_lines(text: str) -> list[str]:
    """Return the non-blank lines after the first `<Solving Procedure>`, up to a second one.

    LongProc splits on the opening tag and keeps only the piece after the first one, so a
    completion that writes the tag twice is read up to its second occurrence.
    """
    text = text.replace(_PLAN_INSTRUCTION, "")
    if _PROCEDURE_TAG in text:
        text = _PROCEDURE_TAG + text.split(_PROCEDURE_TAG)[1]
    return [line.rstrip() for line in text.strip().split("\n") if line.strip()]


def travel_procedure_progress(completion: str, gold_procedure: str) -> float:
    """LongProc's partial accuracy: the share of the gold log the completion follows before an error.

    A completion line matches when the normalised gold line is a substring of it. The share is
    the index of the last compared line over the n gold lines. So a first mismatch at line k
    (0-based) scores k / n, and a completion that stops after k matching lines scores (k - 1) / n.
    A completion without the `<Solving Procedure>` tag is compared from its first line.
    """
    if _PROCEDURE_TAG not in gold_procedure:
        raise ValueError(f"the gold travel planning output has no {_PROCEDURE_TAG} tag")
    gold_lines = _procedure_lines(gold_procedure)
    predicted_lines = _procedure_lines(completion)

    index = 0
    for index, (predicted, gold) in enumerate(zip(predicted_lines, gold_lines)):
        if _normalize_line(gold) not in _normalize_line(predicted):
            break
    return index / len(gold_lines)


def evaluate_travel_planning(
    completion: str, cities: list[str], durations: list[int], gold_procedure: str
) -> EvalOutput:
    """Score a travel plan: accuracy is whether the `<Plan>` stays match the gold cities and days.

    When the plan is wrong or missing, partial accuracy measures how far the solving procedure
    follows the gold one (`travel_procedure_progress`), read from the whole completion.
    """
    plan = extract_between_tags(completion, "Plan")
    if plan is None:
        correct, error = False, "no <Plan> block"
    else:
        correct, error = check_travel_plan(plan, cities, durations)
    if correct:
        return {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}, plan, None

    partial = travel_procedure_progress(completion, gold_procedure)
    extraction_rate = 0.0 if plan is None else 1.0
    return {"accuracy": 0.0, "partial_accuracy": partial, "extraction_rate": extraction_rate}, plan, error
