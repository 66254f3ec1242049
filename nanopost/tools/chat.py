"""The chat template's side of tool use: whether a template has a tool-call format that
parse_tool_calls reads, and the tokens it inserts between a model turn that called tools and the
model's next turn (the tool results, rendered by the template, and the next turn's header).
"""

from collections.abc import Sequence

from nanopost.tools.calls import ToolCall, parse_tool_calls

# a placeholder for the model's turn: the text the template puts after it begins with the end-of-turn token
TURN = "NANOPOST_MODEL_TURN"
PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_tool", "description": "NANOPOST_PROBE_DESCRIPTION",
    "parameters": {"type": "object", "properties": {"x": {"type": "string", "description": "x"}}, "required": ["x"]}}}
PROBE_CALL = ToolCall("probe_tool", {"x": "NANOPOST_PROBE_ARGUMENT"})
PROBE_RESULT = "NANOPOST_PROBE_RESULT"


def tool_response_ids(tokenizer, contents: Sequence[str]) -> list[int]:
    """Token ids that follow a model turn that made len(contents) tool calls, after the end-of-turn token
    the model sampled: the `tool` messages with these contents (in call order), as the chat template
    renders them, and the header of the model's next turn. A rollout appends them as context. They are
    tokenized apart from the turn, which is exact because the turn ends with a special token."""
    conversation = [{"role": "user", "content": "?"}, {"role": "assistant", "content": TURN}]
    conversation += [{"role": "tool", "content": content} for content in contents]
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    after = text[text.index(TURN) + len(TURN):]  # the first occurrence: a tool's output may contain TURN too
    return tokenizer(after, add_special_tokens=False).input_ids[1:]  # [0] is the end-of-turn token


def check_chat_template(tokenizer) -> None:
    """Raises ValueError ("the chat template has no tool-call format: ...") unless the tokenizer's chat
    template shows the model its tools, renders an assistant's tool call in the format parse_tool_calls
    reads, and renders tool results; run it once before a rollout uses tools."""
    question = [{"role": "user", "content": "?"}]
    call = {"type": "function", "function": {"name": PROBE_CALL.name, "arguments": PROBE_CALL.arguments}}
    calling = {"role": "assistant", "content": "", "tool_calls": [call]}

    def render(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    try:
        prompt = render(question, tools=[PROBE_TOOL], add_generation_prompt=True)
        turn = render(question + [calling], tools=[PROBE_TOOL])
        plain = render(question + [{"role": "assistant", "content": TURN}])
        header = render(question, add_generation_prompt=True)[len(render(question)):]  # the model's turn begins
        response = tokenizer.decode(tool_response_ids(tokenizer, [PROBE_RESULT]))
    except Exception as e:  # a template may raise on tools or tool messages (raise_exception, undefined fields)
        raise ValueError(f"the chat template has no tool-call format: rendering tools fails: {e}") from None
    end_of_turn = plain[plain.index(TURN) + len(TURN):]  # what follows a model turn: its end-of-turn token, ...
    end_ids = tokenizer(end_of_turn, add_special_tokens=False).input_ids
    if not end_ids or end_ids[0] not in tokenizer.added_tokens_decoder:
        problem = f"it ends a model turn with {end_of_turn!r}, not with a special token"
    elif PROBE_TOOL["function"]["description"] not in prompt:
        problem = "it does not show the tools (apply_chat_template's `tools`) to the model"
    elif not (turn.startswith(prompt) and turn.endswith(end_of_turn)) or \
            parse_tool_calls(turn[len(prompt):len(turn) - len(end_of_turn)]) != [PROBE_CALL]:
        problem = "it does not render an assistant's tool_calls as <tool_call>{\"name\": ..., \"arguments\": ...}" \
                  "</tool_call> at the end of the turn"
    elif PROBE_RESULT not in response or not response.endswith(header):
        problem = "it does not render a `tool` message followed by the next assistant turn"
    else:
        return
    raise ValueError(f"the chat template has no tool-call format: {problem}")
