"""Held-out accuracy of any checkpoint: generate completions for a test split and score them with
the verifiers.

Each row has `messages` (the prompt conversation), `ground_truth` and `dataset` (the verifier's
name), the RL format of DESIGN.md. Greedy decoding by default gives pass@1 accuracy; with
--temperature > 0 and --num_samples n, it reports the mean score over samples and the unbiased
pass@k of Chen et al. 2021 for each k <= n. Prints accuracy per verifier and writes every
prompt, completion and score to a jsonl file.

    python eval.py --model runs/sft/final                       # the demo's test split
    torchrun --nproc_per_node 8 eval.py --model Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --dataset allenai/RLVR-GSM-MATH-IF-Mixed-Constraints --max_new_tokens 1024 \\
        --temperature 0.6 --num_samples 8
"""

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation import CompileConfig

import verifiers


@dataclass
class Args:
    model: str = "runs/sft/final"
    """hub id or local Hugging Face checkpoint (e.g. output_dir/final of any script)"""
    dataset: str = "data/test.jsonl"
    """hub id or local .jsonl/.parquet with messages, ground_truth, dataset columns"""
    dataset_split: str = "test"
    """split of a hub dataset"""
    max_rows: int | None = None
    """evaluate only the first N rows"""
    max_new_tokens: int = 64
    """completion length limit (real math evals: 1024-4096)"""
    temperature: float = 0.0
    """0 = greedy; > 0 samples"""
    top_p: float = 1.0
    """nucleus sampling when temperature > 0"""
    num_samples: int = 1
    """completions per prompt (needs temperature > 0 when > 1); pass@k is reported for k <= this"""
    batch_size: int = 64
    """prompts per generate call on each rank"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """dtype the model is loaded and run in. auto = bf16 on CUDA, fp32 on CPU"""
    generation_cache: Literal["auto", "static", "dynamic"] = "auto"
    """KV cache: static (every prompt left-padded to the longest one, a fixed-size cache, the decode step
    compiled once with torch.compile and replayed, on GPUs as a CUDA graph; compiling takes a while once)
    or dynamic (grows with each token, no compilation). auto = static on CUDA, dynamic elsewhere"""
    output: str | None = None
    """jsonl of prompts, completions and scores (default: eval_<dataset name>.jsonl beside a local model)"""
    seed: int = 0
    """sampling seed (each rank uses seed + rank)"""


def pass_at_k(n, c, k):
    """Unbiased estimate of the chance that at least one of k samples out of n is correct, given c
    correct ones (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_rows(name, split):
    import datasets

    if os.path.exists(name):
        kind = "parquet" if name.endswith(".parquet") else "json"
        return datasets.load_dataset(kind, data_files=name, split="train").to_list()
    return datasets.load_dataset(name, split=split).to_list()


def check_rows(rows, name):
    known = set(verifiers.names())
    for i, row in enumerate(rows):
        if not isinstance(row.get("messages"), list) or not row["messages"]:
            raise ValueError(f"{name} row {i}: `messages` must be a non-empty list of {{role, content}}")
        if not isinstance(row.get("ground_truth"), str):
            raise ValueError(f"{name} row {i}: `ground_truth` must be a string, got {row.get('ground_truth')!r:.100}")
        if str(row.get("dataset", "")).lower() not in known:
            raise ValueError(f"{name} row {i}: `dataset` {row.get('dataset')!r} is not a verifier "
                             f"(known: {sorted(known)})")


def end_of_turn_ids(tokenizer, model):
    """Generation stops at the chat template's end-of-turn token(s) and the model's eos."""
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids]) - {None}
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = tokenizer(text[text.rindex("PROBE") + len("PROBE"):], add_special_tokens=False).input_ids
    if after:
        ids.add(after[0])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def load_model(name, dtype, device):
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()


def cache_settings(static):
    """generate() options for the KV cache: always on (whatever the model's config says), and with
    `static` a fixed-size cache, so that generate compiles the decode step once (torch.compile) and
    replays it; transformers would compile only on GPUs, this asks it to on any device."""
    if not static:
        return {"use_cache": True}
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True
    return {"use_cache": True, "cache_implementation": "static", "compile_config": compile_config}


def generate(model, tokenizer, prompts, args, stop_ids, device, static_width=None):
    """num_samples completions for each prompt, as text. With static_width, prompts are left-padded
    to that many tokens and the KV cache is static (see cache_settings)."""
    padding = dict(padding="max_length", max_length=static_width) if static_width else dict(padding=True)
    enc = tokenizer(prompts, return_tensors="pt", add_special_tokens=False, **padding).to(device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_samples,
                             eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                             **cache_settings(static_width is not None), **sampling)
    texts = tokenizer.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    return [texts[i * args.num_samples:(i + 1) * args.num_samples] for i in range(len(prompts))]


def evaluate(args):
    """Scores this process's share of the rows; returns (summary dict, per-row records) on rank 0."""
    if args.num_samples > 1 and args.temperature <= 0:
        raise ValueError("--num_samples > 1 needs --temperature > 0 (greedy gives the same completion)")
    distributed = "RANK" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    rows = load_rows(args.dataset, args.dataset_split)[:args.max_rows]
    check_rows(rows, args.dataset)

    tokenizer = AutoTokenizer.from_pretrained(args.model, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    model = load_model(args.model, dtype, device)
    stop_ids = end_of_turn_ids(tokenizer, model)
    torch.manual_seed(args.seed + rank)

    mine = list(range(rank, len(rows), world))
    static_width = None
    if args.generation_cache == "static" or (args.generation_cache == "auto" and device.type == "cuda"):
        # one width for every batch, so that the compiled decode step is replayed, not recompiled
        texts = [tokenizer.apply_chat_template(rows[i]["messages"], tokenize=False, add_generation_prompt=True)
                 for i in mine]
        static_width = max((len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids), default=1)
    records = []
    for start in range(0, len(mine), args.batch_size):
        batch = [rows[i] for i in mine[start:start + args.batch_size]]
        prompts = [tokenizer.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
                   for r in batch]
        for i, row, prompt, completions in zip(mine[start:], batch, prompts,
                                               generate(model, tokenizer, prompts, args, stop_ids, device,
                                                        static_width)):
            verify = verifiers.get(row["dataset"])
            records.append({"index": i, "prompt": prompt, "completions": completions,
                            "scores": [verify(c, row["ground_truth"]) for c in completions],
                            "ground_truth": row["ground_truth"], "dataset": row["dataset"]})
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    return summarize(records, args.num_samples), records


def summarize(records, num_samples):
    """Mean score (pass@1) overall and per verifier, and pass@k for k in 1, 2, 4, ... <= n."""
    by_verifier = defaultdict(list)
    for r in records:
        by_verifier[r["dataset"].lower()].append(r)
    summary = {"accuracy": sum(sum(r["scores"]) / num_samples for r in records) / max(1, len(records)),
               "num_rows": len(records)}
    for name, group in sorted(by_verifier.items()):
        summary[f"accuracy/{name}"] = sum(sum(r["scores"]) / num_samples for r in group) / len(group)
    k = 2
    while k <= num_samples:
        summary[f"pass@{k}"] = sum(pass_at_k(num_samples, sum(s == 1.0 for s in r["scores"]), k)
                                   for r in records) / max(1, len(records))
        k *= 2
    return summary


def main(args):
    summary, records = evaluate(args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        split_name = os.path.splitext(os.path.basename(args.dataset))[0]
        output = args.output or (os.path.join(args.model, f"eval_{split_name}.jsonl") if os.path.isdir(args.model)
                                 else "eval.jsonl")
        with open(output, "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        for key, value in summary.items():
            print(f"{key:>24}: {value:.4f}" if isinstance(value, float) else f"{key:>24}: {value}")
        print(json.dumps(summary))
        print(f"wrote {output}")
    if dist.is_initialized():
        # ranks leave together: a gloo rank that tears down while its peer still holds the
        # connection can abort the peer at exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(tyro.cli(Args))
