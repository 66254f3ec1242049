"""Verifiable instruction-following constraints (IFEval), as used for Tulu 3 RLVR.

The ground truth names one or more constraints with their arguments, in either format found in
Tulu 3 data:
- `allenai/RLVR-GSM-MATH-IF-Mixed-Constraints`: a JSON object with open-instruct's function name
  and its arguments, unused ones null:
  `{"func_name": "verify_keyword_frequency", "word": "sun", "N": 3, "quantifier": null, ...}`;
- IFEval / open-instruct IFEvalG: `{"instruction_id": ["keywords:existence", ...],
  "kwargs": [{"keywords": ["sun"]}, ...]}`, possibly inside a list, as JSON or a Python literal.
A list of several such items is accepted too. The score is the fraction of constraints the
response satisfies (1.0 or 0.0 for a single one). The response is the completion after its
<think> section; a blank response satisfies nothing.

What each constraint checks (IFEval id / open-instruct name):
- keywords:existence / verify_keywords: every keyword occurs (case-insensitive substring).
- keywords:frequency / verify_keyword_frequency: whole-word, case-insensitive count of the
  keyword against N with the relation ("less than", "at least", "at most", "around" (within
  max(1, 10%)), or exactly N when none is given).
- keywords:forbidden_words / validate_forbidden_words: none occurs as a whole word.
- keywords:letter_frequency / verify_letter_frequency: case-insensitive count of the letter.
- language:response_language / validate_response_language: verifiers.language.detect_language
  (writing system + stopwords heuristic) gives the requested code.
- length_constraints:number_sentences / verify_sentence_constraint: pieces ending in . ! or ?
- length_constraints:number_words / validate_word_constraint: runs of word characters.
- length_constraints:number_paragraphs / verify_paragraph_count: exactly N non-blank paragraphs
  separated by `***` (spaces allowed between the stars).
- length_constraints:nth_paragraph_first_word / validate_paragraphs: exactly N paragraphs
  separated by blank lines, and the nth starts with the word (case-insensitive).
- detectable_content:number_placeholders / validate_placeholders: at least N `[...]`.
- detectable_content:postscript / verify_postscript: a line starting with the marker ("P.S.",
  spaces ignored, case-insensitive) followed by some text.
- detectable_format:number_bullet_lists / verify_bullet_points: exactly N lines that are
  markdown bullets (`* item` or `- item`).
- detectable_format:constrained_response / validate_choice: one of the options occurs
  (IFEval's are "My answer is yes.", "My answer is no.", "My answer is maybe.").
- detectable_format:number_highlighted_sections / validate_highlighted_sections: at least N
  non-blank `*highlighted*` or `**highlighted**` spans.
- detectable_format:multiple_sections / validate_sections: at least N section headers
  "<splitter> <number>" (e.g. "SECTION 1"), case-insensitive.
- detectable_format:json_format / validate_json_format: the response, without a ``` fence, is JSON.
- detectable_format:title / validate_title: a non-blank `<<title>>` on one line.
- combination:two_responses / validate_two_responses: two different non-blank responses
  separated by `******`.
- combination:repeat_prompt / validate_repeat_prompt: starts with the prompt (case-insensitive).
- startend:end_checker / validate_end: ends with the phrase (case-insensitive, trailing space aside).
- startend:quotation / validate_quotation: wrapped in double quotes.
- change_case:capital_word_frequency / validate_frequency_capital_words: words in capitals.
- change_case:english_capital / validate_uppercase: no lowercase letter.
- change_case:english_lowercase / validate_lowercase: no uppercase letter.
- punctuation:no_comma / validate_no_commas: no ",".

All patterns run in linear time, so any response is checked in bounded time.
"""

import ast
import functools
import json
import re
from typing import Any, Callable

from verifiers import register
from verifiers.extract import strip_think
from verifiers.language import SUPPORTED_LANGUAGES, detect_language

# ----------------------------------------------------------------------------- checks


def _compare(actual: int, count: int, relation: str | None) -> bool:
    relation = (relation or "exactly").strip().lower()
    if relation == "exactly":
        return actual == count
    if relation == "less than":
        return actual < count
    if relation == "at least":
        return actual >= count
    if relation == "at most":
        return actual <= count
    if relation == "around":
        return abs(actual - count) <= max(1, round(0.1 * count))
    raise ValueError(f"unknown relation {relation!r}")


def _whole_word(word: str) -> re.Pattern:
    return re.compile(r"(?<!\w)" + re.escape(word.strip()) + r"(?!\w)", re.IGNORECASE)


def keywords_present(text: str, keywords: list[str]) -> bool:
    lowered = text.lower()
    return all(keyword.lower() in lowered for keyword in keywords)


def keyword_count(text: str, keyword: str, count: int, relation: str | None = None) -> bool:
    return _compare(len(_whole_word(keyword).findall(text)), count, relation)


def no_forbidden_words(text: str, words: list[str]) -> bool:
    return not any(_whole_word(word).search(text) for word in words)


def letter_count(text: str, letter: str, count: int, relation: str | None = None) -> bool:
    return _compare(text.lower().count(letter.lower()), count, relation)


def in_language(text: str, language: str) -> bool:
    return detect_language(text) == language


def sentence_count(text: str, count: int, relation: str | None = None) -> bool:
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if re.search(r"\w", s)]
    return _compare(len(sentences), count, relation)


def word_count(text: str, count: int, relation: str | None = None) -> bool:
    return _compare(len(re.findall(r"\w+", text)), count, relation)


def paragraph_count(text: str, count: int) -> bool:
    paragraphs = re.split(r"\s?\*\s?\*\s?\*\s?", text)
    if paragraphs and not paragraphs[0].strip():  # a divider may open or close the text
        paragraphs = paragraphs[1:]
    if paragraphs and not paragraphs[-1].strip():
        paragraphs = paragraphs[:-1]
    return all(p.strip() for p in paragraphs) and len(paragraphs) == count


def nth_paragraph_first_word(text: str, count: int, nth: int, first_word: str) -> bool:
    paragraphs = [p for p in re.split(r"\n[ \t]*\n", text) if p.strip()]
    if len(paragraphs) != count or not 1 <= nth <= count:
        return False
    word = re.match(r"[^\w]*(\w*)", paragraphs[nth - 1]).group(1)
    return word.lower() == first_word.strip().lower()


def placeholder_count(text: str, count: int) -> bool:
    return len(re.findall(r"\[[^\[\]\n]*\]", text)) >= count


def has_postscript(text: str, marker: str) -> bool:
    marker = re.sub(r"\s+", "", marker).lower()
    for line in text.splitlines():
        compact = re.sub(r"\s+", "", line).lower()
        if compact.startswith(marker) and len(compact) > len(marker):
            return True
    return False


def bullet_count(text: str, count: int) -> bool:
    return len(re.findall(r"^[ \t]*[*-][ \t]+\S", text, re.MULTILINE)) == count


IFEVAL_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def has_option(text: str, options: list[str] | str = IFEVAL_OPTIONS) -> bool:
    if isinstance(options, str):  # a list written as a string, or a single option
        options = ast.literal_eval(options) if options.strip()[:1] in "[(" else [options]
    return any(str(option).strip() in text for option in options)


def highlighted_count(text: str, count: int) -> bool:
    spans = re.findall(r"\*{1,2}([^\n*]+)\*{1,2}", text)
    return sum(1 for span in spans if span.strip()) >= count


def section_count(text: str, splitter: str, count: int) -> bool:
    headers = re.findall(re.escape(splitter.strip()) + r"\s*\d+", text, re.IGNORECASE)
    return len(headers) >= count


def is_json(text: str) -> bool:
    text = text.strip()
    if text.startswith("```") and text.endswith("```") and len(text) >= 6:  # a fenced block
        text = text[3:-3]
        text = text[4:] if text[:4].lower() == "json" else text
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def has_title(text: str) -> bool:
    return any(title.strip() for title in re.findall(r"<<([^\n<>]+)>>", text))


def two_responses(text: str) -> bool:
    parts = [part.strip() for part in text.split("******")]
    if parts and not parts[0]:
        parts = parts[1:]
    if parts and not parts[-1]:
        parts = parts[:-1]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


def repeats_prompt(text: str, prompt: str) -> bool:
    return text.strip().lower().startswith(prompt.strip().lower())


def ends_with(text: str, phrase: str) -> bool:
    return text.strip().lower().endswith(phrase.strip().lower())


def quoted(text: str) -> bool:
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def capital_word_count(text: str, count: int, relation: str | None = None) -> bool:
    return _compare(sum(1 for word in re.findall(r"\w+", text) if word.isupper()), count, relation)


def all_uppercase(text: str) -> bool:
    return text == text.upper()


def all_lowercase(text: str) -> bool:
    return text == text.lower()


def no_commas(text: str) -> bool:
    return "," not in text


# ----------------------------------------------------------------------------- ground truth
# Each constraint name maps to (check, {argument name in the data: argument name of the check}).

_IFEVAL_IDS: dict[str, tuple[Callable[..., bool], dict[str, str]]] = {
    "keywords:existence": (keywords_present, {"keywords": "keywords"}),
    "keywords:frequency": (keyword_count, {"keyword": "keyword", "frequency": "count", "relation": "relation"}),
    "keywords:forbidden_words": (no_forbidden_words, {"forbidden_words": "words"}),
    "keywords:letter_frequency": (letter_count, {"letter": "letter", "let_frequency": "count",
                                                 "let_relation": "relation"}),
    "language:response_language": (in_language, {"language": "language"}),
    "length_constraints:number_sentences": (sentence_count, {"num_sentences": "count", "relation": "relation"}),
    "length_constraints:number_paragraphs": (paragraph_count, {"num_paragraphs": "count"}),
    "length_constraints:number_words": (word_count, {"num_words": "count", "relation": "relation"}),
    "length_constraints:nth_paragraph_first_word": (nth_paragraph_first_word, {
        "num_paragraphs": "count", "nth_paragraph": "nth", "first_word": "first_word"}),
    "detectable_content:number_placeholders": (placeholder_count, {"num_placeholders": "count"}),
    "detectable_content:postscript": (has_postscript, {"postscript_marker": "marker"}),
    "detectable_format:number_bullet_lists": (bullet_count, {"num_bullets": "count"}),
    "detectable_format:constrained_response": (has_option, {}),
    "detectable_format:number_highlighted_sections": (highlighted_count, {"num_highlights": "count"}),
    "detectable_format:multiple_sections": (section_count, {"section_spliter": "splitter",
                                                            "section_splitter": "splitter",
                                                            "num_sections": "count"}),
    "detectable_format:json_format": (is_json, {}),
    "detectable_format:title": (has_title, {}),
    "combination:two_responses": (two_responses, {}),
    "combination:repeat_prompt": (repeats_prompt, {"prompt_to_repeat": "prompt"}),
    "startend:end_checker": (ends_with, {"end_phrase": "phrase"}),
    "startend:quotation": (quoted, {}),
    "change_case:capital_word_frequency": (capital_word_count, {"capital_frequency": "count",
                                                                "capital_relation": "relation"}),
    "change_case:english_capital": (all_uppercase, {}),
    "change_case:english_lowercase": (all_lowercase, {}),
    "punctuation:no_comma": (no_commas, {}),
}

_OPEN_INSTRUCT_NAMES: dict[str, tuple[Callable[..., bool], dict[str, str]]] = {
    "verify_keywords": (keywords_present, {"keyword_list": "keywords"}),
    "verify_keyword_frequency": (keyword_count, {"word": "keyword", "N": "count"}),
    "validate_forbidden_words": (no_forbidden_words, {"forbidden_words": "words"}),
    "verify_letter_frequency": (letter_count, {"letter": "letter", "N": "count"}),
    "validate_response_language": (in_language, {"language": "language"}),
    "verify_paragraph_count": (paragraph_count, {"N": "count"}),
    "validate_word_constraint": (word_count, {"N": "count", "quantifier": "relation"}),
    "verify_sentence_constraint": (sentence_count, {"N": "count", "quantifier": "relation"}),
    "validate_paragraphs": (nth_paragraph_first_word, {"N": "count", "i": "nth", "first_word": "first_word"}),
    "verify_postscript": (has_postscript, {"postscript_marker": "marker"}),
    "validate_placeholders": (placeholder_count, {"N": "count"}),
    "verify_bullet_points": (bullet_count, {"N": "count"}),
    "validate_title": (has_title, {}),
    "validate_choice": (has_option, {"options": "options"}),
    "validate_highlighted_sections": (highlighted_count, {"N": "count"}),
    "validate_sections": (section_count, {"N": "count", "section_splitter": "splitter"}),
    "validate_json_format": (is_json, {}),
    "validate_repeat_prompt": (repeats_prompt, {"original_prompt": "prompt"}),
    "validate_two_responses": (two_responses, {}),
    "validate_uppercase": (all_uppercase, {}),
    "validate_lowercase": (all_lowercase, {}),
    "validate_frequency_capital_words": (capital_word_count, {"N": "count", "quantifier": "relation"}),
    "validate_end": (ends_with, {"end_phrase": "phrase"}),
    "validate_quotation": (quoted, {}),
    "validate_no_commas": (no_commas, {}),
}

Constraint = tuple[Callable[..., bool], tuple[tuple[str, Any], ...]]


def _bind(name: str, table: dict, kwargs: dict | None) -> Constraint:
    if name not in table:
        raise ValueError(f"unknown ifeval constraint {name!r}; known: {', '.join(sorted(table))}")
    check, renames = table[name]
    bound = {}
    for key, value in (kwargs or {}).items():
        if value is None:
            continue
        if key not in renames:
            raise ValueError(f"unexpected argument {key!r} for ifeval constraint {name!r}")
        bound[renames[key]] = value
    if check is in_language and bound.get("language") not in SUPPORTED_LANGUAGES:
        raise ValueError(f"language {bound.get('language')!r} is not one of {sorted(SUPPORTED_LANGUAGES)}")
    return check, tuple(bound.items())


def _constraints(item: Any) -> list[Constraint]:
    if isinstance(item, str):
        return _constraints(_load(item))
    if isinstance(item, list):
        return [c for sub in item for c in _constraints(sub)]
    if isinstance(item, dict) and "func_name" in item:
        kwargs = {k: v for k, v in item.items() if k != "func_name"}
        return [_bind(item["func_name"], _OPEN_INSTRUCT_NAMES, kwargs)]
    if isinstance(item, dict) and "instruction_id" in item:
        ids, kwargs = item["instruction_id"], item.get("kwargs") or [{}] * len(item["instruction_id"])
        if isinstance(ids, str):
            ids, kwargs = [ids], [kwargs]
        if len(ids) != len(kwargs):
            raise ValueError(f"{len(ids)} instruction ids but {len(kwargs)} kwargs")
        return [_bind(i, _IFEVAL_IDS, k) for i, k in zip(ids, kwargs)]
    raise ValueError(f"not an ifeval ground truth: {item!r}")


def _load(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return ast.literal_eval(text)  # open-instruct writes some ground truths as Python literals


@functools.lru_cache(maxsize=4096)
def parse_ground_truth(ground_truth: str) -> tuple[Constraint, ...]:
    """The constraints a ground truth names, with their arguments bound (cached per string)."""
    constraints = _constraints(_load(ground_truth))
    if not constraints:
        raise ValueError(f"ifeval ground truth names no constraint: {ground_truth!r}")
    return tuple(constraints)


@register("ifeval")
def ifeval(completion: str, ground_truth: str) -> float:
    """Fraction of the ground truth's constraints that the response satisfies."""
    constraints = parse_ground_truth(ground_truth)
    response = strip_think(completion).strip()
    if not response:
        return 0.0
    return sum(check(response, **dict(kwargs)) for check, kwargs in constraints) / len(constraints)
