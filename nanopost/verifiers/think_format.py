"""R1-style output format: reasoning in <think>...</think>, then a non-empty answer.

1.0 if the completion (leading whitespace aside) is `<think>reasoning</think>answer`, where the
opening tag may be missing (R1 chat templates put it in the prompt), each tag occurs once, the
reasoning and the answer are non-blank; else 0.0. The ground truth is ignored.
"""

from nanopost.verifiers import register
from nanopost.verifiers.extract import THINK_CLOSE, THINK_OPEN


@register("format")
def think_format(completion: str, ground_truth: str = "") -> float:
    """1.0 for a well-formed `<think>...</think>answer` completion, else 0.0."""
    text = completion.lstrip()
    if text.startswith(THINK_OPEN):
        text = text[len(THINK_OPEN):]
    if THINK_OPEN in text or text.count(THINK_CLOSE) != 1:
        return 0.0
    reasoning, answer = text.split(THINK_CLOSE)
    return float(bool(reasoning.strip()) and bool(answer.strip()))
