"""Supervised finetuning (instruction tuning) of a causal LM on chat conversations.

The loss is the negative log-likelihood of every assistant turn (its content and the template's
end-of-turn token) given everything before it; system and user turns are context only. Token
losses are summed over the global batch (all micro-batches, all ranks) and divided by its number
of loss tokens, so gradient accumulation and data parallelism give the same update as one big
batch. Each global batch is sorted by length before it is split into micro-batches, and each
micro-batch's conversations are packed into one row with attention confined to each (FlashAttention's
varlen_attn on CUDA), so no compute goes to padding. Log-probs come from nanopost/kernels/ (the head never
materializes [tokens, vocab] logits, and runs only on loss tokens).

References: Ouyang et al. 2022 (InstructGPT, SFT stage); Lambert et al. 2024 (Tulu 3, the recipe
whose data format and hyperparameters the defaults follow).

    python sft.py                                  # the built-in demo: tiny model, data/, CPU ok
    torchrun --nproc_per_node 8 sft.py --model Qwen/Qwen2.5-0.5B \\
        --dataset allenai/tulu-3-sft-mixture --max_seq_len 4096 --lr 2e-5 \\
        --per_device_batch_size 4 --grad_accum_steps 4 --num_epochs 2 --gradient_checkpointing
"""

import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import tyro
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_model_state_dict,
                                                     set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from tqdm import tqdm
from transformers import AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from nanopost.kernels import linear_logprobs
from nanopost.kernels.packed_attention import packed_attention

AttentionInterface.register("packed", packed_attention)


@dataclass
class Args:
    # model and data
    model: str = "assets/tiny"
    """hub id or local dir; a dir holding only a config is initialized randomly"""
    dataset: str = "data/sft_train.jsonl"
    """hub id or local .jsonl/.parquet with a `messages` column (Tulu 3 format)"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    eval_dataset: str | None = "data/sft_eval.jsonl"
    """same format as --dataset; its loss is logged as eval_loss (hub datasets: the 'test' split)"""
    max_seq_len: int = 256
    """conversations are truncated to this many tokens (real runs: 2048-4096)"""
    attn_implementation: str = "sdpa"
    """attention kernel of the padded path: sdpa, eager, or flash_attention_2 where installed"""
    padding_free: bool = True
    """pack each micro-batch's sequences into one row, attention confined to each sequence (varlen_attn,
    FlashAttention, on CUDA): no compute on padding. --no_padding_free: right-padded rows"""

    # optimization
    lr: float = 3e-3
    """peak learning rate (the demo's tiny model wants 3e-3; Tulu 3 8B used 5e-6, 0.5B models 2e-5)"""
    num_epochs: int = 4
    """passes over the dataset (ignored when --max_steps is set; Tulu 3: 2)"""
    max_steps: int | None = None
    """optimizer steps to run; overrides --num_epochs"""
    per_device_batch_size: int = 32
    """sequences per micro-batch on each rank"""
    max_tokens_per_micro_batch: int | None = None
    """also cap micro-batches at this many tokens (padding included), which adds micro-batches to a step
    of long sequences; the global batch stays per_device_batch_size x grad_accum_steps x world size"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step; global batch = this x per_device_batch_size x world size"""
    warmup_ratio: float = 0.03
    """fraction of steps with linear warmup from 0"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "cosine"
    """decay after warmup, to 0 at the last step"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (0 disables)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """compute dtype of params in forward/backward; master weights and grad reduction stay fp32.
    auto = bf16 on CUDA, fp32 on CPU"""
    save_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """dtype of final/'s weights. auto = the source model's (the dtype its config names; fp32 if none)"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in backward (less memory, about 30% more compute)"""
    hsdp: bool = False
    """hybrid sharding: shard the model within each node and replicate it across nodes (less traffic between
    nodes, more memory per GPU); default: shard it over all ranks"""
    seed: int = 1
    """seeds init, data order and everything random"""

    # logging and checkpointing
    output_dir: str = "runs/sft"
    """where metrics.jsonl, step_N/ checkpoints and final/ (Hugging Face format) go"""
    save_every: int = 0
    """save a resumable checkpoint every N steps (0: only on SIGTERM or Ctrl-C)"""
    resume: bool = False
    """continue from the latest output_dir/step_N (metrics.jsonl keeps the steps up to it)"""
    overwrite_output_dir: bool = False
    """start afresh in an output_dir that holds an earlier run (deletes its metrics.jsonl, step_N/, final/)"""
    eval_every: int = 0
    """eval loss every N steps (0: only at the end)"""
    log_every: int = 1
    """log metrics every N steps"""
    track: bool = False
    """also log to Weights & Biases"""
    wandb_project: str = "nanopost"
    """wandb project name"""
    run_name: str | None = None
    """wandb run name (None: output_dir's name)"""


class InputError(ValueError):
    """A bad flag, file or data row: the message says what is wrong and what was expected, and the
    script prints it alone, without a traceback."""


# ---------------------------------------------------------------------------------------------
# Data: chat-template tokenization with a loss mask on assistant turns


def end_of_turn_token(tokenizer):
    """The token the chat template puts right after an assistant message (<|im_end|>, <|eot_id|>,
    <end_of_turn>, ...): it must carry loss, and generation stops at it."""
    if not tokenizer.chat_template:
        raise InputError("the tokenizer has no chat template; use a model whose tokenizer has one")
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text[text.rindex("PROBE") + len("PROBE"):]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    if not ids or ids[0] not in tokenizer.added_tokens_decoder:
        raise InputError(f"the chat template ends assistant turns with {after!r}, not a special token")
    return tokenizer.convert_ids_to_tokens(ids[0]), ids[0]


def check_messages(messages, where):
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: `messages` must be a non-empty list of {{role, content}}, got {messages!r:.200}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InputError(f"{where}: message {j} must be {{role: system|user|assistant|tool, content: str}}, "
                             f"got {m!r:.200}")


def tokenize_conversation(tokenizer, messages, eot_text, max_seq_len, where):
    """Token ids of the templated conversation and labels that equal the ids on assistant tokens
    (content + end-of-turn token) and -100 elsewhere. Assistant spans are found by rendering each
    prefix of the conversation, so any prefix-stable chat template works."""
    check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise InputError(f"{where}: no assistant message, so nothing to learn")
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise InputError(f"{where}: the conversation starts with an assistant message")
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
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


def tokenize_dataset(name, split, tokenizer, eot_text, max_seq_len, rank):
    """Tokenized rows {input_ids, labels, n_loss}. A malformed row stops the run with its index.
    Each node's local rank 0 tokenizes first, so that the node's other ranks read its datasets cache (one
    cache per node, or one that all nodes share)."""
    rows = load_rows(name, split)
    if "messages" not in rows.column_names:
        raise InputError(f"{name}: expected a `messages` column, found {rows.column_names}")

    def tokenize(row, index):
        ids, labels = tokenize_conversation(tokenizer, row["messages"], eot_text, max_seq_len, f"{name} row {index}")
        # the loss at position t predicts token t+1, so the first token never counts
        return {"input_ids": ids, "labels": labels, "n_loss": sum(x != -100 for x in labels[1:])}

    for turn in (0, 1):
        if (os.environ["LOCAL_RANK"] == "0") == (turn == 0):
            rows = rows.map(tokenize, with_indices=True, remove_columns=rows.column_names, desc="tokenizing")
        dist.barrier()
    kept = rows.filter(lambda n: n > 0, input_columns="n_loss")
    if rank == 0 and len(kept) < len(rows):
        print(f"{name}: dropped {len(rows) - len(kept)} rows with no assistant token within --max_seq_len")
    if len(kept) == 0:
        raise InputError(f"{name}: no row has an assistant token within --max_seq_len={max_seq_len}")
    return kept


def global_batch(step, n_rows, batch_size, seed):
    """Row indices of optimizer step `step`: a fresh permutation each epoch, the last partial
    batch dropped. Every rank computes the same list, so nothing needs to be communicated."""
    per_epoch = n_rows // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


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
    """The model inputs of (token ids, next-token targets) pairs, as a dict with `targets` (-100: no loss)
    and the decoder's inputs. Packed: one row [1, T], the sequences end to end, position ids restarting
    at 0 with each, and the boundaries cu_seq_lens [N + 1] that confine attention to each sequence
    (nanopost/kernels/packed_attention.py), so no compute goes to padding. Padded: rows right-padded to the
    longest [N, T]; causal attention never lets a real token see the padding after it."""
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


# ---------------------------------------------------------------------------------------------
# Model


class PolicyLogprobs(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that one forward returns log-probs of the targets.
    The head runs here, inside the FSDP root module, so FSDP unshards its weight (tied to the
    embedding for Qwen) and reduces its gradient."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, targets, **inputs):
        hidden = self.lm.get_decoder()(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        keep = targets.flatten() != -100
        logp, _ = linear_logprobs(hidden[keep], self.lm.get_output_embeddings().weight, targets.flatten()[keep])
        return logp


def load_model(name, attn_implementation):
    """The full model in fp32, which rank 0 alone reads (the others receive their shards from it): the
    checkpoint's weights, or for a dir holding only a config a random init from it."""
    weights = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, w)) for w in weights):
        print(f"WARNING: {name} has a config but no weights: initializing the model randomly")
        config = AutoConfig.from_pretrained(name)
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(name, attn_implementation=attn_implementation, dtype=torch.float32)


def empty_model(name, attn_implementation, dtype):
    """The model on the meta device (parameters in `dtype`, no memory until materialize), with the
    source's generation config, which final/ keeps."""
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(name), attn_implementation=attn_implementation,
                                              dtype=dtype)
    try:
        lm.generation_config = GenerationConfig.from_pretrained(name)
    except OSError:  # none saved: the one derived from the config, as from_pretrained does
        pass
    return lm


@torch.no_grad()
def materialize(model, full, device):
    """Fills the sharded meta-device `model` with the weights of `full`, the same module tree in full on
    rank 0 (None elsewhere): each rank allocates only its shards, rank 0 broadcasts one tensor at a time
    and each rank keeps its slice, in its own dtype. Tied weights stay one parameter (to_empty keeps
    FSDP's parameter objects); buffers, also those not saved with the weights (rotary frequencies), are
    rank 0's."""
    model.to_empty(device=device)
    set_model_state_dict(model, full.state_dict() if full is not None else {},
                         options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    for name, buffer in model.named_buffers():
        if full is not None:
            buffer.copy_(full.get_buffer(name))
        dist.broadcast(buffer, 0)


def final_dtype(name, save_dtype):
    """dtype of final/'s weights: --save_dtype, or for auto the one the source's config names (the
    dtype its weights are published in; fp32 if it names none), whatever precision trained them."""
    if save_dtype != "auto":
        return {"bf16": torch.bfloat16, "fp32": torch.float32}[save_dtype]
    return AutoConfig.from_pretrained(name).dtype or torch.float32


def lr_lambda(schedule, total_steps, warmup_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]
    return factor


# Dense bf16 peak FLOP/s by GPU name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


# ---------------------------------------------------------------------------------------------
# Checkpoints: output_dir/step_N (sharded, resumable) and output_dir/final (Hugging Face)


def latest_checkpoint(output_dir):
    steps = [int(m.group(1)) for d in os.listdir(output_dir) if (m := re.fullmatch(r"step_(\d+)", d))] \
        if os.path.isdir(output_dir) else []
    return os.path.join(output_dir, f"step_{max(steps)}") if steps else None


def earlier_run(output_dir):
    """The files of an earlier run in output_dir: metrics.jsonl, step_N/, final/ (and their .tmp)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return sorted(n for n in names if n == "metrics.jsonl" or re.fullmatch(r"(step_\d+|final)(\.tmp)?", n))


def prepare_output_dir(output_dir, resumed_step):
    """A fresh run (resumed_step None) deletes an earlier run's files, which check_args let through
    only with --overwrite_output_dir; a resumed run drops the metrics.jsonl rows logged after its
    checkpoint, so that every step is logged once."""
    os.makedirs(output_dir, exist_ok=True)
    metrics = os.path.join(output_dir, "metrics.jsonl")
    if resumed_step is None:
        for name in earlier_run(output_dir):
            path = os.path.join(output_dir, name)
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.remove(path)
    elif os.path.exists(metrics):
        with open(metrics) as f:
            # a last line without its newline was cut short by a crash: dropped too
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= resumed_step]
        with open(metrics + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(metrics + ".tmp", metrics)


def save_checkpoint(path, model, optimizer, scheduler, step, run_config, rank):
    """Sharded model + optimizer via torch.distributed.checkpoint, plus scheduler, step and every
    rank's RNG state; written to path.tmp and renamed, so a crash never leaves a partial step_N."""
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "scheduler": scheduler.state_dict(), "config": run_config}, f)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


def load_checkpoint(path, model, optimizer, scheduler, global_batch_size, seed, rank):
    with open(os.path.join(path, "trainer_state.json")) as f:
        state = json.load(f)
    saved = state["config"]
    saved_batch = saved["per_device_batch_size"] * saved["grad_accum_steps"] * saved["world_size"]
    if (saved_batch, saved["seed"]) != (global_batch_size, seed):
        raise InputError(f"{path} was trained with a global batch of {saved_batch} sequences and --seed "
                         f"{saved['seed']}; this run has {global_batch_size} and {seed}: the data order would "
                         "not continue where it stopped")
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.load({"model": model_state, "optim": optim_state}, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state)
    scheduler.load_state_dict(state["scheduler"])
    rng_file = os.path.join(path, f"rng_rank{rank}.pt")
    if os.path.exists(rng_file):  # absent when resuming on more ranks than saved
        rng = torch.load(rng_file, weights_only=False)
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return state["step"]


@torch.no_grad()
def save_hf(path, model, lm, tokenizer, dtype, eot_id, rank, max_file_bytes=5 * 10**9):
    """Writes a Hugging Face directory that from_pretrained and vLLM load: the weights in `dtype` as
    safetensors (several files of at most max_file_bytes and an index if they do not fit in one), the
    source's config (use_cache and all; training changes none of it) and the tokenizer; generation stops
    at the chat template's end-of-turn token. Streamed: each tensor is gathered from its shards in turn,
    and rank 0 holds at most one file's worth before writing it. Written to path.tmp, then renamed."""
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
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    weight_map = {}
    for i, members in enumerate(files):
        file = "model.safetensors" if len(files) == 1 else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        part = {}
        for name, tensor in members:
            full = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # every rank joins the gather
            if rank == 0:
                part[name] = full.to("cpu", dtype)
            weight_map[name] = file
        if rank == 0:
            save_file(part, os.path.join(tmp, file), metadata={"format": "pt"})
    if rank == 0:
        if len(files) > 1:
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
                total = sum(tensor.numel() for _, tensor in tensors.values()) * dtype.itemsize
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        lm.config.dtype = dtype
        lm.config.architectures = [type(lm).__name__]
        lm.config.save_pretrained(tmp)
        lm.generation_config.eos_token_id = sorted({eot_id, tokenizer.eos_token_id} - {None})
        lm.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


# ---------------------------------------------------------------------------------------------


def setup_distributed():
    """torchrun sets RANK/WORLD_SIZE (global) and LOCAL_RANK/LOCAL_WORLD_SIZE (within the node), on one
    node or several; a plain `python sft.py` becomes a world of one."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


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


def names_local_path(name):
    """Whether a --model / --dataset value means a local path rather than a hub id ("org/name"): a
    data file suffix, a leading ".", "/" or "~", more than one "/", or a first part that is a local
    directory. Such a value that does not exist is an error now, not after minutes of hub retries."""
    parts = name.split("/")
    return name.endswith((".jsonl", ".json", ".parquet")) or name.startswith((".", "/", "~")) or len(parts) > 2 \
        or (len(parts) == 2 and os.path.isdir(parts[0]))


def check_args(args):
    """Every flag and path, before anything heavy runs."""
    for name in ("per_device_batch_size", "grad_accum_steps", "max_seq_len", "num_epochs", "log_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.max_tokens_per_micro_batch is not None and args.max_tokens_per_micro_batch < 1:
        raise InputError(f"--max_tokens_per_micro_batch must be >= 1, got {args.max_tokens_per_micro_batch}")
    if not 0 <= args.warmup_ratio < 1:
        raise InputError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    if args.lr <= 0:
        raise InputError(f"--lr must be > 0, got {args.lr}")
    if names_local_path(args.model) and not os.path.isdir(args.model):
        raise InputError(f"--model {args.model}: no such directory")
    for flag, name in (("--dataset", args.dataset), ("--eval_dataset", args.eval_dataset)):
        if name and names_local_path(name) and not os.path.exists(name):
            raise InputError(f"{flag} {name}: no such file or directory")
    if args.resume and args.overwrite_output_dir:
        raise InputError("--resume continues the run in --output_dir and --overwrite_output_dir replaces it: pass one")
    if args.resume and latest_checkpoint(args.output_dir) is None:
        raise InputError(f"--resume: no step_N checkpoint in {args.output_dir}")
    earlier = earlier_run(args.output_dir)
    if earlier and not args.resume and not args.overwrite_output_dir:
        raise InputError(f"--output_dir {args.output_dir} holds an earlier run ({', '.join(earlier)}): pass --resume "
                         "to continue it, --overwrite_output_dir to replace it, or another --output_dir")


def main(args):
    check_args(args)
    rank, world, device = setup_distributed()
    mesh = fsdp_mesh(args.hsdp, device)
    torch.manual_seed(args.seed)  # the random init of a model given by its config alone (on rank 0) and all else
    stop_requested = stop_on_signals(rank)

    # tokenizer and data
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eot_text, eot_id = end_of_turn_token(tokenizer)
    train = tokenize_dataset(args.dataset, args.dataset_split, tokenizer, eot_text, args.max_seq_len, rank)
    evals = tokenize_dataset(args.eval_dataset, "test", tokenizer, eot_text, args.max_seq_len, rank).to_list() \
        if args.eval_dataset else None
    lengths = [len(x) for x in train["input_ids"]]
    train_rows = train.to_list()
    eval_lengths = [len(row["input_ids"]) for row in evals] if evals else None
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id  # never a target
    batch_size = args.per_device_batch_size * args.grad_accum_steps * world
    if len(train_rows) < batch_size:
        raise InputError(f"{args.dataset} has {len(train_rows)} usable rows, fewer than one global batch "
                         f"({batch_size} = per_device_batch_size x grad_accum_steps x world size)")
    total_steps = args.max_steps or args.num_epochs * (len(train_rows) // batch_size)

    # model: built on the meta device, sharded (FSDP2 over each decoder layer, then the root), then filled
    # with the weights that rank 0 alone reads, each rank receiving only its shards
    save_dtype = final_dtype(args.model, args.save_dtype)
    full = PolicyLogprobs(load_model(args.model, args.attn_implementation)) if rank == 0 else None
    lm = empty_model(args.model, args.attn_implementation, torch.float32)
    if args.padding_free:
        lm.set_attn_implementation("packed")
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    compute_dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    model = PolicyLogprobs(lm)
    for layer in lm.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    materialize(model, full, device)
    del full
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_schedule, total_steps, int(args.warmup_ratio * total_steps)))

    start_step = 0
    if args.resume:
        path = latest_checkpoint(args.output_dir)
        start_step = load_checkpoint(path, model, optimizer, scheduler, batch_size, args.seed, rank)
        if rank == 0:
            print(f"resumed from {path}")

    def evaluate():
        """Mean token NLL over the eval set. Each rank takes every world-th batch; every rank runs
        the same number of forwards (FSDP's collectives need it), a rank past the end re-runs a
        batch with zero weight."""
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        step = world * args.per_device_batch_size
        with torch.no_grad():
            for start in range(0, len(evals), step):
                first = start + rank * args.per_device_batch_size
                weight = float(first < len(evals))
                first = first if weight else 0
                chunk = list(range(first, min(first + args.per_device_batch_size, len(evals))))
                batch, = micro_batches(evals, chunk, eval_lengths, 0, 1, len(chunk), None, args.padding_free, pad_id)
                logp = model(**to_device(batch, device))
                totals += weight * torch.stack([-logp.sum().double(), torch.tensor(logp.numel(), device=device)])
        dist.all_reduce(totals)
        model.reshard()  # a no-grad forward leaves the root unsharded
        model.train()
        return (totals[0] / totals[1]).item()

    # logging
    if rank == 0:
        prepare_output_dir(args.output_dir, start_step if args.resume else None)
    if rank == 0 and args.track:
        import wandb
        wandb.init(project=args.wandb_project, name=args.run_name or os.path.basename(args.output_dir.rstrip("/")),
                   config=asdict(args))
    flops_peak = peak_flops(device)
    config = lm.config
    bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, desc="sft")

    def log(metrics, step):
        if rank != 0:
            return
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if args.track:
            import wandb
            wandb.log(metrics, step=step)

    # training loop
    params = [p for p in model.parameters() if p.requires_grad]
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        indices = global_batch(step - 1, len(train_rows), batch_size, args.seed)
        n_loss_tokens = sum(train_rows[i]["n_loss"] for i in indices)
        n_tokens = sum(lengths[i] for i in indices)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        for batch in micro_batches(train_rows, indices, lengths, rank, world, args.per_device_batch_size,
                                   args.max_tokens_per_micro_batch, args.padding_free, pad_id):
            logp = model(**to_device(batch, device))
            # FSDP averages gradients over ranks; scaling by world makes them a global-batch sum
            (-logp.sum() * world / n_loss_tokens).backward()
            loss_sum += -logp.detach().sum().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        dist.all_reduce(loss_sum)
        stop = torch.tensor(float(bool(stop_requested)), device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        elapsed = time.perf_counter() - t0
        if step % args.log_every == 0 or step == total_steps:
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            metrics = {"loss": loss_sum.item() / n_loss_tokens, "grad_norm": grad_norm.item(),
                       "learning_rate": lr, "epoch": step * batch_size / len(train_rows),
                       "perf/tokens_per_second": n_tokens / elapsed}
            if flops_peak:
                attention = 12 * config.num_hidden_layers * config.hidden_size * n_tokens / len(indices)
                metrics["perf/mfu"] = (6 * n_params + attention) * n_tokens / elapsed / (world * flops_peak)
            if evals is not None and args.eval_every and step % args.eval_every == 0:
                metrics["eval_loss"] = evaluate()
            log(metrics, step)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
        bar.update(1)
        if (args.save_every and step % args.save_every == 0) or stop.item():
            save_checkpoint(os.path.join(args.output_dir, f"step_{step}"), model, optimizer, scheduler, step,
                            {**asdict(args), "world_size": world}, rank)
        if stop.item():
            if rank == 0:
                print(f"{stop_requested[0] if stop_requested else 'a signal to another rank'}: saved step_{step}, "
                      "exiting (--resume continues from it)")
            dist.destroy_process_group()
            return
    bar.close()

    if evals is not None and not (args.eval_every and step % args.eval_every == 0):
        eval_loss = evaluate()
        log({"eval_loss": eval_loss}, step)
        if rank == 0:
            print(f"eval_loss {eval_loss:.4f}")
    save_hf(os.path.join(args.output_dir, "final"), model, lm, tokenizer, save_dtype, eot_id, rank)
    if rank == 0:
        print(f"saved {os.path.join(args.output_dir, 'final')}")
    dist.barrier()  # leave together: a gloo rank torn down while its peer still writes can abort it
    dist.destroy_process_group()


if __name__ == "__main__":
    try:
        main(tyro.cli(Args, use_underscores=True))
    except InputError as error:  # the message says what to fix; a traceback would only bury it
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
