"""Reward functions for RL with verifiable rewards.

    score = verifiers.get(row["dataset"])(completion, row["ground_truth"])   # float in [0, 1]

The name is the row's `dataset` field, matched case-insensitively (Tulu 3 data says `MATH`,
`gsm8k`, `ifeval`). Every verifier is pure and deterministic, needs no network, never executes
anything taken from a completion, and returns in bounded time on any input: answers are parsed
by small hand-written parsers with length and size caps, so no verifier needs a timeout.
Each module's docstring says what it extracts and what counts as equal; nanopost/verifiers/README.md
has the table.

Add a verifier with the decorator:

    @verifiers.register("my_task")
    def my_task(completion: str, ground_truth: str) -> float: ...
"""

from typing import Callable

Verifier = Callable[[str, str], float]

_REGISTRY: dict[str, Verifier] = {}


def register(name: str) -> Callable[[Verifier], Verifier]:
    """Decorator: register `fn(completion, ground_truth) -> float` under `name` (case-insensitive)."""
    key = name.lower()

    def decorator(fn: Verifier) -> Verifier:
        if key in _REGISTRY:
            raise ValueError(f"a verifier named {key!r} is already registered")
        _REGISTRY[key] = fn
        return fn

    return decorator


def get(name: str) -> Verifier:
    """The verifier registered under `name` (case-insensitive); KeyError lists the known names."""
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise KeyError(f"no verifier named {name!r}; registered: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered verifier names, sorted."""
    return sorted(_REGISTRY)


# Importing the built-in modules registers them.
from nanopost.verifiers import gsm8k, ifeval, math_answer, think_format  # noqa: E402,F401

__all__ = ["Verifier", "get", "names", "register"]
