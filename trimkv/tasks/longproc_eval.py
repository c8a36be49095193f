"""LongProc's metrics, one evaluator per task, written to score exactly as LongProc does.

Source: LongProc (Ye et al., 2025, arXiv 2501.05414), princeton-pli/LongProc at commit 78e873a,
files `longproc/longproc_data.py` (output parsing and the metric of each task),
`longproc/countdown_evaluator.py`, `longproc/tom_tracking_evaluator.py` and
`longproc/html_to_tsv_evaluator.py`. The code here is our own. It reproduces their parsing
rules, including the quirks that change scores, and names each quirk where it is kept.

Every evaluator takes the completion and the gold data and returns `(metrics, parsed, error)`.
`metrics` uses LongProc's metric names: `accuracy`, `partial_accuracy` and `extraction_rate`,
or `f1`, `precision`, `recall` and `extraction_rate` for HTML to TSV. `parsed` is the part of
the completion that was graded (None when nothing could be extracted), and `error` is a short
reason for a failure.

The countdown search procedure that LongProc uses both as the in-context demonstration and as
the gold trace is generated here too (`countdown_demonstration`), byte for byte in its format.
"""

from __future__ import annotations

import csv
import re
import string
from dataclasses import dataclass, field
from typing import Any

Metrics = dict[str, float]
EvalOutput = tuple[Metrics, str | None, str | None]


def extract_between_tags(text: str, tag: str) -> str | None:
    """Return the stripped text between the first `<tag>` and the first `</tag>`, or None.

    LongProc takes the first opening and the first closing tag, not a matched pair. So a
    completion that mentions `<tag>` before its output is parsed from that mention.
    """
    start = text.find(f"<{tag}>")
    end = text.find(f"</{tag}>")
    if start == -1 or end == -1:
        return None
    return text[start + len(tag) + 2 : end].strip()


# Countdown


# Intermediate results at or above this value are dropped during the search.
COUNTDOWN_MAX_INTERMEDIATE = 2000

# The two problems whose search procedures form the in-context examples of every prompt.
COUNTDOWN_DEMO_PROBLEMS = (([40, 19, 23, 7], 29), ([9, 16, 6, 18], 12))

_COUNTDOWN_SOLUTION_TEMPLATE = (
    "Now we have found the target, let's trace back the solution:\n"
    "Final step: {2}\n"
    "The step before: {1}\n"
    "The first step: {0}\n"
    "\n"
    "Output the solution in the required format:\n"
    "<Solution>\n"
    "{0}\n"
    "{1}\n"
    "{2}\n"
    "</Solution>\n"
)

# A division by zero, kept as a state value so that the search logs it and drops the branch.
_DIVISION_BY_ZERO = object()


def _indent(level: int) -> str:
    return "" if level == 0 else " " * level + "|- "


def _number_pairs(numbers: list) -> list[tuple[Any, Any, list]]:
    """List all pairs (numbers[i], numbers[j]) with i < j, in order, each with the numbers left over."""
    pairs = []
    for i, first in enumerate(numbers):
        for j in range(i + 1, len(numbers)):
            rest = [x for k, x in enumerate(numbers) if k not in (i, j)]
            pairs.append((first, numbers[j], rest))
    return pairs


@dataclass
class _CountdownSearch:
    """Depth-first search over pairs and operations that writes LongProc's search log."""

    target: int
    log: list[str] = field(default_factory=list)
    # The equation that led to each state and the index of its parent state, in visit order.
    equations: list[str] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)

    def visit(self, numbers: list, equation: str | None, parent: int, depth: int) -> bool:
        """Explore the state `numbers`, reached by `equation` (None at the root); True when solved."""
        state = len(self.equations)
        self.equations.append(equation or "")
        self.parents.append(parent)
        newest = numbers[0]
        prefix = f"\n{_indent(depth)}Try {equation}."

        if equation is not None:
            if newest is _DIVISION_BY_ZERO:
                self.log.append(f"{prefix} drop this branch.")
                return False
            if newest % 1 != 0:
                self.log.append(f"{prefix} {newest:.1f} is a decimal, drop this branch.")
                return False
            if newest >= COUNTDOWN_MAX_INTERMEDIATE:
                self.log.append(f"{prefix} {newest} exceeds the maximum intermediate result, drop this branch.")
                return False

        if len(numbers) == 1:
            if newest == self.target:
                self.log.append(f"{prefix} Evaluate {newest} == {self.target}, target found!")
                return True
            self.log.append(f"{prefix} Evaluate {newest} != {self.target}, drop this branch.")
            return False

        pairs = _number_pairs(numbers)
        options = [(a, b) for a, b, _ in pairs]
        if equation is not None:
            self.log.append(f"{prefix} Add {newest} to the number set.")
        if len(numbers) == 2:
            # With two numbers left the log names no pair, and the depth does not grow.
            self.log.append(f" Current number set: {numbers}, target: {self.target}, just two numbers left.")
        else:
            if equation is None:
                self.log.append(f"Initial number set: {numbers}, target: {self.target}. Options for choosing two numbers: {options}.")
            else:
                self.log.append(f" Current number set: {numbers}, target: {self.target}. Options for choosing two numbers: {options}.")
            depth += 1

        for a, b, rest in pairs:
            if len(numbers) > 2:
                self.log.append(f"\n{_indent(depth)}Pick two numbers ({a}, {b}) (numbers left: {rest}). Try possible operations.")
            # The larger number is always the first operand.
            if a < b:
                a, b = b, a
            for value, child_equation in self._operations(a, b):
                if self.visit([value] + rest, child_equation, state, depth + 1):
                    return True
        return False

    @staticmethod
    def _operations(a: int, b: int) -> list[tuple[Any, str]]:
        results: list[tuple[Any, str]] = [
            (a + b, f"{a} + {b} = {a + b}"),
            (a - b, f"{a} - {b} = {a - b}"),
            (a * b, f"{a} * {b} = {a * b}"),
        ]
        if b == 0:
            results.append((_DIVISION_BY_ZERO, f"{a} / {b} (invalid operation)"))
        elif a % b == 0:
            results.append((int(a / b), f"{a} / {b} = {int(a / b)}"))
        else:
            results.append((a / b, f"{a} / {b} = {a / b:.1f}"))
        return results

    def solution(self) -> list[str]:
        """Return the equations from the root to the last visited state, which is the solved one."""
        steps = []
        state = len(self.equations) - 1
        while self.parents[state] != -1:
            steps.append(self.equations[state])
            state = self.parents[state]
        return steps[::-1]


def countdown_demonstration(numbers: list[int], target: int) -> tuple[list[str], str]:
    """Return the solution equations and the full search procedure text for one problem.

    The text is LongProc's gold output: `# Search Procedure`, the search log, and the traced-back
    solution in `<Solution>` tags. Raises ValueError when no solution exists.
    """
    search = _CountdownSearch(target=target)
    if not search.visit(list(numbers), None, -1, 0):
        raise ValueError(f"countdown problem {numbers} -> {target} has no solution")
    steps = search.solution()
    if len(steps) != 3:
        raise ValueError(f"countdown problem {numbers} -> {target}: expected 3 solution steps, got {steps}")
    text = "# Search Procedure\n" + "".join(search.log) + "\n\n" + _COUNTDOWN_SOLUTION_TEMPLATE.format(*steps)
    return steps, text


def countdown_examples() -> str:
    """Build the in-context examples that fill `{demonstration}` in the countdown prompt."""
    examples = []
    for numbers, target in COUNTDOWN_DEMO_PROBLEMS:
        _, text = countdown_demonstration(numbers, target)
        examples.append(f"# Example\nNumbers: {numbers}\nTarget: {target}\n\n{text}")
    return "\n\n".join(examples)


# An operand as Python's eval accepts it: LongProc evaluates the left-hand side with eval and
# parses the operands with int, so a number must satisfy both (no leading zeros, ASCII digits).
_OPERAND = re.compile(r"\s*-?(?:0|[1-9][0-9]*)\s*")


def _parse_countdown_step(line: str) -> tuple[int, int, int] | None:
    """Parse `a op b = c` into (a, b, c) when the arithmetic is right; None otherwise."""
    sides = line.strip().split("=")
    if len(sides) != 2:
        return None
    left, right = sides

    # LongProc picks the operator by the first of + - * / that occurs anywhere on the left,
    # in that order, and needs exactly two operands around it.
    operator = next((op for op in "+-*/" if op in left), None)
    if operator is None:
        return None
    operands = left.split(operator)
    if len(operands) != 2 or not all(_OPERAND.fullmatch(x) for x in operands):
        return None
    a, b = int(operands[0]), int(operands[1])
    try:
        c = int(right)
    except ValueError:
        return None

    if operator == "+":
        value: float = a + b
    elif operator == "-":
        value = a - b
    elif operator == "*":
        value = a * b
    elif b == 0:
        return None
    else:
        value = a / b
    return (a, b, c) if value == c else None


def check_countdown_solution(numbers: list[int], target: int, solution: str) -> bool:
    """Check that three equations use the given numbers and reach the target.

    Each equation must be arithmetically right, take both operands from the current numbers
    and put its result back. As in LongProc, intermediate results are not checked for being
    positive integers below 2000; a division is right only when its result is an integer.
    """
    lines = solution.split("\n")
    if len(lines) != 3:
        return False
    available = list(numbers)
    for line in lines:
        step = _parse_countdown_step(line)
        if step is None:
            return False
        a, b, c = step
        for operand in (a, b):
            if operand not in available:
                return False
            available.remove(operand)
        available.append(c)
    return available[0] == target


def _countdown_procedure_progress(predicted: str, gold: str) -> float:
    """LongProc's partial accuracy: the share of the gold search log matched before the first error.

    The first line must match exactly. After it, a `Pick two numbers` line must match exactly and
    a `Try` line must match up to its `=` and agree on dropping the branch. As in LongProc, the
    share is the index of the first wrong line over the number of lines after the first, so a
    fully matched log scores (n - 1) / n. LongProc returns -1 / n when the completion has only
    the first line; that is clamped to 0 here.
    """
    predicted_lines = predicted.strip().split("\n")
    gold_lines = gold.strip().split("\n")
    if predicted_lines[0] != gold_lines[0]:
        return 0.0
    predicted_lines = predicted_lines[1:]
    gold_lines = gold_lines[1:]
    if not gold_lines:
        return 0.0

    index = -1
    for predicted_line, gold_line in zip(predicted_lines, gold_lines):
        index += 1
        if predicted_line == gold_line:
            continue
        if "|- Try" not in gold_line:
            break
        if predicted_line.split("=")[0] != gold_line.split("=")[0]:
            break
        if ("drop this branch" in predicted_line) != ("drop this branch" in gold_line):
            break
    return max(index, 0) / len(gold_lines)


def evaluate_countdown(completion: str, numbers: list[int], target: int, gold_procedure: str) -> EvalOutput:
    """Score a countdown completion: accuracy is whether its `<Solution>` reaches the target."""
    solution = extract_between_tags(completion, "Solution")
    if solution is not None and check_countdown_solution(numbers, target, solution):
        return {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}, solution, None

    extraction_rate = 0.0 if solution is None else 1.0
    error = "no <Solution> block" if solution is None else "the solution does not reach the target"
    if "# Search Procedure" not in completion:
        return {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": extraction_rate}, solution, error

    predicted_procedure = completion.split("# Search Procedure")[-1].strip()
    gold = gold_procedure.split("# Search Procedure")[-1].split("Now we have found the target")[0].strip()
    partial = _countdown_procedure_progress(predicted_procedure, gold)
    return {"accuracy": 0.0, "partial_accuracy": partial, "extraction_rate": extraction_rate}, solution, error


# Path traversal


def evaluate_path_traversal(completion: str, gold_route: str) -> EvalOutput:
    """Score a route: accuracy is an exact match of the `<Route>` text with the gold route.

    Partial accuracy follows LongProc: (index of the first wrong line + 1) / gold lines, so the
    wrong line counts as reached. A correct prefix of k lines scores k / gold lines.
    """
    route = extract_between_tags(completion, "Route")
    if route is None:
        return {"accuracy": 0.0, "partial_accuracy": 0.0, "extraction_rate": 0.0}, None, "no <Route> block"

    gold = gold_route.strip()
    if route == gold:
        return {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}, route, None

    gold_lines = gold.split("\n")
    predicted_lines = route.split("\n")
    reached = 0
    error = "the route is a prefix of the gold route or extends it"
    for index, (gold_line, predicted_line) in enumerate(zip(gold_lines, predicted_lines)):
        reached = index + 1
        if gold_line != predicted_line:
            error = f"route step {index + 1} differs: {predicted_line!r}, expected {gold_line!r}"
            break
    return {"accuracy": 0.0, "partial_accuracy": reached / len(gold_lines), "extraction_rate": 1.0}, route, error


# Theory-of-mind tracking

# LongProc's normaliser drops these words as well as articles, so "Leon's belief on the
# band-aid" and "Leon believes band-aid" compare equal.
_TOM_STOPWORDS = re.compile(
    r"\b(a|an|the|on|in|at|step|thinks|think|believes|believe|is|are|of|location|know|knows|belief)\b"
)
_TOM_PUNCTUATION = set(string.punctuation) | {"\u2019"}


def _normalize_tom(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _TOM_PUNCTUATION)
    return " ".join(_TOM_STOPWORDS.sub(" ", text).split())


def _tom_trace_steps(text: str) -> list[str]:
    """Return the normalised contents of the `- ...` lines of a trace, as LongProc reads them.

    LongProc keeps the lines whose stripped form starts with `-`, rejoins them and strips the
    result, then reads only lines that start with `-` unstripped. So an indented `- Step` line
    counts only when it is the first one; steps whose content normalises to nothing are dropped.
    """
    bullet_lines = "\n".join(line for line in text.splitlines() if line.strip().startswith("-"))
    steps = []
    for line in bullet_lines.strip().split("\n"):
        if not line.startswith("-"):
            continue
        content = _normalize_tom(line.split("-", 1)[1].strip())
        if content:
            steps.append(content)
    return steps


def evaluate_tom_tracking(completion: str, gold_trace: str) -> EvalOutput:
    """Score a belief trace: accuracy is whether every normalised step equals the gold step.

    Partial accuracy is the index of the first differing step over the number of gold steps,
    or, when one trace is a prefix of the other, the shorter length over the gold length.
    """
    predicted = _tom_trace_steps(completion)
    gold = _tom_trace_steps(gold_trace)
    parsed = "\n".join(predicted)
    if len(predicted) == len(gold) and predicted == gold:
        return {"accuracy": 1.0, "partial_accuracy": 1.0, "extraction_rate": 1.0}, parsed, None

    # LongProc always counts a tom_tracking output as extracted.
    first_difference = next((i for i, (p, g) in enumerate(zip(predicted, gold)) if p != g), None)
    if not gold:
        partial = 0.0
    elif first_difference is not None:
        partial = first_difference / len(gold)
    else:
        partial = min(len(predicted), len(gold)) / len(gold)
    if first_difference is not None:
        error = f"step {first_difference} differs: {predicted[first_difference]!r}, expected {gold[first_difference]!r}"
    else:
        error = f"{len(predicted)} steps, expected {len(gold)}"
    return {"accuracy": 0.0, "partial_accuracy": partial, "extraction_rate": 1.0}, parsed, error


# HTML to TSV

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def _normalize_cell(text: str) -> str:
    """Lower-case, drop punctuation and articles, then remove all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return "".join(text.split())


class _TableError(ValueError):
    """A TSV text that LongProc's evaluator cannot turn into a table; the sample scores 0."""


def _parse_tsv(text: str) -> list[tuple[str, ...]]:
    """Parse TSV text into normalised rows, the first line being the header.

    As in LongProc, a last row with the wrong number of cells is dropped, because it is usually
    a trailing remark, and any other such row becomes a row of `N/A`. A header that repeats a
    column name makes the table unreadable, because pandas then returns a frame, not a column.
    """
    try:
        rows = list(csv.reader(text.strip().split("\n"), delimiter="\t"))
    except csv.Error as error:
        raise _TableError(f"unreadable TSV: {error}") from None
    if not rows:
        raise _TableError("the TSV is empty")

    header, body = rows[0], rows[1:]
    if len(set(header)) != len(header):
        raise _TableError(f"the header repeats a column name: {header}")
    if not body:
        raise _TableError("the TSV has a header but no rows")
    if len(body[-1]) != len(header):
        body = body[:-1]
    width = len(header)
    body = [row if len(row) == width else ["N/A"] * width for row in body]
    return [tuple(_normalize_cell(cell) for cell in row) for row in body]


def _table_scores(predicted_text: str, gold_text: str) -> tuple[float, float, float]:
    """Row-level precision, recall and F1; a row counts when all its normalised cells match.

    Rows are compared as a multiset membership test in both directions, so order does not
    matter and a duplicated predicted row counts every time it occurs.
    """
    gold = _parse_tsv(gold_text)
    predicted = _parse_tsv(predicted_text)
    if not predicted:
        raise _TableError("the predicted TSV has no complete rows")
    if not gold:
        raise _TableError("the gold TSV has no complete rows")
    if len(predicted[0]) != len(gold[0]):
        # pandas cannot compare rows of different widths, so LongProc scores such a table 0.
        raise _TableError(f"the TSV has {len(predicted[0])} columns, expected {len(gold[0])}")

    gold_rows = set(gold)
    predicted_rows = set(predicted)
    precision = sum(row in gold_rows for row in predicted) / len(predicted)
    recall = sum(row in predicted_rows for row in gold) / len(gold)
    f1 = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return precision, recall, f1


_TSV_BLOCK = re.compile(r"```tsv([\s\S]*)```")


def evaluate_html_to_tsv(completion: str, gold_tsv: str) -> EvalOutput:
    """Score an extracted table by row-level F1 against the gold TSV.

    The table is the text from the first ```tsv to the last ``` (greedy, as in LongProc), else
    everything after ```tsv, else the whole completion. Extraction rate is 0 when the table
    cannot be read, which also scores 0.
    """
    match = _TSV_BLOCK.search(completion)
    if match is not None:
        table = match.group(1).strip()
    elif "```tsv" in completion:
        table = completion.split("```tsv")[1].strip()
    else:
        table = completion.strip()

    try:
        precision, recall, f1 = _table_scores(table, gold_tsv)
    except _TableError as error:
        zero = {"f1": 0.0, "precision": 0.0, "recall": 0.0, "extraction_rate": 0.0}
        return zero, table, str(error)
    metrics = {"f1": f1, "precision": precision, "recall": recall, "extraction_rate": 1.0}
    return metrics, table, None if f1 == 1.0 else f"row-level F1 {f1:.3f}"


# Pseudocode to code

_CPP_BLOCK = re.compile(r"```cpp([\s\S]*)```")


def extract_cpp_code(completion: str) -> str | None:
    """Return the code from the first ```cpp (or ```c++) to the last ```, or None.

    The match is greedy as in LongProc, so text between two code blocks becomes part of the
    code and usually fails to compile.
    """
    match = _CPP_BLOCK.search(completion.replace("```c++", "```cpp"))
    return None if match is None else match.group(1)
