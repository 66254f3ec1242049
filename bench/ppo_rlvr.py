"""GPU benchmark of ppo_rlvr.py: PPO steps on a random Qwen2.5-0.5B-shaped model (hidden 896, 24
layers, vocab 151936, tied), 1 GPU, bf16. Prints one JSON line with the steady-state step time,
generation vs training seconds and rollout tokens/s, read from the run's metrics.jsonl.

    python bench/ppo_rlvr.py                       # 8 prompts x 256 new tokens per step
    python bench/ppo_rlvr.py --prompts 64 --max_new_tokens 512
    python bench/ppo_rlvr.py --small               # a 2-layer, 64-wide model: checks the script on CPU

Completions come from a random model, so they run to --max_new_tokens (the worst case for
generation). There is no anchor here: TRL's PPO trainer needs a trained reward model where
ppo_rlvr.py scores with verifiers, so the two do not run the same step.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

from transformers import AutoTokenizer, Qwen2Config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=8, help="prompts per PPO step (one completion each)")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5, help="PPO steps; the median of all but the first is reported")
    parser.add_argument("--num_ppo_epochs", type=int, default=1)
    parser.add_argument("--small", action="store_true",
                        help="a 2-layer, 64-wide model, 2 prompts x 8 new tokens: checks the script on CPU")
    args = parser.parse_args()
    if args.small:
        args.prompts, args.max_new_tokens = min(args.prompts, 2), min(args.max_new_tokens, 8)

    work = tempfile.mkdtemp(prefix="bench_ppo_")
    model_dir = os.path.join(work, "model")
    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if args.small \
        else dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    config = Qwen2Config(vocab_size=151936, **shape, num_key_value_heads=2, max_position_embeddings=32768,
                         tie_word_embeddings=True, rope_theta=1e6)
    config.save_pretrained(model_dir)  # config only: ppo_rlvr.py initializes it randomly
    AutoTokenizer.from_pretrained(os.path.join(ROOT, "assets", "tiny")).save_pretrained(model_dir)
    data = os.path.join(work, "prompts.jsonl")
    with open(data, "w") as f:
        for i in range(args.prompts * args.steps):
            row = {"messages": [{"role": "user", "content": f"What is {i} + {i}? " * 8}],
                   "ground_truth": str(2 * i), "dataset": "gsm8k"}
            f.write(json.dumps(row) + "\n")
    out = os.path.join(work, "run")
    cmd = [sys.executable, os.path.join(ROOT, "ppo_rlvr.py"), "--model", model_dir, "--dataset", data,
           "--eval_dataset", "None", "--max_steps", str(args.steps), "--per_device_batch_size", str(args.prompts),
           "--num_ppo_epochs", str(args.num_ppo_epochs), "--max_new_tokens", str(args.max_new_tokens),
           "--max_prompt_len", "512", "--output_dir", out]
    pythonpath = os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": pythonpath})
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "objective/kl" in line][1:]
    median = lambda key: sorted(r[key] for r in rows)[len(rows) // 2]  # noqa: E731
    generation, training = median("perf/generation_seconds"), median("perf/training_seconds")
    print(json.dumps({"impl": "nanopost", "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
                      "num_ppo_epochs": args.num_ppo_epochs, "step_s": round(generation + training, 3),
                      "generation_s": round(generation, 3), "training_s": round(training, 3),
                      "rollout_tokens_per_s": round(median("perf/rollout_tokens_per_second")),
                      "mean_length": median("completions/mean_length")}), flush=True)


if __name__ == "__main__":
    main()
