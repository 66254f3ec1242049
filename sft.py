"""Supervised finetuning (instruction tuning) of a causal LM on chat conversations.

The loss is the negative log-likelihood of every assistant turn (its content and the template's
end-of-turn token) given everything before it; system and user turns are context only. Token
losses are summed over the global batch (all micro-batches, all ranks) and divided by its number
of loss tokens, so gradient accumulation and data parallelism give the same update as one big
batch. Each global batch is sorted by length before it is cut into micro-batches, and each
micro-batch's conversations are packed into one row with attention confined to each (varlen_attn on
CUDA), so no compute goes to padding. Log-probs come from nanopost.kernels: the head never
materializes [tokens, vocab] logits, and runs only on loss tokens.

References: Ouyang et al. 2022 (InstructGPT, SFT stage); Lambert et al. 2024 (Tulu 3, the recipe
whose data format and hyperparameters the defaults follow).

    python sft.py                                  # the built-in demo: tiny model, data/, CPU ok
    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-0.5B \\
        --dataset allenai/tulu-3-sft-mixture --max_seq_len 4096 --lr 2e-5 \\
        --per_device_batch_size 4 --grad_accum_steps 4 --num_epochs 2 --gradient_checkpointing

Read top to bottom: flags, data, model wrapper, main (the training loop). Below the banner, the
plumbing every script shares, the same code in each (tests/fix_copies.py).
"""

import ast
import dataclasses
import inspect
import json
import math
import os
import pickle
import re
import shutil
import signal
import socket
import sys
import textwrap
import time
from dataclasses import asdict, dataclass
from typing import Annotated, Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import tyro
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import distribute_tensor
from tqdm import tqdm
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nanopost import tools
from nanopost.kernels import linear_logprobs
from nanopost.kernels.packed_attention import packed_attention

AttentionInterface.register("packed", packed_attention)


@dataclass
class Args:
    # common flags: the same names, in the same order, in every script
    model: str = "assets/tiny"
    """hub id or local dir; a dir holding only a config is initialized randomly"""
    dataset: str = "data/sft_train.jsonl"
    """hub id or local .jsonl/.parquet with a `messages` column (Tulu 3 format)"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    eval_dataset: str | None = "data/sft_eval.jsonl"
    """same format as --dataset; its loss is logged as eval/loss (hub datasets: the 'test' split)"""
    output_dir: str = "runs/sft"
    """where metrics.jsonl, step_N/ checkpoints and final/ (Hugging Face format) go"""
    lr: float = 1e-3
    """peak learning rate (the demo's tiny model: 1e-3, 3e-3 lands anywhere between 45% and 80% held-out accuracy
    depending on the seed; Tulu 3 8B used 5e-6, 0.5B models 2e-5)"""
    max_steps: int | None = None
    """optimizer steps to run; overrides --num_epochs"""
    num_epochs: int = 4
    """passes over the dataset (ignored when --max_steps is set; Tulu 3: 2)"""
    per_device_batch_size: int = 32
    """conversations per micro-batch on each rank"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step; global batch = this x per_device_batch_size x world size"""
    max_tokens_per_micro_batch: int | None = None
    """also cap micro-batches at this many tokens (more micro-batches per step; the same global batch)"""
    max_seq_len: int = 256
    """conversations are truncated to this many tokens (real runs: 2048-4096)"""
    warmup_ratio: float = 0.03
    """fraction of steps with linear warmup from 0"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "cosine"
    """decay after warmup, to 0 at the last step"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (0 disables)"""
    max_bad_steps: int = 5
    """a step whose loss or gradient norm is not finite is skipped (no weight or optimizer state changes; the metric
    skipped_steps counts them); after this many in a row the run saves a step_N and stops"""
    seed: int = 1
    """seeds init, data order and everything random"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """compute dtype (weights, gradient reduction and optimizer stay fp32); auto = bf16 on CUDA, fp32 on CPU"""
    save_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """dtype of final/'s weights. auto = the source model's (the dtype its config names; fp32 if none)"""
    attn_implementation: str = "sdpa"
    """attention kernel where sequences are not packed: sdpa, eager, or flash_attention_2 where installed"""
    padding_free: bool = True
    """pack each micro-batch into one row, attention confined to each sequence (--no_padding_free: pad rows)"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in backward (less memory, about 30% more compute)"""
    hsdp: bool = False
    """shard the model within each node and replicate it across nodes (without it: sharded over all ranks)"""
    save_every: int = 0
    """save a resumable step_N every N steps (0: only on SIGTERM / Ctrl-C, which then exit with status 143 / 130)"""
    save_total_limit: int | None = None
    """keep the newest N step_N checkpoints, deleting older ones once a newer one is complete (None: keep all)"""
    resume: bool | Literal["auto"] = False
    """continue from the latest step_N in output_dir (one must exist); `--resume auto`: if any, else start afresh"""
    overwrite_output_dir: bool = False
    """start afresh in an output_dir that holds an earlier run (deletes its metrics.jsonl, step_N/, final/)"""
    eval_every: int = 0
    """evaluate before the first step and every N steps (0: only at the end)"""
    log_every: int = 1
    """log metrics every N steps"""
    track: bool = False
    """also log to Weights & Biases"""
    wandb_project: str = "nanopost"
    """wandb project name"""
    run_name: str | None = None
    """wandb run name (None: output_dir's name)"""


# ---------------------------------------------------------------------------------------------
# Data: chat-template tokenization with a loss mask on assistant turns


def tokenize_conversation(tokenizer, messages, eot_text, max_seq_len, where, tool_schemas=None):
    """Token ids of the templated conversation and labels that equal the ids on assistant tokens
    (content, tool calls + end-of-turn token) and -100 elsewhere (tool results too). Assistant spans are found by
    rendering each prefix of the conversation, so any prefix-stable chat template works. tool_schemas: the JSON
    schemas of the tools the template shows the model (nanopost.tools.schema)."""
    check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: no assistant message, so nothing to learn")
    text = tokenizer.apply_chat_template(messages, tools=tool_schemas, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise InputError(f"{where}: the conversation starts with an assistant message")
        prompt = tokenizer.apply_chat_template(messages[:i], tools=tool_schemas, tokenize=False,
                                               add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], tools=tool_schemas, tokenize=False)
        if not (upto.startswith(prompt) and text.startswith(upto)):
            raise InputError(f"{where}: the chat template renders turn {i} differently in a longer conversation "
                             "(not prefix-stable), so assistant tokens cannot be located")
        end = upto.rfind(eot_text, len(prompt))
        if end < 0:
            raise InputError(f"{where}: assistant turn {i} does not end with {eot_text!r}")
        spans.append((len(prompt), end + len(eot_text)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc.input_ids[:max_seq_len]
    labels = [tok if any(s <= start < e for s, e in spans) else -100
              for tok, (start, _) in zip(ids, enc.offset_mapping)]
    return ids, labels


def tokenize_dataset(name, split, tokenizer, eot_text, max_seq_len):
    """Rows {input_ids, labels, n_loss} of a `messages` dataset (optionally `tools`: the names of the tools it
    offers); a malformed row, or one with tools where the chat template has no tool-call format, stops the run."""
    # the tools' JSON schemas and what the template lacks, as plain data: datasets hashes tokenize to cache its rows
    schemas, problem = {n: tools.schema(n) for n in tools.names()}, tool_template_problem(tokenizer)

    def tokenize(row, index):
        where, names = f"{name} row {index}", row.get("tools")
        check_tool_row(row, where, list(schemas), problem)
        ids, labels = tokenize_conversation(tokenizer, row["messages"], eot_text, max_seq_len, where,
                                            [schemas[n.lower()] for n in names or []] or None)
        # the loss at position t predicts token t+1, so the first token never counts
        return {"input_ids": ids, "labels": labels, "n_loss": sum(x != -100 for x in labels[1:])}

    return prepare_dataset(name, split, ["messages"], tokenize, lambda row: row["n_loss"] > 0,
                           f"have no assistant token within --max_seq_len={max_seq_len}")


def micro_batches(rows, indices, lengths, rank, world, per_device, max_tokens, packed, pad_id):
    """This rank's micro-batches of a global batch (see collate). Rows are sorted by length and cut, in
    that order, into micro-batches of at most per_device rows and at most max_tokens tokens, so that
    a micro-batch holds similar lengths; the micro-batches are dealt out to the ranks in turn."""
    ordered = sorted(indices, key=lambda i: -lengths[i])

    def tokens(chunk):  # what a forward of these rows processes: their tokens, or rows x longest (padded)
        return sum(lengths[i] for i in chunk) if packed else len(chunk) * lengths[chunk[0]]

    chunks = chunks_of(ordered, tokens, per_device, max_tokens)
    chunks = split_largest(chunks, -(-len(chunks) // world) * world)  # as many on every rank (FSDP's collectives)
    return [collate([(rows[i]["input_ids"], rows[i]["labels"][1:] + [-100]) for i in chunk], packed, pad_id)
            for chunk in chunks[rank::world]]


# ---------------------------------------------------------------------------------------------
# Model


class PolicyLogprobs(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that one forward returns the log-probs of the targets. The head
    runs here, inside the FSDP root module, so FSDP unshards its weight (tied to the embedding for Qwen)
    and reduces its gradient."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, targets, **inputs):
        hidden = self.lm.get_decoder()(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        keep = targets.flatten() != -100
        logp, _ = linear_logprobs(hidden[keep], self.lm.get_output_embeddings().weight, targets.flatten()[keep])
        return logp


# ---------------------------------------------------------------------------------------------


def check_args(args):
    """Every flag and path, before anything heavy runs."""
    check_common_args(args, at_least_one=["max_seq_len"])


def main(args):
    check_args(args)
    run = Run(args, "sft")
    tokenizer, eot_text, eot_id, pad_id = load_tokenizer(args.model)
    train = tokenize_dataset(args.dataset, args.dataset_split, tokenizer, eot_text, args.max_seq_len)
    evals = tokenize_dataset(args.eval_dataset, "test", tokenizer, eot_text, args.max_seq_len) \
        if args.eval_dataset else None
    lengths = [len(row["input_ids"]) for row in train]
    eval_lengths = [len(row["input_ids"]) for row in evals or []]
    batch_size = args.per_device_batch_size * args.grad_accum_steps * run.world
    total_steps = run.total_steps(len(train), batch_size, "conversations")

    model = run.build(PolicyLogprobs, args.model, gradient_checkpointing=args.gradient_checkpointing)
    optimizer, scheduler = adamw(model, args.lr, args, total_steps)
    start_step, _ = run.begin({"model": (model, optimizer)}, [scheduler], total_steps,
                              {"seed": args.seed, "global_batch_size": batch_size})

    def evaluate():
        """Mean token NLL over the eval set. Each rank takes every world-th batch; every rank runs the same
        number of forwards (FSDP's collectives need it), a rank past the end re-runs a batch with weight 0."""
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=run.device)
        per_rank = args.per_device_batch_size
        with torch.no_grad():
            for start in range(0, len(evals), run.world * per_rank):
                first = start + run.rank * per_rank
                weight = float(first < len(evals))
                chunk = list(range(first, min(first + per_rank, len(evals)))) if weight else [0]
                batch, = micro_batches(evals, chunk, eval_lengths, 0, 1, len(chunk), None, args.padding_free, pad_id)
                logp = model(**to_device(batch, run.device))
                totals += weight * torch.stack([-logp.sum().double(), torch.tensor(logp.numel(), device=run.device)])
        dist.all_reduce(totals)
        model.reshard()  # a forward without backward leaves the root unsharded
        model.train()
        return {"eval/loss": (totals[0] / totals[1]).item()}

    if evals and args.eval_every and start_step == 0:
        run.log(evaluate(), 0)
    step = evaluated = start_step
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        indices = global_batch(step - 1, len(train), batch_size, args.seed)
        n_loss_tokens = sum(train[i]["n_loss"] for i in indices)
        loss_sum = torch.zeros((), dtype=torch.float64, device=run.device)
        for batch in micro_batches(train, indices, lengths, run.rank, run.world, args.per_device_batch_size,
                                   args.max_tokens_per_micro_batch, args.padding_free, pad_id):
            logp = model(**to_device(batch, run.device))
            # FSDP averages gradients over ranks; scaling by world makes them a global-batch sum
            (-logp.sum() * run.world / n_loss_tokens).backward()
            loss_sum += -logp.detach().sum().double()
        [grad_norm], [lr] = optimizer_step(run, loss_sum, args.max_grad_norm, (model, optimizer, scheduler))
        dist.all_reduce(loss_sum)
        if run.log_due(step):
            n_tokens, seconds = sum(lengths[i] for i in indices), time.perf_counter() - t0
            metrics = {"loss": loss_sum.item() / n_loss_tokens, "grad_norm": grad_norm.item(), "learning_rate": lr,
                       "epoch": step * batch_size / len(train),
                       **throughput(run, model, n_tokens, len(indices), seconds)}
            if evals and every(args.eval_every, step):
                metrics |= evaluate()
                evaluated = step
            run.log(metrics, step, loss=metrics["loss"], lr=lr)
        run.end_step(step)
    if evals and evaluated != step:
        run.log(evaluate(), step, echo=True)
    run.finish(model, tokenizer, eot_id)


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


def check_common_args(args, at_least_one=(), positive=(), models=(), demo_stages=()):
    """The common flags and paths, and the script's own flags that must be >= 1 or > 0 or name a model dir,
    before anything heavy runs. demo_stages: the demo scripts whose output --model defaults to, for the hint
    when it is missing."""
    for name in ("per_device_batch_size", "grad_accum_steps", "num_epochs", "log_every", "max_bad_steps",
                 *at_least_one):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("max_steps", "max_tokens_per_micro_batch", "save_total_limit"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    for name in ("save_every", "eval_every"):
        if getattr(args, name) < 0:
            raise InputError(f"--{name} must be >= 0, got {getattr(args, name)}")
    for name in ("lr", *positive):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.warmup_ratio < 1:
        raise InputError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if names_local_path(args.model) and not os.path.isdir(args.model):
        hint = demo_checkpoints_hint(demo_stages) if demo_stages else ""
        raise InputError(f"--model {args.model}: no such directory{hint}")
    for name in models:
        if getattr(args, name) and names_local_path(getattr(args, name)) and not os.path.isdir(getattr(args, name)):
            raise InputError(f"--{name} {getattr(args, name)}: no such directory")
    for flag, name in (("--dataset", args.dataset), ("--eval_dataset", args.eval_dataset)):
        if name and names_local_path(name) and not os.path.exists(name):
            raise InputError(f"{flag} {name}: no such file or directory")
    if args.resume and args.overwrite_output_dir:
        raise InputError("--resume continues the run in --output_dir and --overwrite_output_dir replaces it: pass one")
    checkpoint, earlier = latest_checkpoint(args.output_dir), earlier_run(args.output_dir)
    if args.resume is True and checkpoint is None:
        raise InputError(f"--resume: no step_N checkpoint in {args.output_dir} (`--resume auto` starts a run where "
                         "there is none)")
    if earlier and not args.resume and not args.overwrite_output_dir:
        raise InputError(f"--output_dir {args.output_dir} holds an earlier run ({', '.join(earlier)}): pass --resume "
                         "to continue it, --overwrite_output_dir to replace it, or another --output_dir")
    # with nothing to continue, --resume auto starts afresh where a run died before its first save, but never
    # deletes a finished run's final/
    if args.resume == "auto" and checkpoint is None and "final" in earlier:
        raise InputError(f"--resume auto: --output_dir {args.output_dir} holds a finished run (final) and no step_N to "
                         "continue from: pass --overwrite_output_dir to replace it, or another --output_dir")


class Run:
    """This process's part in the job, and what every training loop asks of it. torchrun sets RANK and
    WORLD_SIZE (global) and LOCAL_RANK, LOCAL_WORLD_SIZE (within the node), on one node or several; a plain
    `python X.py` is a world of one. Rank 0 keeps the log: a progress bar, output_dir/metrics.jsonl and, with
    --track, wandb. SIGTERM and Ctrl-C ask the loop to save a resumable step_N after the current step. A step whose
    loss or gradient norm is not finite is skipped on every rank alike and counted (skipped_steps)."""

    def __init__(self, args, name):
        self.args, self.name = args, name
        if "RANK" not in os.environ:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(port))
        store = attempt_store()
        joined = {"store": store, "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])} \
            if store else {}
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device, **joined)
        else:
            self.device = torch.device("cpu")
            dist.init_process_group("gloo", **joined)
            cpu_threads()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mesh = fsdp_mesh(args.hsdp, self.device)
        self.compute_dtype = torch.bfloat16 if args.precision == "bf16" or (
            args.precision == "auto" and self.device.type == "cuda") else torch.float32
        self.signals = stop_on_signals(self.rank)
        # whether this run continues a step_N (--resume auto: if there is one), decided by rank 0 for every rank;
        # self.args.resume says whether it does
        found = [latest_checkpoint(args.output_dir) if args.resume and self.rank == 0 else None]
        dist.broadcast_object_list(found)
        self.checkpoint, self.resume_auto = found[0], args.resume == "auto"
        self.args = dataclasses.replace(args, resume=self.checkpoint is not None)
        self.step = self.skipped_steps = self.bad_in_a_row = 0  # optimizer steps; skipped ones, in all and in a row
        self.bad_stop = None  # once --max_bad_steps non-finite steps came in a row: what they were
        torch.manual_seed(args.seed)  # the random init of a model given by its config alone (on rank 0), and all else

    def total_steps(self, n_rows, batch_size, what, steps_per_batch=1):
        """Optimizer steps of the run: --max_steps, or --num_epochs passes over n_rows in global batches of
        batch_size, each trained on for steps_per_batch steps."""
        if n_rows < batch_size:
            raise InputError(f"{self.args.dataset} has {n_rows} usable {what}, fewer than one step's {batch_size}")
        return self.args.max_steps or self.args.num_epochs * (n_rows // batch_size) * steps_per_batch

    def build(self, wrapper, name, full=None, dtype=torch.float32, dropout=True, gradient_checkpointing=False,
              auto_class=AutoModelForCausalLM, free_full=True, **config):
        """wrapper(the model `name`), a module holding it as .lm that runs its head, sharded with FSDP2 over each
        decoder layer, then over the root (so FSDP unshards the head's weight and reduces its gradient), its
        parameters stored in `dtype` and computed in the compute dtype. Built on the meta device, then filled
        with the weights of `full`, rank 0's whole model (default: what load_full reads), each rank receiving
        only its shards and rank 0 freeing each tensor of `full` once copied (see materialize); free_full=False
        keeps `full` whole for another model built from it. config: overrides of the model's config."""
        config = model_config(name, dropout, **config)
        full = full if full is not None else load_full(name, self.args.attn_implementation, self, config, auto_class)
        model = wrapper(empty_model(config, self.args.attn_implementation, dtype, auto_class))
        if self.args.padding_free:
            model.lm.set_attn_implementation("packed")
        if gradient_checkpointing:
            model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for layer in model.lm.base_model.layers:
            fully_shard(layer, mesh=self.mesh, mp_policy=mp)
        fully_shard(model, mesh=self.mesh, mp_policy=mp)
        materialize(model, full, self.device, free_full)
        return model.train()

    def begin(self, models, schedulers, total_steps, match):
        """Continues from the step_N that --resume found, whose `match` (what the data order depends on: the seed,
        the global batch...) must be this run's, and says so in one line (with --resume auto also when it starts
        afresh); opens the log. models: {name: (model, optimizer)}. Returns the step to continue from and the
        rollout saved with it (or None)."""
        self.models, self.schedulers, self.match, self.total = models, schedulers, match, total_steps
        start_step, rollout = 0, None
        if self.checkpoint:
            state, rollout = load_checkpoint(self.checkpoint, models, schedulers, match, self.rank)
            start_step, self.skipped_steps, self.bad_in_a_row = (
                state["step"], state.get("skipped_steps", 0), state.get("bad_steps_in_a_row", 0))
        self.step = start_step
        if self.rank == 0:
            prepare_output_dir(self.args.output_dir, start_step if self.checkpoint else None)
            if self.checkpoint:
                print(f"resumed from {self.checkpoint}" + (" (--resume auto)" if self.resume_auto else ""))
            elif self.resume_auto:
                print(f"started a fresh run (--resume auto: no step_N checkpoint in {self.args.output_dir})")
            if self.args.track:
                import wandb
                wandb.init(project=self.args.wandb_project, config=asdict(self.args), dir=self.args.output_dir,
                           name=self.args.run_name or os.path.basename(self.args.output_dir.rstrip("/")))
        self.bar = tqdm(total=total_steps, initial=start_step, disable=self.rank != 0, desc=self.name)
        return start_step, rollout

    def log_due(self, step, steps=1):
        """Whether metrics are logged after `step` (which ran `steps` optimizer steps): every --log_every, and the
        last step."""
        return every(self.args.log_every, step, steps) or step >= self.total

    def log(self, metrics, step, echo=False, **shown):
        """Rank 0 appends the metrics to output_dir/metrics.jsonl (and wandb); `shown` go on the progress bar,
        and with echo every metric is printed. The row of a training step (one with `shown`) also has
        skipped_steps, the steps skipped so far for a non-finite loss or gradient norm."""
        if self.rank != 0:
            return
        if shown:
            metrics = {**metrics, "skipped_steps": self.skipped_steps}
        with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.args.track:
            import wandb
            wandb.log(metrics, step=step)
        if shown:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()})
        if echo:
            tqdm.write(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))

    def step_is_finite(self, loss, grad_norms):
        """Whether the optimizer step now due may change the weights: its loss summed over all ranks and every
        gradient norm ({model: norm}) finite, which every rank decides alike. One that is not is counted in
        skipped_steps and announced; the --max_bad_steps-th in a row makes end_step save and stop the run."""
        self.step += 1
        values = torch.stack([loss.detach().double().sum(), *(norm.detach().double() for norm in grad_norms.values())])
        dist.all_reduce(values)  # a non-finite value on any rank makes the sum non-finite on every rank
        if values.isfinite().all():
            self.bad_in_a_row = 0
            return True
        names = {model: name for name, (model, _) in self.models.items()}
        loss_sum, *norms = values.tolist()
        what = " and ".join([f"loss is {loss_sum}"] * (not math.isfinite(loss_sum)) + [
            f"{names[model]} gradient norm is {norm}"
            for model, norm in zip(grad_norms, norms) if not math.isfinite(norm)])
        self.skipped_steps, self.bad_in_a_row = self.skipped_steps + 1, self.bad_in_a_row + 1
        if self.rank == 0:
            tqdm.write(f"WARNING: skipped step {self.step}, whose {what}: no weight or optimizer state changed")
        if self.bad_in_a_row >= self.args.max_bad_steps:  # a resumed run's count goes on from its step_N's
            self.bad_stop = (f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient norm (the last, "
                             f"step {self.step}, with {what})")
        return False

    def end_step(self, step, steps=1, rollout=None):
        """After each step (or rollout of `steps` optimizer steps): a resumable step_N every --save_every
        steps, and when SIGTERM or Ctrl-C reached any rank, then the run saves and stops (rollout: what the
        next steps reuse, saved with it); after --max_bad_steps skipped steps in a row it saves and fails."""
        self.bar.update(steps)
        stop = torch.tensor(max([signal.Signals[name].value for name in self.signals], default=0), device=self.device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        try:
            if every(self.args.save_every, step, steps) or stop.item() or self.bad_stop:
                save_checkpoint(os.path.join(self.args.output_dir, f"step_{step}"), self.models, self.schedulers,
                                step, {"match": self.match, "config": {**asdict(self.args), "world_size": self.world},
                                       "skipped_steps": self.skipped_steps, "bad_steps_in_a_row": self.bad_in_a_row},
                                self.rank, rollout, self.args.save_total_limit)
            if self.bad_stop:
                raise FatalError(f"{self.bad_stop}; saved step_{step}, which none of them changed, and stopped")
        except FatalError:
            self.bar.close()  # the error's line then starts a line of its own
            raise
        if stop.item():
            self.bar.close()  # ends the progress bar's line: the message gets a line of its own
            if self.rank == 0:
                print(f"{self.signals[0] if self.signals else 'a signal to another rank'}: saved step_{step}, "
                      "exiting (--resume continues from it)", flush=True)
            dist.destroy_process_group()
            sys.exit(128 + int(stop.item()))  # the shell's convention for a run ended by a signal

    def finish(self, model, tokenizer, eot_id):
        """Saves the trained model as a Hugging Face checkpoint in output_dir/final and leaves the job."""
        self.bar.close()
        path = os.path.join(self.args.output_dir, "final")
        save_hf(path, model, self.args.model, tokenizer, final_dtype(self.args.model, self.args.save_dtype), eot_id,
                self.rank)
        if self.rank == 0:
            print(f"saved {path}")
        dist.barrier()  # leave together: a gloo rank torn down while its peer still writes can abort it
        dist.destroy_process_group()


def attempt_store():
    """Where the ranks of a torchrun job on one node meet to form the process group: under torchrun's own store
    (None, the default), or after torchrun restarted the workers (--max-restarts), under keys of this attempt.
    torchrun's agent keeps its store for the whole job, and a restarted rank would read the killed attempt's
    addresses there and fail to connect. One node's agent counts the restarts for all its ranks; several nodes'
    agents count apart, so there TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each attempt a store of its own."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or \
            os.environ["WORLD_SIZE"] != os.environ["LOCAL_WORLD_SIZE"]:
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=dist.constants.default_pg_timeout)
    return dist.PrefixStore(f"attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def every(n, step, steps=1):
    """Whether the `steps` optimizer steps that ended at `step` crossed a multiple of n (0: never)."""
    return n > 0 and step // n > (step - steps) // n


def fsdp_mesh(hsdp, device):
    """The ranks FSDP2 shards over: all of them (None), or with --hsdp a 2-D mesh whose "shard" dimension
    is the ranks of a node and "replicate" the nodes. Gradients are averaged over all ranks either way
    (reduce-scatter within the node, then all-reduce across nodes), so loss scaling and clipping hold."""
    if not hsdp:
        return None
    per_node, world = int(os.environ["LOCAL_WORLD_SIZE"]), dist.get_world_size()
    if world % per_node:
        raise InputError(f"--hsdp needs as many ranks on every node; {world} ranks in all, {per_node} on this node")
    return init_device_mesh(device.type, (world // per_node, per_node), mesh_dim_names=("replicate", "shard"))


def stop_on_signals(rank):
    """SIGTERM and Ctrl-C (SIGINT) ask the training loop to save a resumable step_N after the current
    step and exit; a second Ctrl-C aborts at once. Returns the list of the signals received."""
    received = []

    def request_stop(signum, frame):
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # the next Ctrl-C ends the process
            if rank == 0:
                print("\nCtrl-C: saving a checkpoint after this step, then exiting (Ctrl-C again: exit now, "
                      "without saving)", flush=True)
        received.append(signal.Signals(signum).name)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, request_stop)
    return received


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


def check_tool_names(names, where, known):
    """A list of names of tools among `known` (nanopost.tools.names(), case-insensitive); InputError names `where`."""
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise InputError(f"{where} must be a list of tool names ({', '.join(known)}), got {names!r:.200}")
    for name in names:
        if name.lower() not in known:
            raise InputError(f"{where}: no tool named {name!r}; the tools are: {', '.join(known)}")


def check_tool_row(row, where, known, problem):
    """An SFT row's messages, its `tools` (names among `known`, or absent) and, where it has tools or tool calls, a
    chat template that can render them (problem: tool_template_problem's answer); InputError names `where`."""
    check_messages(row["messages"], where)
    if row.get("tools") is not None:
        check_tool_names(row["tools"], f"{where}: `tools`", known)
    if problem and (row.get("tools") or any(m.get("tool_calls") for m in row["messages"])):
        raise InputError(f"{where} has tools: {problem}")


def tool_template_problem(tokenizer):
    """Why the chat template cannot show the model tools, or render calls and results in the format that
    nanopost.tools parses (tools.check_chat_template's message); None if it can."""
    try:
        tools.check_chat_template(tokenizer)
    except ValueError as e:
        return str(e)
    return None


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


def global_batch(step, n_rows, batch_size, seed):
    """Row indices of global batch `step`: a fresh permutation each epoch, the last partial batch
    dropped. Every rank computes the same list, so nothing needs to be communicated."""
    per_epoch = n_rows // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


def chunks_of(ordered, tokens, per_device, max_tokens):
    """Consecutive runs of `ordered` of at most per_device items and, unless max_tokens is None, at most
    max_tokens tokens as tokens(run) counts them (an item longer than that gets a run of its own)."""
    chunks = []
    for i in ordered:
        if chunks and len(chunks[-1]) < per_device and (max_tokens is None or tokens(chunks[-1] + [i]) <= max_tokens):
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def split_largest(chunks, n):
    """Halves the largest chunks until there are n (or every chunk holds one item)."""
    while len(chunks) < n and any(len(chunk) > 1 for chunk in chunks):
        k = max(range(len(chunks)), key=lambda k: len(chunks[k]))
        chunks[k:k + 1] = [chunks[k][:len(chunks[k]) // 2], chunks[k][len(chunks[k]) // 2:]]
    return chunks


def collate(sequences, packed, pad_id):
    """The model inputs of (token ids, next-token targets) pairs, as a dict with `targets` (-100: none)
    and the decoder's inputs. Packed: one row [1, T], the sequences end to end, position ids restarting
    at 0 with each, and the boundaries cu_seq_lens [N + 1] that confine attention to each sequence
    (nanopost/kernels/packed_attention.py), so no compute goes to padding. Padded: rows right-padded to
    the longest [N, T]; causal attention never lets a real token see the padding after it."""
    if packed:
        lengths = [len(ids) for ids, _ in sequences]
        bounds = torch.tensor([0] + lengths).cumsum(0, dtype=torch.int32)
        return {"input_ids": torch.tensor([[t for ids, _ in sequences for t in ids]]),
                "targets": torch.tensor([[t for _, targets in sequences for t in targets]]),
                "position_ids": torch.cat([torch.arange(n) for n in lengths])[None],
                "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_q": max(lengths),
                "max_length_k": max(lengths)}
    width = max(len(ids) for ids, _ in sequences)
    return {"input_ids": torch.tensor([ids + [pad_id] * (width - len(ids)) for ids, _ in sequences]),
            "targets": torch.tensor([targets + [-100] * (width - len(targets)) for _, targets in sequences])}


def to_device(batch, device):
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def has_weights(name):
    """Whether --model names weights: a hub id, or a local dir holding them (not only a config)."""
    return not os.path.isdir(name) or any(os.path.exists(os.path.join(name, f)) for f in WEIGHT_FILES)


def model_config(name, dropout=True, **overrides):
    """The model's config, with every dropout probability set to 0 unless `dropout` (modules read their rates
    when they are built): the RL scripts need the same log-probs from every pass over the same tokens."""
    config = AutoConfig.from_pretrained(name, **overrides)
    if not dropout:
        config.update({k: 0.0 for k, v in config.to_dict().items()
                       if isinstance(v, float) and ("dropout" in k or k.endswith("pdrop"))})
    return config


def empty_model(config, attn_implementation, dtype=torch.float32, auto_class=AutoModelForCausalLM):
    """The model on the meta device: parameters in `dtype`, no memory until materialize."""
    with torch.device("meta"):
        return auto_class.from_config(config, attn_implementation=attn_implementation, dtype=dtype)


def load_full(name, attn_implementation, run, config=None, auto_class=AutoModelForCausalLM):
    """The whole model in fp32 on rank 0 (None elsewhere: the other ranks receive their shards from it): the
    checkpoint's weights, or for a dir holding only a config a random init from it."""
    if run.rank != 0:
        return None
    config = config or AutoConfig.from_pretrained(name)
    if not has_weights(name):
        if not run.args.resume:  # a resumed run's weights come from its checkpoint
            print(f"WARNING: {name} has a config but no weights: initializing the model randomly")
        return auto_class.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return auto_class.from_pretrained(name, config=config, attn_implementation=attn_implementation, dtype=torch.float32)


@torch.no_grad()
def materialize(model, full, device, free_full=False):
    """Fills the sharded meta-device `model` (a wrapper holding the model as .lm) with the weights of `full`,
    the same model whole in fp32 on rank 0 (None elsewhere), one tensor at a time: rank 0 broadcasts it and
    each rank keeps its slice, in its own dtype. free_full (on the last model filled from `full`): rank 0
    frees each tensor of `full` once it is copied, so that its shards fill in the memory `full` gives back.
    Tied weights stay one parameter (to_empty keeps FSDP's parameter objects); buffers, also those not saved
    with the weights (rotary frequencies), are rank 0's."""
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        source = full.get_parameter(name.removeprefix("lm.")) if full is not None else None
        whole = source.detach().to(device) if source is not None else torch.empty(param.shape, device=device)
        dist.broadcast(whole, 0)
        param.to_local().copy_(distribute_tensor(whole, param.device_mesh, param.placements,
                                                 src_data_rank=None).to_local())
        del whole
        if free_full and source is not None:
            source.data = torch.empty(0)  # a tied weight is one Parameter: this frees it for every module using it
    for name, buffer in model.named_buffers():
        if full is not None:
            buffer.copy_(full.get_buffer(name.removeprefix("lm.")))
        dist.broadcast(buffer, 0)


def lr_lambda(schedule, total_steps, warmup_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]
    return factor


def adamw(model, lr, args, total_steps):
    """AdamW and its schedule: linear warmup over --warmup_ratio of total_steps, then --lr_schedule to 0 at the
    last step. Fused on CPU as on CUDA: one kernel over all parameters, several times faster than the loop
    over them, and the same update to float rounding."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay, fused=True)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_schedule, total_steps, int(args.warmup_ratio * total_steps)))


def optimizer_step(run, loss, max_grad_norm, *trained):
    """Steps each (model, optimizer, scheduler) of `trained` on its gradients, clipped by their global norm (0: no
    clipping), unless the step's loss (this rank's part of it) or a gradient norm is not finite on some rank: then
    no weight and no optimizer state changes, on any rank (Run.step_is_finite), in all the models stepped together.
    The schedulers advance either way: the learning rate follows the step number, as the data does (a skipped
    step's batch is not tried again). Returns the gradient norms (tensors) and the learning rates of the step."""
    norms = []
    for model, _, _ in trained:
        norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                              max_grad_norm or float("inf"))
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    lrs = [scheduler.get_last_lr()[0] for _, _, scheduler in trained]
    if run.step_is_finite(loss, {model: norm for (model, _, _), norm in zip(trained, norms)}):
        for _, optimizer, _ in trained:
            optimizer.step()
    for _, optimizer, scheduler in trained:
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return norms, lrs


# Dense bf16 peak FLOP/s by GPU name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def throughput(run, model, n_tokens, n_sequences, seconds):
    """Training tokens per second of the whole job and, on a known GPU, the model FLOPs utilization: 6 FLOPs
    per parameter and token, plus attention's 12 x layers x hidden x mean sequence length per token."""
    metrics = {"perf/tokens_per_second": n_tokens / seconds}
    if run.device.type == "cuda":
        peak = next((v for k, v in PEAK_FLOPS.items() if k in torch.cuda.get_device_name(run.device)), None)
        config = model.lm.config
        if peak:
            n_params = sum(p.numel() for p in model.parameters())
            attention = 12 * config.num_hidden_layers * config.hidden_size * n_tokens / n_sequences
            metrics["perf/mfu"] = (6 * n_params + attention) * n_tokens / seconds / (run.world * peak)
    return metrics


def final_dtype(name, save_dtype):
    """dtype of final/'s weights: --save_dtype, or for auto the one the source's config names (the
    dtype its weights are published in; fp32 if it names none), whatever precision trained them."""
    if save_dtype != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[save_dtype]
    return AutoConfig.from_pretrained(name).dtype or torch.float32


@torch.no_grad()
def save_hf(path, model, source, tokenizer, dtype, eot_id, rank, max_file_bytes=5 * 10**9):
    """Writes model.lm as a Hugging Face directory that from_pretrained and vLLM load: the weights in `dtype`
    as safetensors (several files of at most max_file_bytes and an index if they do not fit in one), the
    config and generation config of `source` (the model training started from; training changes neither, and
    settings made for training, such as dropout off, stay out), and the tokenizer; generation stops at the
    chat template's end-of-turn token. Streamed: each tensor is gathered from its shards in turn, and rank 0
    holds at most one file's worth before writing it. Written to path.tmp, then renamed; a failed write (disk
    full...) ends the run with a FatalError on every rank, leaving an earlier final/ as it was."""
    tensors = {}  # a tied weight is written once, under its first name (the embedding's), as save_pretrained does
    for name, tensor in model.state_dict(keep_vars=True).items():
        tensors.setdefault(id(tensor), (name.removeprefix("lm."), tensor))
    files, size = [[]], 0  # consecutive tensors, at most max_file_bytes per file
    for name, tensor in tensors.values():
        nbytes = tensor.numel() * dtype.itemsize
        if files[-1] and size + nbytes > max_file_bytes:
            files, size = files + [[]], 0
        files[-1].append((name, tensor))
        size += nbytes
    tmp = path + ".tmp"
    failure = None  # rank 0's failed write: it writes no more, but joins every gather until all ranks stop
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            os.makedirs(tmp)
        except OSError as error:
            failure = error
    weight_map = {}
    for i, members in enumerate(files):
        file = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        part = {}
        for name, tensor in members:
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # every rank joins the gather
            if rank == 0:
                part[name] = full.to("cpu", dtype)
            weight_map[name] = file
        if rank == 0 and failure is None:
            try:
                save_file(part, os.path.join(tmp, file), metadata={"format": "pt"})
                os.chmod(os.path.join(tmp, file), file_mode())  # safetensors writes 0600, unreadable to the group
            except Exception as error:  # safetensors' SafetensorError, which names the OS error
                failure = error
    if rank == 0 and failure is None:
        try:
            if len(files) > 1:
                with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                    total = sum(tensor.numel() for _, tensor in tensors.values()) * dtype.itemsize
                    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
            config = AutoConfig.from_pretrained(source)
            config.dtype = dtype
            config.architectures = [type(model.lm).__name__]
            if config.architectures[0].endswith("ForSequenceClassification"):  # a reward model: its labels, and the
                # pad token, as it reads each sequence's score at the last token that is not padding
                config.num_labels = model.lm.config.num_labels
                config.get_text_config().pad_token_id = model.lm.config.get_text_config().pad_token_id
            config.save_pretrained(tmp)
            try:
                generation_config = GenerationConfig.from_pretrained(source)
            except OSError:  # none saved: the one derived from the config, as from_pretrained does
                generation_config = GenerationConfig.from_model_config(config)
            generation_config.eos_token_id = sorted({eot_id, tokenizer.eos_token_id} - {None})
            generation_config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        except Exception as error:  # OSError, or the tokenizers library's own error naming it
            failure = error
    stop_if_any_failed(path, failure)


def file_mode():
    """The permissions open() gives a new file under this process's umask (0644 under the usual 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


# ---------------------------------------------------------------------------------------------
# Checkpoints: output_dir/step_N (sharded, resumable)


def latest_checkpoint(output_dir):
    steps = [int(m.group(1)) for d in os.listdir(output_dir) if (m := re.fullmatch(r"step_(\d+)", d))] \
        if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, f"step_{max(steps)}") if steps else None


def earlier_run(output_dir):
    """The files of an earlier run in output_dir: metrics.jsonl, step_N/, final/ (and their .tmp), wandb/."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(n for n in names if n in ("metrics.jsonl", "wandb") or re.fullmatch(r"(step_\d+|final)(\.tmp)?", n))


def prepare_output_dir(output_dir, resumed_step):
    """A fresh run (resumed_step None) deletes an earlier run's files, which check_args let through
    only with --overwrite_output_dir; a resumed run deletes what a crash left half-written or half-deleted
    (step_N.tmp, final.tmp) and drops the metrics.jsonl rows logged after its checkpoint, so that every step is
    logged once."""
    os.makedirs(output_dir, exist_ok=True)
    metrics = os.path.join(output_dir, "metrics.jsonl")
    for name in earlier_run(output_dir):
        if resumed_step is None or name.endswith(".tmp"):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    if resumed_step is not None and os.path.exists(metrics):
        with open(metrics) as f:
            # a last line without its newline was cut short by a crash: dropped too
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= resumed_step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)


def save_checkpoint(path, models, schedulers, step, state, rank, rollout=None, keep=None):
    """Every model and optimizer sharded via torch.distributed.checkpoint; the step, the schedulers and
    `state` (JSON) in trainer_state.json; each rank's RNG state and `rollout` (what later steps reuse) in
    rank{r}.pt. Written to path.tmp and renamed, so a crash never leaves a partial step_N, and a failed write
    (disk full...) ends the run with a FatalError on every rank, leaving the earlier step_N as they were; then
    all but the newest `keep` step_N go (None: none), each renamed to step_N.tmp before it is deleted (what a
    crash leaves of one, --resume deletes: prepare_output_dir)."""
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    sharded = {}
    for name, (model, optimizer) in models.items():
        sharded[name], sharded[name + "_optim"] = get_state_dict(model, optimizer)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    failure = None
    try:
        dcp.save(sharded, checkpoint_id=tmp)
        torch.save({"rng": rng, "rollout": rollout}, os.path.join(tmp, f"rank{rank}.pt"))
        if rank == 0:
            with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
                json.dump({"step": step, "schedulers": [s.state_dict() for s in schedulers], **state}, f)
    except (Exception, dcp.CheckpointException) as error:  # dcp's CheckpointException is not an Exception
        failure = error
    stop_if_any_failed(path, failure)  # also waits until every rank has written its part
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
        output_dir = os.path.dirname(path)
        steps = sorted(int(m.group(1)) for d in os.listdir(output_dir) if (m := re.fullmatch(r"step_(\d+)", d)))
        for old in steps[:-keep] if keep else []:
            old = os.path.join(output_dir, f"step_{old}")
            shutil.rmtree(old + ".tmp", ignore_errors=True)
            os.replace(old, old + ".tmp")
            shutil.rmtree(old + ".tmp")
    dist.barrier()


def load_checkpoint(path, models, schedulers, match, rank):
    """Restores what save_checkpoint wrote, if the checkpoint's `match` is this run's; returns its trainer state
    (the step...) and this rank's rollout (None when saved by fewer ranks, whose RNG states are then left as they
    are)."""
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    if state["match"] != match:
        raise InputError(f"{path} was trained with {state['match']}; this run has {match}: the data order "
                         "would not continue where it stopped")
    sharded = {}
    for name, (model, optimizer) in models.items():
        sharded[name], sharded[name + "_optim"] = get_state_dict(model, optimizer)
    dcp.load(sharded, checkpoint_id=path)
    for name, (model, optimizer) in models.items():
        set_state_dict(model, optimizer, model_state_dict=sharded[name], optim_state_dict=sharded[name + "_optim"])
    for scheduler, scheduler_state in zip(schedulers, state["schedulers"]):
        scheduler.load_state_dict(scheduler_state)
    rank_file = os.path.join(path, f"rank{rank}.pt")
    if not os.path.exists(rank_file):
        return state, None
    try:  # tensors and plain containers only: unpickling anything else could run code
        saved = torch.load(rank_file, weights_only=True)
    except pickle.UnpicklingError as error:
        raise InputError(f"{rank_file} holds more than tensors and plain containers, which --resume does not "
                         f"unpickle (it could run code): {str(error).splitlines()[0]}") from None
    torch.set_rng_state(saved["rng"]["cpu"])
    if saved["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["rng"]["cuda"])
    return state, saved["rollout"]


def stop_if_any_failed(path, error):
    """After the writes of a save to `path` (error: what failed on this rank, or None): if they failed on any
    rank, rank 0 deletes path.tmp and every rank raises FatalError naming path and the OS error, so that the run
    ends in one line with the earlier checkpoints as they were."""
    reasons = [None] * dist.get_world_size()
    dist.all_gather_object(reasons, None if error is None else str(os_error(error, path + ".tmp")))
    reason = next((reason for reason in reasons if reason is not None), None)
    if reason is not None:
        if dist.get_rank() == 0:
            shutil.rmtree(path + ".tmp", ignore_errors=True)
        raise FatalError(f"could not save {path}: {reason}")


def os_error(error, directory):
    """The OS error behind a failed write: `error` or one it wraps (dcp's CheckpointException holds every rank's);
    else, as torch.save (and so dcp) loses the errno of a write that failed, what the OS answers a write of 1 MiB
    into directory (or its parent) now; else the error's own message."""
    wrapped = [e for e, _ in error.failures.values()] if isinstance(error, dcp.CheckpointException) else [error]
    found = next((e for e in wrapped if isinstance(e, OSError)), None)
    if found is not None:
        return found
    probe = os.path.join(directory if os.path.isdir(directory) else os.path.dirname(directory),
                         f".write_probe_{os.getpid()}")
    try:
        with open(probe, "wb") as f:
            f.write(bytes(2**20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as refused:
        return refused
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    return f"{type(wrapped[0]).__name__}: {wrapped[0]}"


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

if __name__ == "__main__":
    launch(main, Args)
