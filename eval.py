"""Held-out accuracy of any checkpoint: generate completions for a test split and score them with
the verifiers.

Each row has `messages` (the prompt conversation), `ground_truth` and `dataset` (the verifier's
name), the RL format that grpo.py and ppo_rlvr.py train on. Greedy decoding by default gives
pass@1 accuracy; with --temperature > 0 and --num_samples n, it reports the mean score over samples
and the unbiased pass@k of Chen et al. 2021 for each k <= n. Prints accuracy per verifier (GSM8K and
MATH accuracy as their papers report it) and, for IFEval rows, IFEval's four numbers: prompt-level
and instruction-level accuracy, strict and loose. Writes every prompt, completion and score to a
jsonl file. Generation is the RL scripts' own (the same sample() below the banner).

    python eval.py                                              # the demo's GRPO model (`python pipeline.py`)
    python eval.py --model runs/pipeline/sft/final              # another checkpoint, e.g. the demo's SFT model
    torchrun --nproc_per_node 8 eval.py --model Qwen/Qwen2.5-Math-1.5B-Instruct \\
        --dataset allenai/RLVR-GSM-MATH-IF-Mixed-Constraints --max_completion_len 1024 \\
        --temperature 0.6 --num_samples 8
"""

import ast
import dataclasses
import inspect
import json
import math
import os
import sys
import textwrap
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import tyro
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper,
                          TopPLogitsWarper)

from nanopost import tools, verifiers
from nanopost.verifiers.ifeval import instruction_results


@dataclass
class Args:
    # evaluation
    max_rows: int | None = None
    """evaluate only the first N rows"""
    temperature: float = 0.0
    """0 = greedy; > 0 samples"""
    top_p: float = 1.0
    """nucleus sampling when temperature > 0"""
    num_samples: int = 1
    """completions per prompt (needs temperature > 0 when > 1); pass@k is reported for k <= this"""
    batch_size: int = 64
    """prompts per generate call on each rank"""
    generation_cache: Literal["auto", "static", "dynamic"] = "auto"
    """KV cache: static (every prompt left-padded to the longest one, a fixed-size cache, the decode step compiled
    once on CUDA) or dynamic (grows with each token). auto = static on CUDA, dynamic elsewhere"""
    tools: list[str] | None = None
    """tools (calculator, python) of the rows that name none in a `tools` column: the model may call them, and its
    answer is its last turn (README)"""
    max_tool_calls: int = 4
    """tool calls per completion: a turn whose calls would pass it ends the completion, its calls not run"""
    output: str | None = None
    """jsonl of every prompt, completion and score (None: runs/eval/<model>__<dataset>.jsonl in the working
    directory, each path's parts joined by "-"); evaluation writes nothing into the model's directory"""
    sft_output: str | None = None
    """rejection sampling: write each prompt's best-scoring completion (of those that ended) as an SFT row
    (`messages`) to this jsonl, which sft.py trains on as it is"""
    sft_min_score: float | None = None
    """with --sft_output: only prompts whose best score is at least this (1 with a verifier: a correct answer);
    None: every prompt's best"""
    pairs_output: str | None = None
    """on-policy preference pairs: write each prompt's best and worst completions (of those that ended) as a
    `chosen` / `rejected` pair to this jsonl where their scores differ, which dpo.py trains on as it is"""
    reward_model: str | None = None
    """also score every completion with this reward model (a sequence classifier with one label, e.g.
    reward_model.py's final/), whose scores then choose --sft_output's and --pairs_output's completions; rows
    without ground_truth and dataset are then scored by it alone"""

    # common flags: the same names, in the same order, in every script
    model: str = "runs/pipeline/grpo/final"
    """hub id or local Hugging Face checkpoint (e.g. output_dir/final of any script; the demo: the GRPO model that
    `python pipeline.py` writes)"""
    dataset: str = "data/test.jsonl"
    """hub id or local .jsonl/.parquet with messages, ground_truth, dataset columns"""
    dataset_split: str = "test"
    """split of a hub dataset"""
    max_completion_len: int = 64
    """new tokens per completion (real math evals: 1024-4096)"""
    seed: int = 0
    """sampling seed (each rank uses seed + rank)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """dtype the model is loaded and run in; auto = bf16 on CUDA, fp32 on CPU"""


def pass_at_k(n, c, k):
    """Unbiased estimate of the chance that at least one of k samples out of n is correct, given c
    correct ones (Chen et al. 2021): 1 - C(n-c, k) / C(n, k)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def check_args(args):
    """Every flag and path, before anything heavy runs."""
    for name in ("max_completion_len", "num_samples", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_rows is not None and args.max_rows < 1:
        raise InputError(f"--max_rows must be >= 1, got {args.max_rows}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise InputError(f"need --temperature >= 0 and 0 < --top_p <= 1, got {args.temperature} and {args.top_p}")
    if args.num_samples > 1 and args.temperature <= 0:
        raise InputError("--num_samples > 1 needs --temperature > 0 (greedy gives the same completion)")
    check_tool_args(args)
    if names_local_path(args.model) and not os.path.isdir(args.model):
        raise InputError(f"--model {args.model}: no such directory"
                         f"{demo_checkpoints_hint(['grpo', 'ppo', 'dpo', 'sft'])}")
    if names_local_path(args.dataset) and not os.path.exists(args.dataset):
        raise InputError(f"--dataset {args.dataset}: no such file or directory")
    if args.reward_model:
        if names_local_path(args.reward_model) and not os.path.isdir(args.reward_model):
            raise InputError(f"--reward_model {args.reward_model}: no such directory")
        check_reward_model(args.reward_model)


def load_model(name, dtype, device):
    return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()


@torch.no_grad()
def score_with_reward_model(name, records, dtype, device, batch_size):
    """Adds to each record the reward model's score of each completion (`reward_model_scores`), as transformers
    reads a sequence classifier: the prompt and completion rendered with the reward model's own chat template,
    scored at the last token that is not padding (where reward_model.py trains it)."""
    tokenizer, _, _, pad_id = load_tokenizer(name)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype).to(device).eval()
    texts = [tokenizer.apply_chat_template(r["messages"] + [{"role": "assistant", "content": completion}],
                                           tokenize=False) for r in records for completion in r["completions"]]
    scores = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], add_special_tokens=False, padding=True, return_tensors="pt")
        scores += model(**batch.to(device)).logits[:, 0].float().tolist()
    for r in records:
        r["reward_model_scores"], scores = scores[:len(r["completions"])], scores[len(r["completions"]):]


def evaluate(args):
    """Scores this process's share of the rows; returns (summary dict, per-row records) on rank 0."""
    check_args(args)
    distributed = "RANK" in os.environ
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if device.type == "cpu":
        cpu_threads()
    tokenizer, _, eot_id, pad_id = load_tokenizer(args.model)
    rows = prepare_prompts(args.dataset, args.dataset_split, tokenizer, prompt_only=bool(args.reward_model),
                           default_tools=args.tools)[:args.max_rows]
    if (args.sft_output or args.pairs_output) and any(row["tools"] for row in rows):
        raise InputError("--sft_output and --pairs_output write single-turn completions as training rows: rows with "
                         "tools (--tools or a `tools` column) are not supported there")
    dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    model = load_model(args.model, dtype, device)
    # generation stops at the chat template's end-of-turn token and at the model's and the tokenizer's eos
    eos = model.generation_config.eos_token_id
    stop_ids = sorted({eot_id, tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])} - {None})
    torch.manual_seed(args.seed + rank)

    mine = list(range(rank, len(rows), world))
    # a static cache: one width for every batch, so that the compiled decode step is replayed, not recompiled
    width = max((len(rows[i]["prompt_ids"]) for i in mine), default=1) \
        if static_cache(args.generation_cache, device) else None
    records = []
    for start in range(0, len(mine), args.batch_size):
        batch = mine[start:start + args.batch_size]
        completions = sample_turns(model, [rows[i] for i in batch for _ in range(args.num_samples)], tokenizer, pad_id,
                                   stop_ids, args.max_completion_len, args.temperature, args.top_p, width,
                                   args.max_tool_calls)
        for k, i in enumerate(batch):
            records.append(score(i, rows[i], tokenizer, completions, range(k * args.num_samples,
                                                                            (k + 1) * args.num_samples)))
    if args.reward_model:
        score_with_reward_model(args.reward_model, records, dtype, device, args.batch_size)
    if distributed:
        gathered = [None] * world
        dist.all_gather_object(gathered, records)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    return summarize(records, args.num_samples), records


def score(index, row, tokenizer, completions, samples):
    """The record of one row from its completions (samples: their indices in the Completions): the completions
    (tool calls and results included), whether each ended (else it was cut at --max_completion_len), the tokens
    the model wrote, their verifier's scores (of each answer, the last turn; None for a row without a verifier)
    and, for IFEval rows, each instruction's outcome in IFEval's strict and loose modes; for a row with tools,
    each completion's TOOL_COLUMNS."""
    texts = [tokenizer.decode(completions.ids[j], skip_special_tokens=True) for j in samples]
    answers = [tokenizer.decode(completions.ids[j][completions.answer_start[j]:], skip_special_tokens=True)
               for j in samples]
    scores = [verifiers.get(row["verifier"])(answer, row["ground_truth"]) for answer in answers] \
        if row["verifier"] else None
    record = {"index": index, "prompt": tokenizer.decode(row["prompt_ids"]), "messages": row["messages"],
              "completions": texts, "ended": [completions.ended[j] for j in samples],
              "num_tokens": [sum(completions.sampled[j]) for j in samples], "scores": scores,
              "ground_truth": row["ground_truth"], "dataset": row["verifier"]}
    if row["verifier"] == "ifeval":
        record["followed"] = [{mode: instruction_results(answer, row["ground_truth"], loose=mode == "loose")
                               for mode in ("strict", "loose")} for answer in answers]
    if row["tools"]:
        record |= {name: [completions.tool_columns[name][j].item() for j in samples] for name in TOOL_COLUMNS}
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
    """Mean score (pass@1) overall and per verifier over the rows that have one, IFEval's prompt- and
    instruction-level accuracies, pass@k for k in 1, 2, 4, ... <= n, the fraction of completions that ended
    (rather than being cut at --max_completion_len) and their mean length, a reward model's mean score, and with
    tools TRL's tools/*."""
    verified = [r for r in records if r["scores"] is not None]
    by_verifier = defaultdict(list)
    for r in verified:
        by_verifier[r["dataset"].lower()].append(r)
    summary = {"accuracy": sum(sum(r["scores"]) / num_samples for r in verified) / max(1, len(verified)),
               "num_rows": len(records)}
    completions = max(1, len(records) * num_samples)
    if records and "ended" in records[0]:
        # a base model that has not learned its end-of-turn token runs every completion to the limit
        summary["completions/ended"] = sum(sum(r["ended"]) for r in records) / completions
        summary["completions/mean_tokens"] = sum(sum(r["num_tokens"]) for r in records) / completions
    for name, group in sorted(by_verifier.items()):
        summary[f"accuracy/{name}"] = sum(sum(r["scores"]) / num_samples for r in group) / len(group)
    summary.update(ifeval_accuracies(verified))
    summary.update(tool_metrics({name: sum(x for r in records for x in r.get(name, [])) for name in TOOL_COLUMNS}))
    k = 2
    while k <= num_samples:
        summary[f"pass@{k}"] = sum(pass_at_k(num_samples, sum(s == 1.0 for s in r["scores"]), k)
                                   for r in verified) / max(1, len(verified))
        k *= 2
    if records and "reward_model_scores" in records[0]:
        summary["reward_model/mean"] = sum(sum(r["reward_model_scores"]) for r in records) / completions
    return summary


def rejection_sampling(records, min_score=None):
    """From each prompt's samples, those that ended (a completion cut at --max_completion_len is no example):
    the best-scoring one as an SFT row where its score is at least min_score, and the best and the worst as a
    preference pair where their scores differ; ties go to the first sampled. Scores are the reward model's where
    the records have them, else the verifier's. Returns the SFT rows, the pairs and how many prompts went where."""
    sft_rows, pairs = [], []
    counts = dict.fromkeys(["prompts", "sft rows", "pairs", "no ended sample", "best below --sft_min_score",
                            "fewer than two ended samples", "every ended sample scored the same",
                            "several samples tied for the best"], 0)
    for r in records:
        counts["prompts"] += 1
        scores = r["reward_model_scores"] if "reward_model_scores" in r else r["scores"]
        ended = [(score, text) for score, text, stopped in zip(scores, r["completions"], r["ended"]) if stopped]
        if not ended:
            counts["no ended sample"] += 1
            continue
        (best_score, best), (worst_score, worst) = (max(ended, key=lambda x: x[0]), min(ended, key=lambda x: x[0]))
        counts["several samples tied for the best"] += sum(score == best_score for score, _ in ended) > 1
        if min_score is None or best_score >= min_score:
            sft_rows.append({"messages": r["messages"] + [{"role": "assistant", "content": best}]})
        else:
            counts["best below --sft_min_score"] += 1
        if len(ended) < 2:
            counts["fewer than two ended samples"] += 1
        elif best_score == worst_score:
            counts["every ended sample scored the same"] += 1
        else:
            pairs.append({"chosen": r["messages"] + [{"role": "assistant", "content": best}],
                          "rejected": r["messages"] + [{"role": "assistant", "content": worst}]})
    counts["sft rows"], counts["pairs"] = len(sft_rows), len(pairs)
    return sft_rows, pairs, counts


def write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def records_path(model, dataset):
    """Where the per-row records go without --output: runs/eval/<model>__<dataset>.jsonl in the working
    directory, named after both (their paths' parts joined by "-", a data file's suffix dropped), never into
    the model's directory, which may be read-only or shared."""
    def name(path):
        return "-".join(part for part in os.path.normpath(path).split(os.sep) if part not in ("", ".", ".."))

    for suffix in (".jsonl", ".json", ".parquet"):
        dataset = dataset.removesuffix(suffix)
    return os.path.join("runs", "eval", f"{name(model)}__{name(dataset)}.jsonl")


def main(args):
    summary, records = evaluate(args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        output = args.output or records_path(args.model, args.dataset)
        write_jsonl(output, records)
        for key, value in summary.items():
            print(f"{key:>30}: {value:.4f}" if isinstance(value, float) else f"{key:>30}: {value}")
        print(json.dumps(summary))
        print(f"wrote {output}")
        if args.sft_output or args.pairs_output:
            sft_rows, pairs, counts = rejection_sampling(records, args.sft_min_score)
            print("rejection sampling: " + ", ".join(f"{name} {count}" for name, count in counts.items()))
            for path, rows in ((args.sft_output, sft_rows), (args.pairs_output, pairs)):
                if path:
                    write_jsonl(path, rows)
                    print(f"wrote {path}")
    if dist.is_initialized():
        # ranks leave together: a gloo rank that tears down while its peer still holds the
        # connection can abort the peer at exit
        dist.barrier()
        dist.destroy_process_group()


# ===================== plumbing: the same code in every script that has it (tests/fix_copies.py) =====================


class InputError(ValueError):
    """A bad flag, file or data row: the message says what is wrong and what was expected, and the
    script prints it alone, without a traceback."""


class FatalError(RuntimeError):
    """A run that cannot go on (a save failed, --max_bad_steps non-finite steps in a row): the message says where
    and why, and the script prints it alone, without a traceback."""


def names_local_path(name):
    """Whether a --model / --dataset value means a local path rather than a hub id ("org/name"): a
    data file suffix, a leading ".", "/" or "~", more than one "/", or a first part that is a local
    directory. Such a value that does not exist is an error now, not after minutes of hub retries."""
    parts = name.split("/")
    return name.endswith((".jsonl", ".json", ".parquet")) or name.startswith((".", "/", "~")) or len(parts) > 2 \
        or (len(parts) == 2 and os.path.isdir(parts[0]))


def demo_checkpoints_hint(stages):
    """What to pass for a missing --model: the demo's checkpoints of these stages that exist (`python
    pipeline.py` writes runs/pipeline/sft/final, ...; `python sft.py` runs/sft/final, ...), or how to make them."""
    found = [path for stage in stages for path in (f"runs/pipeline/{stage}/final", f"runs/{stage}/final")
             if os.path.isdir(path)]
    if found:
        return f"; found {', '.join(found)}: pass {'it' if len(found) == 1 else 'one of them'} with --model"
    return (f"; `python pipeline.py` writes the demo's checkpoints (runs/pipeline/{stages[0]}/final, ...), "
            f"`python {stages[0]}.py` writes runs/{stages[0]}/final")


def load_tokenizer(name):
    """The tokenizer, its chat template's end-of-turn token (<|im_end|>, <|eot_id|>, <end_of_turn>, ...: it
    ends every assistant turn, carries loss, and generation stops at it) as text and id, and the padding id
    (never a target)."""
    tokenizer = AutoTokenizer.from_pretrained(name)
    if not tokenizer.chat_template:
        raise InputError("the tokenizer has no chat template; use a model whose tokenizer has one")
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text[text.rindex("PROBE") + len("PROBE"):]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    if not ids or ids[0] not in tokenizer.added_tokens_decoder:
        raise InputError(f"the chat template ends assistant turns with {after!r}, not a special token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids[0]
    return tokenizer, tokenizer.convert_ids_to_tokens(ids[0]), ids[0], pad_id


def check_messages(messages, where):
    """A conversation: a non-empty list of {role, content} messages; InputError names the row and message."""
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: expected a non-empty list of {{role, content}} messages, got {messages!r:.200}")
    for j, m in enumerate(messages):
        calls = m.get("tool_calls") if isinstance(m, dict) else None
        if not isinstance(m, dict) or not (isinstance(m.get("content"), str) or calls and m["content"] is None) or \
                m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InputError(f"{where}: message {j} must be {{role: system|user|assistant|tool, content: str}}, "
                             f"got {m!r:.200}")
        if calls is not None and not (m["role"] == "assistant" and isinstance(calls, list) and calls and all(
                isinstance(fn := call.get("function", call) if isinstance(call, dict) else None, dict) and
                isinstance(fn.get("name"), str) and isinstance(fn.get("arguments"), (dict, str)) for call in calls)):
            raise InputError(f"{where}: message {j}: `tool_calls` must be a non-empty list of {{function: {{name: str, "
                             f"arguments: object or JSON string}}}} in an assistant message, got {calls!r:.200}")


def load_rows(name, split):
    """A local .jsonl/.json/.parquet file, or a split of a hub dataset or local dataset directory."""
    import datasets  # imported here: it is slow to import and only needed once

    datasets.disable_progress_bars()
    if not os.path.isfile(name):
        return datasets.load_dataset(name, split=split)
    kind = "parquet" if name.endswith(".parquet") else "json"
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a file it cannot read is reported below, once
    try:
        return datasets.load_dataset(kind, data_files=name, split="train")
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


def prepare_dataset(name, split, columns, prepare, keep, dropped_because):
    """The rows of a dataset with the given columns, each turned by prepare(row, index) into a dict (which
    raises InputError naming a malformed row), as a list of those keep(row) accepts. Each node's local rank 0
    prepares first, so that the node's other ranks read its datasets cache (one per node, or one shared)."""
    rows = load_rows(name, split)
    missing = set(columns) - set(rows.column_names)
    if missing:
        raise InputError(f"{name}: missing columns {sorted(missing)}, found {rows.column_names}")
    for turn in (0, 1):
        if (os.environ.get("LOCAL_RANK", "0") == "0") == (turn == 0):
            rows = rows.map(prepare, with_indices=True, remove_columns=rows.column_names, desc=f"preparing {name}")
        if dist.is_initialized():
            dist.barrier()
    kept = [row for row in rows.to_list() if keep(row)]
    if int(os.environ.get("RANK", "0")) == 0 and len(kept) < len(rows):
        print(f"{name}: dropped {len(rows) - len(kept)} of {len(rows)} rows, which {dropped_because}")
    if not kept:
        raise InputError(f"{name}: no usable row: all {len(rows)} {dropped_because}")
    return kept


# ---------------------------------------------------------------------------------------------
# Checkpoints: output_dir/step_N (sharded, resumable)


def cpu_threads():
    """On CPU, unless OMP_NUM_THREADS says otherwise, this process's threads: one core fewer than the
    machine's, shared by the node's ranks. With a thread on every core, another busy process slows every
    step several-fold (each parallel region waits for its slowest thread)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() - 1) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))


def prose_help(args_class):
    """args_class with each flag's help made of its docstring as one paragraph (tyro keeps a docstring's line
    breaks, which cut --help's sentences where the source wraps them), and --resume, where there is one, taking
    no value (True) or `auto`: tyro would want a value for bool | Literal["auto"]."""
    body = ast.parse(textwrap.dedent(inspect.getsource(args_class))).body[0].body
    helps = {field.target.id: " ".join(doc.value.value.split()) for field, doc in zip(body, body[1:])
             if isinstance(field, ast.AnnAssign) and isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)}

    def resume_value(words):
        if words not in ([], ["auto"]):
            raise ValueError(f"--resume takes no value or `auto`, got {' '.join(words)!r}")
        return words[0] if words else True

    parsers = {"resume": [tyro.constructors.PrimitiveConstructorSpec(
        nargs="*", metavar="[auto]", instance_from_str=resume_value,
        is_instance=lambda value: value in (False, True, "auto"), str_from_instance=lambda value: [str(value)])]}
    return dataclasses.make_dataclass(args_class.__name__, [
        (f.name, Annotated[(f.type, tyro.conf.arg(help=helps[f.name]), *parsers.get(f.name, []))],
         dataclasses.field(default=f.default))
        for f in dataclasses.fields(args_class)])


def launch(main, args_class):
    """Parses the flags and runs main. An InputError or FatalError ends the run with its message alone, not a
    traceback; under torchrun the message also goes to the worker's error file, so that torchrun's failure report,
    which it prints last, names it."""
    try:
        main(tyro.cli(prose_help(args_class), use_underscores=True))
    except (InputError, FatalError) as error:  # the message says what to fix; a traceback would only bury it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        if "TORCHELASTIC_ERROR_FILE" in os.environ:
            with open(os.environ["TORCHELASTIC_ERROR_FILE"], "w") as f:
                json.dump({"message": f"error: {error}", "timestamp": int(time.time())}, f)
        sys.exit(1)


def check_rl_row(row, where, verified=True):
    """A usable RL row: a prompt conversation that does not end with an assistant turn, a string ground truth,
    and in `dataset` a registered verifier that accepts that ground truth (unless `verified` is False: a
    reward model scores rows without both); InputError names the row."""
    check_messages(row.get("messages"), where)
    if row["messages"][-1]["role"] == "assistant":
        raise InputError(f"{where}: the prompt ends with an assistant message; the policy writes that turn")
    if row.get("ground_truth") is None and row.get("dataset") is None:
        if verified:
            raise InputError(f"{where}: no `ground_truth` and `dataset` for a verifier to score it (a prompt-only "
                             "row needs --reward_model)")
        return
    if not isinstance(row.get("ground_truth"), str):
        raise InputError(f"{where}: `ground_truth` must be a string, got {row.get('ground_truth')!r:.200}")
    if not isinstance(row.get("dataset"), str):
        raise InputError(f"{where}: `dataset` must name a verifier, got {row.get('dataset')!r:.200}")
    try:
        verifiers.get(row["dataset"])("", row["ground_truth"])  # a malformed ground truth raises here
    except (KeyError, ValueError) as e:
        raise InputError(f"{where}: {e.args[0]}") from None


def check_tool_names(names, where, known):
    """A list of names of tools among `known` (nanopost.tools.names(), case-insensitive); InputError names `where`."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise InputError(f"{where} must be a list of tool names ({', '.join(known)}), got {names!r:.200}")
    for name in names:
        if name.lower() not in known:
            raise InputError(f"{where}: no tool named {name!r}; the tools are: {', '.join(known)}")


def check_tool_args(args):
    """--tools names registered tools, --max_tool_calls >= 1."""
    if args.tools is not None:
        check_tool_names(args.tools, "--tools", tools.names())
    if args.max_tool_calls < 1:
        raise InputError(f"--max_tool_calls must be >= 1, got {args.max_tool_calls}")


def tool_template_problem(tokenizer):
    """Why the chat template cannot show the model tools, or render calls and results in the format that
    nanopost.tools parses (tools.check_chat_template's message); None if it can."""
    try:
        tools.check_chat_template(tokenizer)
    except ValueError as e:
        return str(e)
    return None


def prepare_prompts(name, split, tokenizer, max_prompt_len=None, prompt_only=False, default_tools=None):
    """Rows {messages, prompt_ids, ground_truth, verifier, tools} of an RL dataset (`messages`: the prompt,
    `ground_truth`, `dataset`: the verifier; with prompt_only, rows may have neither, and a reward model scores
    them: verifier ""; optionally `tools`, the names of the tools the row may call, which the chat template shows
    the model), those whose templated prompt fits in max_prompt_len (None: all). default_tools (--tools): the tools
    of the rows that name none. A malformed row stops the run with its index, and so does the first row with tools
    if the chat template has no tool-call format or a reward model scores the run."""
    # the tools' JSON schemas and what the template lacks, as plain data: datasets hashes prepare to cache its rows
    schemas, problem = {n: tools.schema(n) for n in tools.names()}, tool_template_problem(tokenizer)

    def prepare(row, index):
        check_rl_row(row, f"{name} row {index}", verified=not prompt_only)
        if row.get("tools") is not None:
            check_tool_names(row["tools"], f"{name} row {index}: `tools`", list(schemas))
        names = [n.lower() for n in (row["tools"] if row.get("tools") is not None else default_tools or [])]
        if names and problem:
            raise InputError(f"{name} row {index} has tools: {problem}")
        if names and prompt_only:
            raise InputError(f"{name} row {index} has tools, and a reward model scores one assistant turn, not a "
                             "conversation with tool calls: use tools with verifiers only")
        text = tokenizer.apply_chat_template(row["messages"], tools=[schemas[n] for n in names] or None,
                                             tokenize=False, add_generation_prompt=True)
        return {"messages": row["messages"], "prompt_ids": tokenizer(text, add_special_tokens=False).input_ids,
                "ground_truth": row.get("ground_truth"), "verifier": (row.get("dataset") or "").lower(),
                "tools": names}

    return prepare_dataset(name, split, ["messages"], prepare,
                           lambda row: max_prompt_len is None or len(row["prompt_ids"]) <= max_prompt_len,
                           f"have a prompt longer than --max_prompt_len={max_prompt_len}")


def check_reward_model(name):
    """--reward_model must be a sequence classifier with one label (reward_model.py's final/, or a hub reward
    model), as its config says, before anything is loaded."""
    config = AutoConfig.from_pretrained(name)
    architectures = config.architectures or []
    if config.num_labels != 1 or not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise InputError(f"--reward_model {name}: not a sequence classifier with one label (architectures "
                         f"{architectures}, {config.num_labels} labels); reward_model.py trains one")


def static_cache(generation_cache, device):
    """Whether to sample with a static KV cache: --generation_cache, where auto means on CUDA."""
    return generation_cache == "static" or (generation_cache == "auto" and device.type == "cuda")


class SamplerLogprobs(LogitsProcessor):
    """generate's logits processor when sampling: it applies the temperature, then top-p, as generate's own
    warpers would (those are left out), and records the log-prob of each sampled token under that final
    distribution, the one it was drawn from. One step at a time: [batch, vocab] is held for one step."""

    def __init__(self, temperature, top_p):
        self.warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)] * (temperature != 1.0) +
                                           [TopPLogitsWarper(top_p)] * (top_p < 1.0))
        self.logprobs, self.last = [], None

    def __call__(self, input_ids, scores):
        if self.last is not None:  # the token drawn at the previous step is the last input now
            self.record(input_ids[:, -1])
        scores = self.warpers(input_ids, scores)
        # the scores (fp32, generate's) and their log-normalizer: not log_softmax, which would copy [batch, vocab]
        # and whose fp32 CPU kernel is off by about 1e-5 per token over a 262k vocabulary
        self.last = scores, torch.logsumexp(scores.float(), -1)
        return scores

    def record(self, tokens):
        scores, normalizer = self.last
        self.logprobs.append(scores.float().gather(1, tokens[:, None]).squeeze(1) - normalizer)


def copies_in_a_row(prompts):
    """k when the prompts are runs of k equal prompts in a row (a group's samples, eval's --num_samples), else 1."""
    k = next((i for i, p in enumerate(prompts) if p != prompts[0]), len(prompts))
    return k if len(prompts) % k == 0 and all(prompts[i] == prompts[i - i % k] for i in range(len(prompts))) else 1


@torch.no_grad()
def sample(generator, prompts, pad_id, stop_ids, max_new_tokens, temperature=0.0, top_p=1.0, width=None):
    """Completions of prompts (token id lists) with a KV cache, whatever the model's config says: greedy at
    temperature 0, else drawn at `temperature` from the smallest set of tokens holding top_p of the
    probability. Prompts are left-padded to the longest, or to `width`, which makes the cache static: a
    fixed size, so that on CUDA generate compiles the decode step once (torch.compile) and replays it.
    With the dynamic cache, k copies of a prompt in a row are read once: the model runs on each distinct
    prompt (all but its last token) and its KV cache is repeated for the copies, from which generate goes on.
    Returns each completion's token ids, up to and including its first stop token; whether it stopped
    (else it was cut at max_new_tokens); and when sampling, each token's log-prob under the distribution
    it was drawn from (temperature and top-p applied), else None."""
    length = width or max(len(p) for p in prompts)
    device = generator.device
    ids = torch.full((len(prompts), length), pad_id, device=device)
    mask = torch.zeros((len(prompts), length), dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        ids[b, length - len(p):] = torch.tensor(p, device=device)
        mask[b, length - len(p):] = 1
    sampler = SamplerLogprobs(temperature, top_p) if temperature > 0 else None
    # temperature 1, top_k 0 and top_p 1 explicitly: generate's own warpers stay out (unset, top_k would be 50)
    sampling = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0) if sampler else dict(do_sample=False)
    config = GenerationConfig(max_new_tokens=max_new_tokens, eos_token_id=stop_ids, pad_token_id=pad_id,
                              use_cache=True, **({"cache_implementation": "static"} if width else {}), **sampling)
    prefilled, copies = {}, copies_in_a_row(prompts)
    if width is None and copies > 1 and length > 1:
        # positions as generate numbers left-padded rows; transformers renamed past_key_values to cache (5.2x)
        first = slice(None, None, copies)
        positions = (mask[first].cumsum(-1) - 1).masked_fill(mask[first] == 0, 1)
        cache_arg = "cache" if "cache" in inspect.signature(generator.forward).parameters else "past_key_values"
        prefilled = {cache_arg: DynamicCache(config=generator.config)}
        generator(input_ids=ids[first, :-1], attention_mask=mask[first, :-1], position_ids=positions[:, :-1],
                  use_cache=True, **prefilled)
        prefilled[cache_arg].batch_repeat_interleave(copies)
    out = generator.generate(input_ids=ids, attention_mask=mask, generation_config=config, **prefilled,
                             logits_processor=LogitsProcessorList([sampler] if sampler else []))[:, length:]
    if sampler:
        sampler.record(out[:, -1])
        logprobs = torch.stack(sampler.logprobs, 1).tolist()
    completions, ended, completion_logprobs = [], [], []
    for b, tokens in enumerate(out.tolist()):
        end = next((i + 1 for i, token in enumerate(tokens) if token in stop_ids), None)
        completions.append(tokens[:end])
        ended.append(end is not None)
        completion_logprobs.append(logprobs[b][:end] if sampler else None)
    return completions, ended, completion_logprobs if sampler else None


# per completion: its row has tools; the calls run, and failed; 1 if it ended at --max_tool_calls; the calls' seconds;
# the tokens their results inserted
TOOL_COLUMNS = ("tool_offered", "tool_calls", "tool_failures", "tool_limit", "tool_seconds", "tool_tokens")


@dataclass
class Completions:
    """sample_turns' completions of a batch of prompts: one entry per prompt in each list."""

    ids: list
    """every token after the prompt: the model's turns and, between them, what the tools' results inserted (the
    tool messages and the header of the model's next turn, as the chat template renders them)"""
    sampled: list
    """a bool per token of ids: whether the model sampled it (only these have loss, advantage and log-probs)"""
    logprobs: list | None
    """when sampling, the log-prob each sampled token was drawn with (sample()), in order; None when greedy"""
    ended: list
    """whether it ended with its stop token: an answer, or a turn whose calls would pass max_tool_calls; else it was
    cut at max_new_tokens (also when a tool's results left no room for a next turn)"""
    answer_start: list
    """where its last model turn, the answer that verifiers score, begins in ids"""
    tool_columns: dict
    """{name: [n] float64} for each of TOOL_COLUMNS"""
    tool_seconds: float
    """wall-clock time spent running tools"""

    def answers(self):
        return [ids[start:] for ids, start in zip(self.ids, self.answer_start)]


@torch.no_grad()
def sample_turns(generator, rows, tokenizer, pad_id, stop_ids, max_new_tokens, temperature=0.0, top_p=1.0, width=None,
                 max_tool_calls=1):
    """Completions (a Completions) of rows (their prompt_ids, and the names of the tools each may call), in rounds of
    sample(): where a turn ends (its stop token) with calls of its row's tools (nanopost.tools' format), the calls
    run, all of a round's at once, their results are appended (tools.tool_response_ids) and the completion goes on
    in the next round, sampled from its prompt and everything after it. It ends with a turn without calls, with a
    turn whose calls would make more than max_tool_calls in all (they do not run), or when max_new_tokens, which
    counts every token after the prompt, tool results included, runs out. The first round is sample() of the
    prompts as given (rows without tools end there); later rounds sample the completions still going with a
    dynamic cache (a static one would recompile for each round's number of them)."""
    n = len(rows)
    ids, sampled, ended, answer_start = [[] for _ in rows], [[] for _ in rows], [False] * n, [0] * n
    logprobs = [[] for _ in rows] if temperature > 0 else None
    columns = {name: [0.0] * n for name in TOOL_COLUMNS}
    columns["tool_offered"] = [float(bool(row["tools"])) for row in rows]
    going, seconds, round_width = list(range(n)), 0.0, width
    while going:
        budgets = [max_new_tokens - len(ids[b]) for b in going]
        turns, stopped, turn_logprobs = sample(generator, [rows[b]["prompt_ids"] + ids[b] for b in going], pad_id,
                                               stop_ids, max(budgets), temperature, top_p, round_width)
        calls, round_width = {}, None
        for k, b in enumerate(going):
            turn = turns[k][:budgets[k]]
            answer_start[b], ended[b] = len(ids[b]), stopped[k] and len(turns[k]) <= budgets[k]
            ids[b] += turn
            sampled[b] += [True] * len(turn)
            if logprobs is not None:
                logprobs[b] += turn_logprobs[k][:len(turn)]
            found = tools.parse_tool_calls(tokenizer.decode(turn[:-1])) if ended[b] and rows[b]["tools"] else []
            if columns["tool_calls"][b] + len(found) > max_tool_calls:
                columns["tool_limit"][b] = 1.0
            elif found:
                calls[b] = found
        jobs = [(b, call) for b, found in calls.items() for call in found]
        if jobs:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(max_workers=min(16, len(jobs))) as pool:  # they wait on tools, not on the GIL
                results = iter(list(pool.map(lambda job: tools.run_tool_call(job[1], allowed=rows[job[0]]["tools"]),
                                             jobs)))
            seconds += time.perf_counter() - t0
        going = []
        for b, found in calls.items():
            done = [next(results) for _ in found]
            columns["tool_calls"][b] += len(done)
            columns["tool_failures"][b] += sum(not result.ok for result in done)
            columns["tool_seconds"][b] += sum(result.seconds for result in done)
            inserted = tools.tool_response_ids(tokenizer, [result.content for result in done])
            if len(ids[b]) + len(inserted) < max_new_tokens:  # room for the results and a next turn
                ids[b] += inserted
                sampled[b] += [False] * len(inserted)
                columns["tool_tokens"][b] += len(inserted)
                going.append(b)
            else:
                ended[b] = False
    return Completions(ids, sampled, logprobs, ended, answer_start,
                       {name: torch.tensor(values, dtype=torch.float64) for name, values in columns.items()}, seconds)


def tool_metrics(sums, seconds=None):
    """TRL's tools/* metrics from the sums of TOOL_COLUMNS over a batch's completions ({} when no row had tools):
    calls per completion of a row with tools, the fraction of calls that failed, of those completions that ended
    at --max_tool_calls, and seconds per call; with `seconds`, the wall-clock time spent running tools."""
    sums = {name: float(sums[name]) for name in TOOL_COLUMNS}
    if not sums["tool_offered"]:
        return {}
    metrics = {"tools/call_frequency": sums["tool_calls"] / sums["tool_offered"],
               "tools/failure_frequency": sums["tool_failures"] / max(sums["tool_calls"], 1),
               "tools/loop_exhausted_frac": sums["tool_limit"] / sums["tool_offered"],
               "tools/latency_s": sums["tool_seconds"] / max(sums["tool_calls"], 1)}
    return metrics | ({"perf/time_tools": seconds} if seconds is not None else {})


if __name__ == "__main__":
    launch(main, Args)
