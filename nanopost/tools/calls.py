"""Tool calls in the Qwen / Hermes format, and running them.

A model turn that calls tools ends with one or more blocks

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "47 + 8"}}
    </tool_call>

(whitespace around the JSON is free; `arguments` may also be a JSON string holding the object, as
in OpenAI's format). parse_tool_calls finds them; run_tool_call runs one and always returns text for
the `tool` message: a malformed call, an unknown or disallowed tool, wrong arguments and a tool that
raises all give an error message, never an exception, so that a rollout goes on and the model sees
what went wrong.
"""

import json
import re
import time
from collections.abc import Collection
from dataclasses import dataclass, field

from nanopost import tools

OPEN, CLOSE = "<tool_call>", "</tool_call>"
SPACE = re.compile(r"\s*")
DECODER = json.JSONDecoder()
# what a JSON value of each schema type may be in Python (bool is an int in Python, not in JSON)
JSON_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list, "object": dict,
              "null": type(None)}


@dataclass(frozen=True)
class ToolCall:
    name: str
    """the tool's name as the model wrote it ("" when the call could not be read)"""
    arguments: dict = field(default_factory=dict)
    """its keyword arguments"""
    error: str | None = None
    """why the call is malformed (run_tool_call answers it with this), or None"""


@dataclass(frozen=True)
class ToolResult:
    content: str
    """the `tool` message's text: what the tool returned, or "Error: ..." """
    ok: bool
    """False when the call failed: malformed, unknown or disallowed tool, wrong arguments, or the tool raised"""
    seconds: float
    """wall-clock time of the call"""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """The tool calls that end a model turn (`text`: the turn as the model wrote it, without its
    end-of-turn token), in order; [] when the turn has no <tool_call> (an answer). Everything from the
    first <tool_call> on must be calls, separated by whitespace: a block that is not a JSON call gives
    a malformed call (and the next blocks are still read), text after the calls one more."""
    pos, calls = text.find(OPEN), []
    if pos < 0:
        return []
    while pos < len(text):
        if not text.startswith(OPEN, pos):
            calls.append(ToolCall("", error=f"text after a tool call ({text[pos:pos + 40]!r}): tool calls must "
                                            "end the turn"))
            break
        body = SPACE.match(text, pos + len(OPEN)).end()
        try:  # the JSON decoder finds the object's end, so tags inside its strings do no harm
            value, end = DECODER.raw_decode(text, body)
            close = SPACE.match(text, end).end()
            problem = None if text.startswith(CLOSE, close) else f"expected {CLOSE} after the JSON object"
        except (ValueError, RecursionError) as e:
            problem = f"not valid JSON: {str(e)[:200]}"
        if problem:
            close = text.find(CLOSE, body)
            if close < 0:
                calls.append(ToolCall("", error=f"a {OPEN} without {CLOSE}"))
                break
            calls.append(ToolCall("", error=f"a tool call must be {OPEN}{{\"name\": ..., \"arguments\": {{...}}}}"
                                            f"{CLOSE}: {problem}"))
        else:
            calls.append(read_call(value))
        pos = SPACE.match(text, close + len(CLOSE)).end()
    return calls


def read_call(value):
    """A call from the JSON value between the tags."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return ToolCall("", error='a tool call must be a JSON object with "name" and "arguments"')
    arguments = value.get("arguments", {})
    if isinstance(arguments, str):  # OpenAI's format: the arguments object as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            pass
    if not isinstance(arguments, dict):
        return ToolCall(value["name"], error=f'the "arguments" of a tool call must be a JSON object, '
                                             f"got {json.dumps(value['arguments'])[:200]}")
    return ToolCall(value["name"], arguments)


def run_tool_call(call: ToolCall, allowed: Collection[str] | None = None) -> ToolResult:
    """Runs a call of one of the `allowed` tools (names, case-insensitive; None: any registered tool) and
    returns its text, or an error message as the text. Thread-safe for the built-in tools, so calls
    of a batch may run concurrently (the python tool waits on a child process, without the GIL)."""
    start = time.perf_counter()
    problem = call.error or argument_problem(call, allowed)
    if problem:
        return ToolResult(f"Error: {problem}", False, time.perf_counter() - start)
    try:
        content = tools.get(call.name)(**call.arguments)
        ok = isinstance(content, str)
        if not ok:
            content = f"Error: the tool returned {type(content).__name__}, not text"
    except Exception as e:  # whatever the tool raised becomes its result
        content, ok = f"Error: {e}" if str(e) else f"Error: {type(e).__name__}", False
    return ToolResult(content, ok, time.perf_counter() - start)


def argument_problem(call, allowed):
    """Why the call cannot run (an unknown or disallowed tool, arguments that its schema does not
    accept), or None."""
    available = sorted({name.lower() for name in allowed} if allowed is not None else tools.names())
    if call.name.lower() not in available or call.name.lower() not in tools.names():
        return f"unknown tool {call.name!r}; the tools are: {', '.join(available) or 'none'}"
    parameters = tools.schema(call.name)["function"]["parameters"]
    properties, required = parameters.get("properties", {}), parameters.get("required", [])
    unknown = [name for name in call.arguments if name not in properties]
    if unknown:
        return f"{call.name} has no argument {unknown[0]!r}; its arguments: {', '.join(properties) or 'none'}"
    lacking = [name for name in required if name not in call.arguments]
    if lacking:
        return f"{call.name} needs the argument {lacking[0]!r}"
    for name, value in call.arguments.items():
        spec = properties[name]
        kinds = spec.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not kinds or (value is None and spec.get("nullable")):
            continue
        if not any(isinstance(value, JSON_TYPES.get(kind, object))
                   and not (isinstance(value, bool) and kind != "boolean") for kind in kinds):
            return f"the argument {name!r} of {call.name} must be {' or '.join(kinds)}, got {json.dumps(value)[:100]}"
    return None
