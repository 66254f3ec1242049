"""GRPO step time and rollout throughput: grpo.py against TRL's GRPOTrainer without vLLM, in one run.

Both train a random-init Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, vocab 151936, tied; the
same saved weights) with the byte-level tokenizer of assets/tiny (one token per character; the
model samples from all 151936 ids, the ones past the tokenizer decode to nothing): per step 8
prompts of 128 random characters x 8 samples x up to 256 new tokens, temperature 1, bf16, one GPU.
A random model almost never emits the end-of-turn token, so both generate the full 256 tokens.
grpo.py's prompts go through the ChatML template (19 tokens more than TRL's raw prompts) and
are scored by the gsm8k verifier (reward 0, so advantages are 0 but every step still computes the
full loss and backward); TRL's reward is random. Step time is the median over the steps after the first (which
compiles grpo.py's decode step). Prints one JSON line per implementation (or why it was skipped).

The anchor, TRL's GRPOTrainer (no vLLM) measured this way on one H100 80GB: 8.4 s per step, 1.9k
new tokens/s.

    python bench/grpo.py                        # on a GPU machine; the TRL anchor needs trl
    python bench/grpo.py --tiny                 # a tiny version that runs on CPU
"""

import importlib.util
import json
import os
import random
import statistics
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from typing import Literal

import tyro

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Args:
    tiny: bool = False
    """2-layer, 64-wide model, 2 prompts x 2 samples x 8 tokens: a CPU smoke test of the benchmark itself"""
    steps: int = 6
    """optimizer steps of each implementation (the first is excluded from the median)"""
    impls: tuple[Literal["nanopost", "trl"], ...] = ("nanopost", "trl")
    """implementations to run (trl only if installed)"""
    output_dir: str | None = None
    """where grpo.py's run goes (default: a temp dir)"""


def build_model_and_data(path, tiny, n_prompts, prompt_len):
    """Writes a random-init model, the byte-level tokenizer of assets/tiny (one token per character,
    ChatML template) and a prompts file of random `prompt_len`-character texts."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tiny"))
    config = Qwen2Config(vocab_size=151936, hidden_size=64 if tiny else 896, intermediate_size=128 if tiny else 4864,
                         num_hidden_layers=2 if tiny else 24, num_attention_heads=4 if tiny else 14,
                         num_key_value_heads=2, max_position_embeddings=32768, tie_word_embeddings=True,
                         rope_theta=1e6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    tokenizer.save_pretrained(path)
    rng = random.Random(0)
    with open(os.path.join(path, "prompts.jsonl"), "w") as f:
        for _ in range(n_prompts * 8):
            text = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(prompt_len))
            f.write(json.dumps({"messages": [{"role": "user", "content": text}], "ground_truth": "0",
                                "dataset": "gsm8k"}) + "\n")


def run_nanopost(args, model_dir, tmp, n_prompts, G, prompt_len, new_tokens):
    out = args.output_dir or os.path.join(tmp, "run")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), "--model", model_dir,
                    "--dataset", os.path.join(model_dir, "prompts.jsonl"), "--eval_dataset", "None",
                    "--max_prompt_len", str(prompt_len + 32), "--max_completion_len", str(new_tokens),
                    "--num_generations", str(G), "--per_device_batch_size", str(n_prompts * G),
                    "--max_steps", str(args.steps), "--output_dir", out], check=True, env=env, cwd=ROOT)
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rows = [r for r in rows if "perf/time_step" in r][1:]
    step_s = statistics.median(r["perf/time_step"] for r in rows)
    length = statistics.mean(r["completions/mean_length"] for r in rows)
    return {"step_s": round(step_s, 3), "completion_tokens_per_s": round(n_prompts * G * length / step_s),
            "rollout_tokens_per_s": round(statistics.median(r["perf/rollout_tokens_per_second"] for r in rows)),
            "generation_s": round(statistics.median(r["perf/time_generation"] for r in rows), 3),
            "training_s": round(statistics.median(r["perf/time_training"] for r in rows), 3), "mean_len": length}


def run_trl(args, model_dir, tmp, n_prompts, G, prompt_len, new_tokens):
    """TRL's GRPOTrainer on the same weights and prompt tokens (as raw text, no chat template)."""
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    cuda = torch.cuda.is_available()

    class Timer(TrainerCallback):
        times = []

        def on_step_end(self, *_, **__):
            if cuda:
                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    prompts = [json.loads(line)["messages"][0]["content"] for line in open(os.path.join(model_dir, "prompts.jsonl"))]
    rng = random.Random(0)
    config = GRPOConfig(output_dir=os.path.join(tmp, "trl"), per_device_train_batch_size=n_prompts * G,
                        num_generations=G, max_steps=args.steps, max_completion_length=new_tokens, temperature=1.0,
                        bf16=cuda, gradient_checkpointing=False, logging_steps=1, report_to="none",
                        save_strategy="no")
    trainer = GRPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32),
        reward_funcs=[lambda prompts, completions, **_: [rng.random() for _ in completions]], args=config,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steps = sorted(b - a for a, b in zip(Timer.times, Timer.times[1:]))
    step_s = steps[len(steps) // 2]
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    length = statistics.mean(lengths[1:] or lengths)
    return {"step_s": round(step_s, 3), "completion_tokens_per_s": round(n_prompts * G * length / step_s),
            "mean_len": length,
            "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None}


def main(args):
    n_prompts, G, prompt_len, new_tokens = (2, 2, 8, 8) if args.tiny else (8, 8, 128, 256)
    shape = {"prompts": n_prompts, "G": G, "prompt_len": prompt_len, "max_completion": new_tokens}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        build_model_and_data(model_dir, args.tiny, n_prompts, prompt_len)
        for impl in args.impls:
            if impl == "trl" and importlib.util.find_spec("trl") is None:
                print(json.dumps({"impl": impl, "skipped": "trl is not installed"}), flush=True)
                continue
            run = {"nanopost": run_nanopost, "trl": run_trl}[impl]
            try:
                result = run(args, model_dir, tmp, n_prompts, G, prompt_len, new_tokens)
            except Exception as e:  # one failing implementation must not hide the other
                print(json.dumps({"impl": impl, "error": f"{type(e).__name__}: {str(e)[-300:]}"}), flush=True)
                failed.append(impl)
                continue
            print(json.dumps({"impl": impl, **shape, **result}), flush=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main(tyro.cli(Args))
