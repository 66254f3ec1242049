"""Verifiers: realistic answers per verifier, adversarial inputs under a time bound, dispatch."""

import json
import random
import re
import time
from pathlib import Path

import pytest

from nanopost import verifiers
from nanopost.verifiers.ifeval import instruction_results

ROOT = Path(__file__).resolve().parents[1]
gsm8k, math_answer, ifeval, think_format = (verifiers.get(n) for n in ("gsm8k", "math", "ifeval", "format"))

# ----------------------------------------------------------------------------- gsm8k

GSM8K_CASES = [
    # (completion, ground truth, expected score)
    ("52 - 39 = 13\n#### 13", "13", 1.0),
    ("34 - 45 = -11\n#### -11", "-11", 1.0),
    ("#### -13", "-13", 1.0),
    ("#### 13", "-13", 0.0),
    ("52 - 39 = 13\n#### 14", "13", 0.0),
    ("She makes 9 * 2 = $18 every day.\n#### 18", "Janet sells 9 eggs.\n#### 18", 1.0),
    ("#### 18.0", "18", 1.0),
    ("#### 18.00", "#### 18", 1.0),
    ("The answer is $18.", "18", 1.0),
    ("The answer is 18%.", "18", 1.0),
    ("So the total is 1,000 dollars.", "1000", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("#### $1,234,567", "1234567", 1.0),
    ("#### 1234567", "1234568", 0.0),
    ("She ate 3/4 of the pie, so the answer is 3/4", "0.75", 1.0),
    ("The answer is \\boxed{0.75}", "3/4", 1.0),
    ("The answer is $\\boxed{\\frac{3}{4}}$.", "0.75", 1.0),
    ("The answer is $\\boxed{18}$.", "18", 1.0),
    ("I think \\boxed{18} but the total was 20 apples", "18", 1.0),
    ("First 16 - 3 - 4 = 9, then 9 * 2 = 18", "18", 1.0),
    ("First 16 - 3 - 4 = 9, then 9 * 2 = 18.", "9", 0.0),
    ("The temperature drops to \u221213 degrees.", "-13", 1.0),
    ("<think>maybe it is 12</think>The answer is 13.", "13", 1.0),
    ("<think>the answer is 13</think>The answer is 12.", "13", 0.0),
    ("<think>13 is likely, let me check 13 again", "13", 0.0),
    ("I don't know.", "13", 0.0),
    ("", "13", 0.0),
    ("#### 5\n\nI hope that helps! Let me know if you need 3 more.", "5", 1.0),
    ("It costs $0.50 per egg.\n#### .5", "0.5", 1.0),
    ("#### 007", "7", 1.0),
    ("The answer is 18 apples and 3 pears\n#### 21", "21", 1.0),
    ("The difference is 1,5 units", "5", 1.0),  # "1,5" is not a thousands number: last is 5
    ("Total: 2.5 hours", "2.50", 1.0),
    ("Total: 2.5 hours", "25", 0.0),
    # the last `####` followed by a number: a trailing marker with nothing after it is skipped
    ("She sells 16 - 3 - 4 = 9 eggs, 9 * 2 = 18... #### 16####", "16", 1.0),
    ("#### 16\n####", "16", 1.0),
    ("#### 16 #### #####", "16", 1.0),
    ("#### 12 then #### 16####", "16", 1.0),
    ("So the answer is 16.\n####", "16", 1.0),
    ("#### 16####", "#### 16####", 1.0),
]


@pytest.mark.parametrize("completion, truth, expected", GSM8K_CASES)
def test_gsm8k(completion, truth, expected):
    assert gsm8k(completion, truth) == expected


def test_gsm8k_real_solutions():
    rows = [json.loads(line) for line in (ROOT / "tests" / "data" / "gsm8k_sample.jsonl").open()]
    assert len(rows) == 50
    for i, row in enumerate(rows):
        assert gsm8k(row["answer"], row["answer"]) == 1.0, row["answer"]
        bare = row["answer"].rsplit("####", 1)[1].strip()
        assert gsm8k(row["answer"], bare) == 1.0, bare
        other = next(r["answer"] for r in rows[i + 1:] + rows[:i]
                     if r["answer"].rsplit("####", 1)[1].strip().replace(",", "") != bare.replace(",", ""))
        assert gsm8k(row["answer"], other) == 0.0, (row["answer"], other)


def test_gsm8k_ground_truth_without_number_is_an_error():
    with pytest.raises(ValueError, match="no number"):
        gsm8k("#### 3", "three")


# ----------------------------------------------------------------------------- math

MATH_CASES = [
    ("The answer is $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}", 1.0),
    ("$\\boxed{\\dfrac{1}{2}}$", "\\frac12", 1.0),
    ("\\boxed{\\tfrac{2}{4}}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),
    ("\\boxed{\\frac{1}{3}}", "\\frac{2}{3}", 0.0),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 1.0),
    ("\\boxed{(\\frac{\\pi}{2}, 3)}", "\\left( 3, \\frac{\\pi}{2} \\right)", 0.0),
    ("\\boxed{\\{3, 1, 2\\}}", "\\{1,2,3\\}", 1.0),
    ("\\boxed{2, -1}", "-1, 2", 1.0),
    ("\\boxed{\\{-1, 2\\}}", "2, -1", 1.0),
    ("\\boxed{\\{(1,2), (3,4)\\}}", "\\{(3,4),(1,2)\\}", 1.0),
    ("\\boxed{\\{1\\} \\cup \\{2\\}}", "\\{1\\}\\cup\\{3\\}", 0.0),
    ("\\boxed{5/2}", "\\frac52", 1.0),
    ("\\boxed{x = 2, x = -1}", "-1, 2", 1.0),
    ("\\boxed{2, -2}", "-1, 2", 0.0),
    ("\\boxed{[2, 5)}", "[2,5)", 1.0),
    ("\\boxed{[2, 5]}", "[2,5)", 0.0),
    ("\\boxed{x \\in [2, 5)}", "[2,5)", 1.0),
    ("\\boxed{(-\\infty, 0) \\cup (1, \\infty)}", "(-\\infty,0)\\cup(1,\\infty)", 1.0),
    ("\\boxed{x=5}", "5", 1.0),
    ("The final answer is $x = 5$. I hope it is correct.", "5", 1.0),
    ("Final Answer: The final answer is $\\frac{3}{4}$. I hope it is correct.", "0.75", 1.0),
    ("\\boxed{90^\\circ}", "90", 1.0),
    ("\\boxed{90^{\\circ}}", "90^\\circ", 1.0),
    ("\\boxed{25\\%}", "25", 1.0),
    ("\\boxed{\\$18.50}", "18.5", 1.0),
    ("\\boxed{10\\text{ cm}^2}", "10", 1.0),
    ("\\boxed{10 \\text{ inches}}", "10", 1.0),
    ("\\boxed{5 \\text{ dollars}}", "5", 1.0),
    ("\\boxed{\\text{Monday}}", "\\text{Monday}", 1.0),
    ("\\boxed{\\text{(C)}}", "\\text{(C)}", 1.0),
    ("\\boxed{\\text{Tuesday}}", "\\text{Monday}", 0.0),
    ("\\boxed{\\text{Evlyen}}", "\\text{Evelyn}", 0.0),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}", 1.0),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{1}{2}\\sqrt3", 1.0),
    ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{\\sqrt{3}}", "\\sqrt{2}", 0.0),
    ("\\boxed{\\sqrt[3]{27}}", "3", 1.0),
    ("\\boxed{2\\pi}", "2 \\pi", 1.0),
    ("\\boxed{3.14}", "\\pi", 0.0),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", 1.0),
    ("\\boxed{x^2+2x}", "(x+1)^2", 0.0),
    ("\\boxed{\\frac{a+b}{2}}", "\\frac{b+a}{2}", 1.0),
    ("\\boxed{2^{10}}", "1024", 1.0),
    ("\\boxed{1024}", "2^10", 1.0),
    ("\\boxed{1234567891}", "1234567890", 0.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{5!}", "120", 1.0),
    ("\\boxed{-\\frac{7}{3}}", "\\frac{-7}{3}", 1.0),
    ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", 1.0),
    ("\\fbox{42}", "42", 1.0),
    ("We get \\boxed{41} at first, but correcting it: \\boxed{42}", "42", 1.0),
    ("<think>So it is \\boxed{41}?</think>The answer is \\boxed{42}.", "42", 1.0),
    ("<think>The answer is \\boxed{42}", "42", 0.0),
    ("The answer is 42 but I won't box it, it is a long text", "42", 0.0),
    ("42", "42", 1.0),
    ("\\boxed{42}", "So the total is $\\boxed{42}$.", 1.0),
    ("\\boxed{}", "42", 0.0),
    ("\\boxed{\\{\\}}", "\\frac{1}{2}", 0.0),
    ("\\boxed{\\frac{1}{0}}", "1", 0.0),
]


@pytest.mark.parametrize("completion, truth, expected", MATH_CASES)
def test_math(completion, truth, expected):
    assert math_answer(completion, truth) == expected


# ----------------------------------------------------------------------------- ifeval


def rlvr(func_name, **kwargs):
    """A ground truth as in allenai/RLVR-GSM-MATH-IF-Mixed-Constraints: unused arguments null."""
    row = dict.fromkeys(["N", "quantifier", "end_phrase", "keyword_list", "word", "forbidden_words", "letter",
                         "i", "first_word", "postscript_marker", "options", "section_splitter",
                         "original_prompt"])
    return json.dumps({"func_name": func_name, **row, **kwargs})


def ifeval_g(ids, kwargs):
    """A ground truth as in open-instruct's IFEvalG data: a Python literal list with one dict."""
    return str([{"instruction_id": ids, "kwargs": kwargs}])


POEM = "Roses are red.\n\nViolets are blue.\n\nSugar is sweet."
IFEVAL_CASES = [
    ("The sun and the moon.", rlvr("verify_keywords", keyword_list=["sun", "Moon"]), 1.0),
    ("The sun is bright.", rlvr("verify_keywords", keyword_list=["sun", "moon"]), 0.0),
    ("Sun, sun, SUN!", rlvr("verify_keyword_frequency", word="sun", N=3), 1.0),
    ("Sunny sun.", rlvr("verify_keyword_frequency", word="sun", N=2), 0.0),
    ("A calm reply.", rlvr("validate_forbidden_words", forbidden_words=["angry", "mad"]), 1.0),
    ("I am MAD.", rlvr("validate_forbidden_words", forbidden_words=["angry", "mad"]), 0.0),
    ("Made it.", rlvr("validate_forbidden_words", forbidden_words=["mad"]), 0.0),  # a substring counts
    ("banana", rlvr("verify_letter_frequency", letter="a", N=3), 1.0),
    ("The cat sat on the mat and it was a very happy cat.", rlvr("validate_response_language", language="en"), 1.0),
    ("El gato está en la casa y no quiere salir.", rlvr("validate_response_language", language="en"), 0.0),
    ("El gato está en la casa y no quiere salir.", rlvr("validate_response_language", language="es"), 1.0),
    ("One.\n* * *\nTwo.\n* * *\nThree.", rlvr("verify_paragraph_count", N=3), 1.0),
    ("One.\n***\nTwo.", rlvr("verify_paragraph_count", N=3), 0.0),
    ("one two three four five", rlvr("validate_word_constraint", N=5, quantifier="at least"), 1.0),
    ("one two three", rlvr("validate_word_constraint", N=5, quantifier="at least"), 0.0),
    ("one two three", rlvr("validate_word_constraint", N=5, quantifier="at most"), 1.0),
    ("First. Second! Third?", rlvr("verify_sentence_constraint", N=3, quantifier="at least"), 1.0),
    ("First. Second.", rlvr("verify_sentence_constraint", N=3, quantifier="at least"), 0.0),
    (POEM, rlvr("validate_paragraphs", N=3, i=2, first_word="Violets"), 1.0),
    (POEM, rlvr("validate_paragraphs", N=3, i=2, first_word="violets"), 0.0),  # case-sensitive prefix
    (POEM, rlvr("validate_paragraphs", N=3, i=2, first_word="Roses"), 0.0),
    ("Hello.\n\nP.S. See you soon.", rlvr("verify_postscript", postscript_marker="P.S."), 1.0),
    ("Hello. See you soon.", rlvr("verify_postscript", postscript_marker="P.S."), 0.0),
    ("Dear [name], meet me at [address].", rlvr("validate_placeholders", N=2), 1.0),
    ("Dear [name], meet me.", rlvr("validate_placeholders", N=2), 0.0),
    ("* one\n* two\n- three", rlvr("verify_bullet_points", N=3), 1.0),
    ("* one\n* two", rlvr("verify_bullet_points", N=3), 0.0),
    ("<<A Poem of Joy>>\nLines.", rlvr("validate_title"), 1.0),
    ("A Poem of Joy\nLines.", rlvr("validate_title"), 0.0),
    ("My answer is yes.", rlvr("validate_choice", options=["My answer is yes.", "My answer is no."]), 1.0),
    ("This has *one* and **two** highlights.", rlvr("validate_highlighted_sections", N=2), 1.0),
    ("This has *one* highlight.", rlvr("validate_highlighted_sections", N=2), 0.0),
    ("Section 1\nIntro.\nSection 2\nBody.", rlvr("validate_sections", N=2, section_splitter="Section"), 1.0),
    ("Section 1\nIntro.", rlvr("validate_sections", N=2, section_splitter="Section"), 0.0),
    ('{"a": 1, "b": [2, 3]}', rlvr("validate_json_format"), 1.0),
    ('```json\n{"a": 1}\n```', rlvr("validate_json_format"), 0.0),  # no fence allowed
    ("Sure! {\"a\": 1}", rlvr("validate_json_format"), 0.0),
    ("Write a poem. Here it is: roses.", rlvr("validate_repeat_prompt", original_prompt="Write a poem."), 1.0),
    ("Here it is: roses.", rlvr("validate_repeat_prompt", original_prompt="Write a poem."), 0.0),
    ("Answer one.\n******\nAnswer two.", rlvr("validate_two_responses"), 1.0),
    ("Same.\n******\nSame.", rlvr("validate_two_responses"), 0.0),
    ("ALL CAPS HERE.", rlvr("validate_uppercase"), 1.0),
    ("Not all caps.", rlvr("validate_uppercase"), 0.0),
    ("all lowercase here.", rlvr("validate_lowercase"), 1.0),
    ("Not lowercase.", rlvr("validate_lowercase"), 0.0),
    ("THIS IS VERY IMPORTANT and NOT optional", rlvr("validate_frequency_capital_words", N=3, quantifier="at least"), 1.0),
    ("Only ONE capital word.", rlvr("validate_frequency_capital_words", N=3, quantifier="at least"), 0.0),
    ("Thanks. Is there anything else I can help with?",
     rlvr("validate_end", end_phrase="Is there anything else I can help with?"), 1.0),
    ('"Wrapped in quotes."', rlvr("validate_quotation"), 1.0),
    ("Not wrapped.", rlvr("validate_quotation"), 0.0),
    ("No commas at all", rlvr("validate_no_commas"), 1.0),
    ("Yes, commas", rlvr("validate_no_commas"), 0.0),
    # IFEval instruction ids, several constraints scoring the fraction met
    ("the ocean is blue.", ifeval_g(["keywords:existence", "change_case:english_lowercase"],
                                    [{"keywords": ["ocean"]}, {}]), 1.0),
    ("the sky is blue.", ifeval_g(["keywords:existence", "change_case:english_lowercase"],
                                  [{"keywords": ["ocean"]}, {}]), 0.5),
    ("THE SKY IS BLUE.", ifeval_g(["keywords:existence", "change_case:english_lowercase"],
                                  [{"keywords": ["ocean"]}, {}]), 0.0),
    ("<think>THINKING IN CAPS, WITH COMMAS</think>\nthe ocean is blue", ifeval_g(
        ["change_case:english_lowercase", "punctuation:no_comma"], [{}, {}]), 1.0),
    ("a a a", ifeval_g(["keywords:frequency"], [{"keyword": "a", "frequency": 3, "relation": "less than"}]), 0.0),
    ("a a", ifeval_g(["keywords:frequency"], [{"keyword": "a", "frequency": 3, "relation": "less than"}]), 1.0),
    ("banana", ifeval_g(["keywords:letter_frequency"], [{"letter": "a", "let_frequency": 3,
                                                          "let_relation": "at least"}]), 1.0),
    ("SECTION 1 a SECTION 2 b", ifeval_g(["detectable_format:multiple_sections"],
                                         [{"section_spliter": "SECTION", "num_sections": 2}]), 1.0),
    ("My answer is maybe.", ifeval_g(["detectable_format:constrained_response"], [None]), 1.0),
    ("Perhaps.", ifeval_g(["detectable_format:constrained_response"], [None]), 0.0),
    ("Bonjour, je suis très content de vous voir et le chat est là.",
     ifeval_g(["language:response_language"], [{"language": "fr"}]), 1.0),
    ("Привет, как дела? Это очень хорошо.", ifeval_g(["language:response_language"], [{"language": "ru"}]), 1.0),
    ("これは日本語の文です。", ifeval_g(["language:response_language"], [{"language": "ja"}]), 1.0),
    ("这是一个测试句子。", ifeval_g(["language:response_language"], [{"language": "ja"}]), 0.0),
    ("a b c d e f g h i j", ifeval_g(["length_constraints:number_words"],
                                     [{"num_words": 10, "relation": "at least"}]), 1.0),
    ("P.P.S nothing\nP.S. later", ifeval_g(["detectable_content:postscript"], [{"postscript_marker": "P.S."}]), 1.0),
    ("", ifeval_g(["punctuation:no_comma"], [{}]), 0.0),
    ('"quoted"', json.dumps([{"instruction_id": ["startend:quotation"], "kwargs": [{}]}]), 1.0),
]


@pytest.mark.parametrize("completion, truth, expected", IFEVAL_CASES)
def test_ifeval(completion, truth, expected):
    assert ifeval(completion, truth) == expected


HINDI = "मैं आपके खानपान की गुणवत्ता के बारे में एक छोटी समीक्षा लिख रहा हूं। भोजन स्वादिष्ट था और सेवा बहुत तेज़ थी।"
# IFEval instruction ids score as IFEval's official checker does (these outcomes are its own; the
# reference tests in test_ifeval_reference.py compare on thousands more).
IFEVAL_FORMAT_CASES = [
    (HINDI, "language:response_language", {"language": "hi"}, 1.0),
    (HINDI, "language:response_language", {"language": "ne"}, 0.0),
    ("आज सकाळी मी बाजारात गेलो होतो आणि तिथे खूप गर्दी होती. भाज्यांचे भाव वाढले आहेत.",
     "language:response_language", {"language": "mr"}, 1.0),
    ("Oggi piove molto.", "language:response_language", {"language": "it"}, 1.0),
    ("인공지능(AI)은 현대 사회에서 중요한 역할을 하고 있습니다. 특히 자연어 처리(NLP) 기술은 번역과 요약에 널리 사용됩니다.",
     "language:response_language", {"language": "ko"}, 1.0),
    ("12345 !!!", "language:response_language", {"language": "en"}, 1.0),  # nothing to detect: followed
    ("Sneakers are comfy; this sneaker is red.", "keywords:frequency",
     {"keyword": "sneaker", "frequency": 2, "relation": "at least"}, 1.0),  # regex matches, not words
    ("Dr. Smith arrived at 3 p.m. He left at 5.", "length_constraints:number_sentences",
     {"num_sentences": 2, "relation": "less than"}, 0.0),
    ("Wow!!! Is it true? Yes. 1. First item", "length_constraints:number_sentences",
     {"num_sentences": 3, "relation": "at least"}, 1.0),
    ("HOLA MUNDO, ¿CÓMO ESTÁS? ESPERO QUE MUY BIEN.", "change_case:english_capital", {}, 0.0),
    ("HELLO WORLD, THIS IS A TEST OF THE CAPITALS CHECK.", "change_case:english_capital", {}, 1.0),
    ("hola mundo, ¿cómo estás? espero que muy bien.", "change_case:english_lowercase", {}, 0.0),
    ("hello world, this is a test of the lowercase check.", "change_case:english_lowercase", {}, 1.0),
    ("DON'T do it, NASA said.", "change_case:capital_word_frequency",
     {"capital_frequency": 3, "capital_relation": "at least"}, 1.0),  # DO, N'T, NASA
    ("Thanks for the help.s. Bye", "detectable_content:postscript", {"postscript_marker": "P.S."}, 1.0),
    ("* one\n**bold**\n---", "detectable_format:number_bullet_lists", {"num_bullets": 2}, 1.0),
]


@pytest.mark.parametrize("response, instruction_id, kwargs, expected", IFEVAL_FORMAT_CASES)
def test_ifeval_instruction_ids_follow_the_official_checker(response, instruction_id, kwargs, expected):
    assert ifeval(response, json.dumps({"instruction_id": [instruction_id], "kwargs": [kwargs]})) == expected


# open-instruct's functions, as open_instruct/if_functions.py defines them (no copy of it is on
# PyPI): each case states what its code computes, often unlike IFEval's checker for the same text.
OPEN_INSTRUCT_CASES = [
    ("Sneakers are comfy; this sneaker is red.", rlvr("verify_keyword_frequency", word="sneaker", N=1), 1.0),
    ("Sneakers are comfy; this sneaker is red.", rlvr("verify_keyword_frequency", word="sneaker", N=2), 0.0),
    ("Price: #5, #6 and #7", rlvr("verify_letter_frequency", letter="#", N=3), 1.0),
    ("Aa", rlvr("verify_letter_frequency", letter="a", N=2), 0.0),  # case-sensitive
    ("HOLA MUNDO, ¿CÓMO ESTÁS?", rlvr("validate_uppercase"), 1.0),  # any language
    ("Dr. Smith arrived at 3 p.m. He left at 5.", rlvr("verify_sentence_constraint", N=2, quantifier="at most"), 1.0),
    ("One! Two? Three. Four", rlvr("verify_sentence_constraint", N=4, quantifier="at least"), 1.0),
    ("a b c d e f g h i j k", rlvr("validate_word_constraint", N=10, quantifier="around"), 1.0),  # within 1
    ("a b c d e f g h i j k l m", rlvr("validate_word_constraint", N=10, quantifier="around"), 0.0),
    ("One TWO THREE", rlvr("validate_frequency_capital_words", N=3, quantifier="around"), 1.0),
    ("* one\n**bold**\n---", rlvr("verify_bullet_points", N=3), 1.0),
    ("A **bold** word", rlvr("validate_highlighted_sections", N=2), 1.0),  # "**" and "**" are spans
    ("<<>>", rlvr("validate_title"), 1.0),
    ('"', rlvr("validate_quotation"), 1.0),
    ("I pick Option B.", rlvr("validate_choice", options=["Option A", "Option B"]), 1.0),
    ("I pick option b.", rlvr("validate_choice", options="('Option A', 'Option B')"), 0.0),
    ("SECTION 1 a\nsection 2 b", rlvr("validate_sections", N=2, section_splitter="Section"), 1.0),
    ("Thanks.\nP.S. later", rlvr("verify_postscript", postscript_marker="P.S."), 1.0),
    ("Thanks.\np.s. later", rlvr("verify_postscript", postscript_marker="P.S."), 0.0),
    ("Write a poem. Roses.", rlvr("validate_repeat_prompt", original_prompt="write a poem."), 0.0),
    ("Any other questions?", rlvr("validate_end", end_phrase="any other questions?"), 0.0),
    ("  a\n  * * *  \n  b  ", rlvr("verify_paragraph_count", N=2), 1.0),
    ("a\n***\nb", rlvr("verify_paragraph_count", N=2), 0.0),
    ("a\n\n\n\nb", rlvr("validate_paragraphs", N=3, i=1, first_word="a"), 1.0),  # an empty middle part counts
    ("\n\n  ", rlvr("validate_no_commas"), 0.0),  # blank: nothing is followed (open-instruct would pass it)
]


@pytest.mark.parametrize("completion, truth, expected", OPEN_INSTRUCT_CASES)
def test_ifeval_func_names_follow_open_instruct(completion, truth, expected):
    assert ifeval(completion, truth) == expected


def test_ifeval_loose_mode_drops_first_and_last_lines_and_stars():
    truth = ifeval_g(["startend:end_checker", "detectable_format:title"], [{"end_phrase": "Bye."}, {}])
    response = "Sure, here it is:\n<<Reef>>\nThe reef is large. Bye.\nLet me know if you need more."
    assert instruction_results(response, truth) == [False, True]
    assert instruction_results(response, truth, loose=True) == [True, True]
    truth = ifeval_g(["detectable_format:json_format"], [{}])
    assert instruction_results('Here:\n{"a": 1}', truth) == [False]
    assert instruction_results('Here:\n{"a": 1}', truth, loose=True) == [True]
    truth = ifeval_g(["startend:quotation"], [{}])
    assert instruction_results('**"quoted"**', truth) == [False]
    assert instruction_results('**"quoted"**', truth, loose=True) == [True]


def test_ifeval_counts_sentences_and_capital_words_in_the_first_10000_characters():
    # The one documented departure from the official checker, which would count all five NASAs.
    from nanopost.verifiers.ifeval import MAX_TOKENIZED_CHARS

    truth = ifeval_g(["change_case:capital_word_frequency"], [{"capital_frequency": 3, "capital_relation": "at least"}])
    assert ifeval("a " * (MAX_TOKENIZED_CHARS // 2 - 10) + "NASA " * 5, truth) == 1.0  # three fit in the window
    assert ifeval("a " * (MAX_TOKENIZED_CHARS // 2) + "NASA " * 5, truth) == 0.0
    truth = ifeval_g(["length_constraints:number_sentences"], [{"num_sentences": 2, "relation": "at least"}])
    assert ifeval("a " * (MAX_TOKENIZED_CHARS // 2 - 10) + "One. Two. Three.", truth) == 1.0
    assert ifeval("a " * (MAX_TOKENIZED_CHARS // 2) + "One. Two. Three.", truth) == 0.0


def test_linear_scans_equal_the_regexes_they_replace():
    # The graders' patterns that backtrack quadratically are computed by scans; on a seeded soup
    # of the characters that matter they must count exactly what the regexes count.
    from nanopost.verifiers import ifeval as module

    rng = random.Random(0)
    alphabet = ["*", "*", "-", " ", "\n", "\n", "\t", "[", "]", "<", "<", ">", ">", "a", "P", ".", "s", "\u2003"]
    for _ in range(3000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        for opener, closer in (("[", "]"), ("<<", ">>"), ("*", "*")):
            expected = len(re.findall(re.escape(opener) + ".*?" + re.escape(closer), text))
            assert module.count_delimited(text, opener, closer) == expected, (text, opener)
        assert module.count_line_markers(text, "*", star_bullet=True) == \
            len(re.findall(r"^\s*\*[^\*].*$", text, flags=re.MULTILINE)), text
        assert module.count_line_markers(text, "-", star_bullet=False) == \
            len(re.findall(r"^\s*-.*$", text, flags=re.MULTILINE)), text
        titles = re.findall(r"<<[^\n]+>>", text)
        assert module.ifeval_title(text) == any(t.lstrip("<").rstrip(">").strip() for t in titles), text
        assert module.ifeval_postscript(text, "P.S.") == \
            bool(re.findall(r"\s*p\.\s?s\..*$", text.lower(), flags=re.MULTILINE)), text


def test_ifeval_bad_ground_truths_are_errors():
    with pytest.raises(ValueError, match="unknown ifeval function 'validate_nothing'"):
        ifeval("x", rlvr("validate_nothing"))
    with pytest.raises(ValueError, match="unknown ifeval instruction id 'keywords:nothing'"):
        ifeval("x", ifeval_g(["keywords:nothing"], [{}]))
    with pytest.raises(ValueError, match="unexpected argument"):
        ifeval("x", ifeval_g(["punctuation:no_comma"], [{"num_words": 3}]))
    with pytest.raises(ValueError, match=r"needs argument\(s\) \['relation'\]"):
        ifeval("x", ifeval_g(["length_constraints:number_words"], [{"num_words": 3}]))
    with pytest.raises(ValueError, match="relation of .* must be one of"):
        ifeval("x", ifeval_g(["length_constraints:number_words"], [{"num_words": 3, "relation": "around"}]))
    with pytest.raises(ValueError, match="needs argument"):
        ifeval("x", rlvr("verify_keyword_frequency", word="sun"))
    with pytest.raises(ValueError, match="not one langdetect detects"):
        ifeval("x", ifeval_g(["language:response_language"], [{"language": "xx"}]))
    with pytest.raises(ValueError, match="one character"):
        ifeval("x", rlvr("verify_letter_frequency", letter="ab", N=1))


# ----------------------------------------------------------------------------- format

FORMAT_CASES = [
    ("<think>2 + 2 is 4.</think>\n#### 4", 1.0),
    ("<think>\nreasoning\n</think>\n\nanswer", 1.0),
    ("  <think>r</think>a", 1.0),
    ("reasoning without the opening tag</think>answer", 1.0),  # template put <think> in the prompt
    ("<think>r</think>\\boxed{4}", 1.0),
    ("<think>r</think>", 0.0),
    ("<think>r</think>   \n", 0.0),
    ("<think></think>answer", 0.0),
    ("<think>   </think>answer", 0.0),
    ("<think>never closed", 0.0),
    ("just an answer", 0.0),
    ("", 0.0),
    ("<think>a</think>b</think>c", 0.0),
    ("<think>a</think>b<think>c</think>d", 0.0),
    ("<think><think>a</think>b", 0.0),
    ("answer first <think>then thinking</think>", 0.0),
    ("<THINK>a</THINK>b", 0.0),
    ("<think>a</think >b", 0.0),
    ("</think>answer", 0.0),
    ("<think>a\n\nb\n\nc</think>The answer is 42.", 1.0),
    ("<think>x</think>y", 1.0),
    ("<think>" + "long " * 1000 + "</think>" + "answer", 1.0),
    ("\n\n<think>r</think>a", 1.0),
    ("<think>r</think>\n<answer>4</answer>", 1.0),
    ("<think>r<think>", 0.0),
    ("<think>r</think><think>", 0.0),
    ("think>r</think>a", 1.0),  # reasoning text may be anything, even a broken tag
    ("<think>r</ think>a", 0.0),
    ("<think>\u200b</think>a", 1.0),  # a zero-width space is not whitespace to str.strip
    ("<think>r</think>\t", 0.0),
]


@pytest.mark.parametrize("completion, expected", FORMAT_CASES)
def test_format(completion, expected):
    assert think_format(completion, "") == expected


# ----------------------------------------------------------------------------- registry


def test_registry_dispatch_on_real_rows():
    rows = [json.loads(line) for line in (ROOT / "data" / "rl_train.jsonl").open()][:20]
    rows.append({**rows[0], "ground_truth": "-13"})  # a negative answer in the same format
    for row in rows:
        verify = verifiers.get(row["dataset"])
        assert verify(f"some work\n#### {row['ground_truth']}", row["ground_truth"]) == 1.0
        assert verify(f"some work\n#### {int(row['ground_truth']) + 1}", row["ground_truth"]) == 0.0
    tulu_rows = [
        {"dataset": "MATH", "ground_truth": "\\frac{1}{2}", "completion": "So $\\boxed{\\dfrac{1}{2}}$."},
        {"dataset": "gsm8k", "ground_truth": "18", "completion": "9 * 2 = 18\n#### 18"},
        {"dataset": "ifeval", "ground_truth": rlvr("validate_lowercase"), "completion": "all lower"},
    ]
    for row in tulu_rows:
        assert verifiers.get(row["dataset"])(row["completion"], row["ground_truth"]) == 1.0


def test_registry_names_errors_and_register():
    assert {"gsm8k", "math", "ifeval", "format"} <= set(verifiers.names())
    assert verifiers.get("Math") is verifiers.get("MATH") is math_answer
    with pytest.raises(KeyError, match="gsm8k") as error:
        verifiers.get("no_such_task")
    assert "no_such_task" in str(error.value)

    @verifiers.register("Test_Exact_Match")
    def exact(completion, ground_truth):
        return float(completion.strip() == ground_truth)

    try:
        assert verifiers.get("test_exact_match")(" yes ", "yes") == 1.0
        assert "test_exact_match" in verifiers.names()
        with pytest.raises(ValueError, match="already registered"):
            verifiers.register("TEST_EXACT_MATCH")(exact)
    finally:
        verifiers._REGISTRY.pop("test_exact_match")


# ----------------------------------------------------------------------------- adversarial inputs

N = 100_000
ADVERSARIAL = {
    "digits": "1" * N,
    "thousands_commas": "1," * (N // 2),
    "nested_braces": "\\boxed{" + "{" * N + "}" * N + "}",
    "unclosed_braces": "\\boxed{" + "{" * N,
    "exponent_tower": "\\boxed{9^{9^{9^9}}}",
    "huge_power": "\\boxed{10^{10^{6}}}",
    "huge_factorial": "\\boxed{(10^{50})!}",
    "nested_parens": "\\boxed{" + "(" * 5000 + "1" + ")" * 5000 + "}",
    "nested_fracs": "\\boxed{" + "\\frac{" * 2000 + "1" + "}{2}" * 2000 + "}",
    "nested_sqrt": "\\boxed{" + "\\sqrt{" * 30 + "2" + "}" * 30 + "}",
    "long_decimal": "\\boxed{" + "9" * 5000 + "." + "9" * 5000 + "}",
    "big_set": "\\boxed{\\{" + ",".join(["x+1"] * 5000) + "\\}}",
    "many_boxed": "\\boxed{1}" * (N // 9),
    "hashes": "####" * (N // 4),
    "think_tags": "<think>" * (N // 7),
    "close_tags": "</think>" * (N // 8),
    "stars": "*" * N,
    "spaced_stars": "* " * (N // 2),
    "brackets": "[" * N,
    "angles": "<" * N,
    "fence_and_spaces": "```" + " " * N + "```",
    "json_nesting": "[" * N + "]" * N,
    "newlines": "\n" * N,
    "dots": ". " * (N // 2),
    "cyrillic": "я" * N,
    "latex_commands": "\\frac" * (N // 5),
    "dollars": "$" * N,
    "final_answer_dollars": "The final answer is " + "$" * N,
    "text_groups": "\\boxed{" + "\\text{a}" * 5000 + "}",
    "short_sentences": "Ab. " * (N // 4),
    "short_lines": "Ab CD.\n" * (N // 7),
    "inequalities": "\\boxed{" + "x\\le" * (N // 4) + "}",
    "mixed_numbers": "\\boxed{" + "1\\frac{1}{2}" * (N // 12) + "}",
    "plus_minus": "\\boxed{" + "1\\pm" * (N // 4) + "}",
}
ADVERSARIAL_TRUTHS = {
    "gsm8k": ["18", "#### 1,000"],
    "math": ["\\frac{1}{2}", "x^2+1", "(1,2)", "\\{1,2,3\\}", "9^{9^{9^9}}"],
    "format": [""],
    "ifeval": [rlvr(name, **kwargs) for name, kwargs in [
        ("validate_title", {}), ("validate_json_format", {}), ("validate_highlighted_sections", {"N": 3}),
        ("verify_paragraph_count", {"N": 3}), ("validate_two_responses", {}), ("validate_placeholders", {"N": 2}),
        ("verify_sentence_constraint", {"N": 3, "quantifier": "at least"}),
        ("validate_response_language", {"language": "en"}), ("verify_postscript", {"postscript_marker": "P.S."}),
        ("verify_bullet_points", {"N": 3}), ("validate_sections", {"N": 2, "section_splitter": "Section"}),
        ("verify_keyword_frequency", {"word": "a", "N": 3}), ("validate_quotation", {}),
        ("validate_frequency_capital_words", {"N": 3, "quantifier": "at least"}),
        ("validate_paragraphs", {"N": 2, "i": 1, "first_word": "a"}), ("validate_end", {"end_phrase": "a"})]] + [
        ifeval_g([instruction_id], [kwargs]) for instruction_id, kwargs in [
            ("keywords:existence", {"keywords": ["a", "reef"]}),
            ("keywords:frequency", {"keyword": "a", "frequency": 3, "relation": "at least"}),
            ("keywords:forbidden_words", {"forbidden_words": ["a"]}),
            ("keywords:letter_frequency", {"letter": "a", "let_frequency": 3, "let_relation": "less than"}),
            ("language:response_language", {"language": "en"}),
            ("length_constraints:number_sentences", {"num_sentences": 20, "relation": "less than"}),
            ("length_constraints:number_paragraphs", {"num_paragraphs": 3}),
            ("length_constraints:number_words", {"num_words": 300, "relation": "at least"}),
            ("length_constraints:nth_paragraph_first_word", {"num_paragraphs": 2, "nth_paragraph": 1,
                                                             "first_word": "a"}),
            ("detectable_content:number_placeholders", {"num_placeholders": 2}),
            ("detectable_content:postscript", {"postscript_marker": "P.S."}),
            ("detectable_content:postscript", {"postscript_marker": "P.P.S"}),
            ("detectable_format:number_bullet_lists", {"num_bullets": 3}),
            ("detectable_format:constrained_response", {}),
            ("detectable_format:number_highlighted_sections", {"num_highlights": 3}),
            ("detectable_format:multiple_sections", {"section_spliter": "Section", "num_sections": 2}),
            ("detectable_format:json_format", {}), ("detectable_format:title", {}),
            ("combination:two_responses", {}), ("combination:repeat_prompt", {"prompt_to_repeat": "Say a."}),
            ("startend:end_checker", {"end_phrase": "Bye."}), ("startend:quotation", {}),
            ("change_case:capital_word_frequency", {"capital_frequency": 20, "capital_relation": "less than"}),
            ("change_case:english_capital", {}), ("change_case:english_lowercase", {}),
            ("punctuation:no_comma", {})]],
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL_TRUTHS))
def test_adversarial_inputs_return_within_one_second(name):
    verify = verifiers.get(name)
    for truth in ADVERSARIAL_TRUTHS[name]:  # loads langdetect's profiles and nltk once (about 2 s)
        verify("Warm up. WARM UP.", truth)
    for key, completion in ADVERSARIAL.items():
        for truth in ADVERSARIAL_TRUTHS[name]:
            start = time.perf_counter()
            score = verify(completion, truth)
            elapsed = time.perf_counter() - start
            assert elapsed < 1.0, f"{name} took {elapsed:.2f}s on {key}"
            assert 0.0 <= score <= 1.0
    if name == "ifeval":  # loose mode, as eval.py reports it, checks up to 8 variants of a response
        for key, completion in ADVERSARIAL.items():
            for truth in ADVERSARIAL_TRUTHS[name]:
                start = time.perf_counter()
                instruction_results(completion, truth, loose=True)
                elapsed = time.perf_counter() - start
                assert elapsed < 1.0, f"ifeval loose took {elapsed:.2f}s on {key} for {truth}"
    if name == "math":  # adversarial ground truths too (a bad row must not hang a run)
        for key, truth in ADVERSARIAL.items():
            start = time.perf_counter()
            assert math_answer("\\boxed{1}", truth) in (0.0, 1.0)
            assert time.perf_counter() - start < 1.0, key


def test_exponent_tower_is_not_evaluated_exactly():
    # Equal strings are equal; different towers must compare unequal quickly, not by computing them.
    assert math_answer("\\boxed{9^{9^{9^9}}}", "9^{9^{9^9}}") == 1.0
    start = time.perf_counter()
    assert math_answer("\\boxed{9^{9^{9^9}}}", "9^{9^{9^8}}") == 0.0
    assert time.perf_counter() - start < 1.0


def test_random_latex_fragments_never_raise():
    # Seeded soup of the pieces answers are made of: every verifier returns a score in [0, 1]
    # (math both ways round), never an exception, and stays fast.
    fragments = ["\\boxed{", "\\fbox{", "{", "}", "(", ")", "[", "]", "\\{", "\\}", "\\frac", "\\sqrt", "^", "_",
                 "-", "+", "/", ",", ".", "=", "\\in", "\\cup", "\\pi", "\\infty", "\\text{", "cm", "x", "2", "0",
                 "1,000", "$", "\\%", "^\\circ", "!", "<think>", "</think>", "####", " ", "\n", "\\left(", "\\log_",
                 "\\sin", "\\cdot", "\\\\", "The final answer is ", "***", "<<", ">>", "[x]", "P.S.", '"', "\u2212"]
    truths = {"math": ["\\frac{1}{2}", "x^2+1", "(1,2)", "\\{1,2,3\\}", "[2,5)"], "gsm8k": ["18", "-0.5"],
              "format": [""], "ifeval": ADVERSARIAL_TRUTHS["ifeval"][:6]}
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(fragments) for _ in range(rng.randint(1, 40)))
        for name, names_truths in truths.items():
            for truth in names_truths:
                start = time.perf_counter()
                assert 0.0 <= verifiers.get(name)(text, truth) <= 1.0
                if name == "math":
                    assert 0.0 <= math_answer(truth, text) <= 1.0
                assert time.perf_counter() - start < 1.0
