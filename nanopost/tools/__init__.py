"""Tools a model may call in RL rollouts: typed Python functions with Google-style docstrings, shown to
the model by the chat template as transformers does (`apply_chat_template(..., tools=[fn])`).

    fns = [tools.get(name) for name in row_tools]          # KeyError lists the known names
    prompt = tokenizer.apply_chat_template(messages, tools=fns, add_generation_prompt=True)
    calls = tools.parse_tool_calls(turn_text)               # [] when the turn is an answer
    results = [tools.run_tool_call(call, allowed=row_tools) for call in calls]   # never raises
    context = tools.tool_response_ids(tokenizer, [r.content for r in results])  # no loss on these

Names are matched case-insensitively. Built in: `calculator` (arithmetic, nanopost/tools/calculator.py)
and `python` (a program run in the sandbox of nanopost/tools/sandbox.py). nanopost/tools/README.md
describes the call format, the rollout loop and what the sandbox does not cover. Add a tool with
the decorator:

    @tools.register
    def my_tool(text: str) -> str:
        \"\"\"What it does, for the model.

        Args:
            text: What the argument is, for the model.
        \"\"\"
"""

import inspect
from collections.abc import Callable

from transformers.utils import get_json_schema

Tool = Callable[..., str]

_REGISTRY: dict[str, Tool] = {}
_SCHEMAS: dict[str, dict] = {}


def register(fn: Tool) -> Tool:
    """Decorator: registers a tool under its function's name (case-insensitive). It must be a plain
    function that returns str, whose type hints and docstring transformers' get_json_schema reads."""
    key = fn.__name__.lower()
    if key in _REGISTRY:
        raise ValueError(f"a tool named {key!r} is already registered")
    if not inspect.isfunction(fn) or inspect.signature(fn).return_annotation is not str:
        raise TypeError(f"tool {fn.__name__!r} must be a function annotated `-> str`")
    _SCHEMAS[key] = get_json_schema(fn)  # raises for a missing type hint or argument description
    _REGISTRY[key] = fn
    return fn


def get(name: str) -> Tool:
    """The tool registered under `name` (case-insensitive); KeyError lists the known names."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"no tool named {name!r}; registered: {', '.join(names())}") from None


def schema(name: str) -> dict:
    """The JSON schema of the tool registered under `name`: what the chat template shows the model."""
    get(name)
    return _SCHEMAS[name.lower()]


def names() -> list[str]:
    """Registered tool names, sorted."""
    return sorted(_REGISTRY)


# Importing the built-in modules registers them.
from nanopost.tools import calculator, python_tool  # noqa: E402,F401
from nanopost.tools.calls import ToolCall, ToolResult, parse_tool_calls, run_tool_call  # noqa: E402
from nanopost.tools.chat import check_chat_template, tool_response_ids  # noqa: E402

__all__ = ["Tool", "ToolCall", "ToolResult", "check_chat_template", "get", "names", "parse_tool_calls", "register",
           "run_tool_call", "schema", "tool_response_ids"]
