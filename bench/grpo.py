"""GRPO step time and rollout throughput: grpo.py against TRL's GRPOTrainer without vLLM, in one run.

Same setup as /work/shared/anchors/anchor_trl.py: a random-init Qwen2.5-0.5B-shaped model (hidden
896, 24 layers, vocab 151936, tied), a word-level tokenizer over the whole vocab, 8 prompts of 128
random tokens x 8 samples x up to 256 new tokens per step, temperature 1, bf16, one GPU. A random
model almost never emits the end-of-turn token, so both generate the full 256 tokens. grpo.py's
prompts go through a ChatML template (a few tokens more than TRL's raw prompts) and are scored by
the gsm8k verifier (reward 0, so advantages are 0 but every step still computes the full loss and
backward); TRL's reward is random. Step time is the median over steps after the first (which
compiles grpo.py's decode step). Prints one JSON line per method.

    python bench/grpo.py                        # on a GPU machine; needs trl for the anchor
    python bench/grpo.py --tiny                 # a tiny version that runs on CPU
"""

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    tiny: bool = False
    """2-layer, 64-wide model, 2 prompts x 2 samples x 8 tokens: a CPU smoke test of the benchmark itself"""
    steps: int = 6
    """grpo.py optimizer steps (the first is excluded from the median)"""
    anchor: str = os.path.join(ROOT, "..", "shared", "anchors", "anchor_trl.py")
    """TRL anchor script; empty string skips it"""
    output_dir: str | None = None
    """where grpo.py's run goes (default: a temp dir)"""


CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_model_and_data(path, tiny, n_prompts, prompt_len):
    """Writes a random-init model, its word-level tokenizer with a ChatML template, and a prompts file."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    V = 151936
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {f"t{i}": i for i in range(V - len(specials))}
    vocab.update({s: V - len(specials) + i for i, s in enumerate(specials)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                        additional_special_tokens=specials[1:])
    tokenizer.chat_template = CHAT_TEMPLATE
    config = Qwen2Config(vocab_size=V, hidden_size=64 if tiny else 896, intermediate_size=128 if tiny else 4864,
                         num_hidden_layers=2 if tiny else 24, num_attention_heads=4 if tiny else 14,
                         num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_theta=1e6, eos_token_id=vocab["<|im_end|>"], pad_token_id=vocab["<|endoftext|>"])
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    random.seed(0)
    with open(os.path.join(path, "prompts.jsonl"), "w") as f:
        for _ in range(n_prompts * 8):
            text = " ".join(f"t{random.randrange(10, V - 10)}" for _ in range(prompt_len))
            f.write(json.dumps({"messages": [{"role": "user", "content": text}], "ground_truth": "0",
                                "dataset": "gsm8k"}) + "\n")


def main(args):
    n_prompts, G, prompt_len, new_tokens = (2, 2, 8, 8) if args.tiny else (8, 8, 128, 256)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model_and_data(model_dir, args.tiny, n_prompts, prompt_len)
        out = args.output_dir or os.path.join(tmp, "run")
        env = {**os.environ, "PYTHONPATH": ROOT}
        subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--model", model_dir,
                        "--dataset", os.path.join(model_dir, "prompts.jsonl"), "--eval_dataset", "None",
                        "--max_prompt_len", str(prompt_len + 16), "--max_completion_len", str(new_tokens),
                        "--num_generations", str(G), "--per_device_batch_size", str(n_prompts * G),
                        "--max_steps", str(args.steps), "--output_dir", out], check=True, env=env, cwd=ROOT)
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        rows = [r for r in rows if "perf/time_step" in r][1:]
        step_s = statistics.median(r["perf/time_step"] for r in rows)
        length = statistics.mean(r["completions/mean_length"] for r in rows)
        print(json.dumps({"method": "nanopost_grpo", "prompts": n_prompts, "G": G, "prompt_len": prompt_len,
                          "max_completion": new_tokens, "step_s": round(step_s, 3),
                          "completion_tokens_per_s": round(n_prompts * G * length / step_s),
                          "rollout_tokens_per_s": round(statistics.median(r["perf/rollout_tokens_per_second"]
                                                                          for r in rows)),
                          "generation_s": round(statistics.median(r["perf/time_generation"] for r in rows), 3),
                          "training_s": round(statistics.median(r["perf/time_training"] for r in rows), 3),
                          "mean_len": length}), flush=True)
    if args.anchor:
        env = {**os.environ, **({"TINY": "1"} if args.tiny else {})}
        subprocess.run([sys.executable, args.anchor, "grpo"], check=True, env=env)


if __name__ == "__main__":
    main(tyro.cli(Args))
