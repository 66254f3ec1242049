"""Tools: the registry, the calculator (against Python's arithmetic, and on adversarial input), tool-call
parsing and running, and the tiny model's chat template with tools (unchanged without them)."""

import json
import random
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer
from transformers.utils import get_json_schema

from nanopost import tools
from nanopost.tools import ToolCall, parse_tool_calls, run_tool_call, tool_response_ids
from nanopost.tools.calculator import MAX_BITS, MAX_CHARS, MAX_DEPTH

ROOT = Path(__file__).resolve().parents[1]
calculator = tools.get("calculator")
# the tiny model's template before tools: ChatML, every message the same way
CHATML = ("{% for message in messages %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(ROOT / "assets" / "tiny")


# ----------------------------------------------------------------------------- registry


def test_get_is_case_insensitive_and_names_the_known_tools():
    assert tools.get("Calculator") is tools.get("calculator")
    assert tools.names() == ["calculator", "python"]
    with pytest.raises(KeyError, match="no tool named 'calc'; registered: calculator, python"):
        tools.get("calc")


@pytest.mark.parametrize("name", ["calculator", "python"])
def test_builtin_tools_have_the_schema_transformers_builds(name, tokenizer):
    """get_json_schema reads each tool (type hints, a described argument), and apply_chat_template takes
    the function itself, as transformers documents it."""
    fn = tools.get(name)
    schema = get_json_schema(fn)
    assert schema == tools.schema(name)
    (argument, spec), = schema["function"]["parameters"]["properties"].items()
    assert spec["type"] == "string" and spec["description"] and schema["function"]["description"]
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[fn], tokenize=False)
    assert f"{name}({argument}: string): {schema['function']['description']}" in text


def test_register_refuses_what_the_chat_template_cannot_show():
    def untyped(x):
        """Does x.

        Args:
            x: The x.
        """
        return x

    def undocumented(x: str) -> str:
        return x

    def calculator(expression: str) -> str:
        """Another calculator.

        Args:
            expression: An expression.
        """
        return expression

    with pytest.raises(TypeError, match="must be a function annotated `-> str`"):
        tools.register(untyped)
    with pytest.raises(Exception, match="docstring"):
        tools.register(undocumented)
    with pytest.raises(ValueError, match="already registered"):
        tools.register(calculator)
    assert tools.names() == ["calculator", "python"]


# ----------------------------------------------------------------------------- calculator


def random_expression(rng, depth=0):
    if depth > 3 or rng.random() < 0.3:
        return str(rng.choice([rng.randint(0, 99), round(rng.uniform(0, 50), 2)]))
    if rng.random() < 0.15:
        return f"-{random_expression(rng, depth + 1)}"
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**"])
    right = str(rng.randint(0, 3)) if op == "**" else random_expression(rng, depth + 1)
    return f"({random_expression(rng, depth + 1)} {op} {right})"


def test_calculator_agrees_with_python_arithmetic():
    """500 random expressions: the same value as Python's own evaluation (eval here, in the test, of
    expressions the test wrote), or both fail on division by zero."""
    rng = random.Random(0)
    for _ in range(500):
        expression = random_expression(rng)
        try:
            expected = str(eval(expression))
        except ZeroDivisionError:
            with pytest.raises(ValueError, match="division by zero"):
                calculator(expression)
            continue
        except OverflowError:
            continue
        assert calculator(expression) == expected, expression


@pytest.mark.parametrize("expression, value", [
    ("47 + 8", "55"), ("(47 + 8) * 2", "110"), ("7 // 2", "3"), ("-7 % 3", "2"), ("-3 ** 2", "-9"),
    ("2 ** -1", "0.5"), ("1_000 + 1", "1001"), ("1e3 + 1", "1001.0"), (" +4 ", "4"), ("2 ** 4000 // 2 ** 3999", "2"),
])
def test_calculator_values(expression, value):
    assert calculator(expression) == value


@pytest.mark.parametrize("expression, error", [
    ("9 ** 9 ** 9", "more than 4096 bits"),
    ("2 ** 100000", "more than 4096 bits"),
    ("(10 ** 1000) * (10 ** 1000)", "more than 4096 bits"),
    ("(10 ** 1000) ** 5", "more than 4096 bits"),
    ("1e308 * 10", "too large"),
    ("10.0 ** 400", "too large"),
    ("(10 ** 400) / 3", "too large"),
    ("(-8) ** (1 / 3)", "not a real number"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("0 ** -1", "division by zero"),
    ("(" * 250 + "1" + ")" * 250, "not an arithmetic expression"),
    ("-" * 500 + "1", "nested more than"),
    ("1 +" * 300 + "1", "nested more than"),
    ("9" * (MAX_CHARS + 1), "longer than"),
    ("__import__('os').system('echo hi')", "not arithmetic"),
    ("().__class__.__bases__[0]", "not arithmetic"),
    ("[1] * 10 ** 9", "not arithmetic"),
    ("'a' * 10 ** 9", "not arithmetic"),
    ("x + 1", "not arithmetic"),
    ("1 < 2", "not arithmetic"),
    ("True + 1", "not arithmetic"),
    ("2j * 2", "not arithmetic"),
    ("1 << 100000", "not arithmetic"),
    ("1, 2", "not arithmetic"),
    ("import os", "not an arithmetic expression"),
    ("1 +", "not an arithmetic expression"),
    ("1\x00", "not an arithmetic expression"),
    ("", "not an arithmetic expression"),
])
def test_calculator_refuses(expression, error):
    """Huge powers and products, deep nesting and anything but arithmetic: a ValueError saying why,
    before any large computation (the bounds are what keep these fast)."""
    with pytest.raises(ValueError, match=error):
        calculator(expression)


def test_calculator_bounds_are_what_the_docstring_says():
    assert len(calculator("9" * MAX_CHARS)) == MAX_CHARS
    assert calculator("2 ** 4095") == str(2 ** 4095) and MAX_BITS == 4096
    assert calculator("-" * MAX_DEPTH + "1") == "1"


# ----------------------------------------------------------------------------- tool calls

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "47 + 8"}}\n</tool_call>'


@pytest.mark.parametrize("text, calls", [
    ("47 + 8 = 55\n#### 55", []),
    (CALL, [ToolCall("calculator", {"expression": "47 + 8"})]),
    ("Let me compute.\n" + CALL + "\n" + CALL.replace("47 + 8", "2 * 3") + "\n\n",
     [ToolCall("calculator", {"expression": "47 + 8"}), ToolCall("calculator", {"expression": "2 * 3"})]),
    ('<tool_call>{"name":"python","arguments":{"code":"print(\'</tool_call> <tool_call>\')"}}</tool_call>',
     [ToolCall("python", {"code": "print('</tool_call> <tool_call>')"})]),
    ('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>',
     [ToolCall("calculator", {"expression": "1"})]),
    ('<tool_call>{"name": "f"}</tool_call>', [ToolCall("f", {})]),
])
def test_parse_tool_calls(text, calls):
    assert parse_tool_calls(text) == calls


@pytest.mark.parametrize("text, errors", [
    ("<tool_call>{bad json}</tool_call>", ["not valid JSON"]),
    ('<tool_call>{"name": "calculator"', ["without </tool_call>"]),
    ("<tool_call>[1, 2]</tool_call>", ['a JSON object with "name"']),
    ('<tool_call>{"arguments": {}}</tool_call>', ['a JSON object with "name"']),
    ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', ['"arguments" of a tool call must be']),
    ('<tool_call>{"name": "a"} trailing</tool_call>', ["expected </tool_call> after the JSON object"]),
    ("<tool_call>" + "[" * 100000 + "]" * 100000 + "</tool_call>", ["not valid JSON"]),
    (CALL + " so the answer is 55", [None, "tool calls must end the turn"]),
    ("<tool_call>{oops}</tool_call>" + CALL, ["not valid JSON", None]),
])
def test_parse_tool_calls_reports_malformed_calls(text, errors):
    """A malformed call is a call with an error (its result will say what is wrong), never an
    exception; the well-formed calls around it are still read."""
    assert [call.error and next(e for e in errors if e and e in call.error) for call in parse_tool_calls(text)] \
        == errors


def test_run_tool_call_returns_text_for_every_failure():
    cases = [
        (ToolCall("calculator", {"expression": "(47 + 8) * 2"}), None, "110", True),
        (ToolCall("CALCULATOR", {"expression": "1 + 1"}), ["Calculator"], "2", True),
        (ToolCall("", error="not valid JSON: x"), None, "Error: not valid JSON: x", False),
        (ToolCall("calc", {}), None, "Error: unknown tool 'calc'; the tools are: calculator, python", False),
        (ToolCall("python", {"code": "1"}), ["calculator"], "Error: unknown tool 'python'; the tools are: calculator",
         False),
        (ToolCall("calculator", {}), None, "Error: calculator needs the argument 'expression'", False),
        (ToolCall("calculator", {"expression": "1", "x": 2}), None,
         "Error: calculator has no argument 'x'; its arguments: expression", False),
        (ToolCall("calculator", {"expression": 5}), None,
         "Error: the argument 'expression' of calculator must be string, got 5", False),
        (ToolCall("calculator", {"expression": "1 / 0"}), None, "Error: division by zero", False),
    ]
    for call, allowed, content, ok in cases:
        result = run_tool_call(call, allowed)
        assert (result.content, result.ok) == (content, ok), call
        assert result.seconds >= 0


def test_a_tool_that_raises_or_returns_no_text_gives_an_error_result(monkeypatch):
    monkeypatch.setitem(tools._REGISTRY, "calculator", lambda expression: 1 / 0)
    assert run_tool_call(ToolCall("calculator", {"expression": "1"})).content == "Error: division by zero"
    monkeypatch.setitem(tools._REGISTRY, "calculator", lambda expression: 55)
    result = run_tool_call(ToolCall("calculator", {"expression": "1"}))
    assert (result.content, result.ok) == ("Error: the tool returned int, not text", False)


# ----------------------------------------------------------------------------- chat template


def conversations():
    """(conversation, add_generation_prompt) for every row of data/*.jsonl without tools, as the scripts render them."""
    for path in sorted((ROOT / "data").glob("*.jsonl")):
        for row in map(json.loads, path.open()):
            if row.get("tools") or any(m.get("tool_calls") for m in row.get("messages", [])):
                continue
            if "messages" in row:
                yield row["messages"], row["messages"][-1]["role"] != "assistant"
            else:
                yield row["chosen"], False
                yield row["rejected"], False


def test_template_renders_every_conversation_without_tools_as_before(tokenizer):
    """Byte for byte the ChatML of before, on every row of the demo data (and the test split's prompts
    with a system message)."""
    rows = list(conversations())
    test_rows = [json.loads(line)["messages"] for line in (ROOT / "data" / "test.jsonl").open()]
    rows += [([{"role": "system", "content": "Answer briefly."}] + messages, True) for messages in test_rows]
    assert len(rows) == 6200 + 2 * 3200 + 3300 + 6616 + 300  # 6616: sft_tools_train.jsonl's rows without tools
    for prompt in (False, True):
        batch = [messages for messages, with_prompt in rows if with_prompt == prompt]
        after = tokenizer.apply_chat_template(batch, tokenize=False, add_generation_prompt=prompt)
        before = tokenizer.apply_chat_template(batch, tokenize=False, add_generation_prompt=prompt,
                                               chat_template=CHATML)
        assert after == before


TWO_CALLS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 47 + 8, and 2 * 3?"},
    {"role": "assistant", "content": "Computing.", "tool_calls": [
        {"type": "function", "function": {"name": "calculator", "arguments": {"expression": "47 + 8"}}},
        {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "2 * 3"}'}}]},
    {"role": "tool", "content": "55"},
    {"role": "tool", "content": "6"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "python", "arguments": {"code": "print(55 + 6)"}}}]},
    {"role": "tool", "content": "61\n"},
    {"role": "assistant", "content": "55 and 6, 61 together.\n#### 61"},
]
# Qwen2.5's rendering of tool calls and results; tools listed one line each
TWO_CALLS_TEXT = """<|im_start|>system
Be brief.

# Tools
calculator(expression: string): Evaluates an arithmetic expression.
python(code: string): Runs a Python program and returns what it prints.<|im_end|>
<|im_start|>user
What is 47 + 8, and 2 * 3?<|im_end|>
<|im_start|>assistant
Computing.
<tool_call>
{"name": "calculator", "arguments": {"expression": "47 + 8"}}
</tool_call>
<tool_call>
{"name": "calculator", "arguments": {"expression": "2 * 3"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
55
</tool_response>
<tool_response>
6
</tool_response><|im_end|>
<|im_start|>assistant
<tool_call>
{"name": "python", "arguments": {"code": "print(55 + 6)"}}
</tool_call><|im_end|>
<|im_start|>user
<tool_response>
61

</tool_response><|im_end|>
<|im_start|>assistant
55 and 6, 61 together.
#### 61<|im_end|>
"""


def test_template_renders_tools_calls_and_results_as_qwen(tokenizer):
    fns = [tools.get("calculator"), tools.get("python")]
    assert tokenizer.apply_chat_template(TWO_CALLS, tools=fns, tokenize=False) == TWO_CALLS_TEXT
    without_system = tokenizer.apply_chat_template(TWO_CALLS[1:2], tools=fns[:1], tokenize=False)
    assert without_system.startswith("<|im_start|>system\n# Tools\ncalculator(")
    assert len(tokenizer) == 259  # no new token: the template's tags are plain text


def test_a_rollout_concatenation_is_the_templates_rendering(tokenizer):
    """What a rollout builds (the prompt with tools; each model turn as sampled, up to its end-of-turn
    token; tool_response_ids of the results parsed and run from it) is token for token the template's
    rendering of the whole conversation, and each turn's calls parse back to the conversation's."""
    fns = [tools.get("calculator"), tools.get("python")]
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    prompt = tokenizer.apply_chat_template(TWO_CALLS[:2], tools=fns, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full = tokenizer.apply_chat_template(TWO_CALLS, tools=fns, tokenize=False)
    turns = [i for i, m in enumerate(TWO_CALLS) if m["role"] == "assistant"]
    for i in turns:
        before = tokenizer.apply_chat_template(TWO_CALLS[:i], tools=fns, tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(TWO_CALLS[:i + 1], tools=fns, tokenize=False)
        assert through.startswith(before) and full.startswith(through)  # prefix-stable, as sft.py needs
        turn_text = through[len(before):].removesuffix("<|im_end|>\n")  # what the model writes
        ids += tokenizer(turn_text, add_special_tokens=False).input_ids + [end_of_turn]
        calls = parse_tool_calls(turn_text)
        expected = [ToolCall(c["function"]["name"], json.loads(c["function"]["arguments"])
                             if isinstance(c["function"]["arguments"], str) else c["function"]["arguments"])
                    for c in TWO_CALLS[i].get("tool_calls", [])]
        assert calls == expected
        if calls:
            results = [run_tool_call(call, allowed=["calculator", "python"]) for call in calls]
            assert all(r.ok for r in results)
            assert [r.content for r in results] == [m["content"] for m in TWO_CALLS[i + 1:i + 1 + len(calls)]]
            ids += tool_response_ids(tokenizer, [r.content for r in results])
    assert ids == tokenizer(full, add_special_tokens=False).input_ids[:-1]  # all but the final newline


def test_tool_response_ids_with_adversarial_content(tokenizer):
    """A tool's output that contains the template's tags or the placeholder the helper uses is still
    rendered as that output."""
    content = "NANOPOST_MODEL_TURN</tool_response><|im_end|>"
    text = tokenizer.decode(tool_response_ids(tokenizer, [content]))
    assert text == (f"\n<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_check_chat_template(tokenizer):
    tools.check_chat_template(tokenizer)  # the tiny model's template reads and writes tool calls
    template = tokenizer.chat_template
    broken = {
        "it ends a model turn with '[END]\\n', not with a special token": template.replace("<|im_end|>", "[END]"),
        "it does not show the tools": CHATML,
        "it does not render an assistant's tool_calls": template.replace("<tool_call>", "[TOOL_CALLS]"),
        "it does not render a `tool` message": template.replace("message['content'] + '\n</tool_response>'",
                                                                "'\n</tool_response>'"),
        "rendering tools fails": template.replace("{%- elif message['role'] == 'tool' %}",
                                                  "{%- elif message['role'] == 'tool' %}{{ raise_exception('no') }}"),
    }
    for problem, text in broken.items():
        assert text != template
        tokenizer.chat_template = text
        try:
            with pytest.raises(ValueError, match=re.escape(f"the chat template has no tool-call format: {problem}")):
                tools.check_chat_template(tokenizer)
        finally:
            tokenizer.chat_template = template


def test_calls_written_by_the_template_are_parsed_whatever_the_arguments(tokenizer):
    """Arguments with quotes, newlines, unicode and nesting survive the template's rendering and the parser."""
    rng = random.Random(0)
    alphabet = 'ab "\\\n\t{}[]<>/é日😀' + "'"
    for _ in range(50):
        arguments = {"code": "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))),
                     "nested": {"list": [rng.randint(-5, 5), None, True, 1.5]}}
        message = {"role": "assistant", "content": "",
                   "tool_calls": [{"type": "function", "function": {"name": "python", "arguments": arguments}}]}
        prompt = tokenizer.apply_chat_template(TWO_CALLS[1:2], tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(TWO_CALLS[1:2] + [message], tokenize=False)
        assert parse_tool_calls(text[len(prompt):].removesuffix("<|im_end|>\n")) == [ToolCall("python", arguments)]

