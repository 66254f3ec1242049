"""Helpers shared by the verifiers: drop the reasoning section, find boxed answers, parse numbers.

All of them run in time linear in the input (no backtracking-prone patterns), so verifiers built
on them stay fast on adversarial completions.
"""

import re
from fractions import Fraction

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def strip_think(text: str) -> str:
    """The part of a completion after its reasoning.

    R1-style models write `<think>...</think>answer`; their chat templates often put the opening
    tag in the prompt, so a completion may hold only `...</think>answer`. Everything up to the
    last `</think>` is dropped. An unclosed `<think>` (a truncated generation) means everything
    after it is reasoning, so only the text before it is kept (usually nothing).
    """
    close = text.rfind(THINK_CLOSE)
    if close >= 0:
        return text[close + len(THINK_CLOSE):]
    opening = text.find(THINK_OPEN)
    return text if opening < 0 else text[:opening]


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` or `\\fbox{...}` (nested braces kept), or None.

    Also accepts the brace-less form `\\boxed 5`. An unclosed brace gives None.
    """
    boxed, fbox = text.rfind("\\boxed"), text.rfind("\\fbox")
    start = max(boxed, fbox)
    if start < 0:
        return None
    i = start + (len("\\boxed") if start == boxed else len("\\fbox"))
    if text.startswith(" ", i):
        match = re.match(r" +([^\s$]+)", text[i:i + 200])
        return match.group(1) if match else None
    if not text.startswith("{", i):
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


# A number as written in prose: optional sign and dollar, digits with optional thousands commas,
# optional decimals, optional "/denominator".
NUMBER_RE = re.compile(r"-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|-?\$?\.\d+")
MAX_NUMBER_CHARS = 100  # longer digit strings are not answers; int() on them is slow


def normalize_minus(text: str) -> str:
    """Unicode minus and dashes that models emit as a sign become ASCII '-'."""
    return text.replace("\u2212", "-").replace("\u2013", "-")


def parse_number(text: str) -> Fraction | None:
    """Exact value of one number as NUMBER_RE matches it ('$1,000', '-3/4', '.5'), else None."""
    text = text.replace("$", "").replace(",", "")
    if len(text) > MAX_NUMBER_CHARS:
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
