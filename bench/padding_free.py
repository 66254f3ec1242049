"""SFT steps on chat-length sequences, padded vs packed (padding-free): tokens/s and peak memory.

    python bench/padding_free.py                    # one GPU: Qwen2.5-0.5B shape, bf16
    python bench/padding_free.py --small --steps 4  # a 2-layer model anywhere (checks the script on CPU)
    python bench/padding_free.py --padding_only     # only the fraction of padding (CPU, no model)

Sequence lengths are drawn from a log-normal fitted to the Tulu 3 SFT mixture
(allenai/tulu-3-sft-mixture, 939,343 conversations): its mean, 714 tokens per conversation, is the
670,426,314 tokens counted with the Llama 3 chat template by marin-community/marin
(experiments/exp606_sft.py); its spread is not published, and sigma = 1.0 (natural log) is assumed,
which puts the 1st and 99th percentiles at 42 and 4,431 tokens, the few dozen to thousands of tokens
of the mixture's conversations. So mu = ln(714) - sigma^2 / 2 = 6.07 (median 433 tokens); lengths
are clipped to [8, --max_seq_len] (4096: Tulu 3's SFT truncation). --sigma varies the assumption.

A step is sft.py's own: per_device_batch_size x grad_accum_steps conversations, sorted by length and
cut into micro-batches by sft.micro_batches, through sft.PolicyLogprobs under FSDP2 (bf16 params,
fp32 master weights and reduction, the fused head of nanopost/kernels/), the loss on the second half of each
conversation, gradient clipping and fused AdamW. `padded` runs right-padded rows with sdpa;
`packed` runs one row per micro-batch with nanopost/kernels/packed_attention.py (varlen_attn on CUDA), as
sft.py does by default. Each mode runs in its own subprocess on the same batches, so its peak memory
(torch.cuda.max_memory_allocated) is its own; tokens/s counts real (non-pad) tokens over the steps
after 2 warmup steps, with the GPU synchronized.

The fraction of padding removed is computed without a model, over about 16,000 conversations: the
share of the padded path's token slots that are padding (the wasted work of its linear layers; the
head runs on loss tokens only either way) and of its attention score entries (rows x width^2 against
the sum of length^2 packed).
"""

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, bench/ would come first on sys.path

VOCAB, SMALL_VOCAB = 151936, 1024
TULU3_MEAN_TOKENS = 670426314 / 939343  # 713.7


def qwen_config(small):
    from transformers import Qwen2Config

    shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4) if small else \
        dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14)
    vocab = SMALL_VOCAB if small else VOCAB
    return Qwen2Config(vocab_size=vocab, **shape, num_key_value_heads=2, max_position_embeddings=32768,
                       tie_word_embeddings=True, rope_theta=1e6, eos_token_id=vocab - 2, pad_token_id=vocab - 1)


def sample_lengths(n, sigma, max_seq_len, seed=0):
    mu = math.log(TULU3_MEAN_TOKENS) - sigma**2 / 2
    draws = torch.empty(n, dtype=torch.float64).log_normal_(mu, sigma, generator=torch.Generator().manual_seed(seed))
    return draws.round().clamp(8, max_seq_len).long().tolist()


def padding_removed(args):
    """Shares of the padded path's token slots and attention entries that are padding, over about
    16,000 conversations in global batches of --world_size ranks, with sft.py's micro-batches (the global batch sorted by
    length) and with micro-batches taken in data order (as a plain DataLoader does)."""
    import sft

    batch = args.per_device_batch_size * args.grad_accum_steps * args.world_size
    lengths = sample_lengths(max(16384 // batch, 50) * batch, args.sigma, args.max_seq_len)
    rows = [{"input_ids": [0] * n, "labels": [0] * n} for n in lengths]
    totals = {"sorted": [0, 0, 0, 0], "data order": [0, 0, 0, 0]}  # real, slots, real^2, rows x width^2
    for start in range(0, len(lengths), batch):
        indices = list(range(start, start + batch))
        padded = [micro for rank in range(args.world_size) for micro in sft.micro_batches(
            rows, indices, lengths, rank, args.world_size, args.per_device_batch_size, None, False, 0)]
        in_order = [indices[i:i + args.per_device_batch_size] for i in range(0, batch, args.per_device_batch_size)]
        for name, widths in (("sorted", [b["input_ids"].shape for b in padded]),
                             ("data order", [(len(c), max(lengths[i] for i in c)) for c in in_order])):
            totals[name][0] += sum(lengths[i] for i in indices)
            totals[name][1] += sum(r * w for r, w in widths)
            totals[name][2] += sum(lengths[i] ** 2 for i in indices)
            totals[name][3] += sum(r * w * w for r, w in widths)
    shares = {}
    for name, (real, slots, real_squared, slots_squared) in totals.items():
        shares[f"padding_tokens/{name}"] = round(1 - real / slots, 4)
        shares[f"padding_attention/{name}"] = round(1 - real_squared / slots_squared, 4)
    return shares


def run_worker(args):
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    from transformers import AutoModelForCausalLM

    import sft

    packed = args.worker == "packed"
    _, _, device = sft.setup_distributed()
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(qwen_config(args.small), dtype=torch.float32,
                                          attn_implementation="packed" if packed else "sdpa")
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32,
                              reduce_dtype=torch.float32)
    model = sft.PolicyLogprobs(lm)
    for layer in lm.get_decoder().layers:
        fully_shard(layer, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=device.type == "cuda")

    batch = args.per_device_batch_size * args.grad_accum_steps
    lengths = sample_lengths(args.steps * batch, args.sigma, args.max_seq_len)
    generator, vocab = torch.Generator().manual_seed(1), lm.config.vocab_size
    rows = []
    for n in lengths:
        ids = torch.randint(10, vocab - 10, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:]})
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times, real_tokens, micro_batches = [], [], 0
    for step in range(args.steps):
        indices = list(range(step * batch, (step + 1) * batch))
        n_loss = sum(sum(t != -100 for t in rows[i]["labels"][1:]) for i in indices)
        for micro in sft.micro_batches(rows, indices, lengths, 0, 1, args.per_device_batch_size,
                                       args.max_tokens_per_micro_batch, packed, vocab - 1):
            logp = model(**sft.to_device(micro, device))
            (-logp.sum() / n_loss).backward()
            micro_batches += 1
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter())
        real_tokens.append(sum(lengths[i] for i in indices))
    return {"tokens_per_s": round(sum(real_tokens[2:]) / (times[-1] - times[1])),
            "step_s": round((times[-1] - times[1]) / (args.steps - 2), 4), "micro_batches": micro_batches}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--modes", nargs="+", default=["padded", "packed"], choices=["padded", "packed"])
    parser.add_argument("--per_device_batch_size", type=int, default=8)
    parser.add_argument("--grad_accum_steps", type=int, default=4)
    parser.add_argument("--max_tokens_per_micro_batch", type=int, default=None,
                        help="sft.py's token budget per micro-batch (padding included)")
    parser.add_argument("--max_seq_len", type=int, default=4096)
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal spread of the lengths (natural log)")
    parser.add_argument("--steps", type=int, default=10, help="steps per mode (the first 2 are warmup)")
    parser.add_argument("--small", action="store_true",
                        help="a 2-layer, 64-wide model with a 1,024-token vocabulary: checks the script on CPU")
    parser.add_argument("--padding_only", action="store_true", help="only the fraction of padding, no model")
    parser.add_argument("--world_size", type=int, default=1,
                        help="ranks sharing a global batch in the padding fraction (the timed steps run on one)")
    parser.add_argument("--worker", choices=["padded", "packed"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        result = run_worker(args)
        result["peak_GiB"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None
        print("RESULT " + json.dumps({"mode": args.worker, **result}), flush=True)
        return

    padding = padding_removed(args)
    print(json.dumps({"lengths": f"log-normal, mean {TULU3_MEAN_TOKENS:.0f}, sigma {args.sigma}, "
                      f"clipped to [8, {args.max_seq_len}]", "per_device_batch_size": args.per_device_batch_size,
                      "grad_accum_steps": args.grad_accum_steps, "world_size": args.world_size, **padding}),
          flush=True)
    if args.padding_only:
        return
    if not torch.cuda.is_available() and not args.small:
        sys.exit("bench/padding_free.py needs a CUDA GPU (--small runs a 2-layer model anywhere, --padding_only "
                 "no model)")
    results = []
    for mode in args.modes:
        flags = ["per_device_batch_size", "grad_accum_steps", "max_seq_len", "sigma", "steps"] + \
            ["max_tokens_per_micro_batch"] * bool(args.max_tokens_per_micro_batch)
        cmd = [sys.executable, __file__, "--worker", mode] + [str(a) for flag in flags
                                                              for a in (f"--{flag}", getattr(args, flag))]
        proc = subprocess.run(cmd + ["--small"] * args.small, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{mode} failed ({proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results.append(json.loads(lines[-1].removeprefix("RESULT ")))
        print(json.dumps(results[-1]), flush=True)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\n{device}, {args.per_device_batch_size} x {args.grad_accum_steps} conversations per step, "
          f"{'2-layer test model' if args.small else 'Qwen2.5-0.5B shape, bf16'}; padding in the padded path: "
          f"{padding['padding_tokens/sorted']:.1%} of token slots, {padding['padding_attention/sorted']:.1%} of "
          f"attention entries\n\n| mode | real tok/s | step s | micro-batches | peak GiB |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['tokens_per_s']:,} | {r['step_s']} | {r['micro_batches']} | {r['peak_GiB']} |")
    by_mode = {r["mode"]: r for r in results}
    if {"padded", "packed"} <= by_mode.keys():
        print(f"\npacked / padded: {by_mode['packed']['tokens_per_s'] / by_mode['padded']['tokens_per_s']:.2f}x "
              "real tokens/s")


if __name__ == "__main__":
    main()
