"""GSM8K-style numeric answers.

Extracts, after dropping any <think> section, the first number after the last `####` that has a
number after it (so `#### 16####` is 16), else the first number inside the last `\\boxed{}`, else
the last number in the text.
Ground truths are read the same way, so both `"... #### 18"` (GSM8K solutions) and a bare `"18"`
work. A number may carry a sign, `$`, thousands commas, decimals, a trailing `%`, or be a simple
fraction (`3/4`, `\\frac{3}{4}`).

Equal means numerically equal with exact rational arithmetic: 18 = 18.0 = 18.00 = $18 = 18%,
1,000 = 1000, 3/4 = 0.75, -13 = -13.0; 1234567 != 1234568 however large.
"""

import re
from fractions import Fraction

from nanopost.verifiers import register
from nanopost.verifiers.extract import NUMBER_RE, last_boxed, normalize_minus, parse_number, strip_think

_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}")


def _first_number(text: str) -> Fraction | None:
    match = NUMBER_RE.search(text)
    return parse_number(match.group(0)) if match else None


def _after_last_marker(text: str) -> Fraction | None:
    """The first number after the last `####` that has one after it (`#### 16####` gives 16)."""
    end, marker = len(text), text.rfind("####")
    while marker >= 0:
        # A number holds no '#', so one after this marker lies before the next marker, whose own
        # text had none: each stretch of text is searched once.
        number = _first_number(text[marker + 4:end])
        if number is not None:
            return number
        end, marker = marker, text.rfind("####", 0, marker)
    return None


def extract_answer(text: str) -> Fraction | None:
    """The final numeric answer of a solution or completion, or None if it has none."""
    text = normalize_minus(strip_think(text))
    answer = _after_last_marker(text)
    if answer is not None:
        return answer
    boxed = last_boxed(text)
    if boxed is not None:
        return _first_number(_LATEX_FRACTION.sub(r"\1/\2", boxed))
    last = None
    for last in NUMBER_RE.finditer(text):
        pass
    return parse_number(last.group(0)) if last else None


@register("gsm8k")
def gsm8k(completion: str, ground_truth: str) -> float:
    """1.0 if the completion's final number equals the ground truth's, else 0.0."""
    truth = extract_answer(ground_truth)
    if truth is None:
        raise ValueError(f"gsm8k ground truth holds no number: {ground_truth!r}")
    return float(extract_answer(completion) == truth)
