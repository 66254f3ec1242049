"""Writes assets/tiny: a Qwen2-architecture config (tied embeddings, like Qwen2.5-0.5B) and a
byte-level BPE tokenizer with no merges and Qwen's ChatML chat template (with Qwen2.5's tool calls), so
that every script runs offline.

It is Qwen2's tokenizer with an empty merge list: every byte is one token (so every digit is one
token, which makes the demo's arithmetic learnable by a small model), any text round-trips, and
transformers loads it as the same Qwen2Tokenizer class a real Qwen checkpoint uses.
Run from the repo root: python assets/make_tiny.py
"""

import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# ChatML, and tools as Qwen2.5 renders them: the tools (apply_chat_template(..., tools=[...])) listed in a
# system turn, after the conversation's own system message; an assistant's tool calls as
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>; tool results in <tool_response> tags, in one
# user turn for consecutive ones. Tools are listed one line each, `name(argument: type, ...): description`,
# not as Qwen's JSON schemas: with one token per byte, a schema costs the tiny model hundreds of positions.
# A conversation without tools and tool calls renders exactly as plain ChatML.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] + '\n\n' }}{%- endif %}"
    "{{- '# Tools' }}"
    "{%- for tool in tools %}"
    "{%- set function = tool['function'] if tool['function'] is defined else tool %}"
    "{{- '\n' + function['name'] + '(' }}"
    "{%- for name, spec in function['parameters']['properties'].items() %}"
    "{%- set type = spec['type'] | default('any') %}"
    "{{- (', ' if not loop.first else '') + name + ': ' + (type if type is string else type | join(' | ')) }}"
    "{%- endfor %}"
    "{{- '): ' + function['description'] | default('') }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if tools and loop.first and message['role'] == 'system' %}"
    "{%- elif message['role'] == 'assistant' and message['tool_calls'] %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message['content'] %}{{- '\n' + message['content'] }}{%- endif %}"
    "{%- for call in message['tool_calls'] %}"
    "{%- set call = call['function'] if call['function'] is defined else call %}"
    "{%- set arguments = call['arguments'] if call['arguments'] is string else call['arguments'] | tojson %}"
    "{{- '\n<tool_call>\n{\"name\": \"' + call['name'] + '\", \"arguments\": ' + arguments + '}\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\n' }}"
    "{%- elif message['role'] == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1]['role'] != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message['content'] + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1]['role'] != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def main():
    byte_chars = sorted(pre_tokenizers.ByteLevel.alphabet())  # the 256 byte symbols
    vocab = {tok: i for i, tok in enumerate(SPECIALS + byte_chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.add_special_tokens(SPECIALS)
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    os.makedirs(OUT, exist_ok=True)
    tok.save_pretrained(OUT)

    vocab_size = 320  # len(vocab) = 259, rounded up as real models do (unused rows never targeted)
    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        bos_token_id=None,
        eos_token_id=vocab["<|im_end|>"],
        pad_token_id=vocab["<|endoftext|>"],
    )
    config.save_pretrained(OUT)
    print(f"wrote {OUT}: vocab {len(vocab)} (config {vocab_size}), "
          f"{json.dumps({k: getattr(config, k) for k in ['hidden_size', 'num_hidden_layers']})}")


if __name__ == "__main__":
    main()
