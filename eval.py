"""Held-out accuracy of any checkpoint: generate completions for a test split and score them with
the verifiers.

Each row has `messages` (the prompt conversation), `ground_truth` and `dataset` (the verifier's
name), the RL format that grpo.py and ppo_rlvr.py train on. Greedy decoding by default gives
pass@1 accuracy; with --temperature > 0 and --num_samples n, it reports the mean score over samples
and the unbiased pass@k of Chen et al. 2021 for each k <= n. Prints accuracy per verifier (GSM8K and
MATH accuracy as their papers report it) and, for IFEval rows, IFEval's four numbers: prompt-level
and instruction-level accuracy, strict and loose. Writes every prompt, completion and score to a
jsonl file.

    python eval.py                                              # runs/sft/final on the demo's test split
    python eval.py --model runs/pipeline/grpo/final             # a checkpoint of `python pipeline.py`
    torchrun --nproc_per_node 8 eval.py --model Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --dataset allenai/RLVR-GSM-MATH-IF-Mixed-Constraints --max_new_tokens 1024 \\
        --temperature 0.6 --num_samples 8
"""

import json
import math
import os
import sys
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
import tyro
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation import CompileConfig

from nanopost import verifiers
from nanopost.verifiers.ifeval import instruction_results


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
    """jsonl of prompts, completions and scores (None: eval_<dataset name>.jsonl beside a local model)"""
    seed: int = 0
    """sampling seed (each rank uses seed + rank)"""


class InputError(ValueError):
    """A bad flag, file or data row: the message says what is wrong and what was expected, and the
    script prints it alone, without a traceback."""


def pass_at_k(n, c, k):
    """Unbiased estimate of the chance that at least one of k samples out of n is correct, given c
    correct ones (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_rows(name, split):
    """The rows of a local .jsonl/.json/.parquet file, or of a split of a hub dataset or local dataset
    directory."""
    import datasets  # imported here: it is slow to import and only needed once

    datasets.disable_progress_bars()
    if not os.path.isfile(name):
        return datasets.load_dataset(name, split=split).to_list()
    kind = "parquet" if name.endswith(".parquet") else "json"
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read is reported below, once
    try:
        return datasets.load_dataset(kind, data_files=name, split="train").to_list()
    except datasets.exceptions.DatasetGenerationError as error:
        raise InputError(f"{name}: {unreadable(name, error)}") from None
    finally:
        datasets.logging.set_verbosity_warning()


def unreadable(path, error):
    """What is wrong with a local data file that datasets could not read: the first row of a JSON
    lines file that is not JSON, else the reader's own message."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            rows = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
        for row, (number, line) in enumerate(rows):
            try:
                json.loads(line)
            except json.JSONDecodeError as bad:
                return f"row {row} (line {number}) is not valid JSON: {bad.msg} at column {bad.colno}"
    return f"cannot be read: {error.__cause__ or error}"


def check_rows(rows, name):
    known = set(verifiers.names())
    for i, row in enumerate(rows):
        if not isinstance(row.get("messages"), list) or not row["messages"]:
            raise InputError(f"{name} row {i}: `messages` must be a non-empty list of {{role, content}}")
        if not isinstance(row.get("ground_truth"), str):
            raise InputError(f"{name} row {i}: `ground_truth` must be a string, got {row.get('ground_truth')!r:.100}")
        if str(row.get("dataset", "")).lower() not in known:
            raise InputError(f"{name} row {i}: `dataset` {row.get('dataset')!r} is not a verifier "
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
    """num_samples completions for each prompt: (text, whether it ended with a stop token rather than
    at --max_new_tokens, its number of tokens). With static_width, prompts are left-padded to that
    many tokens and the KV cache is static (see cache_settings)."""
    padding = dict(padding="max_length", max_length=static_width) if static_width else dict(padding=True)
    enc = tokenizer(prompts, return_tensors="pt", add_special_tokens=False, **padding).to(device)
    sampling = dict(do_sample=True, temperature=args.temperature, top_p=args.top_p) if args.temperature > 0 \
        else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=args.max_new_tokens, num_return_sequences=args.num_samples,
                             eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                             **cache_settings(static_width is not None), **sampling)
    new_tokens = out[:, enc.input_ids.shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    # generate pads a finished completion, so tokens up to and including the first stop are its own
    stops = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device))
    ended = stops.any(dim=1)
    lengths = torch.where(ended, stops.int().argmax(dim=1) + 1, new_tokens.shape[1])
    completions = list(zip(texts, ended.tolist(), lengths.tolist()))
    return [completions[i * args.num_samples:(i + 1) * args.num_samples] for i in range(len(prompts))]


def names_local_path(name):
    """Whether a --model / --dataset value means a local path rather than a hub id ("org/name"): a
    data file suffix, a leading ".", "/" or "~", more than one "/", or a first part that is a local
    directory. Such a value that does not exist is an error now, not after minutes of hub retries."""
    parts = name.split("/")
    return name.endswith((".jsonl", ".json", ".parquet")) or name.startswith((".", "/", "~")) or len(parts) > 2 \
        or (len(parts) == 2 and os.path.isdir(parts[0]))


def demo_checkpoints_hint(stages):
    """What to pass for a missing --model: the demo's checkpoints that exist (`python sft.py` writes
    runs/sft/final, `python pipeline.py` runs/pipeline/sft/final, ...), or how to make the first."""
    found = [path for stage in stages for path in (f"runs/{stage}/final", f"runs/pipeline/{stage}/final")
             if os.path.isdir(path)]
    if found:
        return f"; found {', '.join(found)}: pass one of them with --model"
    return (f"; `python {stages[0]}.py` writes runs/{stages[0]}/final (run it first) and `python pipeline.py` "
            f"runs/pipeline/{stages[0]}/final")


def check_args(args):
    """Every flag and path, before anything heavy runs."""
    for name in ("max_new_tokens", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_rows is not None and args.max_rows < 1:
        raise InputError(f"--max_rows must be >= 1, got {args.max_rows}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise InputError(f"need --temperature >= 0 and 0 < --top_p <= 1, got {args.temperature} and {args.top_p}")
    if args.num_samples > 1 and args.temperature <= 0:
        raise InputError("--num_samples > 1 needs --temperature > 0 (greedy gives the same completion)")
    if names_local_path(args.model) and not os.path.isdir(args.model):
        raise InputError(f"--model {args.model}: no such directory"
                         f"{demo_checkpoints_hint(['sft', 'dpo', 'grpo', 'ppo'])}")
    if names_local_path(args.dataset) and not os.path.exists(args.dataset):
        raise InputError(f"--dataset {args.dataset}: no such file or directory")


def evaluate(args):
    """Scores this process's share of the rows; returns (summary dict, per-row records) on rank 0."""
    check_args(args)
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
        for i, row, prompt, generated in zip(mine[start:], batch, prompts,
                                             generate(model, tokenizer, prompts, args, stop_ids, device,
                                                      static_width)):
            records.append(score(i, row, prompt, generated))
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    return summarize(records, args.num_samples), records


def score(index, row, prompt, generated):
    """The record of one row: its completions, whether each ended (else it was cut at
    --max_new_tokens) and its length in tokens, their scores and, for IFEval rows, each
    instruction's outcome in IFEval's strict and loose modes."""
    verify = verifiers.get(row["dataset"])
    completions = [text for text, _, _ in generated]
    record = {"index": index, "prompt": prompt, "completions": completions,
              "ended": [ended for _, ended, _ in generated], "num_tokens": [n for _, _, n in generated],
              "scores": [verify(c, row["ground_truth"]) for c in completions],
              "ground_truth": row["ground_truth"], "dataset": row["dataset"]}
    if row["dataset"].lower() == "ifeval":
        record["followed"] = [{mode: instruction_results(c, row["ground_truth"], loose=mode == "loose")
                               for mode in ("strict", "loose")} for c in completions]
    return record


def ifeval_accuracies(records):
    """IFEval's four numbers (Zhou et al. 2023), over every completion of the IFEval rows:
    prompt-level (all instructions followed) and instruction-level accuracy, strict and loose."""
    followed = [f for r in records for f in r.get("followed", [])]
    if not followed:
        return {}
    summary = {}
    for mode in ("strict", "loose"):
        summary[f"ifeval/prompt_level_{mode}_acc"] = sum(all(f[mode]) for f in followed) / len(followed)
        instructions = sum(len(f[mode]) for f in followed)
        summary[f"ifeval/inst_level_{mode}_acc"] = sum(sum(f[mode]) for f in followed) / instructions
    return summary


def summarize(records, num_samples):
    """Mean score (pass@1) overall and per verifier, IFEval's prompt- and instruction-level
    accuracies, pass@k for k in 1, 2, 4, ... <= n, and the fraction of completions that ended
    (rather than being cut at --max_new_tokens) and their mean length."""
    by_verifier = defaultdict(list)
    for r in records:
        by_verifier[r["dataset"].lower()].append(r)
    summary = {"accuracy": sum(sum(r["scores"]) / num_samples for r in records) / max(1, len(records)),
               "num_rows": len(records)}
    if records and "ended" in records[0]:
        # a base model that has not learned its end-of-turn token runs every completion to the limit
        completions = max(1, len(records) * num_samples)
        summary["completions/ended"] = sum(sum(r["ended"]) for r in records) / completions
        summary["completions/mean_tokens"] = sum(sum(r["num_tokens"]) for r in records) / completions
    for name, group in sorted(by_verifier.items()):
        summary[f"accuracy/{name}"] = sum(sum(r["scores"]) / num_samples for r in group) / len(group)
    summary.update(ifeval_accuracies(records))
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
            print(f"{key:>30}: {value:.4f}" if isinstance(value, float) else f"{key:>30}: {value}")
        print(json.dumps(summary))
        print(f"wrote {output}")
    if dist.is_initialized():
        # ranks leave together: a gloo rank that tears down while its peer still holds the
        # connection can abort the peer at exit
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, use_underscores=True))
    except InputError as error:  # the message says what to fix; a traceback would only bury it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
