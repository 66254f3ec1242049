"""The `python` tool: runs a model-written program in the sandbox (nanopost/tools/sandbox.py) with its
default limits and returns what the program printed. A program that fails (an exception, a non-zero
exit status, a limit) raises, so that run_tool_call counts the call as failed; its message holds the
output and why the program stopped.
"""

from nanopost.tools import register
from nanopost.tools.sandbox import run_python


@register
def python(code: str) -> str:
    """Runs a Python program and returns what it prints.

    Args:
        code: The program's source code; print() what you want to see.
    """
    result = run_python(code)
    if result.error:
        raise RuntimeError(f"{result.error}\n{result.output}".rstrip())
    return result.output or "(no output)"
