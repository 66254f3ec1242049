"""PPO with a value model and verifiable rewards (RLVR), as in Tulu 3.

Each step samples one completion per prompt from the current policy, scores it with the row's
verifier (`verifiers.get(row["dataset"])`, times --verification_reward, placed on the completion's
last token) and adds a per-token KL penalty -beta * (logp - ref_logp) against the frozen starting
model. A value model (the same architecture with a scalar head) estimates the return of every
prefix; GAE turns rewards and values into advantages, which are whitened. The rollout batch is
then reused for --num_ppo_epochs passes of --num_mini_batches optimizer steps, each minimizing
the clipped policy surrogate plus --vf_coef times the clipped value loss.

Implementation details from Huang et al. 2024 ("The N Implementation Details of RLHF with PPO")
and TRL / open-instruct that are implemented here:
  - the reference and the value model start from the policy's initial weights (the value model
    optionally from --value_model, e.g. a reward model); the new value head has std 1/sqrt(H+1);
  - dropout is off in every model, so log-probs of the same tokens agree between passes;
  - log-probs are recomputed at the sampling temperature (logits / T), for policy and reference;
  - generation stops at the chat template's end-of-turn token; tokens after it are padding and
    carry no loss, reward or value; a completion with no end-of-turn token gets the
    --non_stop_penalty as its score instead of its verifier's (open-instruct);
  - per-token KL penalty (k1 or k3), score on the last completion token, optional reward
    whitening (no mean shift); GAE with values set to 0 after the last token;
  - advantages whitened over the valid tokens of the whole rollout batch (all ranks);
  - the first PPO epoch visits the rollout in the order its log-probs were computed, so the first
    minibatch reproduces them exactly (ratio 1); later epochs shuffle;
  - clipped surrogate (--cliprange), clipped value loss 0.5 * max((V - R)^2, (Vclip - R)^2)
    (--cliprange_value), approx KL 0.5 * mean((logp - old_logp)^2), global-norm gradient clipping
    per model, linear learning-rate decay over all optimizer steps;
  - losses are sums over tokens divided by the number of valid tokens of the whole minibatch (all
    micro-batches, all ranks), so gradient accumulation and data parallelism give the same update.

References: Schulman et al. 2017 (PPO); Schulman et al. 2016 (GAE); Ouyang et al. 2022
(InstructGPT); Huang et al. 2024 (The N Implementation Details of RLHF with PPO); Lambert et al.
2024 (Tulu 3, RLVR).

    python ppo_rlvr.py --model runs/sft/final      # the built-in demo: tiny model, data/, CPU ok
    torchrun --nproc_per_node 8 ppo_rlvr.py --model <dpo checkpoint> \\
        --dataset allenai/RLVR-GSM-MATH-IF-Mixed-Constraints --beta 0.05 --lr 3e-7 \\
        --max_prompt_len 2048 --max_new_tokens 2048 --temperature 1.0 --per_device_batch_size 2 \\
        --grad_accum_steps 8 --num_ppo_epochs 4 --num_mini_batches 1 --gradient_checkpointing \\
        --eval_dataset None
"""

import copy
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
from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, GenerationConfig)
from transformers.generation import CompileConfig
from transformers.utils import logging as transformers_logging

from nanopost import verifiers
from nanopost.kernels import linear_logprobs
from nanopost.kernels.packed_attention import packed_attention

AttentionInterface.register("packed", packed_attention)


@dataclass
class Args:
    # model and data
    model: str = "runs/dpo/final"
    """policy to start from (hub id or local dir); the demo chain writes runs/sft/final, then runs/dpo/final"""
    value_model: str | None = None
    """value model init: a reward model or causal LM (hub id or dir); default: --model with a new head"""
    dataset: str = "data/rl_train.jsonl"
    """hub id or local .jsonl/.parquet with `messages` (the prompt), `ground_truth` and `dataset` (verifier)"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    eval_dataset: str | None = "data/test.jsonl"
    """same format; greedy accuracy (mean verifier score) is logged as eval/accuracy (hub: 'test' split)"""
    max_prompt_len: int = 128
    """prompts longer than this many tokens are dropped (Tulu 3: 2048)"""
    max_new_tokens: int = 32
    """completion length cap (Tulu 3: 2048)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are recomputed at it"""
    attn_implementation: str = "sdpa"
    """attention kernel of generation and of the padded path: sdpa, eager, or flash_attention_2 where installed"""
    padding_free: bool = True
    """pack each micro-batch's sequences into one row, attention confined to each sequence (varlen_attn,
    FlashAttention, on CUDA): no compute on padding. --no_padding_free: right-padded rows"""

    # optimization
    lr: float = 3e-5
    """policy learning rate (Tulu 3 8B RLVR: 3e-7)"""
    value_lr: float | None = None
    """value model learning rate (None: --lr)"""
    num_epochs: int = 1
    """passes over the prompts (ignored when --max_steps is set)"""
    max_steps: int | None = None
    """PPO steps (rollout + update) to run; overrides --num_epochs"""
    per_device_batch_size: int = 16
    """completions per micro-batch on each rank"""
    max_tokens_per_micro_batch: int | None = None
    """also cap micro-batches at this many tokens (prompts and padding included), which adds micro-batches
    to a minibatch of long completions; the minibatches stay the same"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step (one minibatch)"""
    num_mini_batches: int = 1
    """optimizer steps per pass over a rollout batch; prompts per step = this x grad_accum_steps x
    per_device_batch_size x world size"""
    num_ppo_epochs: int = 4
    """passes over each rollout batch"""
    warmup_ratio: float = 0.0
    """fraction of optimizer steps with linear warmup from 0"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "linear"
    """decay after warmup, to 0 at the last step"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm, per model (0 disables)"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """compute dtype in forward/backward (master weights and grad reduction stay fp32); also the dtype of
    the generation copy and the frozen reference. auto = bf16 on CUDA, fp32 on CPU"""
    save_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """dtype of final/'s weights. auto = the source model's (the dtype its config names; fp32 if none)"""
    generation_cache: Literal["auto", "static", "dynamic"] = "auto"
    """KV cache for sampling: static (prompts left-padded to --max_prompt_len, a fixed-size cache, the decode
    step compiled once with torch.compile and replayed, on GPUs as a CUDA graph; compiling takes a while
    once) or dynamic (grows with each token, no compilation). auto = static on CUDA, dynamic elsewhere"""
    gradient_checkpointing: bool = False
    """recompute each decoder layer's activations in backward"""
    hsdp: bool = False
    """hybrid sharding: shard the model within each node and replicate it across nodes (less traffic between
    nodes, more memory per GPU); default: shard it over all ranks"""
    seed: int = 1
    """seeds init, data order and sampling (rank r samples with seed + r)"""

    # PPO
    beta: float = 0.05
    """KL penalty coefficient (Tulu 3: 0.05)"""
    kl_estimator: Literal["k1", "k3"] = "k1"
    """per-token KL: k1 = logp - ref_logp; k3 = exp(ref - logp) - 1 - (ref - logp)"""
    verification_reward: float = 10.0
    """score = verifier output in [0, 1] times this (Tulu 3: 10)"""
    non_stop_penalty: float | None = -10.0
    """score of a completion without an end-of-turn token, replacing its verifier's (Tulu 3: -10; None: off)"""
    whiten_rewards: bool = False
    """whiten the per-token rewards (without shifting their mean) before GAE"""
    gamma: float = 1.0
    """discount"""
    lam: float = 0.95
    """GAE lambda"""
    cliprange: float = 0.2
    """policy ratio clip"""
    cliprange_value: float = 0.2
    """value prediction clip around the rollout's values"""
    vf_coef: float = 0.1
    """value loss weight"""

    # logging and checkpointing
    output_dir: str = "runs/ppo"
    """where metrics.jsonl, step_N/ checkpoints and final/ (Hugging Face format, the policy) go"""
    save_every: int = 0
    """save a resumable checkpoint every N steps (0: only on SIGTERM or Ctrl-C)"""
    resume: bool = False
    """continue from the latest output_dir/step_N (metrics.jsonl keeps the steps up to it)"""
    overwrite_output_dir: bool = False
    """start afresh in an output_dir that holds an earlier run (deletes its metrics.jsonl, step_N/, final/)"""
    eval_every: int = 0
    """eval accuracy every N steps and before the first (0: only at the end)"""
    eval_batch_size: int = 64
    """prompts per greedy generation call in eval"""
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
# PPO math: pure functions on [B, T] tensors (T = completion positions), `mask` = valid tokens


def masked_whiten(x, mask, shift_mean=True, distributed=False):
    """(x - mean) / std over the valid entries (of all ranks when distributed); std with Bessel's
    correction. shift_mean=False adds the mean back (reward whitening keeps the reward's sign)."""
    mask = mask.to(x.dtype)
    sums = torch.stack([(x * mask).sum(), mask.sum()]).double()
    if distributed:
        dist.all_reduce(sums)
    mean = (sums[0] / sums[1]).to(x.dtype)
    sq = ((x - mean) ** 2 * mask).sum().double()
    if distributed:
        dist.all_reduce(sq)
    var = (sq / (sums[1] - 1)).to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return (whitened if shift_mean else whitened + mean) * mask


def kl_estimate(logp, ref_logp, estimator):
    """Per-token KL(policy || reference) estimate from the sampled token's log-probs."""
    if estimator == "k1":
        return logp - ref_logp
    log_ratio = ref_logp - logp
    return log_ratio.exp() - 1 - log_ratio


def token_rewards(scores, kl, mask, beta):
    """Per-token rewards: -beta * kl on every valid token, plus the sequence's score on its last one."""
    non_score = -beta * kl * mask
    last = mask.sum(1).long() - 1
    rewards = non_score.clone()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, non_score


def gae(rewards, values, mask, gamma, lam):
    """Generalized advantage estimation. Values and rewards after a sequence's last token are 0, so
    the last token bootstraps from nothing. Returns (advantages, returns = advantages + values)."""
    rewards, values = rewards * mask, values * mask
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        next_value = values[:, t + 1] if t + 1 < rewards.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def ppo_loss(logp, old_logp, advantages, values, old_values, returns, mask, n_tokens, cliprange, cliprange_value,
             vf_coef):
    """Clipped policy loss + vf_coef x clipped value loss, summed over the valid tokens and divided
    by n_tokens (the minibatch's valid tokens on all ranks and micro-batches). Also returns the
    token sums of the statistics TRL logs. Where each clip binds is decided by explicit comparisons
    rather than by max() and clamp(), whose gradients at ties and bounds differ between torch
    releases: a ratio or value on the clip boundary keeps its full, unclipped gradient."""
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    # the policy clip binds where it lowers the objective: A > 0 above 1 + clip, A < 0 below 1 - clip;
    # there the loss is the constant -A clip(ratio), with no gradient
    pg_clipped = ((advantages > 0) & (ratio > 1 + cliprange)) | ((advantages < 0) & (ratio < 1 - cliprange))
    pg_losses = -advantages * torch.where(pg_clipped, ratio.clamp(1 - cliprange, 1 + cliprange).detach(), ratio)
    # the value clip binds where the clipped prediction's error is the larger one (the prediction left
    # the range around the rollout's value); there the loss is constant too
    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_unclipped, vf_clipped = (values - returns) ** 2, (values_clipped - returns) ** 2
    vf_binds = vf_clipped > vf_unclipped
    vf_losses = 0.5 * torch.where(vf_binds, vf_clipped.detach(), vf_unclipped)
    loss = ((pg_losses + vf_coef * vf_losses) * mask).sum() / n_tokens
    with torch.no_grad():
        stats = torch.stack([pg_losses, vf_losses, pg_clipped.float(), vf_binds.float(), 0.5 * log_ratio ** 2, ratio])
        stats = (stats * mask).flatten(1).sum(1).double()
    return loss, stats  # stats: policy loss, value loss, policy clipped, value clipped, approx kl, ratio


# ---------------------------------------------------------------------------------------------
# Data: prompts, checked against their verifiers before any compute


def end_of_turn_token(tokenizer):
    """The token the chat template puts right after an assistant message; generation stops at it."""
    if not tokenizer.chat_template:
        raise InputError("the tokenizer has no chat template; use a model whose tokenizer has one")
    probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "PROBE"}]
    text = tokenizer.apply_chat_template(probe, tokenize=False)
    after = text[text.rindex("PROBE") + len("PROBE"):]
    ids = tokenizer(after, add_special_tokens=False).input_ids
    if not ids or ids[0] not in tokenizer.added_tokens_decoder:
        raise InputError(f"the chat template ends assistant turns with {after!r}, not a special token")
    return ids[0]


def check_row(row, where):
    """A row's prompt conversation, verifier and ground truth; a ValueError names what is wrong."""
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: `messages` must be a non-empty list of {{role, content}}, got {messages!r:.200}")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or \
                m.get("role") not in ("system", "user", "assistant", "tool"):
            raise InputError(f"{where}: message {j} must be {{role: system|user|assistant|tool, content: str}}, "
                             f"got {m!r:.200}")
    if messages[-1]["role"] == "assistant":
        raise InputError(f"{where}: the prompt ends with an assistant message; `messages` must be the prompt only")
    if not isinstance(row.get("ground_truth"), str):
        raise InputError(f"{where}: `ground_truth` must be a string, got {row.get('ground_truth')!r:.200}")
    try:
        verify = verifiers.get(str(row.get("dataset")))
    except KeyError:
        raise InputError(f"{where}: unknown verifier dataset={row.get('dataset')!r}; "
                         f"known: {verifiers.names()}") from None
    try:
        verify("", row["ground_truth"])
    except ValueError as e:
        raise InputError(f"{where}: ground truth {row['ground_truth']!r:.200} is unusable: {e}") from None


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


def load_prompts(name, split, tokenizer, max_prompt_len, rank):
    """Checked and tokenized rows {prompt_ids, ground_truth, verifier}. Each node's local rank 0 goes first,
    so that the node's other ranks read its datasets cache (one cache per node, or one that all nodes share)."""
    rows = load_rows(name, split)
    missing = {"messages", "ground_truth", "dataset"} - set(rows.column_names)
    if missing:
        raise InputError(f"{name}: missing columns {sorted(missing)}; found {rows.column_names}")

    def tokenize(row, index):
        check_row(row, f"{name} row {index}")
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
        return {"prompt_ids": tokenizer(text, add_special_tokens=False).input_ids,
                "ground_truth": row["ground_truth"], "verifier": row["dataset"]}

    for turn in (0, 1):
        if (os.environ["LOCAL_RANK"] == "0") == (turn == 0):
            rows = rows.map(tokenize, with_indices=True, remove_columns=rows.column_names, desc="checking prompts")
        dist.barrier()
    kept = rows.filter(lambda ids: len(ids) <= max_prompt_len, input_columns="prompt_ids")
    if rank == 0 and len(kept) < len(rows):
        print(f"{name}: dropped {len(rows) - len(kept)} prompts longer than --max_prompt_len={max_prompt_len}")
    if len(kept) == 0:
        raise InputError(f"{name}: no prompt fits in --max_prompt_len={max_prompt_len}")
    return kept.to_list()


def global_batch(step, n_rows, batch_size, seed):
    """Row indices of PPO step `step`: a fresh permutation each epoch, the last partial batch dropped."""
    per_epoch = n_rows // batch_size
    epoch, position = divmod(step, per_epoch)
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch))
    return order[position * batch_size:(position + 1) * batch_size].tolist()


# ---------------------------------------------------------------------------------------------
# Models


class PolicyLogprobs(torch.nn.Module):
    """Causal LM -> log-probs (and entropies) of the completion tokens at a temperature, laid out like
    `completion_mask` [B, T] (0 elsewhere), from a micro_batch. The head runs here, inside the FSDP
    root, and only on real targets."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, targets, completion_mask, temperature, **inputs):
        hidden = self.lm.get_decoder()(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        keep = targets.flatten() != -100
        logp, entropy = linear_logprobs(hidden[keep], self.lm.get_output_embeddings().weight, targets.flatten()[keep],
                                        temperature=temperature, with_entropy=True)
        return tuple(torch.zeros(completion_mask.shape, device=x.device).masked_scatter(completion_mask, x)
                     for x in (logp, entropy))


class ValueModel(torch.nn.Module):
    """Sequence-classification model (decoder + `score` Linear(H, 1)) -> the value of each state
    before a completion token: the head reads the hidden state that predicts that token."""

    def __init__(self, seqcls):
        super().__init__()
        self.seqcls = seqcls

    def forward(self, targets, completion_mask, **inputs):
        hidden = self.seqcls.base_model(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        values = self.seqcls.score(hidden[targets.flatten() != -100]).squeeze(-1).float()
        # laid out like completion_mask, in a fresh tensor: FSDP's backward hook on a view is lost if
        # the view is written in place
        return torch.zeros(completion_mask.shape, device=values.device).masked_scatter(completion_mask, values)


def dropout_rates(config):
    """The config's dropout probabilities: attention_dropout, hidden_dropout, resid_pdrop, ..."""
    return {key: value for key, value in config.to_dict().items() if "dropout" in key or key.endswith("pdrop")}


def load_config(name):
    """The model's config with dropout off (modules read their rates when they are built)."""
    config = AutoConfig.from_pretrained(name)
    config.update(dict.fromkeys(dropout_rates(config), 0.0))
    return config


def has_weights(name):
    files = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
    return not os.path.isdir(name) or any(os.path.exists(os.path.join(name, f)) for f in files)


def load_causal_lm(name, attn_implementation):
    """The full policy in fp32, which rank 0 alone reads (the others receive their shards from it): the
    checkpoint's weights, or for a dir holding only a config a random init from it."""
    config = load_config(name)
    if not has_weights(name):
        print(f"WARNING: {name} has a config but no weights: initializing the model randomly")
        return AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(name, config=config, attn_implementation=attn_implementation,
                                                dtype=torch.float32)


def empty_model(name, attn_implementation, dtype, value_model=False):
    """The policy, or the value model (a score head with one output), on the meta device with dropout off:
    parameters in `dtype`, no memory until materialize. The policy has the source's generation config,
    which final/ keeps."""
    config = load_config(name)
    if value_model:
        config.num_labels = 1
        with torch.device("meta"):
            return AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation,
                                                                  dtype=dtype)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
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


def load_value_model(name, attn_implementation):
    """The full value model in fp32, which rank 0 alone reads: a reward model keeps its score head; a causal
    LM (or a config only) gets a new one with std 1/sqrt(H + 1), as open-instruct."""
    config = load_config(name)
    config.num_labels = 1
    if has_weights(name):
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its report would list the new head as a missing weight
        try:
            seqcls, info = AutoModelForSequenceClassification.from_pretrained(
                name, config=config, attn_implementation=attn_implementation, dtype=torch.float32,
                output_loading_info=True)
        finally:
            transformers_logging.set_verbosity(verbosity)
        missing = sorted(set(info["missing_keys"]) - {"score.weight", "score.bias"})
        if missing:
            raise ValueError(f"value model {name}: no weights for {missing[:5]}")
        new_head = "score.weight" in info["missing_keys"]
    else:
        seqcls = AutoModelForSequenceClassification.from_config(config, attn_implementation=attn_implementation,
                                                                dtype=torch.float32)
        new_head = True
    if new_head:
        torch.nn.init.normal_(seqcls.score.weight, std=1 / math.sqrt(config.hidden_size + 1))
        if seqcls.score.bias is not None:
            torch.nn.init.zeros_(seqcls.score.bias)
    print(f"value model: {name} with " + ("a new score head, std 1/sqrt(H+1)" if new_head else "its own score head"))
    return seqcls


def disable_dropout(module):
    for m in module.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def shard(wrapper, decoder, mp, mesh=None):
    """FSDP2: each decoder layer, then the root (which holds the head)."""
    for layer in decoder.layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(wrapper, mesh=mesh, mp_policy=mp)


def generation_copy(lm, dtype, device, attn_implementation):
    """A full (unsharded) model of the policy's architecture in `dtype`, allocated on `device` alone (built
    on the meta device), for sampling; refresh_generation_copy fills in the weights, and the buffers
    (rotary frequencies) are the policy's. Built from the config alone, so it inherits no sampling
    defaults from the source's generation_config.json (repetition_penalty, top_k, ...)."""
    config = copy.deepcopy(lm.config)  # from_config writes the dtype into the config it is given
    with torch.device("meta"):
        gen_lm = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, dtype=dtype)
    gen_lm.to_empty(device=device)
    gen_lm.tie_weights()  # to_empty gave the tied modules a parameter each
    for name, buffer in lm.named_buffers():
        gen_lm.get_buffer(name).copy_(buffer)
    return gen_lm.eval()


def cache_settings(static):
    """GenerationConfig fields for the KV cache: always on (whatever the model's config says), and
    with `static` a fixed-size cache, so that generate compiles the decode step once (torch.compile)
    and replays it; transformers would compile only on GPUs, this asks it to on any device."""
    if not static:
        return {"use_cache": True}
    compile_config = CompileConfig()
    compile_config._compile_all_devices = True
    return {"use_cache": True, "cache_implementation": "static", "compile_config": compile_config}


@torch.no_grad()
def refresh_generation_copy(model, gen_lm):
    """Copies the current FSDP weights into the full copy, one parameter at a time (each rank
    gathers each parameter once), in place, so that a compiled generation graph stays valid."""
    targets = dict(gen_lm.named_parameters())
    names = {name.removeprefix("lm.") for name, _ in model.named_parameters()}
    if names != set(targets):
        raise RuntimeError(f"generation copy out of sync: {sorted(names ^ set(targets))}")
    for name, param in model.named_parameters():
        full = param.full_tensor() if hasattr(param, "full_tensor") else param
        targets[name.removeprefix("lm.")].copy_(full)


@torch.no_grad()
def generate(generator, prompts, pad_id, eot_id, max_new_tokens, temperature, greedy, device, static_width=None):
    """Left-padded prompts [B, P] with their attention mask, completions [B, R] (pad after the
    end-of-turn token) and the completion mask (tokens up to and including it). With static_width,
    prompts are padded to that width and the KV cache is static (see cache_settings)."""
    width = static_width or max(len(p) for p in prompts)
    query = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    query_mask = torch.zeros_like(query)
    for b, p in enumerate(prompts):
        query[b, width - len(p):] = torch.tensor(p)
        query_mask[b, width - len(p):] = 1
    query, query_mask = query.to(device), query_mask.to(device)
    # top_k=0 and top_p=1 explicitly: unset, generate() would fill in top_k=50 and not sample from the policy
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=not greedy, temperature=1.0 if greedy else
                              temperature, top_k=0, top_p=1.0, eos_token_id=eot_id, pad_token_id=pad_id,
                              **cache_settings(static_width is not None))
    out = generator.generate(input_ids=query, attention_mask=query_mask, generation_config=config)
    completion = out[:, width:]
    is_end = completion == eot_id
    length = torch.where(is_end.any(1), is_end.int().argmax(1) + 1, completion.shape[1])
    mask = torch.arange(completion.shape[1], device=device)[None] < length[:, None]
    return query, query_mask, torch.where(mask, completion, pad_id), mask


def rollout_sequences(query, query_mask, completion, mask):
    """Each row of a rollout as (token ids, next-token targets) without padding: its prompt and its
    completion, with the completion tokens as targets (-100 elsewhere)."""
    sequences = []
    for ids, real, tokens, n in zip(query.tolist(), query_mask.tolist(), completion.tolist(), mask.sum(1).tolist()):
        prompt = [t for t, is_real in zip(ids, real) if is_real]
        sequences.append((prompt + tokens[:n], [-100] * (len(prompt) - 1) + tokens[:n] + [-100]))
    return sequences


def micro_batches(sequences, mask, rows, per_device, max_tokens, packed, pad_id):
    """Some rows of this rank's rollout, in their order, cut into micro-batches of at most per_device
    rows and at most max_tokens tokens; every rank runs as many as the busiest (FSDP's collectives),
    splitting its own where short. Returns (rows, micro_batch) pairs."""

    def tokens(chunk):  # what a forward of these rows processes: their tokens, or rows x longest (padded)
        lengths = [len(sequences[b][0]) for b in chunk]
        return sum(lengths) if packed else len(chunk) * max(lengths)

    chunks = chunks_of(rows, tokens, per_device, max_tokens)
    n_micro = torch.tensor(len(chunks), device=mask.device)
    dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
    chunks = split_largest(chunks, int(n_micro))
    return [(chunk, micro_batch(sequences, mask, chunk, packed, pad_id)) for chunk in chunks]


def micro_batch(sequences, mask, rows, packed, pad_id):
    """The model inputs (see collate) of some rows of a rollout, given as rollout_sequences and the
    completion mask [B, R], with `completion_mask` [rows, T] (T: their longest completion), the layout
    of the per-token outputs."""
    width = int(mask[rows].sum(1).max())
    return {**collate([sequences[b] for b in rows], packed, pad_id), "completion_mask": mask[rows, :width]}


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


def lr_lambda(schedule, total_steps, warmup_steps):
    def factor(step):
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return {"constant": 1.0, "linear": 1.0 - progress, "cosine": 0.5 * (1 + math.cos(math.pi * progress))}[schedule]
    return factor


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


def save_checkpoint(path, pairs, schedulers, step, run_config, rank):
    """Sharded policy, value model and both optimizers via torch.distributed.checkpoint, plus the
    schedulers, step and every rank's RNG state (so a resumed run samples the same completions);
    written to path.tmp and renamed, so a crash never leaves a partial step_N."""
    tmp = path + ".tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    state = {}
    for name, (model, optimizer) in pairs.items():
        state[name], state[name + "_optim"] = get_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=tmp)
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None}
    torch.save(rng, os.path.join(tmp, f"rng_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, "schedulers": [s.state_dict() for s in schedulers], "config": run_config}, f)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    dist.barrier()


def load_checkpoint(path, pairs, schedulers, batch_size, seed, world, rank):
    with open(os.path.join(path, "trainer_state.json")) as f:
        saved = json.load(f)
    config = saved["config"]
    saved_batch = config["per_device_batch_size"] * config["grad_accum_steps"] * config["num_mini_batches"] * \
        config["world_size"]
    if (saved_batch, config["seed"], config["world_size"]) != (batch_size, seed, world):
        raise InputError(f"{path} was trained with {saved_batch} prompts per step on {config['world_size']} ranks "
                         f"and --seed {config['seed']}; this run has {batch_size}, {world} and {seed}: data order "
                         "and sampling would not continue where they stopped")
    state = {}
    for name, (model, optimizer) in pairs.items():
        state[name], state[name + "_optim"] = get_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    for name, (model, optimizer) in pairs.items():
        set_state_dict(model, optimizer, model_state_dict=state[name], optim_state_dict=state[name + "_optim"])
    for scheduler, scheduler_state in zip(schedulers, saved["schedulers"]):
        scheduler.load_state_dict(scheduler_state)
    rng = torch.load(os.path.join(path, f"rng_rank{rank}.pt"), weights_only=False)
    torch.set_rng_state(rng["cpu"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return saved["step"]


@torch.no_grad()
def save_hf(path, model, lm, tokenizer, dtype, eot_id, rank, max_file_bytes=5 * 10**9):
    """Writes the policy as a Hugging Face directory that from_pretrained and vLLM load: the weights in
    `dtype` as safetensors (several files of at most max_file_bytes and an index if they do not fit in
    one), the source's config (use_cache and all; main restores the dropout rates it zeroed) and the
    tokenizer; generation stops at the chat template's end-of-turn token. Streamed: each tensor is gathered
    from its shards in turn, and rank 0 holds at most one file's worth before writing it. Written to
    path.tmp, then renamed."""
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
    node or several; a plain `python ppo_rlvr.py` becomes a world of one."""
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
    for name in ("per_device_batch_size", "grad_accum_steps", "num_mini_batches", "num_ppo_epochs", "num_epochs",
                 "max_prompt_len", "max_new_tokens", "log_every", "eval_batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_steps is not None and args.max_steps < 1:
        raise InputError(f"--max_steps must be >= 1, got {args.max_steps}")
    if args.max_tokens_per_micro_batch is not None and args.max_tokens_per_micro_batch < 1:
        raise InputError(f"--max_tokens_per_micro_batch must be >= 1, got {args.max_tokens_per_micro_batch}")
    for name in ("lr", "temperature", "cliprange", "cliprange_value"):
        if not getattr(args, name) > 0:
            raise InputError(f"--{name} must be > 0, got {getattr(args, name)}")
    if args.value_lr is not None and not args.value_lr > 0:
        raise InputError(f"--value_lr must be > 0, got {args.value_lr}")
    if not (0 <= args.gamma <= 1 and 0 <= args.lam <= 1 and 0 <= args.warmup_ratio < 1):
        raise InputError("--gamma and --lam must be in [0, 1], --warmup_ratio in [0, 1)")
    if names_local_path(args.model) and not os.path.isdir(args.model):
        raise InputError(f"--model {args.model}: no such directory{demo_checkpoints_hint(['dpo', 'sft'])}")
    if args.value_model and names_local_path(args.value_model) and not os.path.isdir(args.value_model):
        raise InputError(f"--value_model {args.value_model}: no such directory")
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
    torch.manual_seed(args.seed)  # the random init of a model given by its config alone (on rank 0)
    stop_requested = stop_on_signals(rank)

    # tokenizer and data
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    eot_id = end_of_turn_token(tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id not in (None, eot_id) else eot_id
    train = load_prompts(args.dataset, args.dataset_split, tokenizer, args.max_prompt_len, rank)
    evals = load_prompts(args.eval_dataset, "test", tokenizer, args.max_prompt_len, rank) \
        if args.eval_dataset else None
    local_batch = args.per_device_batch_size * args.grad_accum_steps * args.num_mini_batches
    batch_size = local_batch * world
    if len(train) < batch_size:
        raise InputError(f"{args.dataset} has {len(train)} usable prompts, fewer than one step's {batch_size} "
                         "(per_device_batch_size x grad_accum_steps x num_mini_batches x world size)")
    total_steps = args.max_steps or args.num_epochs * (len(train) // batch_size)
    total_updates = total_steps * args.num_ppo_epochs * args.num_mini_batches

    # models: policy, frozen reference (the starting policy, stored in the compute dtype), value model, all
    # built on the meta device, sharded with FSDP2, then filled with the weights that rank 0 alone reads, each
    # rank receiving only its shards; an unsharded policy copy generates
    compute_dtype = torch.bfloat16 if args.precision == "bf16" or (args.precision == "auto" and device.type == "cuda") \
        else torch.float32
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    save_dtype = final_dtype(args.model, args.save_dtype)
    lm = empty_model(args.model, args.attn_implementation, torch.float32)
    ref_lm = empty_model(args.model, args.attn_implementation, compute_dtype)
    seqcls = empty_model(args.value_model or args.model, args.attn_implementation, torch.float32, value_model=True)
    for m in (lm, ref_lm, seqcls):
        disable_dropout(m)
        if args.padding_free:  # the training and log-prob forwards; generation keeps --attn_implementation
            m.set_attn_implementation("packed")
        if args.gradient_checkpointing and m is not ref_lm:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy, reference, value_model = PolicyLogprobs(lm), PolicyLogprobs(ref_lm), ValueModel(seqcls)
    shard(policy, lm.get_decoder(), mp, mesh)
    shard(reference, ref_lm.get_decoder(), mp, mesh)
    shard(value_model, seqcls.base_model, mp, mesh)
    full = PolicyLogprobs(load_causal_lm(args.model, args.attn_implementation)) if rank == 0 else None
    materialize(policy, full, device)
    materialize(reference, full, device)
    del full
    materialize(value_model, ValueModel(load_value_model(args.value_model or args.model, args.attn_implementation))
                if rank == 0 else None, device)
    policy.train()  # in eval mode gradient checkpointing would be skipped
    value_model.train()
    reference.requires_grad_(False)
    generator = generation_copy(lm, compute_dtype, device, args.attn_implementation)
    static_width = args.max_prompt_len if args.generation_cache == "static" or (
        args.generation_cache == "auto" and device.type == "cuda") else None
    optimizers, schedulers = [], []
    for model, lr in ((policy, args.lr), (value_model, args.value_lr or args.lr)):
        optimizers.append(torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay,
                                            fused=device.type == "cuda"))
        schedulers.append(torch.optim.lr_scheduler.LambdaLR(
            optimizers[-1], lr_lambda(args.lr_schedule, total_updates, int(args.warmup_ratio * total_updates))))
    pairs = {"policy": (policy, optimizers[0]), "value": (value_model, optimizers[1])}

    torch.manual_seed(args.seed + rank)  # sampling differs between ranks, is reproducible per rank
    start_step = 0
    if args.resume:
        path = latest_checkpoint(args.output_dir)
        start_step = load_checkpoint(path, pairs, schedulers, batch_size, args.seed, world, rank)
        if rank == 0:
            print(f"resumed from {path}")
    refresh_generation_copy(policy, generator)

    def evaluate():
        """Mean verifier score of greedy completions; each rank takes every world-th prompt."""
        rows = evals[rank::world]
        total = torch.tensor([0.0, len(rows)], dtype=torch.float64, device=device)
        for start in range(0, len(rows), args.eval_batch_size):
            chunk = rows[start:start + args.eval_batch_size]
            _, _, completion, _ = generate(generator, [r["prompt_ids"] for r in chunk], pad_id, eot_id,
                                           args.max_new_tokens, 1.0, True, device, static_width)
            for row, ids in zip(chunk, completion):
                text = tokenizer.decode(ids, skip_special_tokens=True)
                total[0] += verifiers.get(row["verifier"])(text, row["ground_truth"])
        dist.all_reduce(total)
        return (total[0] / total[1]).item()

    # logging
    if rank == 0:
        prepare_output_dir(args.output_dir, start_step if args.resume else None)
    if rank == 0 and args.track:
        import wandb
        wandb.init(project=args.wandb_project, name=args.run_name or os.path.basename(args.output_dir.rstrip("/")),
                   config=asdict(args))
    bar = tqdm(total=total_steps, initial=start_step, disable=rank != 0, desc="ppo")

    def log(metrics, step):
        if rank != 0:
            return
        with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if args.track:
            import wandb
            wandb.log(metrics, step=step)

    if evals is not None and args.eval_every and start_step == 0:
        log({"eval/accuracy": evaluate()}, 0)

    # training loop: rollout, rewards and advantages, then PPO epochs over the rollout batch
    micro = args.per_device_batch_size
    minibatch = micro * args.grad_accum_steps
    step = start_step
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        indices = global_batch(step - 1, len(train), batch_size, args.seed)
        rows = [train[i] for i in indices[rank * local_batch:(rank + 1) * local_batch]]
        query, query_mask, completion, mask = generate(generator, [r["prompt_ids"] for r in rows], pad_id, eot_id,
                                                       args.max_new_tokens, args.temperature, False, device,
                                                       static_width)
        t_generated = time.perf_counter()
        ended = (completion == eot_id).any(1)
        correct = torch.tensor([verifiers.get(r["verifier"])(tokenizer.decode(ids, skip_special_tokens=True),
                                                             r["ground_truth"]) for r, ids in zip(rows, completion)],
                               device=device)
        scores = correct * args.verification_reward
        if args.non_stop_penalty is not None:
            scores = torch.where(ended, scores, torch.full_like(scores, args.non_stop_penalty))
        sequences = rollout_sequences(query, query_mask, completion, mask)

        # log-probs and values of the rollout, in the micro-batches of the first PPO epoch
        shape = completion.shape
        old_logp, ref_logp, entropy, old_values = (torch.zeros(shape, device=device) for _ in range(4))
        with torch.no_grad():
            for start in range(0, local_batch, minibatch):
                for rows_mb, batch in micro_batches(sequences, mask, list(range(start, start + minibatch)), micro,
                                                    args.max_tokens_per_micro_batch, args.padding_free, pad_id):
                    batch = to_device(batch, device)
                    width = batch["completion_mask"].shape[1]
                    old_logp[rows_mb, :width], entropy[rows_mb, :width] = policy(**batch, temperature=args.temperature)
                    ref_logp[rows_mb, :width] = reference(**batch, temperature=args.temperature)[0]
                    old_values[rows_mb, :width] = value_model(**batch)
        maskf = mask.float()
        old_values *= maskf
        kl = kl_estimate(old_logp, ref_logp, args.kl_estimator) * maskf
        rewards, non_score = token_rewards(scores, kl, maskf, args.beta)
        if args.whiten_rewards:
            rewards = masked_whiten(rewards, maskf, shift_mean=False, distributed=True)
        advantages, returns = gae(rewards, old_values, maskf, args.gamma, args.lam)
        advantages = masked_whiten(advantages, maskf, distributed=True)

        stats = torch.zeros(6, dtype=torch.float64, device=device)
        grad_norms = torch.zeros(2, dtype=torch.float64, device=device)
        lrs = [s.get_last_lr()[0] for s in schedulers]
        for epoch in range(args.num_ppo_epochs):
            order = torch.arange(local_batch, device=device) if epoch == 0 else \
                torch.randperm(local_batch).to(device)
            for start in range(0, local_batch, minibatch):
                rows_minibatch = order[start:start + minibatch]
                n_tokens = mask[rows_minibatch].sum().double()
                dist.all_reduce(n_tokens)
                for rows_mb, batch in micro_batches(sequences, mask, rows_minibatch.tolist(), micro,
                                                    args.max_tokens_per_micro_batch, args.padding_free, pad_id):
                    batch = to_device(batch, device)
                    logp, token_entropy = policy(**batch, temperature=args.temperature)
                    values = value_model(**batch)
                    width = batch["completion_mask"].shape[1]
                    cut = lambda x: x[rows_mb, :width]  # noqa: E731
                    loss, mb_stats = ppo_loss(logp, cut(old_logp), cut(advantages), values, cut(old_values),
                                              cut(returns), batch["completion_mask"].float(), n_tokens, args.cliprange,
                                              args.cliprange_value, args.vf_coef)
                    # FSDP averages gradients over ranks; scaling by world makes them a global-minibatch sum
                    (loss * world).backward()
                    stats += mb_stats
                for i, (model, _) in enumerate(pairs.values()):
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm or float("inf"))
                    grad_norms[i] += (norm.full_tensor() if hasattr(norm, "full_tensor") else norm).double()
                for optimizer, scheduler in zip(optimizers, schedulers):
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
        refresh_generation_copy(policy, generator)

        # metrics: sums over all ranks, then TRL's averages
        n_updates = args.num_ppo_epochs * args.num_mini_batches
        totals = torch.cat([stats, grad_norms / n_updates, torch.stack([
            kl.sum(), -(old_logp * maskf).sum(), non_score.sum(), scores.sum(), correct.sum(), ended.sum(),
            maskf.sum(), (entropy * maskf).sum()]).double()])
        dist.all_reduce(totals)
        stop = torch.tensor(float(bool(stop_requested)), device=device)
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)
        elapsed = time.perf_counter() - t0
        if step % args.log_every == 0 or step == total_steps:
            (pg, vf, pg_clip, vf_clip, approxkl, ratio, policy_norm, value_norm, kl_sum, neg_logp, non_score_sum,
             score_sum, correct_sum, ended_sum, n_valid, entropy_sum) = totals.tolist()
            seen = n_valid * args.num_ppo_epochs
            metrics = {
                "objective/kl": kl_sum / batch_size, "objective/entropy": neg_logp / batch_size,
                "objective/non_score_reward": non_score_sum / batch_size,
                "objective/rlhf_reward": (non_score_sum + score_sum) / batch_size,
                "objective/scores": score_sum / batch_size,
                "objective/verifiable_correct_rate": correct_sum / batch_size,
                "policy/approxkl_avg": approxkl / seen, "policy/clipfrac_avg": pg_clip / seen,
                "policy/entropy_avg": entropy_sum / n_valid, "loss/policy_avg": pg / seen, "loss/value_avg": vf / seen,
                "val/clipfrac_avg": vf_clip / seen, "val/ratio": ratio / seen, "val/num_eos_tokens": ended_sum,
                "completions/mean_length": n_valid / batch_size,
                "grad_norm": policy_norm, "value_grad_norm": value_norm,
                "learning_rate": lrs[0], "value_learning_rate": lrs[1], "episode": step * batch_size,
                "perf/rollout_tokens_per_second": n_valid / world / (t_generated - t0),
                "perf/generation_seconds": t_generated - t0, "perf/training_seconds": elapsed - (t_generated - t0)}
            if evals is not None and args.eval_every and step % args.eval_every == 0:
                metrics["eval/accuracy"] = evaluate()
            log(metrics, step)
            bar.set_postfix(score=f"{metrics['objective/scores']:.2f}", kl=f"{metrics['objective/kl']:.3f}")
        bar.update(1)
        if (args.save_every and step % args.save_every == 0) or stop.item():
            save_checkpoint(os.path.join(args.output_dir, f"step_{step}"), pairs, schedulers, step,
                            {**asdict(args), "world_size": world}, rank)
        if stop.item():
            if rank == 0:
                print(f"{stop_requested[0] if stop_requested else 'a signal to another rank'}: saved step_{step}, "
                      "exiting (--resume continues from it)")
            dist.destroy_process_group()
            return
    bar.close()

    if evals is not None and not (args.eval_every and step % args.eval_every == 0):
        accuracy = evaluate()
        log({"eval/accuracy": accuracy}, step)
        if rank == 0:
            print(f"eval/accuracy {accuracy:.4f}")
    lm.config.update(dropout_rates(AutoConfig.from_pretrained(args.model)))  # final/ gets the source's rates
    save_hf(os.path.join(args.output_dir, "final"), policy, lm, tokenizer, save_dtype, eot_id, rank)
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
