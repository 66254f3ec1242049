"""DPO training step on one GPU: tokens/s and peak memory of dpo.py against TRL's DPOTrainer, in one run.

    python bench/dpo.py                         # Qwen2.5-0.5B shape, bf16, 8 pairs x (512 + 512) tokens
    python bench/dpo.py --impls nanopost --steps 12

Both train a randomly initialized Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV
heads, vocab 151936, tied embeddings) on the same random token pairs: per step 8 pairs, each a
512-token prompt with a 512-token chosen and a 512-token rejected response, so 16,384 tokens.
The anchor, TRL's DPOTrainer measured this way on one H100 80GB: 61k tokens/s at a 25.9 GiB peak.

- nanopost runs dpo.py's own pieces: SequenceLogprobs under FSDP2 (bf16 params, fp32 master
  weights and reduction), the fused head from nanopost/kernels/, preference_loss (sigmoid), gradient
  clipping and fused AdamW, one micro-batch of 16 sequences (chosen and rejected) packed into one row.
  The reference log-probs are precomputed by one no-grad pass, as dpo.py does once and caches;
  that pass is timed too, and `amortized` is the throughput with it included (each pair seen once).
- TRL runs DPOTrainer with a reference model (its default: reference log-probs in every step),
  bf16, no gradient checkpointing, per_device_train_batch_size 8; only if trl is installed.

Each implementation runs in its own subprocess, so peak memory (torch.cuda.max_memory_allocated,
reset before the first step) is its own. A step's time is the median over the steps after 2
warmup steps, with the GPU synchronized. Prints one JSON line per implementation, then a table.
"""

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ comes first on sys.path and this file would shadow dpo.py
sys.path.insert(0, str(ROOT))

VOCAB = 151936


def qwen_config(small):
    from transformers import Qwen2Config

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if small else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    return Qwen2Config(vocab_size=VOCAB, **shape, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1e6, eos_token_id=VOCAB - 2, pad_token_id=VOCAB - 1)


def random_pairs(n, prompt_len, completion_len):
    """n pairs of token-id lists (prompt, chosen, rejected), the same in every subprocess."""
    rng = random.Random(0)
    draw = lambda k: [rng.randrange(10, VOCAB - 10) for _ in range(k)]  # noqa: E731
    return [(draw(prompt_len), draw(completion_len), draw(completion_len)) for _ in range(n)]


def pythonpath():
    """This checkout first, then whatever PYTHONPATH already holds (packages installed with --target)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def median_step(times):
    steps = sorted(b - a for a, b in zip(times, times[1:]))
    return steps[len(steps) // 2]


def run_nanopost(args):
    from torch.distributed.fsdp import MixedPrecisionPolicy
    from transformers import AutoModelForCausalLM

    import dpo

    _, _, device = dpo.setup_distributed()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(qwen_config(args.small), dtype=torch.float32, attn_implementation="packed")
    model = dpo.shard(lm, MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda")
    rows = [{"chosen_ids": p + c, "chosen_labels": [-100] * len(p) + c,
             "rejected_ids": p + r, "rejected_labels": [-100] * len(p) + r}
            for p, c, r in random_pairs(args.pairs, args.prompt_len, args.completion_len)]
    lengths = torch.full((args.pairs, 2), args.completion_len - 0.0, device=device)
    (chunk, batch), = dpo.micro_batches(rows, list(range(args.pairs)), 0, 1, args.pairs, None, True, VOCAB - 1)
    batch = dpo.to_device(batch, device)
    loss_args = dpo.Args(loss_type="sigmoid", beta=0.1)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    ref_times = []
    for _ in range(args.steps):
        ref_times.append(time.perf_counter())
        ref = dpo.all_sequence_logps(model, rows, args.pairs, True, 0, 1, VOCAB - 1, device)
        sync()
    ref_times.append(time.perf_counter())

    times = []
    for _ in range(args.steps):
        logps = model(**batch)
        losses, *_ = dpo.preference_loss(loss_args, torch.stack(logps.split(args.pairs), 1), ref[chunk], lengths)
        (losses.sum() / args.pairs).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter())
    tokens = args.pairs * 2 * (args.prompt_len + args.completion_len)
    step, ref_step = median_step(times[2:]), median_step(ref_times[2:])
    return {"tokens_per_s": round(tokens / step), "ref_pass_tokens_per_s": round(tokens / ref_step),
            "amortized_tokens_per_s": round(tokens / (step + ref_step)), "step_s": round(step, 4)}


def run_trl(args):
    from datasets import Dataset
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    # a word-level tokenizer over the full vocabulary, one token per "t<id>" word
    vocab = {f"t{i}": i for i in range(VOCAB - 2)} | {"<|endoftext|>": VOCAB - 2, "<|pad|>": VOCAB - 1}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|pad|>")
    words = lambda ids: " ".join(f"t{i}" for i in ids)  # noqa: E731
    data = Dataset.from_list([{"prompt": words(p), "chosen": words(c), "rejected": words(r)}
                              for p, c, r in random_pairs(args.pairs * (args.steps + 1), args.prompt_len,
                                                          args.completion_len)])

    def model():
        torch.manual_seed(0)
        dtype = torch.float32 if args.small else torch.bfloat16
        return AutoModelForCausalLM.from_config(qwen_config(args.small), dtype=dtype)

    class Timer(TrainerCallback):
        times = []

        def on_step_end(self, *_, **__):
            sync()
            self.times.append(time.perf_counter())

    config = DPOConfig(output_dir="/tmp/bench_trl_dpo", per_device_train_batch_size=args.pairs, max_steps=args.steps,
                       max_length=args.prompt_len + args.completion_len, bf16=not args.small,
                       gradient_checkpointing=False, logging_steps=1, report_to="none", save_strategy="no")
    trainer = DPOTrainer(model=model(), ref_model=model(), args=config, train_dataset=data,
                         processing_class=tokenizer, callbacks=[Timer()])
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    step = median_step(Timer.times[1:])
    tokens = args.pairs * 2 * (args.prompt_len + args.completion_len)
    return {"tokens_per_s": round(tokens / step), "step_s": round(step, 4)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--impls", nargs="+", default=["nanopost", "trl"], choices=["nanopost", "trl"])
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--prompt_len", type=int, default=512)
    parser.add_argument("--completion_len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="steps per implementation (the first 2 are warmup)")
    parser.add_argument("--small", action="store_true",
                        help="a 2-layer, 64-wide model, at most 2 pairs x (16 + 16) tokens: checks the script on CPU")
    parser.add_argument("--worker", choices=["nanopost", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 4:
        parser.error("--steps must be >= 4 (2 warmup steps, then at least 2 timed ones)")
    if args.small:
        args.pairs, args.prompt_len, args.completion_len = min(args.pairs, 2), min(args.prompt_len, 16), \
            min(args.completion_len, 16)

    if args.worker:
        result = {"nanopost": run_nanopost, "trl": run_trl}[args.worker](args)
        result["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
        print("RESULT " + json.dumps({"impl": args.worker, **result}), flush=True)
        return

    if not torch.cuda.is_available() and not args.small:
        sys.exit("bench/dpo.py needs a CUDA GPU (--small runs a 2-layer model anywhere, to check the script)")
    results, failed = [], []
    for impl in args.impls:
        if impl == "trl" and importlib.util.find_spec("trl") is None:
            print(json.dumps({"impl": impl, "skipped": "trl is not installed"}), flush=True)
            continue
        cmd = [sys.executable, __file__, "--worker", impl, "--pairs", str(args.pairs), "--prompt_len",
               str(args.prompt_len), "--completion_len", str(args.completion_len), "--steps", str(args.steps)] + \
            (["--small"] if args.small else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": pythonpath(), "WANDB_MODE": "disabled"})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{impl} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            print(json.dumps({"impl": impl, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}),
                  flush=True)
            failed.append(impl)
            continue
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(json.dumps(results[-1]), flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, {args.pairs} pairs x ({args.prompt_len} + {args.completion_len}) tokens, bf16\n\n"
          "| impl | train tok/s | peak GiB | ref pass tok/s | with ref pass amortized tok/s |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['impl']} | {r['tokens_per_s']:,} | {r['peak_GiB']} | {r.get('ref_pass_tokens_per_s', '-')} | "
              f"{r.get('amortized_tokens_per_s', '-')} |")
    by_impl = {r["impl"]: r for r in results}
    if {"nanopost", "trl"} <= by_impl.keys() and torch.cuda.is_available():
        print(f"\nnanopost / TRL: {by_impl['nanopost']['tokens_per_s'] / by_impl['trl']['tokens_per_s']:.2f}x tokens/s "
              f"({by_impl['nanopost']['amortized_tokens_per_s'] / by_impl['trl']['tokens_per_s']:.2f}x with the "
              f"reference pass amortized), {by_impl['nanopost']['peak_GiB'] / by_impl['trl']['peak_GiB']:.2f}x memory")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
