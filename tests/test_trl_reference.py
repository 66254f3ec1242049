"""nanopost's losses against Hugging Face TRL's own code (trl==1.16.0, a test-only dependency; TRL's methods
run unchanged on the same tensors through tests/trl_reference.py): DPO, IPO, dpo_norm, cDPO and SimPO
per pair; GRPO's advantages; the GRPO, Dr. GRPO, DAPO and CISPO losses, token- and sequence-level (GSPO),
with a KL penalty and the sampler correction, values and gradients; the sampler correction's weights and
the sampling/* metrics of every mode, for grpo.py and ppo_rlvr.py; the reward model's Bradley-Terry loss with
a margin and the centering term, and its metrics."""

import sys

import pytest
import torch

import trl_reference as trl
from conftest import ROOT

sys.path.insert(0, str(ROOT))
import dpo  # noqa: E402
import grpo  # noqa: E402
import ppo_rlvr  # noqa: E402
import reward_model  # noqa: E402

pytestmark = pytest.mark.math
MODES = ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]


def pairs(n=6):
    torch.manual_seed(0)
    policy = (-20 * torch.rand(n, 2, dtype=torch.float64) - 5).requires_grad_()
    ref = policy.detach() + torch.randn(n, 2, dtype=torch.float64)
    lengths = torch.randint(3, 30, (n, 2)).double()
    return policy, ref, lengths


@pytest.mark.parametrize("loss_type,label_smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0),
                                                        ("dpo_norm", 0.0), ("simpo", 0.0), ("simpo", 0.1)])
def test_dpo_losses_and_gradients_match_trl(loss_type, label_smoothing):
    policy, ref, lengths = pairs()
    beta, ratio = 0.7, 0.4
    args = dpo.Args(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma_beta_ratio=ratio)
    ours, chosen, rejected, _ = dpo.preference_loss(args, policy, None if loss_type == "simpo" else ref, lengths)
    if loss_type == "simpo":  # TRL's CPOTrainer, on token-averaged log-probs; its simpo_gamma is gamma itself
        average = policy / lengths
        theirs, their_chosen, their_rejected = trl.simpo_losses(average[:, 0], average[:, 1], beta=beta,
                                                                simpo_gamma=ratio * beta,
                                                                label_smoothing=label_smoothing)
    elif label_smoothing:  # cDPO: TRL's DPOTrainer ignores label_smoothing for sigmoid; its CPO loss has it
        theirs, their_chosen, their_rejected = trl.conservative_dpo_losses(
            policy[:, 0] - ref[:, 0], policy[:, 1] - ref[:, 1], beta=beta, label_smoothing=label_smoothing)
    else:
        result = trl.dpo_losses(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], beta=beta,
                                loss_type={"dpo_norm": "sigmoid_norm"}.get(loss_type, loss_type),
                                chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])
        theirs, their_chosen, their_rejected = result.losses, result.chosen_rewards, result.rejected_rewards
        if loss_type != "sigmoid":  # TRL logs the summed log-ratios; nanopost those the loss used, averaged
            their_chosen, their_rejected = their_chosen / lengths[:, 0], their_rejected / lengths[:, 1]
    torch.testing.assert_close(ours, theirs.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(chosen.detach(), their_chosen.double(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(rejected.detach(), their_rejected.double(), rtol=1e-6, atol=1e-9)
    ours_grad, = torch.autograd.grad(ours.sum(), policy)
    theirs_grad, = torch.autograd.grad(theirs.sum(), policy)
    torch.testing.assert_close(ours_grad, theirs_grad.double(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(scale):
    torch.manual_seed(1)
    rewards = torch.randint(0, 3, (24,)).double() / 2
    rewards[8:12] = 0.5  # a group without variance
    ours, zero_std = grpo.group_advantages(rewards, 4, scale)
    theirs, metrics = trl.grpo_advantages(rewards, num_generations=4, scale_rewards=scale)
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=1e-6)
    # the fraction of groups whose rewards are all equal; under scale_rewards="batch" TRL's metric of that
    # name measures the batch's std instead, nanopost's stays the groups' (what it is for: groups without signal)
    expected = 0.0 if scale == "batch" else zero_std.double().mean().item()
    assert metrics["frac_reward_zero_std"] == pytest.approx(expected) and zero_std.tolist().count(True) == 1


def rollout(batch=6, length=7, seed=2):
    """Per-token log-probs of completions of different lengths, laid out [B, T] for TRL and flat for
    nanopost (each completion's tokens in turn): the policy's, the old policy's, the reference's and the
    sampler's, and per-completion advantages."""
    torch.manual_seed(seed)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])[:batch]
    mask = torch.arange(length)[None] < lengths[:, None]
    logp = (-torch.rand(batch, length, dtype=torch.float64) * 3).requires_grad_()
    old = logp.detach() + 0.25 * torch.randn(batch, length, dtype=torch.float64)
    ref = logp.detach() + 0.2 * torch.randn(batch, length, dtype=torch.float64)
    sampler = old + 0.3 * torch.randn(batch, length, dtype=torch.float64)
    advantages = torch.randn(batch, dtype=torch.float64)
    return lengths, mask, logp, old, ref, sampler, advantages


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "cispo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("correction", ["none", "token_truncate", "sequence_mask"])
def test_grpo_losses_and_gradients_match_trl(loss_type, level, correction):
    """The loss of one global batch, as grpo.py sums it (per-token losses times the loss_type's weights)
    against TRL's GRPOTrainer.compute_loss, with clip-higher, a k3 KL and off-policy ratios; TRL's
    KL bias correction off (nanopost's k3 is the plain estimator)."""
    lengths, mask, logp, old, ref, sampler, advantages = rollout()
    epsilon, epsilon_high, beta, cap = 0.2, 0.28, 0.04, 1.5
    flat = lambda x: x[mask]  # noqa: E731
    correction_weights = None if correction == "none" else grpo.sampler_weights(
        flat(old), flat(sampler).float().double(), lengths, correction, cap)
    loss, _, _, _ = grpo.clipped_surrogate(flat(logp), flat(old), advantages.repeat_interleave(lengths), epsilon,
                                           epsilon_high, flat(ref), beta, lengths if level == "sequence" else None,
                                           loss_type == "cispo", correction_weights)
    weights = grpo.token_weights(lengths, loss_type, len(lengths), int(lengths.sum()), mask.shape[1])
    ours = (loss * weights.repeat_interleave(lengths)).sum()
    # TRL's cispo caps its weights at epsilon_high itself, nanopost's (and TRL's other losses) at 1 + epsilon_high
    trl_epsilon_high = 1 + epsilon_high if loss_type == "cispo" else epsilon_high
    theirs, _ = trl.grpo_loss(logp, old, advantages, mask, loss_type=loss_type, beta=beta, ref_per_token_logps=ref,
                              epsilon_low=epsilon, epsilon_high=trl_epsilon_high,
                              importance_sampling_level=level, use_bias_correction_kl=False,
                              sampling_per_token_logps=None if correction == "none" else sampler,
                              is_mode=correction, is_clip_max=cap)
    tolerance = dict(rtol=1e-12, atol=1e-14) if correction == "none" else dict(rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours, theirs.double(), **tolerance)
    ours_grad, = torch.autograd.grad(ours, logp)
    theirs_grad, = torch.autograd.grad(theirs, logp)
    torch.testing.assert_close(ours_grad, theirs_grad.double(), **tolerance)


def test_the_first_iteration_of_every_loss_is_the_policy_gradient():
    """At the first iteration (old = current policy) the ratio is 1 at token and at sequence level, and every
    loss type's gradient is -A times the loss_type's token weight, as TRL's is."""
    lengths, mask, logp, _, _, _, advantages = rollout()
    for level in ("token", "sequence"):
        for cispo in (False, True):
            flat = logp[mask]
            loss, _, low, high = grpo.clipped_surrogate(
                flat, flat.detach(), advantages.repeat_interleave(lengths), 0.0, 0.0,
                sequence_lengths=lengths if level == "sequence" else None, cispo=cispo)
            assert not low.any() and not high.any()
            gradient, = torch.autograd.grad(loss.sum(), logp)
            torch.testing.assert_close(gradient[mask], -advantages.repeat_interleave(lengths))


@pytest.mark.parametrize("mode", MODES)
def test_sampler_correction_weights_and_metrics_match_trl(mode):
    lengths, mask, _, old, _, sampler, _ = rollout()
    cap = 1.5
    theirs, metrics = trl.importance_sampling_weights(old, sampler, mask, mode=mode, clip_max=cap)
    theirs = theirs.double().expand(mask.shape)
    sampler = sampler.float().double()  # TRL receives the sampler's log-probs as float32
    ours = grpo.sampler_weights(old[mask], sampler[mask], lengths, mode, cap)
    torch.testing.assert_close(ours, theirs[mask], rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(ppo_rlvr.sampler_weights(old, sampler, mask.double(), mode, cap), theirs * mask,
                               rtol=1e-6, atol=1e-9)
    totals = grpo.Totals(torch.device("cpu"))
    grpo.sampler_mismatch(totals, old[mask], sampler[mask], ours, lengths, mode.startswith("sequence"))
    ours_metrics = grpo.sampling_metrics(totals.reduce())
    assert set(ours_metrics) == set(metrics)
    for name, value in ours_metrics.items():
        assert value == pytest.approx(metrics[name], rel=1e-5), name


@pytest.mark.parametrize("with_margin", [False, True])
@pytest.mark.parametrize("center_rewards_coefficient", [None, 0.01])
def test_reward_model_loss_and_gradient_match_trl(with_margin, center_rewards_coefficient):
    """reward_model.py's loss, a mean over pairs, against TRL's RewardTrainer.compute_loss on the same scores:
    values and gradients, with Llama 2's per-pair margin and the centering term; and the batch metrics that
    reward_model.py logs under TRL's names mean what TRL's do."""
    torch.manual_seed(3)
    chosen = (3 * torch.randn(8, dtype=torch.float64) + 1).requires_grad_()
    rejected = (3 * torch.randn(8, dtype=torch.float64)).requires_grad_()
    margins = torch.rand(8, dtype=torch.float64) * 2 if with_margin else torch.zeros(8, dtype=torch.float64)
    ours = reward_model.reward_loss(chosen, rejected, margins, center_rewards_coefficient).mean()
    theirs, metrics = trl.reward_model_loss(chosen, rejected, margin=margins if with_margin else None,
                                            center_rewards_coefficient=center_rewards_coefficient)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-14)
    ours_grad = torch.autograd.grad(ours, [chosen, rejected])
    theirs_grad = torch.autograd.grad(theirs, [chosen, rejected])
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert metrics["accuracy"] == pytest.approx((chosen > rejected).double().mean().item())
    assert metrics["margin"] == pytest.approx((chosen - rejected).mean().item())
    assert metrics["mean_reward"] == pytest.approx(torch.cat([chosen, rejected]).mean().item())
