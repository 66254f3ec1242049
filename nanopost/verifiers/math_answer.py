"""MATH / Minerva-style LaTeX answers.

Extraction (after dropping any <think> section): the content of the last `\\boxed{...}` or
`\\fbox{...}` (nested braces kept), else what follows the last "final answer is" on its line
(Minerva's "The final answer is $X$. I hope it is correct."), else the whole text. A ground
truth holding a `\\boxed{}` (a full solution) is read the same way; otherwise it is the answer.

Normalization of both sides: `$`, spacing commands, `\\left`/`\\right`, `\\displaystyle`,
degrees (`^\\circ`, `°`), percent and dollar signs are removed; `\\dfrac`/`\\tfrac` become
`\\frac`; `\\text{}`/`\\mbox{}` are dropped after a number (units: `10\\text{ cm}` is 10) and
unwrapped otherwise (`\\text{Monday}`); common unit words after a number go; a leading
`x =`, `f(x) =` or `x \\in` goes (`x=5` equals `5`); thousands commas in a lone number go
(`1,000`, `1{,}000`); `2\\frac{1}{4}` is the mixed number 9/4; `a \\pm b` is the list `a+b, a-b`;
`2 \\text{ and } 3` is the list `2, 3`; `x > 2`, `x \\le 2`, `1 < x \\le 2` become intervals.

Equality, after normalization:
- identical strings are equal;
- `\\{a, b\\}` sets and bare lists `a, b` are compared as multisets (any order, so the
  set `\\{1, 2\\}` equals the list `2, 1`);
- tuples and intervals `(a, b)`, `[a, b)` element by element, with the same brackets;
  unions `A \\cup B` as sets of parts (any order);
- equations `l = r` when `l - r` of one equals that of the other up to sign (`2x+3y=6` = `3y+2x=6`);
- a word (`Monday`) only equals itself;
- anything else is parsed as an expression (numbers, + - * / ^, implicit products, `\\frac`,
  `\\sqrt[n]{}`, `\\binom`, `\\pi`, `\\sin` `\\cos` `\\tan` `\\ln` `\\log` (base 10 unless
  `\\log_b`) `\\exp`, `n!`, one-letter variables, so `ab` is a times b) by the small parser
  below, and two expressions are equal if they agree at two fixed rational assignments of their
  variables: exactly when both evaluate to rationals (so 1/3 != 0.333 and 1234567891 !=
  1234567890), else within a relative 1e-9 (`\\frac{\\sqrt2}{2}` = `\\frac{1}{\\sqrt2}`,
  `(x+1)^2` = `x^2+2x+1`);
- a percentage on one side only also matches its value over 100 (`25\\%` = `25` = `0.25`).

Hugging Face's math-verify agrees on every pair of the reference corpus in
tests/test_math_reference.py except the few listed there, where this verifier is right.

Why not sympy: `sympify`/`parse_expr` run Python `eval` on the text, `parse_latex` needs a
pinned ANTLR runtime, and `simplify` can run for minutes or exhaust memory. Evaluating our own
syntax tree is exact for rationals, cannot execute anything, and is bounded by caps on input
length, nesting, exponent sizes and integer sizes (exponent towers such as `9^{9^{9^9}}` fall
back to floats, overflow, and compare unequal).
"""

import cmath
import math
import re
from fractions import Fraction

from nanopost.verifiers import register
from nanopost.verifiers.extract import last_boxed, normalize_minus, strip_think

MAX_ANSWER_CHARS = 1000  # longer "answers" are compared as strings only
MAX_PARSE_CHARS = 300
MAX_NESTING = 40
MAX_LIST_ITEMS = 32
MAX_EXACT_BITS = 4096  # larger exact powers are computed in floating point
REL_TOL = 1e-9

# ----------------------------------------------------------------------------- extraction

_FINAL_ANSWER = "final answer is"


def extract_answer(text: str) -> str:
    """The raw answer string of a completion or ground truth (see module docstring)."""
    text = strip_think(text)
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    at = text.lower().rfind(_FINAL_ANSWER)
    if at < 0:
        return text
    rest = text[at + len(_FINAL_ANSWER):].split("\n", 1)[0]
    rest = re.sub(r"\.?\s*I hope it is correct.*$", "", rest, flags=re.IGNORECASE)
    dollars = re.search(r"\$([^$]+)\$", rest)
    return dollars.group(1) if dollars else rest


# ----------------------------------------------------------------------------- normalization

_REMOVED = [r"\left", r"\right", r"\displaystyle", r"\!", r"\,", r"\;", r"\:", "~",
            r"\$", "$", r"\%", "%", "^{\\circ}", "^\\circ", "\\circ", "°", r"\limits"]
_RENAMED = [(r"\dfrac", r"\frac"), (r"\tfrac", r"\frac"), (r"\lbrace", r"\{"), (r"\rbrace", r"\}"),
            ("bmatrix", "pmatrix"), (r"\varnothing", r"\emptyset"), ("{,}", ","), (r"\dbinom", r"\binom"),
            (r"\tbinom", r"\binom"), (r"\leq", r"\le"), (r"\geq", r"\ge")]
_CONTROL_SPACE = re.compile(r"(?<!\\)\\ ")  # `\ ` is a space; `\\ ` ends a matrix row
_AND = re.compile(r"\\text\{\s*and\s*\}")  # "2 \text{ and } 3" lists two answers
# an integer right before a numeric fraction is a mixed number: 2\frac{1}{4} = 9/4
_MIXED_NUMBER = re.compile(r"(?<![\d.^_}])(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}")
_TEXT_GROUP = re.compile(r"\\(?:text|textbf|mbox|mathrm|mathbf|textit|operatorname)\s*\{([^{}]*)\}")
_TEXT_UNIT = re.compile(_TEXT_GROUP.pattern + r"(?:\^\{?[23]\}?)?")
_UNIT = re.compile(
    r"(?<=[\d}])\s*(?:square\s+|sq\s+|cubic\s+)?"
    r"(?:cm|centimeters?|mm|millimeters?|meters?|km|kilometers?|inch(?:es)?|feet|foot|ft|yards?|"
    r"miles?|degrees?|radians?|dollars?|cents?|units?|hours?|minutes?|seconds?|days?|weeks?|"
    r"months?|years?|mph|pounds?|lbs?|ounces?|oz|gallons?|liters?|grams?|kg|people|students)"
    r"(?:\^\{?[23]\}?)?\.?$")
_LEFT_SIDE = re.compile(r"^(?:[a-zA-Z](?:_\{?\w+\}?)?(?:\([a-zA-Z]\))?|\\[a-zA-Z]+)\s*(?:=|\\in\b)")
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")


def _strip_left_side(item: str) -> str:
    """`x = 5` -> `5`, `x \\in [2, 5)` -> `[2, 5)`; an equation with several `=` is kept."""
    return _LEFT_SIDE.sub("", item) if item.count("=") <= 1 else item


def normalize(answer: str) -> str:
    """Canonical string form of an answer (see module docstring)."""
    text = normalize_minus(answer).strip()
    text = _CONTROL_SPACE.sub("", text)
    for old in _REMOVED:
        text = text.replace(old, "")
    for old, new in _RENAMED:
        text = text.replace(old, new)
    text = _MIXED_NUMBER.sub(r"(\1+\2/\3)", _AND.sub(",", text))
    without_text = _TEXT_UNIT.sub("", text)
    text = without_text if re.search(r"\d", without_text) else _TEXT_GROUP.sub(r"\1", text)
    text = _UNIT.sub("", text.strip())
    text = _strip_left_side(text)
    text = re.sub(r"\s+", "", text).rstrip(".")
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    if text.count(r"\pm") == 1:  # 1 \pm \sqrt2 is the list of two answers 1+\sqrt2, 1-\sqrt2
        text = text.replace(r"\pm", "+") + "," + text.replace(r"\pm", "-")
    return _inequality_as_interval(text)


_BOUNDS = {"<": ")", r"\le": "]"}
_ONE_SIDED = re.compile(r"^([a-zA-Z])(<|>|\\le|\\ge)([^<>=]+)$")
_TWO_SIDED = re.compile(r"^([^<>=]+)(<|\\le)[a-zA-Z](<|\\le)([^<>=]+)$")


def _inequality_as_interval(text: str) -> str:
    """`x>2` -> `(2,\\infty)`, `x\\le2` -> `(-\\infty,2]`, `1<x\\le2` -> `(1,2]`; other text unchanged."""
    if len(text) > MAX_PARSE_CHARS:  # the two-sided pattern backtracks on long runs of `\le`
        return text
    match = _ONE_SIDED.match(text)
    if match:
        relation, bound = match.group(2), match.group(3)
        if relation in _BOUNDS:
            return r"(-\infty," + bound + _BOUNDS[relation]
        return ("(" if relation == ">" else "[") + bound + r",\infty)"
    match = _TWO_SIDED.match(text)
    if match:
        low, left, right, high = match.groups()
        return ("(" if left == "<" else "[") + low + "," + high + _BOUNDS[right]
    return text


# ----------------------------------------------------------------------------- structure

_OPENERS, _CLOSERS = "([{", ")]}"


def _max_nesting(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in _OPENERS:
            depth += 1
            deepest = max(deepest, depth)
        elif char in _CLOSERS:
            depth -= 1
    return deepest


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split on `separator` where no bracket is open."""
    parts, depth, start, i = [], 0, 0, 0
    while i < len(text):
        if text[i] in _OPENERS:
            depth += 1
        elif text[i] in _CLOSERS:
            depth -= 1
        elif depth == 0 and text.startswith(separator, i):
            parts.append(text[start:i])
            start = i + len(separator)
            i = start
            continue
        i += 1
    parts.append(text[start:])
    return parts


def _set_items(text: str) -> str:
    """`\\{a,b\\}` -> `a,b` (then compared as a bare list, in any order); other text unchanged."""
    if not (text.startswith(r"\{") and text.endswith(r"\}")):
        return text
    inner, depth = text[2:-2], 0
    for char in inner:  # `\{1\}\cup\{2\}` is not one set
        depth += (char in _OPENERS) - (char in _CLOSERS)
        if depth < 0:
            return text
    return inner


def _same_multiset(items_a: list[str], items_b: list[str]) -> bool:
    if len(items_a) != len(items_b):
        return False
    unmatched = list(items_b)
    for item in items_a:
        match = next((k for k, other in enumerate(unmatched) if _equal(item, other)), None)
        if match is None:
            return False
        unmatched.pop(match)
    return True


def _equal(a: str, b: str) -> bool:
    """Equality of two normalized answers."""
    if a == b:
        return True
    if not a or not b or max(len(a), len(b)) > MAX_ANSWER_CHARS:
        return False
    if max(_max_nesting(a), _max_nesting(b)) > MAX_NESTING:
        return False
    a, b = _set_items(a), _set_items(b)
    if not a or not b:
        return False
    unions_a, unions_b = _split_top_level(a, r"\cup"), _split_top_level(b, r"\cup")
    if len(unions_a) > 1 or len(unions_b) > 1:
        return len(unions_a) <= MAX_LIST_ITEMS and _same_multiset(unions_a, unions_b)  # in any order
    items_a, items_b = _split_top_level(a, ","), _split_top_level(b, ",")
    if len(items_a) > 1 or len(items_b) > 1:  # a bare list of solutions: any order
        items_a, items_b = [_strip_left_side(x) for x in items_a], [_strip_left_side(x) for x in items_b]
        return len(items_a) <= MAX_LIST_ITEMS and _same_multiset(items_a, items_b)
    if a[0] in "([" and a[-1] in ")]" and b[0] in "([" and b[-1] in ")]":
        inner_a, inner_b = _split_top_level(a[1:-1], ","), _split_top_level(b[1:-1], ",")
        if len(inner_a) > 1 or len(inner_b) > 1:  # tuple or interval: order and brackets matter
            return (a[0], a[-1]) == (b[0], b[-1]) and len(inner_a) == len(inner_b) \
                and len(inner_a) <= MAX_LIST_ITEMS and all(map(_equal, inner_a, inner_b))
    sides_a, sides_b = _split_top_level(a, "="), _split_top_level(b, "=")
    if len(sides_a) == 2 and len(sides_b) == 2:  # equations: equal when lhs - rhs agree, up to sign
        difference = f"({sides_a[0]})-({sides_a[1]})"
        return _same_value(difference, f"({sides_b[0]})-({sides_b[1]})") \
            or _same_value(difference, f"({sides_b[1]})-({sides_b[0]})")
    if _WORD.match(a) or _WORD.match(b):  # a word answer ("Evelyn") is not a product of letters
        return False
    return _same_value(a, b)


_WORD = re.compile(r"^[a-zA-Z]{2,}$")

# ----------------------------------------------------------------------------- expressions
# A syntax tree is a nested tuple: ("num", Fraction) | ("var", name) | ("pi",) |
# (op, left, right) for op in + - * / ^ | ("neg", x) | ("fact", x) | ("fn", name, x).

_FUNCTIONS = {r"\sin", r"\cos", r"\tan", r"\ln", r"\log", r"\exp", r"\sec", r"\csc", r"\cot"}
_COMMANDS = sorted(_FUNCTIONS | {r"\frac", r"\sqrt", r"\pi", r"\cdot", r"\times", r"\div", r"\binom"}, key=len,
                   reverse=True)
# Known commands first, so that `\cdotx` (spaces are removed) reads as `\cdot x`; one letter is one
# variable, so that `ab` is a times b.
_TOKEN = re.compile(r"\d+(?:\.\d+)?|\.\d+|" + "|".join(map(re.escape, _COMMANDS))
                    + r"|\\[a-zA-Z]+|[a-zA-Z]|[-+*/^()\[\]{}!_]")
MAX_BINOMIAL_N = 10_000
_TIMES = {"*", r"\cdot", r"\times"}
_DIVIDE = {"/", r"\div"}


class _ParseError(Exception):
    pass


class _Parser:
    """Recursive descent over a token list; raises _ParseError on anything it does not know."""

    def __init__(self, text: str):
        self.tokens = _TOKEN.findall(text)
        if "".join(self.tokens) != text:
            raise _ParseError(f"unknown characters in {text!r}")
        self.pos = 0

    def parse(self):
        tree = self.expression()
        if self.pos != len(self.tokens):
            raise _ParseError("trailing tokens")
        return tree

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token != expected):
            raise _ParseError(f"expected {expected!r}, got {token!r}")
        self.pos += 1
        return token

    def expression(self):
        tree = self.term()
        while self.peek() in ("+", "-"):
            tree = (self.take(), tree, self.term())
        return tree

    def starts_factor(self, token: str | None) -> bool:
        return token is not None and (token[0].isalnum() or token[0] == "." or token in "({["
                                      or (token.startswith("\\") and token not in _TIMES | _DIVIDE))

    def term(self):
        tree = self.unary()
        while True:
            token = self.peek()
            if token in _TIMES or token in _DIVIDE:
                self.take()
                tree = ("*" if token in _TIMES else "/", tree, self.unary())
            elif self.starts_factor(token):  # implicit product: 2x, 3\sqrt{2}, (a)(b)
                tree = ("*", tree, self.power())
            else:
                return tree

    def unary(self):
        if self.peek() == "-":
            self.take()
            return ("neg", self.unary())
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            return ("^", base, self.argument(exponent=True))
        return base

    def postfix(self):
        tree = self.primary()
        while self.peek() == "!":
            self.take()
            tree = ("fact", tree)
        return tree

    def argument(self, exponent: bool = False):
        """A command's argument: `{expr}` or one token; one digit as LaTeX reads `\\frac12`.

        Exponents are read more leniently than LaTeX does: `2^10` is 2^{10}, `x^-1` is x^{-1}.
        """
        token = self.peek()
        if token == "{":
            self.take()
            tree = self.expression()
            self.take("}")
            return tree
        if exponent and token == "-":
            self.take()
            return ("neg", self.argument(exponent=True))
        if not exponent and token is not None and token[0].isdigit() and len(token) > 1:
            self.tokens[self.pos] = token[1:]
            return ("num", Fraction(token[0]))
        return self.primary()

    def primary(self):
        token = self.take()
        if token[0].isdigit() or token[0] == ".":
            return ("num", Fraction(token))
        if token.isalpha():
            if self.peek() == "_":  # subscripted variable: x_1, a_{n}
                self.take()
                token += "_" + repr(self.argument())
            return ("var", token)
        if token in "({[":
            tree = self.expression()
            self.take({"(": ")", "{": "}", "[": "]"}[token])
            return tree
        if token == r"\frac":
            return ("/", self.argument(), self.argument())
        if token == r"\sqrt":
            index = ("num", Fraction(2))
            if self.peek() == "[":
                self.take()
                index = self.expression()
                self.take("]")
            return ("^", self.argument(), ("/", ("num", Fraction(1)), index))
        if token == r"\pi":
            return ("pi",)
        if token == r"\binom":
            return ("binom", self.argument(), self.argument())
        if token in _FUNCTIONS:
            if token == r"\log" and self.peek() == "_":
                self.take()
                base = self.argument()
                return ("/", ("fn", r"\ln", self.power()), ("fn", r"\ln", base))
            return ("fn", token, self.power())
        raise _ParseError(f"unsupported token {token!r}")


def _variables(tree) -> set[str]:
    if tree[0] == "var":
        return {tree[1]}
    return set().union(*(_variables(child) for child in tree[1:] if isinstance(child, tuple)))


def _exact_root(value: Fraction, n: int) -> Fraction | None:
    """value ** (1/n) if it is rational (perfect powers only), else None."""
    if value < 0 or n > 64 or value.numerator.bit_length() > MAX_EXACT_BITS:
        return None
    roots = []
    for part in (value.numerator, value.denominator):
        root = round(part ** (1 / n)) if n > 2 else math.isqrt(part)
        if root ** n != part:
            return None
        roots.append(root)
    return Fraction(roots[0], roots[1])


def _power(base, exponent):
    if isinstance(base, Fraction) and isinstance(exponent, Fraction):
        if exponent.denominator == 1:
            bits = max(base.numerator.bit_length(), base.denominator.bit_length())
            if bits * abs(exponent.numerator) <= MAX_EXACT_BITS:
                return base ** exponent.numerator  # ZeroDivisionError for 0 ** -n is caught
        elif exponent.numerator == 1:
            root = _exact_root(base, exponent.denominator)
            if root is not None:
                return root
    if abs(complex(exponent)) > 1e4:
        raise OverflowError("exponent too large")
    return complex(base) ** complex(exponent)


_FLOAT_FUNCTIONS = {r"\sin": cmath.sin, r"\cos": cmath.cos, r"\tan": cmath.tan, r"\ln": cmath.log,
                    r"\log": cmath.log10, r"\exp": cmath.exp, r"\sec": lambda x: 1 / cmath.cos(x),
                    r"\csc": lambda x: 1 / cmath.sin(x), r"\cot": lambda x: 1 / cmath.tan(x)}


def _evaluate(tree, values: dict[str, Fraction]):
    """Value of a tree: a Fraction while everything stays rational, else a complex number."""
    kind = tree[0]
    if kind == "num":
        return tree[1]
    if kind == "var":
        return values[tree[1]]
    if kind == "pi":
        return complex(math.pi)
    if kind == "neg":
        return -_evaluate(tree[1], values)
    if kind == "fact":
        n = _evaluate(tree[1], values)
        if not (isinstance(n, Fraction) and n.denominator == 1 and 0 <= n <= 200):
            raise ValueError("factorial of a non-integer or large number")
        return Fraction(math.factorial(int(n)))
    if kind == "binom":
        n, k = _evaluate(tree[1], values), _evaluate(tree[2], values)
        if not all(isinstance(v, Fraction) and v.denominator == 1 and 0 <= v <= MAX_BINOMIAL_N for v in (n, k)):
            raise ValueError("binomial of a non-integer or large number")
        return Fraction(math.comb(int(n), int(k)))
    if kind == "fn":
        return _FLOAT_FUNCTIONS[tree[1]](complex(_evaluate(tree[2], values)))
    left, right = _evaluate(tree[1], values), _evaluate(tree[2], values)
    if kind == "^":
        return _power(left, right)
    if isinstance(left, complex) or isinstance(right, complex):
        left, right = complex(left), complex(right)
    if kind == "+":
        return left + right
    if kind == "-":
        return left - right
    if kind == "*":
        return left * right
    return left / right


def _parse(text: str):
    if len(text) > MAX_PARSE_CHARS:
        return None
    try:
        return _Parser(text).parse()
    except (_ParseError, ValueError, ZeroDivisionError):
        return None


def _close(x, y) -> bool:
    if isinstance(x, Fraction) and isinstance(y, Fraction):
        return x == y
    x, y = complex(x), complex(y)
    if not (cmath.isfinite(x) and cmath.isfinite(y)):
        return False
    return abs(x - y) <= REL_TOL * max(1.0, abs(x), abs(y))


def _same_value(a: str, b: str) -> bool:
    tree_a, tree_b = _parse(a), _parse(b)
    if tree_a is None or tree_b is None:
        return False
    names = sorted(_variables(tree_a) | _variables(tree_b))
    for trial in range(2):
        # Generic rationals, distinct per variable and per trial: agreeing expressions of
        # different shape almost never coincide at both points.
        values = {name: Fraction(7 * k + 11 + trial * 5, 13 + 4 * trial) for k, name in enumerate(names)}
        try:
            if not _close(_evaluate(tree_a, values), _evaluate(tree_b, values)):
                return False
        except (ArithmeticError, ValueError):
            return False
    return True


@register("math")
def math_answer(completion: str, ground_truth: str) -> float:
    """1.0 if the completion's final answer equals the ground truth's (see module docstring)."""
    answer, truth = extract_answer(completion), extract_answer(ground_truth)
    normalized_answer, normalized_truth = normalize(answer), normalize(truth)
    if _equal(normalized_answer, normalized_truth):
        return 1.0
    # A percentage on one side only may also be meant as a fraction: 25% = 25 and 25% = 0.25.
    if ("%" in answer) != ("%" in truth):
        if "%" in answer and _NUMBER.match(normalized_answer):
            return float(_equal(normalized_answer + "/100", normalized_truth))
        if "%" in truth and _NUMBER.match(normalized_truth):
            return float(_equal(normalized_answer, normalized_truth + "/100"))
    return 0.0


_NUMBER = re.compile(r"^-?(?:\d+(?:\.\d*)?|\.\d+)$")
