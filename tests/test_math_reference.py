"""The `math` verifier against Hugging Face's math-verify (a test extra) as a second opinion.

A corpus of realistic (completion, gold answer) pairs from MATH-style problems: fractions, decimals,
roots, pi, sets, intervals, tuples, units, degrees, percentages, money, matrices, expressions,
equations, text answers. Both graders score every pair; they must agree everywhere except on the
pairs listed in DISAGREEMENTS, each with the reason our answer is the right one. A new
disagreement, or a listed one that went away, fails the test, so the list stays true.
"""

import pytest

from nanopost import verifiers

math_answer = verifiers.get("math")

# (gold answer as written in MATH, the answer a model put in \boxed{})
EQUAL = [
    # fractions and decimals
    ("\\frac{1}{2}", "\\frac{1}{2}"), ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("\\frac{1}{2}", "\\tfrac12"),
    ("\\frac{1}{2}", "0.5"), ("\\frac{1}{2}", "1/2"), ("\\frac{3}{4}", "\\frac{6}{8}"),
    ("-\\frac{7}{3}", "\\frac{-7}{3}"),
    ("-\\frac{7}{3}", "-\\frac{14}{6}"), ("0.75", "\\frac{3}{4}"),
    ("\\frac{5}{2}", "2.5"), ("1.5", "\\frac{3}{2}"), ("12", "12.0"), ("12", "12.00"), ("-3", "-3"),
    ("\\frac{17}{4}", "4.25"), ("0.125", "\\frac{1}{8}"), ("1000", "1,000"), ("1000000", "1,000,000"),
    # roots, pi, powers
    ("2\\sqrt{2}", "\\sqrt{8}"), ("\\frac{\\sqrt{3}}{2}", "\\frac{1}{2}\\sqrt{3}"),
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("3\\sqrt{5}", "\\sqrt{45}"), ("\\sqrt[3]{2}", "2^{1/3}"), ("5\\sqrt{2}", "5 \\sqrt 2"), ("2\\pi", "2 \\pi"),
    ("\\frac{\\pi}{4}", "\\pi/4"), ("4\\pi", "4 \\cdot \\pi"), ("1024", "2^{10}"), ("27", "3^3"),
    ("\\frac{1}{8}", "2^{-3}"),
    ("6 + 2\\sqrt{3}", "2\\sqrt{3} + 6"), ("\\frac{1+\\sqrt{5}}{2}", "\\frac{\\sqrt{5}+1}{2}"), ("120", "5!"),
    ("\\sqrt{2}", "\\sqrt2"), ("\\frac{9\\pi}{2}", "4.5\\pi"),
    # sets, lists, tuples, intervals
    ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}"), ("1, 2, 3", "3, 1, 2"), ("-1, 2", "2, -1"), ("\\{-1, 2\\}", "-1, 2"),
    ("(3, 4)", "(3,4)"), ("(1, -2)", "\\left(1, -2\\right)"), ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("[2, 5)", "[2,5)"), ("(-\\infty, 0) \\cup (1, \\infty)", "(-\\infty,0)\\cup(1,\\infty)"), ("[-2, 7]", "[-2, 7]"),
    ("(0, \\frac{1}{2}]", "(0, 0.5]"), ("(1, 2, 3)", "(1,2,3)"), ("\\{(1, 2), (3, 4)\\}", "\\{(3, 4), (1, 2)\\}"),
    # equations and named values
    ("5", "x = 5"), ("5", "x=5"), ("[2, 5)", "x \\in [2, 5)"), ("y = 2x + 3", "y = 2x + 3"), ("y = 2x + 3", "y=2x+3"),
    ("3", "k = 3"), ("-2, 3", "x = -2, x = 3"),
    # units, degrees, percent, money
    ("10", "10\\text{ cm}"), ("10", "10 \\text{ inches}"), ("5", "5 \\text{ dollars}"), ("90", "90^\\circ"),
    ("90^\\circ", "90"), ("90^\\circ", "90^{\\circ}"), ("45", "45°"), ("25", "25\\%"), ("25\\%", "25"),
    ("18.50", "\\$18.50"), ("\\$18.50", "18.5"), ("12", "12 \\text{ square units}"), ("30", "30 \\mbox{ degrees}"),
    # expressions
    ("x^2 + 2x + 1", "(x+1)^2"), ("\\frac{a+b}{2}", "\\frac{b+a}{2}"), ("2x", "x + x"), ("3x - 6", "3(x - 2)"),
    ("x^2 - 1", "(x-1)(x+1)"), ("\\frac{1}{x}", "x^{-1}"), ("2a + 3b", "3b + 2a"), ("n(n+1)/2", "\\frac{n^2+n}{2}"),
    # matrices and text answers
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
    ("\\begin{pmatrix} 1 & 2 \\\\ 3 & 4 \\end{pmatrix}", "\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{bmatrix} 1 \\\\ 2 \\end{bmatrix}"),
    ("\\text{Monday}", "\\text{Monday}"), ("\\text{(C)}", "\\text{(C)}"), ("\\text{even}", "\\text{even}"),
    ("\\begin{pmatrix} -1 \\\\ 3 \\end{pmatrix}", "\\begin{pmatrix}-1\\\\3\\end{pmatrix}"),
    ("\\text{B}", "B"), ("\\text{(B)}", "B"), ("B", "\\text{(B)}"), ("\\textbf{(C)}", "C"), ("\\text{odd}", "odd"),
    # percentages on one side only: 25% is 25 and is 0.25
    ("25\\%", "0.25"), ("8\\%", "0.08"), ("0.4", "40\\%"), ("\\frac{1}{4}", "25\\%"), ("40", "40\\,\\%"),
    ("\\$5", "5 \\text{ dollars}"), ("40^\\circ", "40 \\text{ degrees}"), ("12", "12 \\text{ ft}"),
    ("100", "\\$100.00"),
    ("12\\text{ ft}", "12 feet"), ("12", "12 \\text{ cm}^2"), ("1{,}000", "1000"), ("1000", "1{,}000"), ("11", "11."),
    # mixed numbers, plus-minus, lists written with "and"
    ("\\frac{3}{2}", "1\\frac{1}{2}"), ("\\dfrac{9}{4}", "2\\tfrac{1}{4}"), ("-\\frac{9}{4}", "-2\\frac{1}{4}"),
    ("\\pm 2", "2, -2"), ("2, -2", "\\pm 2"), ("1 \\pm \\sqrt{2}", "1-\\sqrt{2}, 1+\\sqrt{2}"),
    ("2\\text{ and }3", "2, 3"),
    # inequalities, unions in any order, equations rearranged
    ("x > 2", "(2, \\infty)"), ("(-\\infty, 2]", "x \\le 2"), ("[1, 3)", "1 \\leq x < 3"),
    ("(-\\infty, -3] \\cup [3, \\infty)", "[3, \\infty) \\cup (-\\infty, -3]"),
    ("2x + 3y = 6", "3y + 2x = 6"), ("x^2 + y^2 = 25", "y^2 + x^2 = 25"), ("y = -\\frac{1}{2}x + 3", "y = -0.5x + 3"),
    # more expressions and functions
    ("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2"), ("\\emptyset", "\\varnothing"), ("\\frac{1}{2}x^2", "x^2/2"),
    ("[-1, 1]", "\\left[ -1, 1 \\right]"), ("\\frac{2\\sqrt{3}}{3}", "\\frac{2}{\\sqrt{3}}"),
    ("300000", "3 \\times 10^5"),
    ("0.001", "10^{-3}"), ("3", "\\log_2 8"), ("2", "\\log 100"), ("\\frac{1}{2}", "\\sin(\\pi/6)"),
    ("-\\frac{\\sqrt{3}}{2}", "-\\sqrt{3}/2"), ("\\infty", "\\infty"), ("3", "3.0000"), ("\\frac{7}{2}", "3.5"),
    ("\\frac{\\sqrt{10}}{5}", "\\sqrt{\\frac{2}{5}}"), ("5\\sqrt{3}", "\\sqrt{75}"), ("1+2i", "2i+1"), ("a^2b", "ba^2"),
    ("x^3", "x\\cdot x\\cdot x"), ("m+n", "n+m"), ("\\frac{m}{n}", "m/n"), ("\\frac{x+1}{x-1}", "\\frac{1+x}{x-1}"),
    ("e^2", "e^{2}"), ("10", "10^{1}"), ("6", "3!"), ("\\binom{5}{2}", "10"), ("10", "\\dbinom{5}{2}"),
    ("\\{2\\}", "2"), ("3", "\\{3\\}"), ("4", "4\\!"),
]

UNEQUAL = [
    ("\\frac{1}{2}", "\\frac{1}{3}"), ("\\frac{1}{3}", "0.333"), ("\\frac{2}{3}", "0.67"), ("12", "13"), ("-3", "3"),
    ("1234567891", "1234567890"), ("\\sqrt{2}", "\\sqrt{3}"), ("\\pi", "3.14"), ("2\\pi", "\\pi"),
    ("\\{1, 2, 3\\}", "\\{1, 2\\}"), ("-1, 2", "-2, 2"), ("(3, 4)", "(4, 3)"), ("[2, 5)", "[2, 5]"),
    ("[2, 5)", "(2, 5)"),
    ("(-\\infty, 0)", "(-\\infty, 0]"), ("x^2 + 2x + 1", "x^2 + 2x"), ("\\frac{a+b}{2}", "\\frac{a-b}{2}"),
    ("10", "100\\text{ cm}"), ("90^\\circ", "45^\\circ"), ("\\text{Monday}", "\\text{Tuesday}"), ("5", "x = 6"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}"), ("120", "6!"),
    ("3x - 6", "3(x + 2)"), ("2^{10}", "2^{11}"), ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{2}}{2}"), ("0", "1"),
    ("\\frac{\\pi}{6}", "30^\\circ"), ("\\frac{1}{3}", "0.\\overline{3}"), ("\\sqrt{2}", "1.414"),
    ("\\frac{1}{7}", "0.142857"),
    ("(1, 2)", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"), ("-1", "i^2"), ("1.5\\text{ hours}", "90 \\text{ minutes}"),
    ("7", "\\text{seven}"), ("(2, 3)", "2, 3"), ("(2, 3)", "\\{2, 3\\}"), ("25\\%", "0.25\\%"),
    ("\\text{Evelyn}", "\\text{Evlyen}"),
    ("\\ln 2", "\\log 2"), ("2x + 3y = 6", "2x + 3y = 7"), ("x > 2", "[2, \\infty)"), ("\\pm 2", "2"),
]

# Pairs where math-verify's verdict differs from ours, each with why ours is right.
DISAGREEMENTS = {
    ("45", "45°"): "the degree sign is a unit, as ^\\circ is (math-verify reads 45^\\circ as 45 but not 45°)",
    ("\\emptyset", "\\varnothing"): "two spellings of the empty set",
    ("(-\\infty, 2]", "x \\le 2"): "the same set; math-verify reads x > 2 as an interval but not \\le",
    ("[1, 3)", "1 \\leq x < 3"): "the same set; math-verify does not read a double inequality",
    ("40", "40\\,\\%"): "a thin space before the percent sign changes nothing (math-verify accepts 25 for 25\\%)",
    ("11", "11."): "the final period ends the sentence",
    ("\\frac{1}{7}", "0.142857"):
        "a rounded decimal is not the exact answer (math-verify itself rejects 0.333 for 1/3)",
    ("(2, 3)", "\\{2, 3\\}"): "an ordered pair is not a set",
    ("(2, 3)", "2, 3"): "an ordered pair is not a list of solutions (math-verify rejects 3, 2 for it)",
}


def math_verify_equal(gold: str, answer: str) -> bool:
    from math_verify import parse, verify

    return verify(parse("$" + gold + "$"), parse("The answer is $\\boxed{" + answer + "}$."))


def test_corpus_has_no_duplicates():
    pairs = EQUAL + UNEQUAL
    assert len(pairs) == len(set(pairs)) and len(pairs) >= 100


@pytest.mark.parametrize("gold, answer", EQUAL + UNEQUAL)
def test_math_agrees_with_math_verify(gold, answer):
    ours = math_answer("The answer is $\\boxed{" + answer + "}$.", gold) == 1.0
    theirs = math_verify_equal(gold, answer)
    if (gold, answer) in DISAGREEMENTS:
        assert ours != theirs, f"no longer a disagreement: {(gold, answer)}"
    else:
        assert ours == theirs, f"ours {ours}, math-verify {theirs}"
    assert ours == ((gold, answer) in EQUAL)
