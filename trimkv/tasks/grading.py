"""Answer extraction and equivalence grading for the math benchmarks (GSM8K, MATH-500, AIME24).

A completion is graded in three steps:

1. `answer_region` keeps the text after the last `</think>`, so draft answers inside a
   reasoning block do not count.
2. `last_boxed` (MATH-500, AIME24) or `extract_gsm8k_answer` (GSM8K) pulls the final answer
   out of that text.
3. `is_equivalent` asks math-verify (HuggingFace, `math_verify.parse` and `math_verify.verify`)
   whether the extracted answer and the gold answer are the same mathematical object, so
   `\\frac{1}{2}`, `0.5` and `\\dfrac12` all match.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Sequence

from math_verify import parse, verify

logger = logging.getLogger(__name__)

THINK_END = "</think>"

# math-verify's own default for both parsing and comparison. A timed-out step counts as
# "not equivalent".
DEFAULT_TIMEOUT_S = 5

# `\boxed`, `\fbox` and `\framebox` all draw a box around their argument. The lookahead keeps
# longer command names such as `\fboxsep` from matching.
_BOX_COMMAND = re.compile(r"\\(?:boxed|fbox|framebox)(?![A-Za-z])")

# A number with optional sign, thousands separators and decimals: `-3`, `1,234,567`, `0.25`,
# `.5`. The sign is taken only when no word character or digit precedes it, so `5-3` yields
# `5` and `3` rather than `-3`.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")

# A comma between a digit and exactly three more digits is a thousands separator.
_THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")

# A numeral with its base as a subscript, as MATH writes `52_8` or `4210_{5}`.
_BASE_SUBSCRIPT = re.compile(r"^\s*[0-9A-Za-z]+_\{?(\d+)\}?\s*$")

_warned_no_timeout = False


def answer_region(completion: str) -> str:
    """Return the part of `completion` that contains the final answer.

    That is the text after the last `</think>` when there is one, else the whole completion.
    A completion cut off inside its reasoning block has no `</think>`, so a `\\boxed{}`
    written while reasoning is then graded like a final answer.
    """
    _, separator, after = completion.rpartition(THINK_END)
    return after if separator else completion


def last_boxed(text: str) -> str | None:
    """Return the argument of the last complete `\\boxed{...}` (or `\\fbox`, `\\framebox`) in `text`.

    Nested braces are matched, and an escaped brace (`\\{`, `\\}`) does not count as a group
    delimiter, so `\\boxed{\\{1, 2\\}}` yields `\\{1, 2\\}`. The unbraced form `\\boxed 5`
    yields the text up to the next space or `$`. A box that is never closed (a completion
    truncated mid-answer) or is empty is skipped in favour of the box before it. Returns None
    when no box has content.
    """
    for match in reversed(list(_BOX_COMMAND.finditer(text))):
        argument = _box_argument(text, match.end())
        if argument:
            return argument
    return None


def _box_argument(text: str, start: int) -> str | None:
    """Return the argument of a box command whose name ends at `start`, or None if it has none."""
    position = start
    while position < len(text) and text[position] in " \t":
        position += 1
    if position == len(text):
        return None

    if text[position] == "{":
        return _braced_group(text, position)

    # `\boxed 5` needs a space after the command name, else `\boxed\frac` would be read as an
    # argument.
    if position == start:
        return None
    token = re.match(r"[^\s$]+", text[position:])
    if token is None:
        return None
    return token.group(0).rstrip(".,;:")


def _braced_group(text: str, open_index: int) -> str | None:
    """Return the text inside the brace group opening at `open_index`, or None if it never closes."""
    depth = 0
    position = open_index
    while position < len(text):
        char = text[position]
        if char == "\\":
            # Skip the escaped character, so `\{`, `\}` and `\\` never change the depth.
            position += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : position].strip()
        position += 1
    return None


def remove_thousands_separators(text: str) -> str:
    """Remove commas that separate groups of three digits: `1,234,567` becomes `1234567`."""
    return _THOUSANDS_SEPARATOR.sub("", text)


def last_number(text: str) -> str | None:
    """Return the last number in `text` with its thousands separators removed, or None."""
    numbers = _NUMBER.findall(text)
    if not numbers:
        return None
    return remove_thousands_separators(numbers[-1])


def extract_gsm8k_answer(text: str) -> str | None:
    """Extract a GSM8K answer: the last `\\boxed{}` argument, else the last number in `text`.

    Thousands separators are removed in both cases. The fallback also reads answers written in
    GSM8K's own `#### 18` style.
    """
    boxed = last_boxed(text)
    if boxed is not None:
        return remove_thousands_separators(boxed)
    return last_number(text)


def gsm8k_gold_answer(solution: str) -> str:
    """Return the final answer of a GSM8K reference solution: the number after `####`, without commas.

    Raises ValueError when the solution has no `####` line.
    """
    marker = "####"
    if marker not in solution:
        raise ValueError(f"GSM8K solution has no '{marker} <answer>' line: {solution[-200:]!r}")
    answer = solution.rsplit(marker, 1)[1].strip()
    return answer.replace(",", "")


def is_equivalent(predicted: str, gold: str, timeout_s: int | None = DEFAULT_TIMEOUT_S) -> bool:
    """Return whether the LaTeX answer `predicted` equals `gold` according to math-verify.

    Both strings are wrapped in `$...$` so math-verify reads them as LaTeX math. Numerals
    with different base subscripts (`52_8`, `52_9`) are never equivalent. Parse errors,
    comparison errors and timeouts count as not equivalent.

    math-verify 0.9 enforces its timeouts with `signal.alarm`, which Python allows only in the
    main thread. In any other thread this function therefore compares without a timeout and
    logs a warning once, so a pathological answer can block that thread.
    """
    # math-verify 0.9 drops a base subscript, reading both `52_8` and `52_9` as 52, so a
    # wrong base would pass. A prediction with no subscript is still compared on its digits.
    gold_base = _base_subscript(gold)
    predicted_base = _base_subscript(predicted)
    if gold_base is not None and predicted_base is not None and gold_base != predicted_base:
        return False

    timeout_s = _timeout_for_current_thread(timeout_s)
    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout_s)
    predicted_parsed = parse(f"${predicted}$", parsing_timeout=timeout_s)
    if not gold_parsed or not predicted_parsed:
        return False
    # verify is not symmetric: the gold goes first, so that `x = 5` as a gold accepts `5`.
    return verify(gold_parsed, predicted_parsed, timeout_seconds=timeout_s)


def _base_subscript(answer: str) -> int | None:
    match = _BASE_SUBSCRIPT.match(answer)
    return int(match.group(1)) if match else None


def _timeout_for_current_thread(timeout_s: int | None) -> int | None:
    global _warned_no_timeout
    if timeout_s is None or threading.current_thread() is threading.main_thread():
        return timeout_s
    if not _warned_no_timeout:
        logger.warning(
            "grading in thread %r: math-verify timeouts need the main thread, so answers are "
            "compared without a timeout; grade on the main thread to keep the %s s limit",
            threading.current_thread().name,
            timeout_s,
        )
        _warned_no_timeout = True
    return None


def pass_at_1(correct: Sequence[Sequence[bool]]) -> float:
    """Return pass@1: the fraction of correct samples per problem, averaged over problems.

    `correct[i][j]` is whether sample j of problem i is correct. With the same number of
    samples for every problem this equals the mean over all samples.
    """
    if len(correct) == 0:
        raise ValueError("pass@1 needs at least one problem, got none")
    per_problem = []
    for index, samples in enumerate(correct):
        if len(samples) == 0:
            raise ValueError(f"problem {index} has no graded samples; pass@1 needs at least one per problem")
        per_problem.append(sum(bool(value) for value in samples) / len(samples))
    return sum(per_problem) / len(per_problem)
