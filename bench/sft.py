"""SFT training step on one GPU: tokens/s and peak memory of sft.py's step against Hugging Face
(+ Liger), in one run.

    python bench/sft.py                         # Qwen2.5-0.5B shape, bf16, 8 x 2048 tokens per step
    python bench/sft.py --impls nanopost hf_liger --steps 12
    python bench/sft.py --small                 # a 2-layer, 64-wide model: checks the script on CPU

Each trains a randomly initialized Qwen2.5-0.5B-shaped model (hidden 896, 24 layers, 14 heads, 2 KV
heads, vocab 151936, tied embeddings) on the same random tokens: per step one micro-batch of 8
sequences of 2048 tokens with a loss on every token, AdamW (fused on CUDA), SDPA attention, no
gradient checkpointing.

- nanopost: sft.py's step: PolicyLogprobs (the fused head of nanopost/kernels/, no [tokens, vocab] logits)
  under FSDP2 with bf16 compute, fp32 master weights and fp32 gradient reduction; loss
  -sum(logp) / n_tokens, gradient clipping, AdamW.
- hf: the transformers model in bf16 (weights, gradients and AdamW states all bf16, as the anchor
  was measured), loss from model(input_ids, labels=input_ids), full logits.
- hf_liger: the same with Liger's kernels patched into Qwen2 (apply_liger_kernel_to_qwen2: fused
  linear cross-entropy, RMSNorm, RoPE, SwiGLU); only if liger-kernel is installed.

The anchor, measured this way on one H100 80GB: Hugging Face 75k tokens/s at a
51.8 GiB peak, Hugging Face + Liger 81k tokens/s at 18.1 GiB. Each implementation runs in its own
subprocess, so its peak memory (torch.cuda.max_memory_allocated, weights and optimizer states
included) is its own. A step's time is the median over the steps after 2 warmup steps, with the
GPU synchronized; MFU counts 6 x parameters + 12 x layers x hidden x sequence FLOPs per token
against the GPU's dense bf16 peak. Prints one JSON line per implementation, then a table.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# run as a script, bench/ comes first on sys.path and this file would shadow sft.py
sys.path.insert(0, str(ROOT))

VOCAB = 151936
IMPLS = ["nanopost", "hf", "hf_liger"]


def qwen_config(small):
    from transformers import Qwen2Config

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if small else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    return Qwen2Config(vocab_size=VOCAB, **shape, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1e6, use_cache=False)


def pythonpath():
    """This checkout first, then whatever PYTHONPATH already holds (packages installed with --target)."""
    return os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(step, n):
    """Runs step() n times; the median duration after 2 warmup steps."""
    durations = []
    for _ in range(n):
        sync()
        start = time.perf_counter()
        step()
        sync()
        durations.append(time.perf_counter() - start)
    durations = sorted(durations[2:])
    return durations[len(durations) // 2]


def random_batch(args, device):
    g = torch.Generator().manual_seed(0)
    return torch.randint(10, VOCAB - 10, (args.batch, args.seq_len), generator=g).to(device)


def run_nanopost(args):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    import sft

    _, _, device = sft.setup_distributed()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(qwen_config(args.small), dtype=torch.float32, attn_implementation="sdpa")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    model = sft.PolicyLogprobs(lm)
    for layer in lm.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=device.type == "cuda")
    ids = random_batch(args, device)
    inputs, targets = ids[:, :-1], ids[:, 1:]
    n_tokens = targets.numel()

    def step():
        logp = model(inputs, targets)
        (-logp.sum() / n_tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return timed_steps(step, args.steps), sum(p.numel() for p in params), device


def run_hf(args, liger):
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_qwen2

        apply_liger_kernel_to_qwen2()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lm = AutoModelForCausalLM.from_config(qwen_config(args.small), dtype=dtype, attn_implementation="sdpa").to(device)
    lm.train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=1e-5, fused=device.type == "cuda")
    ids = random_batch(args, device)

    def step():
        lm(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    return timed_steps(step, args.steps), sum(p.numel() for p in lm.parameters()), device


def worker(args):
    import sft

    step_s, n_params, device = run_nanopost(args) if args.worker == "nanopost" else \
        run_hf(args, liger=args.worker == "hf_liger")
    # nanopost predicts seq_len - 1 targets per sequence, transformers shifts the labels the same way
    tokens = args.batch * (args.seq_len - 1)
    config = qwen_config(args.small)
    flops = (6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * args.seq_len) * tokens
    peak = sft.peak_flops(device)
    return {"impl": args.worker, "batch": args.batch, "seq_len": args.seq_len, "step_s": round(step_s, 4),
            "tokens_per_s": round(tokens / step_s), "mfu": round(flops / step_s / peak, 3) if peak else None,
            "peak_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None}


def skip_reason(impl):
    """Why `impl` cannot run here, or None."""
    if impl != "hf_liger":
        return None
    if importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed"
    if not torch.cuda.is_available():
        return "Liger's kernels need CUDA"
    return None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].replace("\n", " "))
    parser.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS)
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq_len", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=8, help="steps per implementation (the first 2 are warmup)")
    parser.add_argument("--small", action="store_true",
                        help="a 2-layer, 64-wide model, 2 x 64 tokens: checks the script on CPU")
    parser.add_argument("--worker", choices=IMPLS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.batch, args.seq_len = min(args.batch, 2), min(args.seq_len, 64)
    if args.steps < 3:
        parser.error("--steps must be >= 3 (2 warmup steps, then the timed ones)")

    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    if not torch.cuda.is_available() and not args.small:
        sys.exit("bench/sft.py needs a CUDA GPU (--small runs a 2-layer model anywhere, to check the script)")
    results, failed = [], []
    for impl in args.impls:
        skipped = skip_reason(impl)
        if skipped:
            print(json.dumps({"impl": impl, "skipped": skipped}), flush=True)
            continue
        cmd = [sys.executable, __file__, "--worker", impl, "--batch", str(args.batch), "--seq_len", str(args.seq_len),
               "--steps", str(args.steps)] + (["--small"] if args.small else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": pythonpath()})
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
    print(f"\n{device}, {args.batch} x {args.seq_len} tokens per step\n\n"
          "| impl | tokens/s | step s | MFU | peak GiB |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['impl']} | {r['tokens_per_s']:,} | {r['step_s']} | {r['mfu']} | {r['peak_GiB']} |")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
