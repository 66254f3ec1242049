"""Hugging Face TRL's own loss code, callable on small tensors: the reference the tests compare
nanopost's losses with (test-only; the scripts never import TRL). Pinned to trl==1.16.0.

Nothing here restates a TRL formula. Each helper builds a bare trainer instance with
`object.__new__(TRLTrainer)` (no model, dataset or accelerate state), gives it only the attributes
the TRL method reads, replaces the model forward / generation / reward calls by functions that return
the given tensors, and runs TRL's method unchanged:

  grpo_loss                    GRPOTrainer.compute_loss -> _compute_loss     (trl/trainer/grpo_trainer.py)
  importance_sampling_weights  GRPOTrainer._generate_and_score_completions   (the vLLM IS ratio + sampling/* metrics)
  grpo_advantages              GRPOTrainer._generate_and_score_completions   (advantages + reward metrics)
  dpo_losses                   DPOTrainer._compute_loss                      (trl/trainer/dpo_trainer.py)
  simpo_losses / cpo_losses    CPOTrainer.cpo_loss                           (trl/experimental/cpo/cpo_trainer.py)
  conservative_dpo_losses      CPOTrainer.cpo_loss("sigmoid") on log-ratios  (cDPO label smoothing)
  reward_model_loss            RewardTrainer.compute_loss                    (trl/trainer/reward_trainer.py)

Settings the helpers do not take keep TRL's defaults, read from the config dataclasses' field
defaults (GRPOConfig / DPOConfig / CPOConfig / RewardConfig are not instantiated: TrainingArguments.__post_init__
would set up accelerate's process-wide state). The few lines of GRPOTrainer.__init__ that copy config
values onto the trainer (e.g. epsilon_high = epsilon when None) are mirrored in `_grpo_trainer`.

TRL itself is imported on first use (about 5 s on this machine), so importing this module costs only
torch's import; `pip install -e ".[test]"` installs it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from collections import defaultdict, deque
from types import SimpleNamespace
from typing import NamedTuple
from unittest import mock

import torch

TRL_VERSION = "1.16.0"  # the version these stand-ins were written against (tests/ pin it in [test])


# ---------------------------------------------------------------------------------------------------
# TRL imports (lazy, cached) and the single-process stand-ins
# ---------------------------------------------------------------------------------------------------


@functools.cache
def _trl():
    with warnings.catch_warnings():  # trl.experimental (CPOTrainer) warns on import
        warnings.simplefilter("ignore")
        import trl
        from trl.experimental.cpo import cpo_trainer
        from trl.experimental.cpo.cpo_config import CPOConfig
        from trl.trainer import dpo_trainer, grpo_trainer, reward_trainer, utils
        from trl.trainer.dpo_config import DPOConfig
        from trl.trainer.grpo_config import GRPOConfig
        from trl.trainer.reward_config import RewardConfig
    if trl.__version__ != TRL_VERSION:
        warnings.warn(f"tests/trl_reference.py was written against trl {TRL_VERSION}, found {trl.__version__}",
                      stacklevel=3)
    return SimpleNamespace(version=trl.__version__, grpo=grpo_trainer, dpo=dpo_trainer, cpo=cpo_trainer,
                           reward=reward_trainer, utils=utils, GRPOConfig=GRPOConfig, DPOConfig=DPOConfig,
                           CPOConfig=CPOConfig, RewardConfig=RewardConfig)


def _config_defaults(config_cls, **overrides):
    """The dataclass field defaults of a TRL config (not run through __post_init__), with overrides."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    unknown = set(overrides) - set(values)
    if unknown:
        raise TypeError(f"{config_cls.__name__} has no field(s) {sorted(unknown)}")
    values.update(overrides)
    return SimpleNamespace(**values)


class _SingleProcessAccelerator:
    """What accelerate's Accelerator does with one process: gathers and reductions are identities."""

    num_processes = 1
    process_index = 0
    is_main_process = True
    sync_gradients = True

    def __init__(self, device):
        self.device = torch.device(device)

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def autocast(self):
        return contextlib.nullcontext()

    def unwrap_model(self, model):
        return model


def _metrics_of(trainer, mode="train"):
    """The trainer's logged metrics, averaged over the values it appended, as its `log()` reports them."""
    out = {}
    for key, values in trainer._metrics[mode].items():
        valid = [v for v in values if v == v]  # drop NaN, as GRPOTrainer.log does
        out[key] = sum(valid) / len(valid) if valid else None
    return out


# ---------------------------------------------------------------------------------------------------
# GRPO
# ---------------------------------------------------------------------------------------------------


def _grpo_trainer(device, **config):
    """A bare GRPOTrainer whose attributes are those GRPOTrainer.__init__ sets from a GRPOConfig with
    these fields (trl/trainer/grpo_trainer.py, __init__: lines ~789-1100 in 1.16.0)."""
    t = _trl()
    args = _config_defaults(t.GRPOConfig, **config)
    if args.steps_per_generation is None:  # GRPOConfig.__post_init__'s default, one process
        args.steps_per_generation = args.gradient_accumulation_steps
    self = object.__new__(t.grpo.GRPOTrainer)
    self.args = args
    self.accelerator = _SingleProcessAccelerator(device)
    self.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    self.temperature = args.temperature
    # GRPOConfig.__post_init__ turns its default "auto" into None off Neuron
    self.pad_to_multiple_of = None if args.pad_to_multiple_of == "auto" else args.pad_to_multiple_of
    self.use_vllm = args.use_vllm
    self.vllm_importance_sampling_correction = args.vllm_importance_sampling_correction
    self.vllm_importance_sampling_mode = args.vllm_importance_sampling_mode
    self.vllm_importance_sampling_clip_max = args.vllm_importance_sampling_clip_max
    self.vllm_importance_sampling_clip_min = args.vllm_importance_sampling_clip_min
    self.loss_type = args.loss_type
    self.multi_objective_aggregation = args.multi_objective_aggregation
    self.router_aux_loss_coef = 0.0
    self.aux_loss_enabled = False
    self.scale_rewards = {True: "group", False: "none"}.get(args.scale_rewards, args.scale_rewards)
    self.importance_sampling_level = args.importance_sampling_level
    self.off_policy_mask_threshold = args.off_policy_mask_threshold
    self.mask_truncated_completions = args.mask_truncated_completions
    self.top_entropy_quantile = args.top_entropy_quantile
    self.entropy_coef = args.entropy_coef
    self.use_adaptive_entropy = args.use_adaptive_entropy
    self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
    self._last_world_entropy = float("inf")
    self._entropy_window_stats = None
    self.num_iterations = args.num_iterations
    self.epsilon_low = args.epsilon
    self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    self.beta = args.beta
    self.ref_model = None
    self.max_completion_length = args.max_completion_length
    self.num_generations = args.num_generations
    self.num_generations_eval = args.num_generations_eval or args.num_generations
    self.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    self._logs = {"images": deque(), "prompt": deque(), "completion": deque(), "advantages": deque(),
                  "rewards": defaultdict(deque), "extra": defaultdict(deque)}
    self._pending_extra_logs = defaultdict(list)
    self._pending_metrics = defaultdict(list)
    self.log_multimodal = args.log_multimodal
    self.environment_factories = None
    self.environments = []
    self.tools = []
    self._tokenizer = SimpleNamespace(pad_token_id=0)
    return self


def _lengths_and_tool_mask(completion_mask):
    """Completion lengths (through each row's last unmasked token, at least 1) and, where a row's mask
    is not a prefix of ones, the in-length mask as TRL's tool_mask (loss mask = completion_mask * tool_mask)."""
    mask = completion_mask.bool()
    positions = torch.arange(1, mask.size(1) + 1, device=mask.device)
    lengths = (mask * positions).amax(1).clamp(min=1).tolist()
    tool_mask = [mask[i, :n].long().tolist() for i, n in enumerate(lengths)]
    if all(all(row) for row in tool_mask):
        tool_mask = None
    return lengths, tool_mask


def _generate_and_score(self, old_per_token_logps, completion_mask, sampling_per_token_logps, rewards_per_func):
    """Run GRPOTrainer._generate_and_score_completions with generation, the log-prob forward and the
    reward functions replaced by the given tensors. Returns (its output dict, its metrics)."""
    batch = completion_mask.size(0)
    lengths, tool_mask = _lengths_and_tool_mask(completion_mask)
    completion_ids = [[1] * n for n in lengths]  # token id 1, never a pad (0)
    sampling = None
    if sampling_per_token_logps is not None:
        # as vLLM hands them over: python floats, NaN where a token could not be scored
        sampling = [sampling_per_token_logps[i, :n].tolist() for i, n in enumerate(lengths)]

    def generate(prompts):
        return [[1] for _ in prompts], completion_ids, tool_mask, ["" for _ in prompts], sampling, {}, None, []

    def logps_forward(model, input_ids, attention_mask, logits_to_keep, *a, **k):
        assert logits_to_keep == old_per_token_logps.size(1), (logits_to_keep, old_per_token_logps.shape)
        return old_per_token_logps, None, None

    self._generate = generate
    self._get_per_token_logps_and_entropies = logps_forward
    self._calculate_rewards = lambda inputs, prompts, completions, completion_ids_list: rewards_per_func
    self.reward_func_names = [f"reward_{i}" for i in range(rewards_per_func.size(1))]
    if getattr(self, "reward_weights", None) is None:
        self.reward_weights = torch.ones(rewards_per_func.size(1))
    identity = lambda obj: obj  # noqa: E731 - accelerate's gather_object with one process
    with mock.patch.object(_trl().grpo, "gather_object", identity):
        output = self._generate_and_score_completions([{"prompt": "p"} for _ in range(batch)])
    return output, _metrics_of(self)


def importance_sampling_weights(old_per_token_logps, sampling_per_token_logps, completion_mask, *,
                                mode="sequence_mask", clip_max=3.0, clip_min=None):
    """TRL's sampler/trainer importance-sampling ("TIS"/"MIS") weight and its sampling/* metrics.

    old_per_token_logps: [B, T] the trainer's log-probs of the sampled tokens at generation time
    (pi_old); sampling_per_token_logps: [B, T] the sampler's (vLLM's) log-probs, NaN where unknown;
    completion_mask: [B, T] 0/1. mode: "token_truncate" | "token_mask" | "sequence_truncate" |
    "sequence_mask" (TRL's default); clip_max (TRL default 3.0) / clip_min (default None) are
    vllm_importance_sampling_clip_max / _min.

    Returns (ratio, metrics): ratio is [B, T] for token_* modes and [B, 1] for sequence_* modes,
    no gradient (TRL computes it under no_grad, once per generation); metrics has
    "sampling/sampling_logp_difference/mean|max" and "sampling/importance_sampling_ratio/min|mean|max".
    Runs GRPOTrainer._generate_and_score_completions (use_vllm=True, correction on). Values are
    float32: TRL builds the sampler's log-probs with torch.tensor(list of floats).
    """
    self = _grpo_trainer(old_per_token_logps.device, use_vllm=True, vllm_importance_sampling_correction=True,
                         vllm_importance_sampling_mode=mode, vllm_importance_sampling_clip_max=clip_max,
                         vllm_importance_sampling_clip_min=clip_min, num_generations=completion_mask.size(0),
                         per_device_train_batch_size=completion_mask.size(0), beta=0.0)
    rewards = torch.zeros(completion_mask.size(0), 1, device=old_per_token_logps.device)
    output, metrics = _generate_and_score(self, old_per_token_logps.detach(), completion_mask,
                                          sampling_per_token_logps.detach(), rewards)
    keep = ("sampling/",)
    return output["importance_sampling_ratio"], {k: v for k, v in metrics.items() if k.startswith(keep)}


def grpo_advantages(rewards, *, num_generations, scale_rewards="group", reward_weights=None,
                    multi_objective_aggregation="sum_then_normalize"):
    """TRL's GRPO advantages from rewards, and the reward metrics it logs.

    rewards: [B] or [B, n_reward_funcs] (NaN: the function did not score that completion), the B
    completions in consecutive groups of num_generations. scale_rewards: "group" (TRL default),
    "batch" or "none" (True/False map to group/none, as GRPOConfig does).
    Returns (advantages [B], metrics): metrics has "reward", "reward_std", "frac_reward_zero_std",
    "rewards/reward_<i>/mean|std". Runs GRPOTrainer._generate_and_score_completions.
    """
    rewards = rewards.detach().float()
    if rewards.dim() == 1:
        rewards = rewards.unsqueeze(1)
    batch = rewards.size(0)
    self = _grpo_trainer(rewards.device, num_generations=num_generations, per_device_train_batch_size=batch,
                         scale_rewards=scale_rewards, multi_objective_aggregation=multi_objective_aggregation,
                         beta=0.0, use_vllm=False)
    if reward_weights is not None:
        self.reward_weights = torch.as_tensor(reward_weights, dtype=torch.float32)
    mask = torch.ones(batch, 1, dtype=torch.long, device=rewards.device)
    output, metrics = _generate_and_score(self, torch.zeros(batch, 1, device=rewards.device), mask, None, rewards)
    return output["advantages"], metrics


def grpo_loss(per_token_logps, old_per_token_logps, advantages, completion_mask, *, loss_type, beta=0.0,
              ref_per_token_logps=None, epsilon_low=0.2, epsilon_high=None, delta=None,
              importance_sampling_level="token", max_completion_length=None, sampling_per_token_logps=None,
              is_correction=True, is_mode="sequence_mask", is_clip_max=3.0, is_clip_min=None,
              importance_sampling_ratio=None, use_bias_correction_kl=True, entropies=None,
              top_entropy_quantile=1.0, off_policy_mask_threshold=None, num_items_in_batch=None,
              gradient_accumulation_steps=1, steps_per_generation=1, **config):
    """TRL's GRPO loss (GRPOTrainer.compute_loss) on given log-probs, and the metrics it logs.

    per_token_logps [B, T]: the policy's log-probs of the completion tokens (the tensor to take
    gradients of); old_per_token_logps [B, T] or None (TRL then uses per_token_logps.detach(), the
    on-policy case); advantages [B] (or [B, T]); completion_mask [B, T] 0/1 (cast to long, TRL's dtype).
    loss_type: "grpo" | "bnpo" | "dr_grpo" | "dapo" | "cispo" | "sapo" | "luspo" | "vespo".
    epsilon_low is GRPOConfig.epsilon; epsilon_high None -> epsilon_low (for cispo it is the IS-weight
    cap, the paper's eps_max: pass e.g. 5.0). delta: INTELLECT-2's two-sided clip (None: off).
    beta > 0 needs ref_per_token_logps; use_bias_correction_kl (TRL default True) multiplies the k3
    KL by the (differentiable) ratio. max_completion_length: dr_grpo's constant (None -> T).
    num_items_in_batch: dapo/cispo/vespo's normalizer, the generation batch's loss-token count
    (None -> completion_mask.sum()); with gradient_accumulation_steps G and steps_per_generation S the
    loss divides by num_items * G / S, as in TRL; grpo/bnpo/dr_grpo divide by G.
    Sampler correction: give sampling_per_token_logps (or a ready importance_sampling_ratio) and keep
    is_correction=True; the ratio is computed from old_per_token_logps (or per_token_logps.detach())
    by importance_sampling_weights(mode=is_mode, clip_max=is_clip_max, clip_min=is_clip_min).
    entropies [B, T]: for the "entropy" metric and top_entropy_quantile (default zeros).
    **config: any other GRPOConfig field (e.g. sapo_temperature_pos, vespo_k_pos, entropy_coef).

    Returns (loss, metrics): the scalar loss TRL backpropagates (connected to per_token_logps), and
    its metrics for this call ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean",
    "clip_ratio/low_min", "clip_ratio/high_max", "cispo_clip_ratio", "kl", "entropy", plus the
    sampling/* metrics when the sampler correction is on).
    """
    batch, length = completion_mask.shape
    device = per_token_logps.device
    completion_mask = completion_mask.long()
    use_vllm = is_correction and (sampling_per_token_logps is not None or importance_sampling_ratio is not None)
    self = _grpo_trainer(
        device, loss_type=loss_type, beta=beta, epsilon=epsilon_low, epsilon_high=epsilon_high, delta=delta,
        importance_sampling_level=importance_sampling_level, use_bias_correction_kl=use_bias_correction_kl,
        max_completion_length=length if max_completion_length is None else max_completion_length,
        use_vllm=use_vllm, vllm_importance_sampling_correction=is_correction,
        vllm_importance_sampling_mode=is_mode, vllm_importance_sampling_clip_max=is_clip_max,
        vllm_importance_sampling_clip_min=is_clip_min, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold, gradient_accumulation_steps=gradient_accumulation_steps,
        steps_per_generation=steps_per_generation, **config)
    if entropies is None:
        entropies = torch.zeros_like(per_token_logps)

    def logps_forward(model, input_ids, attention_mask, logits_to_keep, *a, compute_entropy=False, **k):
        assert logits_to_keep == length
        return per_token_logps, (entropies if compute_entropy else None), None

    self._get_per_token_logps_and_entropies = logps_forward
    inputs = {
        "prompt_ids": torch.ones(batch, 1, dtype=torch.long, device=device),
        "prompt_mask": torch.ones(batch, 1, dtype=torch.long, device=device),
        "completion_ids": torch.ones(batch, length, dtype=torch.long, device=device),
        "completion_mask": completion_mask,
        "advantages": advantages,
        "num_items_in_batch": completion_mask.sum() if num_items_in_batch is None
        else torch.as_tensor(num_items_in_batch, device=device),
    }
    if old_per_token_logps is not None:
        inputs["old_per_token_logps"] = old_per_token_logps
    if beta != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps")
        inputs["ref_per_token_logps"] = ref_per_token_logps
    sampling_metrics = {}
    if use_vllm:
        if importance_sampling_ratio is None:
            old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
            importance_sampling_ratio, sampling_metrics = importance_sampling_weights(
                old, sampling_per_token_logps, completion_mask, mode=is_mode, clip_max=is_clip_max,
                clip_min=is_clip_min)
        inputs["importance_sampling_ratio"] = importance_sampling_ratio
        if sampling_per_token_logps is not None:
            inputs["sampling_per_token_logps"] = sampling_per_token_logps
    loss = self.compute_loss(None, inputs)
    return loss, {**sampling_metrics, **_metrics_of(self)}


# ---------------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------------


class DPOReference(NamedTuple):
    losses: torch.Tensor | None  # [B] per pair (None for the batch-coupled aot / aot_unpaired / sft)
    chosen_rewards: torch.Tensor  # [B] beta * (logp_chosen - ref_logp_chosen), detached, as TRL logs
    rejected_rewards: torch.Tensor  # [B]
    loss: torch.Tensor  # TRL's batch loss: the mean over the pairs (weighted sum over loss types)
    metrics: dict  # the batch's logged rewards/chosen|rejected|accuracies|margins, logps/chosen|rejected


def _dpo_call(loss_type, beta, label_smoothing, chosen, rejected, ref_chosen, ref_rejected,
              chosen_lengths, rejected_lengths, config):
    t = _trl()
    loss_types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    args = _config_defaults(t.DPOConfig, loss_type=loss_types, beta=beta, label_smoothing=label_smoothing, **config)
    self = object.__new__(t.dpo.DPOTrainer)
    device = chosen.device
    # DPOTrainer.__init__'s copies of the config
    self.args = args
    self.beta = args.beta
    self.loss_types = args.loss_type
    self.loss_weights = args.loss_weights or [1.0] * len(self.loss_types)
    self.label_smoothing = args.label_smoothing
    self.f_divergence_type = args.f_divergence_type
    self.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    self.ld_alpha = None
    self.use_weighting = False
    self.precompute_ref_logps = True
    self.aux_loss_enabled = False
    self.accelerator = _SingleProcessAccelerator(device)
    self.model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    self._total_train_tokens = 0
    self._tp_size = 1

    # the batch is [chosen; rejected]; one prompt token, then each completion's tokens
    lengths = torch.cat([chosen_lengths, rejected_lengths]).long()
    width = int(lengths.max()) + 1
    positions = torch.arange(width, device=device)
    completion_mask = ((positions >= 1) & (positions <= lengths[:, None])).long()
    logps = torch.cat([chosen, rejected])
    # the fused LM head's per-token log-probs [2B, width - 1], zero off the completion; TRL sums them
    # per row, so the whole sequence log-prob sits on the first completion token
    first = torch.zeros(width - 1, device=device, dtype=logps.dtype)
    first[0] = 1.0
    per_token = logps[:, None] * first

    def model(**kwargs):
        zeros = torch.zeros_like(per_token)
        return SimpleNamespace(log_probs=per_token, entropy=zeros, mean_logits=zeros,
                               is_top1=zeros.bool(), log_sum_sq_probs=None, aux_loss=None)

    inputs = {"input_ids": torch.ones_like(completion_mask), "attention_mask": torch.ones_like(completion_mask),
              "completion_mask": completion_mask, "ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = self.compute_loss(model, inputs)
    # entropy, num_tokens, logits/* and mean_token_accuracy would only describe the stand-in model
    keep = ("rewards/", "logps/")
    return loss, {k: v for k, v in _metrics_of(self).items() if k.startswith(keep)}


def dpo_losses(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
               loss_type="sigmoid", beta=0.1, label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None,
               **config):
    """TRL's DPO losses (DPOTrainer._compute_loss) on given sequence log-probs.

    *_logps: [B] summed completion log-probs (policy ones carry the gradient). loss_type: a DPOConfig
    loss type ("sigmoid", "ipo", "sigmoid_norm", "hinge", "robust", "exo_pair", ...) or a list of them
    (combined with config loss_weights). label_smoothing: note that TRL 1.16's "sigmoid" ignores it;
    only "robust", "exo_pair", "aot" and "aot_unpaired" use it. chosen_lengths / rejected_lengths [B]:
    completion token counts, which "ipo" and "sigmoid_norm" divide the log-ratios by (default 1).
    **config: other DPOConfig fields (f_divergence_type, f_alpha_divergence_coef, discopop_tau,
    loss_weights).

    Returns a DPOReference: per-pair losses (one TRL call per pair, so each carries its own
    gradient), the rewards TRL logs per pair, the batch loss of one TRL call on the whole batch and
    that call's metrics.
    """
    batch = policy_chosen_logps.size(0)
    ones = torch.ones(batch, dtype=torch.long, device=policy_chosen_logps.device)
    chosen_lengths = ones if chosen_lengths is None else torch.as_tensor(chosen_lengths, device=ones.device)
    rejected_lengths = ones if rejected_lengths is None else torch.as_tensor(rejected_lengths, device=ones.device)
    tensors = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
               chosen_lengths, rejected_lengths)
    loss, metrics = _dpo_call(loss_type, beta, label_smoothing, *tensors, config)
    types = {loss_type} if isinstance(loss_type, str) else set(loss_type)
    losses, chosen_rewards, rejected_rewards = [], [], []
    for i in range(batch):
        pair_loss, pair_metrics = _dpo_call(loss_type, beta, label_smoothing,
                                            *(x[i:i + 1] for x in tensors), config)
        losses.append(pair_loss)
        chosen_rewards.append(pair_metrics["rewards/chosen"])
        rejected_rewards.append(pair_metrics["rewards/rejected"])
    coupled = types & {"aot", "aot_unpaired", "sft"}
    return DPOReference(None if coupled else torch.stack(losses), torch.tensor(chosen_rewards),
                        torch.tensor(rejected_rewards), loss, metrics)


# ---------------------------------------------------------------------------------------------------
# CPO / SimPO
# ---------------------------------------------------------------------------------------------------


def cpo_losses(policy_chosen_logps, policy_rejected_logps, *, loss_type="sigmoid", beta=0.1, label_smoothing=0.0,
               simpo_gamma=0.5, alpha=0.0):
    """TRL's CPOTrainer.cpo_loss: (losses [B], chosen_rewards [B], rejected_rewards [B]).

    For "simpo" and "ipo", CPOTrainer feeds it token-AVERAGED log-probs (get_batch_logps with
    average_log_prob=True, see cpo_batch_logps); for "sigmoid"/"hinge" summed ones. The trainer's loss is
    losses.mean() + cpo_alpha * NLL(chosen) (cpo_alpha defaults to 1.0; SimPO uses 0). alpha != 0:
    AlphaPO's reward transform.
    """
    t = _trl()
    args = _config_defaults(t.CPOConfig, loss_type=loss_type, beta=beta, label_smoothing=label_smoothing,
                            simpo_gamma=simpo_gamma, alpha=alpha)
    self = object.__new__(t.cpo.CPOTrainer)
    # CPOTrainer.__init__'s copies of the config
    self.args = args
    self.beta, self.label_smoothing, self.loss_type = args.beta, args.label_smoothing, args.loss_type
    self.simpo_gamma, self.alpha, self.cpo_alpha = args.simpo_gamma, args.alpha, args.cpo_alpha
    self.accelerator = _SingleProcessAccelerator(policy_chosen_logps.device)
    return self.cpo_loss(policy_chosen_logps, policy_rejected_logps)


def simpo_losses(policy_chosen_logps, policy_rejected_logps, *, beta, simpo_gamma, label_smoothing=0.0):
    """SimPO as TRL computes it (CPOTrainer.cpo_loss with loss_type="simpo"): inputs are token-AVERAGED
    log-probs [B]; logits = (chosen - rejected) - simpo_gamma / beta, loss = -logsigmoid(beta * logits)
    smoothed by label_smoothing. Returns (losses, chosen_rewards = beta * avg logp, rejected_rewards).
    simpo_gamma is the margin gamma itself (TRL subtracts simpo_gamma / beta from the log-prob gap).
    CPOConfig's defaults are beta 0.1 and simpo_gamma 0.5; the SimPO paper uses beta 2.0-2.5."""
    return cpo_losses(policy_chosen_logps, policy_rejected_logps, loss_type="simpo", beta=beta,
                      label_smoothing=label_smoothing, simpo_gamma=simpo_gamma)


def conservative_dpo_losses(chosen_logratios, rejected_logratios, *, beta=0.1, label_smoothing=0.0):
    """cDPO (DPO with label smoothing eps), which TRL's DPOTrainer no longer has (its "sigmoid" ignores
    label_smoothing): TRL's CPOTrainer.cpo_loss(loss_type="sigmoid") computes
    -(1 - eps) logsigmoid(beta (a - b)) - eps logsigmoid(-beta (a - b)) on its two inputs, so given the
    policy-minus-reference log-ratios [B] it is cDPO. Returns (losses, beta * chosen_logratios,
    beta * rejected_logratios). With label_smoothing=0 it equals dpo_losses(loss_type="sigmoid")."""
    return cpo_losses(chosen_logratios, rejected_logratios, loss_type="sigmoid", beta=beta,
                      label_smoothing=label_smoothing)


# ---------------------------------------------------------------------------------------------------
# Reward model
# ---------------------------------------------------------------------------------------------------


def reward_model_loss(rewards_chosen, rewards_rejected, *, margin=None, center_rewards_coefficient=None):
    """TRL's reward model loss (RewardTrainer.compute_loss) on given scores, and the metrics it logs.

    rewards_chosen / rewards_rejected: [B] the scores of the chosen and rejected conversations (the tensors
    to take gradients of), which TRL's model returns as logits [2B, 1], the chosen first. margin: [B], a
    dataset's `margin` column as TRL's collator hands it over (None: no such column).
    center_rewards_coefficient: RewardConfig's (default None: no centering term).

    Returns (loss, metrics): the scalar batch loss TRL backpropagates (the mean over the pairs) and the
    batch's logged "accuracy", "margin", "min_reward", "mean_reward", "max_reward".
    """
    t = _trl()
    self = object.__new__(t.reward.RewardTrainer)
    # what compute_loss reads: RewardTrainer.__init__'s config and metric stores, the model's train mode
    self.args = _config_defaults(t.RewardConfig, center_rewards_coefficient=center_rewards_coefficient)
    self.accelerator = _SingleProcessAccelerator(rewards_chosen.device)
    self.model = SimpleNamespace(training=True)
    self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    self._total_train_tokens = 0
    self._tp_size = 1
    logits = torch.cat([rewards_chosen, rewards_rejected])[:, None]
    ones = torch.ones(len(logits), 1, dtype=torch.long, device=logits.device)

    def model(input_ids, attention_mask, use_cache, **kwargs):
        return SimpleNamespace(logits=logits)

    inputs = {"input_ids": ones, "attention_mask": ones}
    if margin is not None:
        inputs["margin"] = margin
    loss = self.compute_loss(model, inputs)
    return loss, {k: v for k, v in _metrics_of(self).items() if k != "num_tokens"}  # num_tokens: the stand-in's
