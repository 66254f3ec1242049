"""The `calculator` tool: arithmetic on numbers, evaluated by walking the expression's syntax tree.

Numbers (integers, decimals, scientific notation), + - * / // % **, unary + and -, parentheses:
nothing else parses (no names, calls, attributes, comparisons), and nothing is ever eval'd. Every
call returns in bounded time and memory: the expression is at most MAX_CHARS long and MAX_DEPTH
deep, and an operation whose integer result would exceed MAX_BITS bits (9**9**9, 10**400 * 10**400)
is refused before it is computed. Integer arithmetic is exact (`/` gives a float, as in Python);
a float that overflows, a complex result and division by zero are errors.
"""

import ast
import math
import operator

from nanopost.tools import register

MAX_CHARS = 1000
MAX_DEPTH = 100
MAX_BITS = 4096  # about 1233 decimal digits

OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
             ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
SYMBOLS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.Pow: "**"}


@register
def calculator(expression: str) -> str:
    """Evaluates an arithmetic expression.

    Args:
        expression: Numbers with + - * / // % ** and parentheses, e.g. "(47 + 8) * 2".
    """
    if len(expression) > MAX_CHARS:
        raise ValueError(f"the expression is longer than {MAX_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise ValueError(f"not an arithmetic expression: {getattr(e, 'msg', e)}") from None
    return str(evaluate(tree.body, depth=0))


def evaluate(node, depth):
    """The value of an arithmetic syntax tree; ValueError for anything else or a result out of bounds."""
    if depth > MAX_DEPTH:
        raise ValueError(f"the expression is nested more than {MAX_DEPTH} deep")
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return checked(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = evaluate(node.operand, depth + 1)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in OPERATORS:
        left, right = evaluate(node.left, depth + 1), evaluate(node.right, depth + 1)
        refuse_huge(node.op, left, right)
        try:
            return checked(OPERATORS[type(node.op)](left, right))
        except ZeroDivisionError:
            raise ValueError("division by zero") from None
        except OverflowError:
            raise ValueError(f"the result of {SYMBOLS[type(node.op)]} is too large") from None
    raise ValueError(f"not arithmetic: {ast.unparse(node)[:100]!r}; use numbers, + - * / // % ** and parentheses")


def refuse_huge(op, left, right):
    """Refuses, before computing it, an integer product or power of more than MAX_BITS bits."""
    if not (isinstance(left, int) and isinstance(right, int)):
        return  # floats overflow to an error by themselves, in constant time
    if isinstance(op, ast.Mult):
        bits = left.bit_length() + right.bit_length()
    elif isinstance(op, ast.Pow) and right > 0 and abs(left) > 1:
        bits = (abs(left).bit_length() - 1) * right + 1  # at least this many
    else:
        return
    if bits > MAX_BITS:
        raise ValueError(f"the result of {SYMBOLS[type(op)]} would have more than {MAX_BITS} bits")


def checked(value):
    """A real, finite number within MAX_BITS, or ValueError."""
    if isinstance(value, complex):
        raise ValueError("the result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the result is too large")
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise ValueError(f"the result has more than {MAX_BITS} bits")
    return value
