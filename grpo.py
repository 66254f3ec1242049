"""GRPO, Dr. GRPO, DAPO, GSPO and CISPO: policy-gradient RL with verifiable rewards and no value model.

Each step samples --num_generations completions per prompt from the current policy, scores each
with the verifier named by its row's `dataset` (plus an optional format reward), and uses the
group's mean reward as the baseline: advantage = (r - mean_group) / scale, with scale the group's
std (GRPO), the batch's std, or 1 (Dr. GRPO, which removes the length and difficulty biases).
The loss is PPO's clipped surrogate per completion token, min(ratio * A, clip(ratio) * A), with an
optional k3 KL penalty to the frozen starting policy (--beta). Token losses are summed with
weights that implement each --loss_type's normalization over the whole global batch, so gradient
accumulation and data parallelism give the same update. DAPO adds clip-higher (--epsilon_high),
dynamic sampling (--filter_zero_std drops groups whose rewards are all equal) and its token-level
normalization (--loss_type dapo); GSPO takes one ratio per completion (--importance_sampling_level
sequence); CISPO clips the ratio as a weight on every token's gradient (--loss_type cispo). A rollout
can be reused for --num_iterations optimizer steps, with the ratio taken against its log-probs at
sampling time. Generation runs on each rank from a whole copy of the policy with a KV cache,
refreshed from the FSDP shards before each rollout; the log-probs it drew each token with are kept,
and the surrogate is corrected for the copy not being numerically the trained policy (--sampler_correction).

References: Shao et al. 2024 (DeepSeekMath, GRPO); Liu et al. 2025 (Dr. GRPO, "Understanding R1-Zero-
Like Training"); Yu et al. 2025 (DAPO); Zheng et al. 2025 (GSPO); MiniMax 2025 (MiniMax-M1, CISPO); Yao et
al. 2025 ("Your efficient RL framework secretly brings you off-policy RL training", TIS); Schulman 2020
(k3 KL estimator); Lambert et al. 2024 (Tulu 3 RLVR).

    python grpo.py                                 # the demo: GRPO from `python pipeline.py`'s DPO model, CPU ok
    torchrun --nproc_per_node 8 grpo.py --model Qwen/Qwen2.5-Math-1.5B \\
        --dataset allenai/RLVR-GSM-MATH-IF-Mixed-Constraints --eval_dataset None --lr 1e-6 \\
        --max_prompt_len 512 --max_completion_len 1024 --num_generations 8 --per_device_batch_size 8 \\
        --grad_accum_steps 4 --beta 0.0 --max_steps 500 --gradient_checkpointing --save_every 50

Read top to bottom: flags, the algorithm's math, the model wrapper, the rollout, main (the training
loop). Below the banner, the plumbing every script shares, the same code in each (tests/fix_copies.py).
"""

import ast
import copy
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
from concurrent.futures import ThreadPoolExecutor
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
from transformers import (AttentionInterface, AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoTokenizer, DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList,
                          TemperatureLogitsWarper, TopPLogitsWarper)
from transformers.utils import logging as transformers_logging

from nanopost import tools, verifiers
from nanopost.kernels import linear_logprobs
from nanopost.kernels.packed_attention import packed_attention

AttentionInterface.register("packed", packed_attention)


@dataclass
class Args:
    # GRPO
    num_generations: int = 8
    """completions per prompt (the group)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are recomputed at the same temperature"""
    top_p: float = 1.0
    """nucleus sampling; the trainer's log-probs are of the full temperature-scaled distribution, as in TRL"""
    loss_type: Literal["grpo", "dapo", "dr_grpo", "cispo"] = "dapo"
    """grpo: mean over each completion's tokens, then over completions; dapo: sum over the global batch's
    tokens / their number; dr_grpo: sum / (completions x max_completion_len); cispo: CISPO's loss (the
    clipped ratio weighs every token's policy gradient, none is dropped), normalized as dapo"""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    """token: a ratio per token (GRPO); sequence: one per completion, exp of the mean of its tokens'
    log-ratios, clipped as one (GSPO; TRL's importance_sampling_level)"""
    scale_rewards: Literal["group", "batch", "none"] = "group"
    """divide advantages by the group's reward std, the batch's, or nothing (Dr. GRPO)"""
    epsilon: float = 0.2
    """lower clip of the ratio, >= 1 - epsilon (the GRPO and PPO papers' epsilon)"""
    epsilon_high: float | None = None
    """upper clip of the ratio, <= 1 + epsilon_high (DAPO's clip-higher uses 0.28; cispo caps its weights at
    1 + epsilon_high, which TRL calls epsilon_high itself); None: --epsilon"""
    beta: float = 0.0
    """weight of the k3 KL to the starting policy (0: no reference model is loaded)"""
    num_iterations: int = 1
    """optimizer steps per rollout (mu in the GRPO paper); > 1 takes the ratio against the sampling-time log-probs"""
    filter_zero_std: bool = False
    """drop groups whose rewards are all equal (DAPO's dynamic sampling, without resampling)"""
    mask_truncated_completions: bool = False
    """completions without the end-of-turn token carry no loss (DAPO's overlong filtering)"""
    format_reward: bool = False
    """add the `format` verifier (<think>...</think>answer) as a second reward"""
    reward_model: str | None = None
    """a reward model (reward_model.py's final/, or a hub sequence classifier with one label) whose score of the prompt
    and completion is another reward; rows without ground_truth and dataset are then scored by it alone"""
    reward_weights: list[float] | None = None
    """weights of the rewards, in this order: verifier, format (with --format_reward), reward model (with
    --reward_model); None: all 1"""
    missing_eos_penalty: float = 0.0
    """subtracted from the reward of a completion cut at --max_completion_len before its end-of-turn token (TRL's)"""
    sampler_correction: Literal["none", "token_truncate", "token_mask", "sequence_truncate", "sequence_mask"] = \
        "sequence_mask"
    """the generation copy that samples is not numerically the trained policy (another dtype, kernels and
    attention; top-p's truncation): multiply the surrogate by exp(trainer - sampler log-prob) of each token
    (token_*) or of each completion (sequence_*: the product over its tokens), truncated at the cap
    (*_truncate; token_truncate is TIS) or zeroed above it (*_mask); none: no correction (the mismatch is
    logged under sampling/ either way). sequence_mask is TRL's choice. With --top_p < 1 every token's weight is below 1
    (the sampler renormalizes the nucleus), so a sequence_* weight shrinks with the completion's length: use a
    token_* mode there"""
    sampler_correction_cap: float = 3.0
    """the cap of --sampler_correction (TRL's vllm_importance_sampling_clip_max)"""
    generation_cache: Literal["auto", "static", "dynamic"] = "auto"
    """KV cache for sampling: static (prompts left-padded to --max_prompt_len, a fixed-size cache, the decode step
    compiled once on CUDA) or dynamic (grows with each token). auto = static on CUDA, dynamic elsewhere"""
    tools: list[str] | None = None
    """tools (calculator, python) of the rows that name none in a `tools` column: multi-turn rollouts (README)"""
    max_tool_calls: int = 4
    """tool calls per completion: a turn whose calls would pass it ends the completion, its calls not run"""

    # common flags: the same names, in the same order, in every script
    model: str = "runs/pipeline/dpo/final"
    """hub id or local dir of the starting policy (the demo: the DPO model that `python pipeline.py` writes)"""
    dataset: str = "data/rl_train.jsonl"
    """hub id or local .jsonl/.parquet with `messages` (the prompt), `ground_truth` and `dataset` (verifier name)"""
    dataset_split: str = "train"
    """split of a hub dataset"""
    eval_dataset: str | None = "data/test.jsonl"
    """same format; greedy accuracy logged as eval/accuracy (hub datasets: the 'test' split)"""
    output_dir: str = "runs/grpo"
    """where metrics.jsonl, step_N/ checkpoints and final/ (Hugging Face format) go"""
    lr: float = 1e-4
    """peak learning rate (the demo's tiny model wants 1e-4; 1.5B models 1e-6)"""
    max_steps: int | None = None
    """optimizer steps to run; overrides --num_epochs"""
    num_epochs: int = 1
    """passes over the prompts (ignored when --max_steps is set)"""
    per_device_batch_size: int = 32
    """completions per micro-batch on each rank"""
    grad_accum_steps: int = 1
    """micro-batches per optimizer step; a rank's completions per step = this x per_device_batch_size, a multiple
    of --num_generations (prompts per step = global completions / num_generations)"""
    max_tokens_per_micro_batch: int | None = None
    """also cap micro-batches at this many tokens (more micro-batches per step; the same completions)"""
    max_prompt_len: int = 128
    """rows whose templated prompt is longer are dropped (real runs: 512-2048)"""
    max_completion_len: int = 32
    """new tokens per completion; one that ends without the end-of-turn token is truncated (real runs: 1024+)"""
    warmup_ratio: float = 0.0
    """fraction of steps with linear warmup from 0"""
    lr_schedule: Literal["linear", "cosine", "constant"] = "constant"
    """decay after warmup, to 0 at the last step"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping by global norm (0 disables)"""
    max_bad_steps: int = 5
    """a step whose loss or gradient norm is not finite is skipped (no weight or optimizer state changes; the metric
    skipped_steps counts them); after this many in a row the run saves a step_N and stops"""
    seed: int = 1
    """seeds data order; rank r samples with seed + r"""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """compute dtype, also of the generation copy and the reference; auto = bf16 on CUDA, fp32 on CPU"""
    save_dtype: Literal["auto", "bf16", "fp32"] = "auto"
    """dtype of final/'s weights. auto = the source model's (the dtype its config names; fp32 if none)"""
    attn_implementation: str = "sdpa"
    """attention kernel of generation and where sequences are not packed: sdpa, eager, flash_attention_2"""
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
# The algorithm


def completion_rewards(scores, args):
    """Each completion's reward from its named scores (score_completions): the one place that shapes the
    reward (add a length penalty or another scorer here). The verifier's score (none for a row without a
    verifier), plus the format reward and the reward model's score where used, weighted by --reward_weights;
    minus --missing_eos_penalty for a completion cut before its end."""
    weights = iter(args.reward_weights or [1.0] * 3)
    rewards = next(weights) * scores["verifier"].nan_to_num()
    for name in ("format", "reward_model"):
        if name in scores:
            rewards = rewards + next(weights) * scores[name]
    return rewards - args.missing_eos_penalty * scores["truncated"]


def group_advantages(rewards, group_size, scale):
    """rewards [n_prompts * group_size], groups contiguous. Returns advantages (same shape) and a
    [n_prompts] bool mask of groups whose rewards are all equal (they carry no signal)."""
    grouped = rewards.view(-1, group_size)
    centered = (grouped - grouped.mean(1, keepdim=True)).flatten()
    std = grouped.std(1)  # unbiased, as TRL
    zero_std = std < 1e-6
    if scale == "group":
        centered = centered / (std.repeat_interleave(group_size) + 1e-4)
    elif scale == "batch":
        centered = centered / (rewards.std() + 1e-4)
    return centered, zero_std


def token_weights(n_loss_tokens, loss_type, n_sequences, total_loss_tokens, max_completion_len):
    """Per-sequence weight of each of its loss tokens, such that sum(weight * token_loss) over the
    global batch (all micro-batches, all ranks) is the loss_type's normalized loss. n_loss_tokens [B]
    per sequence of the global batch; n_sequences and total_loss_tokens are the batch's totals."""
    n_loss_tokens = n_loss_tokens.double()
    if loss_type == "grpo":
        return 1.0 / (n_loss_tokens.clamp(min=1) * max(n_sequences, 1))
    if loss_type in ("dapo", "cispo"):
        return torch.full_like(n_loss_tokens, 1.0 / max(total_loss_tokens, 1))
    return torch.full_like(n_loss_tokens, 1.0 / (max(n_sequences, 1) * max_completion_len))


def completion_sums(x, lengths):
    """The sum of x over each completion's tokens, repeated over them: x [n_tokens] holds the tokens of
    consecutive completions, lengths [n] of them each."""
    completion = torch.arange(len(lengths), device=x.device).repeat_interleave(lengths)
    return torch.zeros(len(lengths), dtype=x.dtype, device=x.device).index_add(0, completion, x).repeat_interleave(
        lengths)


def clipped_surrogate(logp, old_logp, advantages, epsilon_low, epsilon_high, ref_logp=None, beta=0.0,
                      sequence_lengths=None, cispo=False, correction=None):
    """Per-token loss -min(ratio A, clip(ratio, 1-eps_low, 1+eps_high) A) + beta k3(pi || ref),
    with k3 = exp(ref - logp) - (ref - logp) - 1 >= 0. All inputs are [n_tokens]. Also returns the
    k3 values (or None) and the masks of tokens whose gradient the clip removed from below / above.
    The clipped tokens are picked by those explicit comparisons rather than by min() and clamp(),
    whose gradients at ties and bounds differ between torch releases: a token on the clip boundary
    (every token when the ratio is 1 and epsilon 0) keeps the full policy gradient -A ratio.
    sequence_lengths (GSPO): the completions' token counts; the ratio is then one per completion, exp of the
    mean of its tokens' log-ratios. cispo: -sg(min(ratio, 1 + eps_high)) A logp, the capped ratio weighing
    the policy gradient of every token (high: where the cap bound with A > 0). correction: the sampler
    correction's weights (sampler_weights), multiplying the surrogate (not the KL)."""
    log_ratio = logp - old_logp
    if sequence_lengths is not None:
        log_ratio = completion_sums(log_ratio, sequence_lengths) / sequence_lengths.repeat_interleave(sequence_lengths)
    ratio = torch.exp(log_ratio)
    low = (ratio < 1 - epsilon_low) & (advantages < 0) & (not cispo)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    if cispo:
        loss = -ratio.clamp(max=1 + epsilon_high).detach() * advantages * logp
    else:  # where the clip binds, the objective is the constant clip(ratio) A: no gradient
        loss = -torch.where(low | high, ratio.clamp(1 - epsilon_low, 1 + epsilon_high).detach(), ratio) * advantages
    if correction is not None:
        loss = loss * correction
    kl = None
    if ref_logp is not None:
        kl = torch.exp(ref_logp - logp) - (ref_logp - logp) - 1
        loss = loss + beta * kl
    return loss, kl, low, high


def sampler_weights(old_logp, sampler_logp, lengths, mode, cap):
    """--sampler_correction's weights [n_tokens], as TRL computes them: the ratio exp(old_logp - sampler_logp)
    of each token, or of each completion (the product over its tokens, repeated over them), truncated at
    cap or set to 0 above it. old_logp: the trainer's log-probs of the rollout (before any update)."""
    log_ratio = old_logp - sampler_logp
    ratio = torch.exp(completion_sums(log_ratio, lengths) if mode.startswith("sequence") else log_ratio)
    return ratio.clamp(max=cap) if mode.endswith("truncate") else torch.where(ratio > cap, 0.0, ratio)


# ---------------------------------------------------------------------------------------------
# The policy, and the rollout: sample, score, advantages and loss weights, micro-batches


class PolicyLogprobs(torch.nn.Module):
    """Wraps a Hugging Face causal LM so that one forward returns log-probs (and entropies) of the
    targets at a temperature. The head runs here, inside the FSDP root module, so FSDP unshards its
    weight (tied to the embedding for Qwen) and reduces its gradient."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, targets, temperature, with_entropy=False, **inputs):
        hidden = self.lm.get_decoder()(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        keep = targets.flatten() != -100
        return linear_logprobs(hidden[keep], self.lm.get_output_embeddings().weight, targets.flatten()[keep],
                               temperature=temperature, with_entropy=with_entropy)


def score_completions(rows, completions, tokenizer, reward_model, args, device):
    """Named scores per completion (Completions) of its row: `verifier` (its answer, the last turn, by the row's
    verifier, in [0, 1]; NaN for a row without one), `length` (tokens the model sampled), `truncated` (1 if cut at
    --max_completion_len), the tool columns; `format` with --format_reward, `reward_model` with --reward_model."""
    texts = [tokenizer.decode(answer, skip_special_tokens=True) for answer in completions.answers()]
    scores = {"verifier": [verifiers.get(row["verifier"])(text, row["ground_truth"]) if row["verifier"] else math.nan
                           for row, text in zip(rows, texts)],
              "length": [sum(sampled) for sampled in completions.sampled],
              "truncated": [float(not stopped) for stopped in completions.ended]}
    if args.format_reward:
        scores["format"] = [verifiers.get("format")(text, "") for text in texts]
    scores = {name: torch.tensor(values, dtype=torch.float64) for name, values in scores.items()}
    if reward_model is not None:
        scores["reward_model"] = reward_model_scores(reward_model, [row["messages"] + [
            {"role": "assistant", "content": text}] for row, text in zip(rows, texts)], args, device)
    return scores | completions.tool_columns


def micro_batch(sequences, packed, pad_id):
    """The model inputs (see collate) of (prompt_ids, completion_ids, loss_mask) triples: the targets are the
    completion tokens where loss_mask (a bool per token) holds: those the model sampled, none without loss."""
    return collate([(prompt + completion, [-100] * (len(prompt) - 1) + [token if loss else -100 for token, loss in
                                                                         zip(completion, loss_mask)] + [-100])
                    for prompt, completion, loss_mask in sequences], packed, pad_id)


def training_micro_batches(args, device, pad_id, prompts, completions, kept, has_loss, advantages, loss_weights):
    """This rank's kept completions (Completions), longest first, in micro-batches (rank_micro_batches; completions
    that are not kept fill in, without loss, where this rank has too few), each with its loss tokens' advantages,
    loss weights and sampler log-probs in the order the policy returns their log-probs: the loss tokens are those
    the model sampled, tool results are context. Every argument after completions holds one value per completion of
    this rank."""
    size = [len(prompt) + len(completion) for prompt, completion in zip(prompts, completions.ids)]
    mine = sorted((j for j in range(len(prompts)) if kept[j]), key=lambda j: -size[j])

    def tokens(chunk):  # what a forward of these completions processes: their tokens, or rows x longest (padded)
        return sum(size[j] for j in chunk) if args.padding_free else len(chunk) * size[chunk[0]]

    micro_batches = []
    for chunk in rank_micro_batches(mine, tokens, args.per_device_batch_size, args.max_tokens_per_micro_batch, device,
                                    fillers=[j for j in range(len(prompts)) if not kept[j]]):
        lengths = torch.tensor([sum(completions.sampled[j]) if has_loss[j] else 0 for j in chunk])
        micro_batches.append({
            "batch": micro_batch([(prompts[j], completions.ids[j], [bool(has_loss[j]) and s for s in
                                                                    completions.sampled[j]]) for j in chunk],
                                 args.padding_free, pad_id),
            "advantages": advantages[chunk].repeat_interleave(lengths).float(),
            "loss_weights": loss_weights[chunk].repeat_interleave(lengths), "lengths": lengths,
            "sampler_logp": torch.tensor([x for j in chunk if has_loss[j] for x in completions.logprobs[j]])})
    return micro_batches


def make_rollout(args, run, index, model, reference, reward_model, generator, train, tokenizer, pad_id, eot_id):
    """Rollout `index`: this rank's groups sampled and scored; the rewards, advantages and loss weights of the
    global batch; this rank's micro-batches, with reference and old log-probs where needed."""
    G, t0 = args.num_generations, time.perf_counter()
    refresh_generation_copy(model, generator)
    prompts_per_rank = args.per_device_batch_size * args.grad_accum_steps // G
    indices = global_batch(index, len(train), prompts_per_rank * run.world, args.seed)
    rows = [train[i] for i in indices[run.rank * prompts_per_rank:(run.rank + 1) * prompts_per_rank] for _ in range(G)]
    prompts = [row["prompt_ids"] for row in rows]
    completions = sample_turns(  # where rows have tools: the model's turns, and the tools' results between them
        generator, rows, tokenizer, pad_id, [eot_id], args.max_completion_len, args.temperature, args.top_p,
        args.max_prompt_len if static_cache(args.generation_cache, run.device) else None, args.max_tool_calls)
    t_generation = time.perf_counter() - t0

    # every rank's scores, so that groups, batch statistics and the loss normalization see the global batch
    scores = all_gather_columns(score_completions(rows, completions, tokenizer, reward_model, args, run.device),
                                run.device)
    rewards = completion_rewards(scores, args)
    advantages, zero_std = group_advantages(rewards, G, args.scale_rewards)
    # what is trained on (--filter_zero_std keeps groups with signal, --mask_truncated_completions drops the loss
    # of truncated ones), and the loss_type's normalization as a weight on each completion's tokens
    kept = ~zero_std.repeat_interleave(G) if args.filter_zero_std else torch.ones(len(rewards), dtype=torch.bool)
    has_loss = kept & ~(scores["truncated"].bool() & args.mask_truncated_completions)
    n_loss_tokens = scores["length"] * has_loss
    loss_weights = token_weights(n_loss_tokens=n_loss_tokens, loss_type=args.loss_type, n_sequences=int(kept.sum()),
                                 total_loss_tokens=int(n_loss_tokens.sum()), max_completion_len=args.max_completion_len)

    mine = slice(run.rank * len(prompts), (run.rank + 1) * len(prompts))
    micro_batches = training_micro_batches(args, run.device, pad_id, prompts, completions, kept=kept[mine],
                                           has_loss=has_loss[mine], advantages=advantages[mine],
                                           loss_weights=loss_weights[mine])
    with torch.no_grad():
        for mb in micro_batches:
            batch = to_device(mb["batch"], run.device)
            if reference is not None:
                mb["ref_logp"] = reference(**batch, temperature=args.temperature)[0].cpu()
            if args.num_iterations > 1:
                mb["old_logp"] = model(**batch, temperature=args.temperature)[0].cpu()

    metrics = rollout_metrics(scores, rewards, zero_std, [train[i]["verifier"] for i in indices for _ in range(G)],
                              t_generation, completions.tool_seconds)
    prompt_lengths = torch.tensor([len(train[i]["prompt_ids"]) for i in indices]).repeat_interleave(G)
    return {"micro_batches": micro_batches, "metrics": metrics, "n_sequences": int(kept.sum()),
            # the prompt and completion tokens that the training forwards process, for throughput
            "tokens_processed": int(((prompt_lengths + scores["length"] + scores["tool_tokens"]) * kept).sum())}


# ---------------------------------------------------------------------------------------------


def check_args(args):
    """Every flag and path, before anything heavy runs."""
    if args.num_generations < 2:
        raise InputError(f"--num_generations must be >= 2 (the group is the baseline), got {args.num_generations}")
    if args.per_device_batch_size * args.grad_accum_steps % args.num_generations:
        raise InputError(f"--per_device_batch_size x --grad_accum_steps ({args.per_device_batch_size} x "
                         f"{args.grad_accum_steps}) must be a multiple of --num_generations ({args.num_generations}): "
                         "each rank samples whole groups")
    if not 0 < args.top_p <= 1 or args.beta < 0:
        raise InputError(f"need 0 < --top_p <= 1 and --beta >= 0, got {args.top_p} and {args.beta}")
    if not 0 <= args.epsilon < 1 or (args.epsilon_high is not None and args.epsilon_high < 0):
        raise InputError(f"need 0 <= --epsilon < 1 and --epsilon_high >= 0, got {args.epsilon}, {args.epsilon_high}")
    rewards = ["verifier"] + ["format"] * args.format_reward + ["reward model"] * bool(args.reward_model)
    if args.reward_weights is not None and len(args.reward_weights) != len(rewards):
        raise InputError(f"--reward_weights needs {len(rewards)} values ({', '.join(rewards)}), got "
                         f"{args.reward_weights}")
    check_common_args(args, at_least_one=["max_prompt_len", "max_completion_len", "num_iterations"],
                      positive=["temperature"], models=["reward_model"], demo_stages=["dpo", "sft"])
    if args.reward_model:
        check_reward_model(args.reward_model)
    check_tool_args(args)
    if args.top_p < 1 and args.sampler_correction.startswith("sequence") and os.environ.get("RANK", "0") == "0":
        print(f"WARNING: --top_p {args.top_p} with --sampler_correction {args.sampler_correction}: the sampler draws "
              "from the renormalized nucleus, so every token's weight exp(trainer - sampler) is below 1 and a "
              "completion's weight, their product, shrinks geometrically with its length; use token_truncate or "
              "token_mask (or none)")


def main(args):
    check_args(args)
    run = Run(args, "grpo")
    tokenizer, _, eot_id, pad_id = load_tokenizer(args.model)
    train = prepare_prompts(args.dataset, args.dataset_split, tokenizer, args.max_prompt_len, bool(args.reward_model),
                            args.tools)
    evals = prepare_prompts(args.eval_dataset, "test", tokenizer, args.max_prompt_len, default_tools=args.tools) \
        if args.eval_dataset else None
    prompts_per_step = args.per_device_batch_size * args.grad_accum_steps // args.num_generations * run.world
    total_steps = run.total_steps(len(train), prompts_per_step, "prompts", args.num_iterations)
    epsilon_high = args.epsilon if args.epsilon_high is None else args.epsilon_high

    # a frozen reference and reward model, stored in the compute dtype (FSDP would cast them to it anyway); the policy,
    # built after the reference so that rank 0 frees its whole model while filling it in; a whole copy that samples
    full = load_full(args.model, args.attn_implementation, run, model_config(args.model, dropout=False))
    reference = run.build(PolicyLogprobs, args.model, full, run.compute_dtype, dropout=False,
                          free_full=False).eval().requires_grad_(False) if args.beta > 0 else None
    model = run.build(PolicyLogprobs, args.model, full, dropout=False,
                      gradient_checkpointing=args.gradient_checkpointing)
    del full
    reward_model = load_reward_model(args.reward_model, run) if args.reward_model else None
    generator = generation_copy(model, run.compute_dtype, run.device, args.attn_implementation)
    optimizer, scheduler = adamw(model, args.lr, args, total_steps)
    torch.manual_seed(args.seed + run.rank)  # each rank samples different completions, reproducibly (or as resumed)
    start_step, rollout = run.begin({"model": (model, optimizer)}, [scheduler], total_steps,
                                    {k: getattr(args, k) for k in ("seed", "per_device_batch_size", "grad_accum_steps",
                                                                   "num_generations", "num_iterations", "padding_free")}
                                    | {"world_size": run.world})

    def evaluate():
        refresh_generation_copy(model, generator)
        return {"eval/accuracy": greedy_accuracy(generator, evals, tokenizer, pad_id, eot_id, args, run,
                                                 args.per_device_batch_size * args.grad_accum_steps)}

    if evals and args.eval_every and start_step == 0:
        run.log(evaluate(), 0)
    step = evaluated = start_step
    stuck = {}  # how many logged steps in a row each no-signal condition held
    for step in range(start_step + 1, total_steps + 1):
        t0 = time.perf_counter()
        if (step - 1) % args.num_iterations == 0:
            rollout = make_rollout(args, run, (step - 1) // args.num_iterations, model, reference, reward_model,
                                   generator, train, tokenizer, pad_id, eot_id)
        t_train = time.perf_counter()
        totals = Totals(run.device)  # this step's statistics by name, summed over micro-batches and ranks
        for mb in rollout["micro_batches"]:
            logp, entropy = model(**to_device(mb["batch"], run.device), temperature=args.temperature,
                                  with_entropy=True)
            # num_iterations = 1: the old policy is the current one, so the ratio is exactly 1
            old_logp = mb["old_logp"].to(run.device) if "old_logp" in mb else logp.detach()
            lengths, sampler_logp = mb["lengths"].to(run.device), mb["sampler_logp"].to(run.device)
            correction = None if args.sampler_correction == "none" else sampler_weights(
                old_logp=old_logp, sampler_logp=sampler_logp, lengths=lengths, mode=args.sampler_correction,
                cap=args.sampler_correction_cap)
            loss, kl, low, high = clipped_surrogate(
                logp=logp, old_logp=old_logp, advantages=mb["advantages"].to(run.device), epsilon_low=args.epsilon,
                epsilon_high=epsilon_high, ref_logp=mb["ref_logp"].to(run.device) if "ref_logp" in mb else None,
                beta=args.beta, sequence_lengths=lengths if args.importance_sampling_level == "sequence" else None,
                cispo=args.loss_type == "cispo", correction=correction)
            weighted = (loss.double() * mb["loss_weights"].to(run.device)).sum()
            # FSDP averages gradients over ranks; scaling by world makes them a global-batch sum
            (weighted * run.world).backward()
            totals.add(loss=weighted, entropy=entropy.sum(), clipped_low=low.sum(), clipped_high=high.sum(),
                       clipped=(low | high).sum(), loss_tokens=logp.numel())
            if kl is not None:
                totals.add(kl=kl.sum())
            sampler_mismatch(totals, old_logp=old_logp, sampler_logp=sampler_logp, correction=correction,
                             lengths=lengths, sequence_level=args.sampler_correction.startswith("sequence"))
        [grad_norm], [lr] = optimizer_step(run, totals.sums["loss"], args.max_grad_norm, (model, optimizer, scheduler))
        if run.log_due(step):
            sums, now = totals.reduce(), time.perf_counter()
            loss_tokens = max(sums["loss_tokens"], 1)
            metrics = {"loss": sums["loss"], "grad_norm": grad_norm.item(), "learning_rate": lr, **rollout["metrics"],
                       "entropy": sums["entropy"] / loss_tokens,
                       "clip_ratio/low_mean": sums["clipped_low"] / loss_tokens,
                       "clip_ratio/high_mean": sums["clipped_high"] / loss_tokens,
                       "clip_ratio/region_mean": sums["clipped"] / loss_tokens,
                       "perf/time_training": now - t_train, "perf/time_step": now - t0,
                       **throughput(run, model, rollout["tokens_processed"], max(rollout["n_sequences"], 1),
                                    now - t_train)}
            if args.beta > 0:
                metrics["kl"] = sums["kl"] / loss_tokens
            if sums["logp_tokens"] > 0:
                metrics |= sampling_metrics(sums)
            warn_without_signal(run, stuck, {
                f"every completion of the last {PATIENCE} steps was cut at --max_completion_len "
                f"{args.max_completion_len} before its end-of-turn token: raise it, or train the model to end its "
                "answers first (SFT)": metrics["completions/clipped_ratio"] == 1,
                f"no group's rewards varied in the last {PATIENCE} steps, so every advantage and the gradient are "
                "0: raise --temperature or --num_generations, or use prompts the model sometimes solves":
                    metrics["frac_reward_zero_std"] == 1})
            if evals and every(args.eval_every, step):
                metrics |= evaluate()
                evaluated = step
            run.log(metrics, step, reward=metrics["reward"], loss=metrics["loss"])
        run.end_step(step, rollout=rollout if step % args.num_iterations else None)
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


def rank_micro_batches(items, tokens, per_device, max_tokens, device, fillers=()):
    """This rank's items (completion indices, in order) cut into micro-batches (chunks_of) such that every rank
    runs as many as the busiest (FSDP's collectives: each forward and backward needs every rank): the largest
    are halved, then single `fillers` (items trained on without loss) are added where a rank has too few."""
    chunks = chunks_of(items, tokens, per_device, max_tokens)
    n_micro = torch.tensor(max(1, len(chunks)), device=device)
    dist.all_reduce(n_micro, op=dist.ReduceOp.MAX)
    chunks = split_largest(chunks, int(n_micro))
    return chunks + [[j] for j in fillers][:int(n_micro) - len(chunks)]


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


def load_sequence_classifier(name, run, role, new_head=True):
    """The whole one-label sequence classifier (the decoder and a `score` Linear(H, 1)) of `name` in fp32 on rank 0
    (None elsewhere), dropout off, for a value or reward model (`role`, for messages): a checkpoint with a score
    head keeps it; a causal LM (or a config only) gets a new one with std 1/sqrt(H + 1), as open-instruct, where
    new_head allows it (a reward model that scores must bring its own)."""
    if run.rank != 0:
        return None
    config = model_config(name, dropout=False, num_labels=1)
    attention = run.args.attn_implementation
    if has_weights(name):
        verbosity = transformers_logging.get_verbosity()
        transformers_logging.set_verbosity_error()  # its report would list the new head as a missing weight
        try:
            seqcls, info = AutoModelForSequenceClassification.from_pretrained(
                name, config=config, attn_implementation=attention, dtype=torch.float32, output_loading_info=True)
        finally:
            transformers_logging.set_verbosity(verbosity)
        missing = sorted(set(info["missing_keys"]) - ({"score.weight", "score.bias"} if new_head else set()))
        if missing:
            raise InputError(f"{role} {name}: no weights for {missing[:5]}")
        new_head = "score.weight" in info["missing_keys"]
    elif not new_head:
        raise InputError(f"{role} {name}: a config without weights")
    else:
        seqcls = AutoModelForSequenceClassification.from_config(config, attn_implementation=attention,
                                                                dtype=torch.float32)
    if new_head:
        torch.nn.init.normal_(seqcls.score.weight, std=1 / math.sqrt(config.hidden_size + 1))
        if seqcls.score.bias is not None:
            torch.nn.init.zeros_(seqcls.score.bias)
    if not run.args.resume:  # a resumed run's weights come from its checkpoint
        print(f"{role}: {name} with " + ("a new score head, std 1/sqrt(H+1)" if new_head else "its own head"))
    return seqcls


def check_reward_model(name):
    """--reward_model must be a sequence classifier with one label (reward_model.py's final/, or a hub reward
    model), as its config says, before anything is loaded."""
    config = AutoConfig.from_pretrained(name)
    architectures = config.architectures or []
    if config.num_labels != 1 or not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise InputError(f"--reward_model {name}: not a sequence classifier with one label (architectures "
                         f"{architectures}, {config.num_labels} labels); reward_model.py trains one")


def load_reward_model(name, run):
    """The frozen reward model of --reward_model, sharded like the reference and stored in the compute dtype, with
    its own tokenizer and padding id: (model, tokenizer, pad_id), for reward_model_scores."""
    tokenizer, _, _, pad_id = load_tokenizer(name)
    model = run.build(RewardScores, name, load_sequence_classifier(name, run, "reward model", new_head=False),
                      run.compute_dtype, dropout=False, auto_class=AutoModelForSequenceClassification, num_labels=1)
    return model.eval().requires_grad_(False), tokenizer, pad_id


@torch.no_grad()
def reward_model_scores(reward_model, conversations, args, device):
    """The reward model's score of each conversation [n] (float64, CPU), rendered with the reward model's own chat
    template and tokenizer (whatever the policy's are) and read at its last token, where reward_model.py trains
    it and transformers' sequence classifiers read. Every rank runs as many micro-batches as the busiest (FSDP)."""
    model, tokenizer, pad_id = reward_model
    ids = [tokenizer(tokenizer.apply_chat_template(conversation, tokenize=False), add_special_tokens=False).input_ids
           for conversation in conversations]

    def tokens(chunk):  # what a forward of these conversations processes: their tokens, or rows x longest (padded)
        return sum(len(ids[j]) for j in chunk) if args.padding_free else len(chunk) * max(len(ids[j]) for j in chunk)

    scores = torch.zeros(len(ids), dtype=torch.float64)
    for chunk in rank_micro_batches(list(range(len(ids))), tokens, args.per_device_batch_size,
                                    args.max_tokens_per_micro_batch, device):
        batch = collate([(ids[j], [-100] * (len(ids[j]) - 1) + [0]) for j in chunk], args.padding_free, pad_id)
        scores[chunk] = model(**to_device(batch, device)).double().cpu()
    model.reshard()  # FSDP keeps the root's parameters gathered after a forward without backward
    return scores


class RewardScores(torch.nn.Module):
    """A Hugging Face sequence classifier (the decoder and a `score` Linear(H, 1)) -> a score per sequence [rows], at
    the token its targets mark (its last). The head runs here, in the FSDP root: FSDP unshards and reduces it."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, targets, **inputs):
        hidden = self.lm.base_model(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        scores = self.lm.score(hidden[targets.flatten() != -100]).squeeze(-1).float()
        return scores.clone()  # a copy: FSDP's backward hook on a returned view could be lost


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


def generation_copy(model, dtype, device, attn_implementation):
    """A whole (unsharded) model of model.lm's architecture in `dtype`, allocated on `device` alone, for
    sampling; refresh_generation_copy fills in the weights, and the buffers (rotary frequencies) are the
    policy's. Built from the config alone, so it inherits no sampling defaults from the source's
    generation_config.json (repetition_penalty, top_k, ...)."""
    gen_lm = empty_model(copy.deepcopy(model.lm.config), attn_implementation, dtype)  # from_config writes the dtype
    gen_lm.to_empty(device=device)
    gen_lm.tie_weights()  # to_empty gave the tied modules a parameter each
    for name, buffer in model.lm.named_buffers():
        gen_lm.get_buffer(name).copy_(buffer)
    return gen_lm.eval()


@torch.no_grad()
def refresh_generation_copy(model, gen_lm):
    """Copies the current FSDP weights into the whole copy, one parameter at a time (each rank gathers
    each parameter once), in place, so that a compiled generation graph stays valid. A parameter whose
    shard on this rank is already the whole of it, in the copy's dtype and device (one rank in fp32), is
    not copied: the copy samples from the shard itself (the optimizer updates it in place)."""
    targets = dict(gen_lm.named_parameters())
    names = {name.removeprefix("lm.") for name, _ in model.named_parameters()}
    if names != set(targets):
        raise RuntimeError(f"generation copy out of sync: {sorted(names ^ set(targets))}")
    for name, param in model.named_parameters():
        target = targets[name.removeprefix("lm.")]
        # the same on every rank (full_tensor is a collective): only a mesh of one shard holds it whole
        whole = not hasattr(param, "placements") or all(
            param.device_mesh.size(dim) == 1 for dim, placement in enumerate(param.placements) if placement.is_shard())
        local = (param.to_local() if hasattr(param, "to_local") else param).detach()
        if whole and (local.dtype, local.device) == (target.dtype, target.device):
            if target.data_ptr() != local.data_ptr():
                target.data = local
        else:
            target.copy_(param.full_tensor() if hasattr(param, "full_tensor") else param)


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


def greedy_accuracy(generator, rows, tokenizer, pad_id, eot_id, args, run, batch_size):
    """Mean verifier score of greedy completions of rows (with their tools); each rank takes every world-th row."""
    score = torch.zeros(2, dtype=torch.float64, device=run.device)
    mine = rows[run.rank::run.world]
    width = args.max_prompt_len if static_cache(args.generation_cache, run.device) else None
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        completions = sample_turns(generator, chunk, tokenizer, pad_id, [eot_id], args.max_completion_len, width=width,
                                   max_tool_calls=args.max_tool_calls)
        for row, answer in zip(chunk, completions.answers()):
            text = tokenizer.decode(answer, skip_special_tokens=True)
            score[0] += verifiers.get(row["verifier"])(text, row["ground_truth"])
        score[1] += len(chunk)
    dist.all_reduce(score)
    return (score[0] / score[1]).item()


def rollout_metrics(scores, rewards, zero_std, verifier_of, seconds, tool_seconds):
    """TRL's metrics of a rollout's global batch: its rewards, each verifier's mean score (verifier_of: each
    completion's; "" for none) and the other rewards' beside them, the completions' lengths and truncation, the
    time generation took (seconds), and the tools' (tool_metrics; tool_seconds: this rank's time in tools)."""
    metrics = {"reward": rewards.mean().item(), "reward_std": rewards.view(len(zero_std), -1).std(1).mean().item(),
               "frac_reward_zero_std": zero_std.double().mean().item(),
               "completions/mean_length": scores["length"].mean().item(),
               "completions/clipped_ratio": scores["truncated"].mean().item(),
               "perf/time_generation": seconds,
               "perf/rollout_tokens_per_second": scores["length"].sum().item() / seconds}
    for name in sorted(set(verifier_of) - {""}):
        of_name = torch.tensor([v == name for v in verifier_of])
        metrics[f"rewards/{name}/mean"] = scores["verifier"][of_name].mean().item()
    for name in ("format", "reward_model"):
        if name in scores:
            metrics[f"rewards/{name}/mean"] = scores[name].mean().item()
    return metrics | tool_metrics({name: scores[name].sum() for name in TOOL_COLUMNS}, tool_seconds)


def all_gather_columns(columns, device):
    """{name: [n] float64 tensor} of this rank -> {name: [n * world]}, every rank's values in rank order, in
    one all_gather."""
    local = torch.stack(list(columns.values()), 1).to(device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return dict(zip(columns, torch.cat(gathered).cpu().T.contiguous()))


class Totals:
    """A step's statistics by name, accumulated over this rank's micro-batches, then reduced over all ranks
    (this process alone outside a process group): sums (add), maxima (max) and minima (min), with one
    all_reduce for the sums and one for the extremes. Every rank adds the same names."""

    def __init__(self, device):
        self.device, self.sums, self.extremes, self.signs = device, {}, {}, {}  # a minimum is a negated maximum

    def add(self, **values):
        for name, value in values.items():
            self.sums[name] = self.sums.get(name, 0.0) + self.float64(value)

    def max(self, **values):
        self.extreme(1.0, values)

    def min(self, **values):
        self.extreme(-1.0, values)

    def extreme(self, sign, values):
        for name, value in values.items():
            value, self.signs[name] = sign * self.float64(value), sign
            self.extremes[name] = torch.maximum(self.extremes[name], value) if name in self.extremes else value

    def float64(self, value):
        return (value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)).to(self.device,
                                                                                                torch.float64)

    def reduce(self):
        """{name: float} over all ranks; reading them waits for the device, so only logged steps call it."""
        reduced = {}
        for values, op in ((self.sums, dist.ReduceOp.SUM), (self.extremes, dist.ReduceOp.MAX)):
            if values:
                names = sorted(values)
                packed = torch.stack([values[name] for name in names])
                if dist.is_initialized():
                    dist.all_reduce(packed, op=op)
                reduced |= dict(zip(names, packed.tolist()))
        return {name: value * self.signs.get(name, 1.0) for name, value in reduced.items()}


def sampler_mismatch(totals, old_logp, sampler_logp, correction, lengths, sequence_level):
    """Adds a micro-batch's sampler-trainer mismatch to totals, for sampling_metrics: |old_logp - sampler_logp|
    per token (old_logp: the trainer's log-probs of the rollout), and the correction's weights (without a
    correction, the raw ratios), per completion in the sequence modes (lengths: the completions' token counts,
    the tokens consecutive), else per token."""
    if correction is None:
        weights = torch.exp(old_logp - sampler_logp)
    else:
        weights = correction[(lengths.cumsum(0) - lengths)[lengths > 0]] if sequence_level else correction
    difference, weights = (old_logp - sampler_logp).abs().double(), weights.double()
    totals.add(logp_difference=difference.sum(), logp_tokens=len(difference), weight=weights.sum(),
               weights=len(weights))
    empty = not len(difference)  # a micro-batch without loss tokens (FSDP's filler)
    totals.max(logp_difference_max=-math.inf if empty else difference.max(),
               weight_max=-math.inf if empty else weights.max())
    totals.min(weight_min=math.inf if empty else weights.min())


def sampling_metrics(sums):
    """TRL's sampling/* metrics from the reduced totals of sampler_mismatch."""
    return {"sampling/sampling_logp_difference/mean": sums["logp_difference"] / sums["logp_tokens"],
            "sampling/sampling_logp_difference/max": sums["logp_difference_max"],
            "sampling/importance_sampling_ratio/min": sums["weight_min"],
            "sampling/importance_sampling_ratio/mean": sums["weight"] / sums["weights"],
            "sampling/importance_sampling_ratio/max": sums["weight_max"]}


# logged steps in a row without a learning signal after which a run says so
PATIENCE = 3


def warn_without_signal(run, streaks, conditions):
    """Rank 0 warns once a condition under which a run cannot learn has held for PATIENCE logged steps in a
    row. conditions: {what to say: whether it held at this step}; streaks: {what to say: for how long}."""
    for message, held in conditions.items():
        streaks[message] = streaks.get(message, 0) + 1 if held else 0
        if streaks[message] == PATIENCE and run.rank == 0:
            tqdm.write(f"WARNING: {run.name} is not learning: {message}")


if __name__ == "__main__":
    launch(main, Args)
