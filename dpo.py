"""Direct preference optimization (DPO) and its variants, from a cached reference.

Each row is a prompt with a chosen and a rejected response. DPO raises the policy's log-ratio to
a frozen reference, log pi(y|x) - log pi_ref(y|x), on the chosen response relative to the
rejected one: loss = -log sigmoid(beta * (chosen log-ratio - rejected log-ratio)), which fits
the implicit reward beta * log-ratio to the preferences (Bradley-Terry) while staying close to the
reference. Variants (--loss_type): `ipo` (a squared loss that does not saturate), `dpo_norm`
(Tulu 3: log-probs averaged over response tokens), `simpo` (reference-free, averaged log-probs and
a target margin), each with optional label smoothing (cDPO) where it applies.

The reference log-probs are computed once before training, by the initial policy (or
--ref_model), and cached on disk under a hash of everything they depend on, so no reference model
sits in memory during training and a rerun or --resume skips the reference pass. Chosen and
rejected run in one concatenated forward; only the final assistant response carries log-probs,
which come from nanopost/kernels/ without [tokens, vocab] logits. The loss is a mean over the pairs of the
global batch (all micro-batches, all ranks), so accumulation and data parallelism give the same
update as one batch.

References: Rafailov et al. 2023 (DPO); Azar et al. 2023 (IPO); Mitchell 2023 (cDPO);
Meng et al. 2024 (SimPO); Lambert et al. 2024 (Tulu 3, dpo_norm and its hyperparameters).

    python sft.py && python dpo.py                 # the built-in demo: SFT, then DPO on its output
    torchrun --nproc_per_node 8 dpo.py --model <sft checkpoint> \\
        --dataset allenai/llama-3.1-tulu-3-8b-preference-mixture --loss_type dpo_norm --beta 5 \\
        --lr 5e-7 --max_seq_len 2048 --per_device_batch_size 1 --grad_accum_steps 16 \\
        --gradient_checkpointing
"""

import hashlib
import json
import math
import os
import re
import shutil
import signal
import socket
import sys
import time
from array import array
from dataclasses import asdict, dataclass
from typing import Literal

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
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
    model: str = "runs/sft/final"
    """policy to start from: hub id or local dir (the demo: what `python sft.py` writes)"""
    ref_model: str | None = None
    """reference model, when it is not the initial policy (must share the policy's tokenizer)"""
    dataset: str = "data/dpo_train.jsonl"
    """hub id or local .jsonl/.parquet: `chosen` + `rejected` conversations sharing the prompt, or
    `prompt` + `chosen` + `rejected` (TRL's format; plain strings become a user and an assistant turn)"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    eval_dataset: str | None = "data/dpo_eval.jsonl"
    """same format as --dataset; logs eval_loss and eval_rewards/accuracies (hub datasets: the 'test' split)"""
    max_seq_len: int = 256
    """prompt + response are truncated to this many tokens (Tulu 3: 2048)"""
    attn_implementation: str = "sdpa"
    """attention kernel of the padded path: sdpa, eager, or flash_attention_2 where installed"""
    padding_free: bool = True
    """pack each micro-batch's sequences into one row, attention confined to each sequence (varlen_attn,
    FlashAttention, on CUDA): no compute on padding. --no_padding_free: right-padded rows"""

    # optimization
    lr: float = 1e-4
    """peak learning rate (the demo's tiny model wants 1e-4; Tulu 3 8B used 5e-7)"""
    num_epochs: int = 1
    """passes over the dataset (ignored when --max_steps is set)"""
    max_steps: int | None = None
    """optimizer steps to run; overrides --num_epochs"""
    per_device_batch_size: int = 16
    """preference pairs per micro-batch on each rank (each pair is two sequences)"""
    max_tokens_per_micro_batch: int | None = None
    """also cap micro-batches at this many tokens (padding included), which adds micro-batches to a step
    of long pairs; the global batch stays per_device_batch_size x grad_accum_steps x world size pairs"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step; global batch = this x per_device_batch_size x world size pairs"""
    warmup_ratio: float = 0.1
    """fraction of steps with linear warmup from 0 (Tulu 3: 0.1)"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
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

    # algorithm
    loss_type: Literal["sigmoid", "ipo", "dpo_norm", "simpo"] = "sigmoid"
    """sigmoid: DPO; ipo: IPO; dpo_norm: DPO on length-averaged log-probs (Tulu 3); simpo: SimPO, no reference"""
    beta: float = 0.1
    """strength of the KL regularization / reward scale (DPO 0.1; Tulu 3 dpo_norm 5; SimPO 2-10)"""
    label_smoothing: float = 0.0
    """cDPO: assumed probability that a preference label is flipped (sigmoid, dpo_norm, simpo)"""
    simpo_gamma_beta_ratio: float = 0.5
    """SimPO's target reward margin gamma, as the ratio gamma / beta of the SimPO code (TRL's CPO
    `simpo_gamma` is gamma itself: simpo_gamma = this x beta)"""
    ref_cache_dir: str | None = None
    """directory of reference log-prob caches, ref_logps_<key>.pt (None: --output_dir)"""
    ref_cache: str | None = None
    """explicit cache file: reused if its key matches this run, refused if it does not, else written"""

    # logging and checkpointing
    output_dir: str = "runs/dpo"
    """where metrics.jsonl, step_N/ checkpoints, final/ (Hugging Face format) and the reference cache go"""
    save_every: int = 0
    """save a resumable checkpoint every N steps (0: only on SIGTERM or Ctrl-C)"""
    resume: bool = False
    """continue from the latest output_dir/step_N (metrics.jsonl keeps the steps up to it)"""
    overwrite_output_dir: bool = False
    """start afresh in an output_dir that holds an earlier run (deletes its metrics.jsonl, step_N/, final/)"""
    eval_every: int = 0
    """evaluate every N steps (0: before training and at the end only)"""
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
# The losses. Inputs are per-pair log-probs [B] of the policy and the reference; outputs are
# per-pair losses [B]. Length-averaged variants get log-probs already divided by the number of
# response tokens.


def dpo_loss(chosen_logratios, rejected_logratios, beta, label_smoothing=0.0):
    """DPO (Rafailov et al. 2023) with cDPO label smoothing eps (Mitchell 2023):
        h = beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))]
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)
    dpo_norm (Tulu 3) is this loss on log-probs averaged over each response's tokens."""
    h = beta * (chosen_logratios - rejected_logratios)
    return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(chosen_logratios, rejected_logratios, beta):
    """IPO (Azar et al. 2023, eq. 17, with tau = beta), on token-averaged log-probs as in TRL:
        h = (log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))
        loss = (h - 1 / (2 * beta))^2"""
    return (chosen_logratios - rejected_logratios - 1 / (2 * beta)) ** 2


def simpo_loss(chosen_logps, rejected_logps, beta, gamma_beta_ratio, label_smoothing=0.0):
    """SimPO (Meng et al. 2024), reference-free, on token-averaged log-probs, gamma = ratio * beta:
        h = beta * (avg log pi(y_w|x) - avg log pi(y_l|x)) - gamma
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)"""
    return dpo_loss(chosen_logps - gamma_beta_ratio, rejected_logps, beta, label_smoothing)


AVERAGED = ("ipo", "dpo_norm", "simpo")  # loss types on token-averaged log-probs


def preference_loss(args, policy_logps, ref_logps, n_tokens):
    """The --loss_type loss of a batch of pairs. policy_logps and ref_logps (None for simpo) are
    summed response log-probs [B, 2] (chosen, rejected), n_tokens the response lengths [B, 2].
    Returns per-pair losses [B], the implicit rewards of chosen and rejected [B], and the policy
    log-probs the loss used [B, 2] (averaged for ipo, dpo_norm and simpo). The rewards are beta x
    the log-ratio to the reference of the log-probs the loss used: summed for sigmoid, as TRL logs
    them; length-averaged for dpo_norm and ipo, a factor of the response length smaller than the
    summed log-ratios TRL logs; SimPO: beta x average log-prob, as TRL's CPO logs them."""
    if args.loss_type in AVERAGED:
        policy_logps = policy_logps / n_tokens
        ref_logps = ref_logps / n_tokens if ref_logps is not None else None
    if args.loss_type == "simpo":
        losses = simpo_loss(policy_logps[:, 0], policy_logps[:, 1], args.beta, args.simpo_gamma_beta_ratio,
                            args.label_smoothing)
        return losses, args.beta * policy_logps[:, 0], args.beta * policy_logps[:, 1], policy_logps
    chosen_logratios, rejected_logratios = (policy_logps - ref_logps).unbind(1)
    if args.loss_type == "ipo":
        losses = ipo_loss(chosen_logratios, rejected_logratios, args.beta)
    else:
        losses = dpo_loss(chosen_logratios, rejected_logratios, args.beta, args.label_smoothing)
    return losses, args.beta * chosen_logratios, args.beta * rejected_logratios, policy_logps


# ---------------------------------------------------------------------------------------------
# Data: preference rows -> (prompt + chosen, prompt + rejected) token ids, labels on the response


def end_of_turn_token(tokenizer):
    """The token the chat template puts right after an assistant message (<|im_end|>, <|eot_id|>,
    <end_of_turn>, ...): it carries log-prob as the end of the response."""
    if not tokenizer.chat_template:
        raise InputError("the tokenizer has no chat template; use a model whose tokenizer has one")
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text[text.rindex("PROBE") + len("PROBE"):]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    if not ids or ids[0] not in tokenizer.added_tokens_decoder:
        raise InputError(f"the chat template ends assistant turns with {after!r}, not a special token")
    return tokenizer.convert_ids_to_tokens(ids[0]), ids[0]


def as_messages(value, role, where):
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if not isinstance(value, list) or not all(isinstance(m, dict) for m in value):
        raise InputError(f"{where}: expected a list of {{role, content}} messages or a string, got {value!r:.200}")
    for j, m in enumerate(value):
        if not isinstance(m.get("content"), str) or m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InputError(f"{where}: message {j} must be {{role: system|user|assistant|tool, content: str}}, "
                             f"got {m!r:.200}")
    return value


def split_pair(row, where):
    """(prompt messages, chosen response message, rejected response message) of a preference row
    in either format; a malformed row raises ValueError naming the row and what is wrong."""
    prompt = as_messages(row["prompt"], "user", f"{where} prompt") if row.get("prompt") is not None else []
    chosen = prompt + as_messages(row["chosen"], "assistant", f"{where} chosen")
    rejected = prompt + as_messages(row["rejected"], "assistant", f"{where} rejected")
    for name, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation or conversation[-1]["role"] != "assistant":
            last = conversation[-1]["role"] if conversation else "nothing"
            raise InputError(f"{where}: {name} must end with the assistant's response, but ends with {last}")
        if len(conversation) < 2:
            raise InputError(f"{where}: {name} has no prompt before its response")
    if chosen[:-1] != rejected[:-1]:
        j = next((j for j, (a, b) in enumerate(zip(chosen[:-1], rejected[:-1])) if a != b),
                 min(len(chosen), len(rejected)) - 1)
        raise InputError(f"{where}: chosen and rejected must share the prompt (every message but the last); "
                         f"they differ at message {j}")
    return chosen[:-1], chosen[-1], rejected[-1]


def tokenize_response(tokenizer, prompt, response, eot_text, max_seq_len, where):
    """Token ids of the templated prompt + response, cut right after the response's end-of-turn
    token and truncated to max_seq_len, and labels equal to the ids on the response (content and
    end-of-turn token) and -100 on the prompt."""
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    text = tokenizer.apply_chat_template(prompt + [response], tokenize=False)
    if not text.startswith(prompt_text):
        raise InputError(f"{where}: the chat template renders the prompt differently when a response follows "
                         "(not prefix-stable), so response tokens cannot be located")
    end = text.rfind(eot_text, len(prompt_text))
    if end < 0:
        raise InputError(f"{where}: the response does not end with {eot_text!r}")
    enc = tokenizer(text[:end + len(eot_text)], add_special_tokens=False, return_offsets_mapping=True)
    ids = enc.input_ids[:max_seq_len]
    labels = [tok if start >= len(prompt_text) else -100 for tok, (start, _) in zip(ids, enc.offset_mapping)]
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
    """Tokenized pairs {chosen_ids, chosen_labels, n_chosen, rejected_ids, rejected_labels, n_rejected}
    (n_*: response tokens that carry log-prob). A malformed row stops the run with its index.
    Each node's local rank 0 tokenizes first, so that the node's other ranks read its datasets cache (one
    cache per node, or one that all nodes share)."""
    rows = load_rows(name, split)
    if not {"chosen", "rejected"} <= set(rows.column_names):
        raise InputError(f"{name}: expected `chosen` and `rejected` columns, found {rows.column_names}")

    def tokenize(row, index):
        where = f"{name} row {index}"
        prompt, chosen, rejected = split_pair(row, where)
        out = {}
        for side, response in (("chosen", chosen), ("rejected", rejected)):
            ids, labels = tokenize_response(tokenizer, prompt, response, eot_text, max_seq_len, where)
            # the log-prob at position t is of token t+1, so the first token never counts
            out |= {f"{side}_ids": ids, f"{side}_labels": labels, f"n_{side}": sum(x != -100 for x in labels[1:])}
        return out

    for turn in (0, 1):
        if (os.environ["LOCAL_RANK"] == "0") == (turn == 0):
            rows = rows.map(tokenize, with_indices=True, remove_columns=rows.column_names, desc="tokenizing")
        dist.barrier()
    kept = rows.filter(lambda c, r: c > 0 and r > 0, input_columns=["n_chosen", "n_rejected"])
    if rank == 0 and len(kept) < len(rows):
        print(f"{name}: dropped {len(rows) - len(kept)} pairs whose prompt fills --max_seq_len")
    if len(kept) == 0:
        raise InputError(f"{name}: no pair has response tokens within --max_seq_len={max_seq_len}")
    return kept.to_list()


def global_batch(step, n_rows, batch_size, seed):
    """Row indices of optimizer step `step`: a fresh permutation each epoch, the last partial
    batch dropped. Every rank computes the same list, so nothing needs to be communicated."""
    per_epoch = n_rows // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


def micro_batches(rows, indices, rank, world, per_device, max_tokens, packed, pad_id):
    """This rank's micro-batches of a global batch of pairs, as (pair indices [B], batch) with the B
    chosen sequences, then the B rejected ones (see collate). Pairs are sorted by length and cut, in that
    order, into micro-batches of at most per_device pairs and at most max_tokens tokens, so that padding
    stays small; the micro-batches are dealt out to the ranks in turn."""
    size = {i: (len(rows[i]["chosen_ids"]), len(rows[i]["rejected_ids"])) for i in indices}
    ordered = sorted(indices, key=lambda i: -max(size[i]))

    def tokens(chunk):  # what a forward of these pairs processes: their tokens, or 2 x pairs x longest (padded)
        return sum(sum(size[i]) for i in chunk) if packed else 2 * len(chunk) * max(size[chunk[0]])

    chunks = chunks_of(ordered, tokens, per_device, max_tokens)
    chunks = split_largest(chunks, -(-len(chunks) // world) * world)  # as many on every rank (FSDP's collectives)
    return [(chunk, collate([(rows[i][f"{side}_ids"], rows[i][f"{side}_labels"][1:] + [-100])
                             for side in ("chosen", "rejected") for i in chunk], packed, pad_id))
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
    """The model inputs of (token ids, next-token targets) pairs, as a dict with `targets` (-100: no
    log-prob) and the decoder's inputs. Packed: one row [1, T], the sequences end to end, position ids
    restarting at 0 with each, and the boundaries cu_seq_lens [N + 1] that confine attention to each
    sequence (nanopost/kernels/packed_attention.py), so no compute goes to padding. Padded: rows right-padded to
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


# ---------------------------------------------------------------------------------------------
# Model


class SequenceLogprobs(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that one forward returns each sequence's summed log-prob
    of its targets [rows]. The head runs here, inside the FSDP root module, so FSDP unshards its
    weight (tied to the embedding for Qwen) and reduces its gradient."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, targets, **inputs):
        hidden = self.lm.get_decoder()(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        flat = targets.flatten()
        keep = flat != -100
        logp, _ = linear_logprobs(hidden[keep], self.lm.get_output_embeddings().weight, flat[keep])
        # each token's sequence: its row, or in a packed row the span of cu_seq_lens_q it falls in
        bounds = inputs.get("cu_seq_lens_q")
        lengths = bounds.diff() if bounds is not None else torch.full((len(targets),), targets.shape[1])
        sequence = torch.arange(len(lengths)).to(flat.device).repeat_interleave(lengths.to(flat.device),
                                                                               output_size=len(flat))
        return torch.zeros(len(lengths), device=logp.device).index_add(0, sequence[keep], logp)


WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def load_model(name, attn_implementation):
    """The full model in fp32, which rank 0 alone reads (the others receive their shards from it): the
    checkpoint's weights, or for a dir holding only a config a random init from it."""
    if os.path.isdir(name) and not any(os.path.exists(os.path.join(name, w)) for w in WEIGHTS):
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


def shard(lm, mp, mesh=None):
    """FSDP2 over each decoder layer, then the root."""
    model = SequenceLogprobs(lm)
    for layer in lm.get_decoder().layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


@torch.no_grad()
def all_sequence_logps(model, rows, per_device, packed, rank, world, pad_id, device):
    """Summed log-probs [n, 2] (chosen, rejected) of every pair. Each rank takes every world-th
    micro-batch and the results are summed over ranks; every rank runs the same number of forwards,
    because each forward gathers FSDP shards from all of them."""
    model.eval()
    out = torch.zeros(len(rows), 2, dtype=torch.float64, device=device)
    for first in range(0, len(rows), world * per_device):
        start = first + rank * per_device
        chunk = list(range(start, min(start + per_device, len(rows)))) or [0]  # an idle rank still joins
        (chunk, batch), = micro_batches(rows, chunk, 0, 1, len(chunk), None, packed, pad_id)
        logps = model(**to_device(batch, device)).double()
        if start < len(rows):
            out[chunk] = torch.stack(logps.split(len(chunk)), 1)
    dist.all_reduce(out)
    model.reshard()  # FSDP keeps the root's parameters gathered after a forward without backward
    model.train()
    return out


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
# Reference cache: ref_logps_<key>.pt, keyed by a hash of everything the reference log-probs
# depend on: the reference weights, the exact token ids and labels (dataset content, tokenizer,
# chat template, max_seq_len) and the compute dtype and attention kernel.


def model_fingerprint(name, seed):
    """Identifies a model's weights without reading all of them: its config and each weights
    file's size and 16 sampled 1 MiB blocks (a finetune changes every block). A hub id is resolved
    to its local snapshot first; a config-only dir adds the seed of its random init."""
    path = name
    if not os.path.isdir(name):
        from huggingface_hub import snapshot_download
        path = snapshot_download(name, allow_patterns=["config.json", "*.safetensors", "*.bin"])
    h = hashlib.sha256()
    for file in sorted(f for f in os.listdir(path) if f == "config.json" or f.endswith((".safetensors", ".bin"))):
        size = os.path.getsize(os.path.join(path, file))
        h.update(f"{file}:{size}".encode())
        with open(os.path.join(path, file), "rb") as f:
            for k in range(16):
                f.seek(k * max(0, size - 2**20) // 15)
                h.update(f.read(2**20))
    random_init = not any(os.path.exists(os.path.join(path, w)) for w in WEIGHTS)
    return {"name": name, "files": h.hexdigest(), **({"random_init_seed": seed} if random_init else {})}


def data_fingerprint(rows):
    h = hashlib.sha256()
    for row in rows:
        for column in ("chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"):
            h.update(array("i", row[column]).tobytes())
    return h.hexdigest()


def load_reference_cache(path, key, meta, explicit):
    """The cached {"train", "eval"} log-probs at path if its key is this run's. An explicit
    --ref_cache with another key is refused; a default path holds the key in its name."""
    if not os.path.exists(path):
        return None
    cache = torch.load(path, weights_only=True)
    if cache["key"] != key:
        differs = {k: (cache["meta"].get(k), v) for k, v in meta.items() if cache["meta"].get(k) != v}
        raise InputError(f"--ref_cache {path} holds reference log-probs of another setup; differing (cached, "
                         f"this run): {differs}. Delete the file or pass another --ref_cache"
                         if explicit else f"{path}: stored key does not match its name; delete it")
    return cache


def reference_logps(args, model, mp, mesh, compute_dtype, train_rows, eval_rows, pad_id, rank, world, device):
    """[n, 2] reference log-probs (chosen, rejected) of the train and eval pairs: read from the
    cache when its key matches, else one no-grad pass of --ref_model (or of model, the initial
    policy) over every pair, saved atomically for the next run."""
    # rank 0 looks for the cache and tells the others (their filesystem may not hold it)
    found = [None] * 4
    if rank == 0:
        meta = {"ref_model": model_fingerprint(args.ref_model or args.model, args.seed),
                "dataset": args.dataset, "eval_dataset": args.eval_dataset, "max_seq_len": args.max_seq_len,
                "tokens": data_fingerprint(train_rows + eval_rows), "dtype": str(compute_dtype),
                "attn_implementation": "packed" if args.padding_free else args.attn_implementation}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()
        path = args.ref_cache or os.path.join(args.ref_cache_dir or args.output_dir, f"ref_logps_{key[:16]}.pt")
        try:
            found = [path, key, meta, load_reference_cache(path, key, meta, explicit=bool(args.ref_cache))]
        except ValueError as error:
            found = [path, key, meta, error]
    dist.broadcast_object_list(found)
    path, key, meta, cache = found
    if isinstance(cache, ValueError):
        raise cache
    if rank == 0:
        print(f"reference log-probs: reusing {path} (no reference pass)" if cache is not None else
              f"reference log-probs: one pass of {args.ref_model or args.model} over "
              f"{len(train_rows) + len(eval_rows)} pairs, cached in {path}")
    if cache is None:
        ref = model
        if args.ref_model:  # loaded as the policy is, its parameters stored in the compute dtype (frozen)
            attention = "packed" if args.padding_free else args.attn_implementation
            ref = shard(empty_model(args.ref_model, attention, compute_dtype), mp, mesh)
            materialize(ref, SequenceLogprobs(load_model(args.ref_model, args.attn_implementation)) if rank == 0
                        else None, device)
        cache = {"key": key, "meta": meta,
                 "train": all_sequence_logps(ref, train_rows, args.per_device_batch_size, args.padding_free, rank,
                                             world, pad_id, device).cpu(),
                 "eval": all_sequence_logps(ref, eval_rows, args.per_device_batch_size, args.padding_free, rank,
                                            world, pad_id, device).cpu()}
        if rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            torch.save(cache, path + ".tmp")
            os.replace(path + ".tmp", path)
    if cache["train"].shape != (len(train_rows), 2) or cache["eval"].shape != (len(eval_rows), 2):
        raise InputError(f"{path} holds {len(cache['train'])} + {len(cache['eval'])} pairs, this run has "
                         f"{len(train_rows)} + {len(eval_rows)}; delete it")
    return cache["train"].to(device), cache["eval"].to(device)


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
        raise InputError(f"{path} was trained with a global batch of {saved_batch} pairs and --seed "
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
    node or several; a plain `python dpo.py` becomes a world of one."""
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
    for name in ("per_device_batch_size", "grad_accum_steps", "max_seq_len", "num_epochs", "log_every"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.max_tokens_per_micro_batch is not None and args.max_tokens_per_micro_batch < 1:
        raise InputError(f"--max_tokens_per_micro_batch must be >= 1, got {args.max_tokens_per_micro_batch}")
    if not 0 <= args.warmup_ratio < 1:
        raise InputError(f"--warmup_ratio must be in [0, 1), got {args.warmup_ratio}")
    for name in ("lr", "beta"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.label_smoothing < 0.5:
        raise InputError(f"--label_smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.label_smoothing and args.loss_type == "ipo":
        raise InputError("--label_smoothing does not apply to --loss_type ipo")
    if args.loss_type == "simpo" and (args.ref_model or args.ref_cache):
        raise InputError("--loss_type simpo uses no reference: drop --ref_model / --ref_cache")
    if names_local_path(args.model) and not os.path.isdir(args.model):
        raise InputError(f"--model {args.model}: no such directory{demo_checkpoints_hint(['sft'])}")
    if args.ref_model and names_local_path(args.ref_model) and not os.path.isdir(args.ref_model):
        raise InputError(f"--ref_model {args.ref_model}: no such directory")
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
    train_rows = tokenize_dataset(args.dataset, args.dataset_split, tokenizer, eot_text, args.max_seq_len, rank)
    eval_rows = tokenize_dataset(args.eval_dataset, "test", tokenizer, eot_text, args.max_seq_len, rank) \
        if args.eval_dataset else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot_id  # never a target
    batch_size = args.per_device_batch_size * args.grad_accum_steps * world
    if len(train_rows) < batch_size:
        raise InputError(f"{args.dataset} has {len(train_rows)} usable pairs, fewer than one global batch "
                         f"({batch_size} = per_device_batch_size x grad_accum_steps x world size)")
    total_steps = args.max_steps or args.num_epochs * (len(train_rows) // batch_size)

    def response_lengths(rows):
        return torch.tensor([[row["n_chosen"], row["n_rejected"]] for row in rows], dtype=torch.float64, device=device)

    train_lengths, eval_lengths = response_lengths(train_rows), response_lengths(eval_rows)

    # model
    compute_dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    save_dtype = final_dtype(args.model, args.save_dtype)
    # built on the meta device, sharded, then filled with the weights that rank 0 alone reads, each rank
    # receiving only its shards
    full = SequenceLogprobs(load_model(args.model, args.attn_implementation)) if rank == 0 else None
    lm = empty_model(args.model, "packed" if args.padding_free else args.attn_implementation, torch.float32)
    if args.gradient_checkpointing:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = shard(lm, mp, mesh)
    materialize(model, full, device)
    del full
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(args.lr_schedule, total_steps, int(args.warmup_ratio * total_steps)))

    # reference log-probs: from the cache, or one pass of the initial policy (or --ref_model) now,
    # before any update and before --resume loads trained weights
    ref_train = ref_eval = None
    if args.loss_type != "simpo":
        ref_train, ref_eval = reference_logps(args, model, mp, mesh, compute_dtype, train_rows, eval_rows, pad_id,
                                              rank, world, device)

    start_step = 0
    if args.resume:
        path = latest_checkpoint(args.output_dir)
        start_step = load_checkpoint(path, model, optimizer, scheduler, batch_size, args.seed, rank)
        if rank == 0:
            print(f"resumed from {path}")

    def evaluate():
        """Held-out preference metrics: mean loss, how often the implicit reward of chosen beats
        rejected (policy vs reference), and how often the policy's own log-prob does."""
        logps = all_sequence_logps(model, eval_rows, args.per_device_batch_size, args.padding_free, rank, world,
                                   pad_id, device)
        losses, chosen_rewards, rejected_rewards, policy = preference_loss(args, logps, ref_eval, eval_lengths)
        return {"eval_loss": losses.mean().item(),
                "eval_rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean().item(),
                "eval_rewards/margins": (chosen_rewards - rejected_rewards).mean().item(),
                "eval_logps/accuracies": (policy[:, 0] > policy[:, 1]).double().mean().item()}

    # logging
    if rank == 0:
        prepare_output_dir(args.output_dir, start_step if args.resume else None)
    if rank == 0 and args.track:
        import wandb
        wandb.init(project=args.wandb_project, name=args.run_name or os.path.basename(args.output_dir.rstrip("/")),
                   config=asdict(args))
    flops_peak = peak_flops(device)
    config = lm.config
    bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, desc=f"dpo ({args.loss_type})")

    def log(metrics, step):
        if rank != 0:
            return
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if args.track:
            import wandb
            wandb.log(metrics, step=step)

    if eval_rows and start_step == 0:
        log(evaluate(), 0)

    # training loop
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        indices = global_batch(step - 1, len(train_rows), batch_size, args.seed)
        n_tokens = sum(len(train_rows[i]["chosen_ids"]) + len(train_rows[i]["rejected_ids"]) for i in indices)
        # sums over this rank's pairs: loss, rewards chosen/rejected, correct, logps chosen/rejected
        totals = torch.zeros(6, dtype=torch.float64, device=device)
        for chunk, batch in micro_batches(train_rows, indices, rank, world, args.per_device_batch_size,
                                          args.max_tokens_per_micro_batch, args.padding_free, pad_id):
            logps = model(**to_device(batch, device))
            chunk = torch.tensor(chunk, device=device)
            losses, chosen_rewards, rejected_rewards, policy = preference_loss(
                args, torch.stack(logps.split(len(chunk)), 1), ref_train[chunk] if ref_train is not None else None,
                train_lengths[chunk])
            # FSDP averages gradients over ranks; scaling by world makes them a global-batch mean
            (losses.sum() * world / batch_size).backward()
            totals += torch.stack([losses.sum(), chosen_rewards.sum(), rejected_rewards.sum(),
                                   (chosen_rewards > rejected_rewards).sum(), policy[:, 0].sum(),
                                   policy[:, 1].sum()]).detach().double()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm or float("inf"))
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        dist.all_reduce(totals)
        stop = torch.tensor(float(bool(stop_requested)), device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        elapsed = time.perf_counter() - t0
        if step % args.log_every == 0 or step == total_steps:
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
            loss, chosen, rejected, correct, logps_chosen, logps_rejected = (totals / batch_size).tolist()
            metrics = {"loss": loss, "grad_norm": grad_norm.item(), "learning_rate": lr,
                       "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/accuracies": correct,
                       "rewards/margins": chosen - rejected, "logps/chosen": logps_chosen,
                       "logps/rejected": logps_rejected, "epoch": step * batch_size / len(train_rows),
                       "perf/tokens_per_second": n_tokens / elapsed}
            if flops_peak:
                attention = 12 * config.num_hidden_layers * config.hidden_size * n_tokens / (2 * len(indices))
                metrics["perf/mfu"] = (6 * n_params + attention) * n_tokens / elapsed / (world * flops_peak)
            if eval_rows and args.eval_every and step % args.eval_every == 0:
                metrics |= evaluate()
            log(metrics, step)
            bar.set_postfix(loss=f"{loss:.4f}", acc=f"{correct:.2f}", margin=f"{chosen - rejected:.3f}")
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

    if eval_rows and not (args.eval_every and step % args.eval_every == 0 and step > start_step):
        metrics = evaluate()
        log(metrics, step)
        if rank == 0:
            print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
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
