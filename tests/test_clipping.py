"""The clipped objectives of grpo.py and ppo_rlvr.py have the documented gradient everywhere, on the
clip boundaries too: the unclipped gradient unless the clip binds strictly, zero where it does. At a
boundary min/max see a tie and clamp sits on a bound, where torch releases differ (2.14 passes no
gradient through clamp at its bounds), so these tests catch an objective written with them."""

import math
import sys

import pytest
import torch

from conftest import ROOT

sys.path.insert(0, str(ROOT))
import grpo  # noqa: E402
import ppo_rlvr  # noqa: E402

pytestmark = pytest.mark.math


def exact_log(x):
    """A float64 y with exp(y) == x exactly, so that a ratio lands exactly on a clip bound."""
    y = torch.tensor(math.log(x), dtype=torch.float64)
    for _ in range(16):
        if torch.exp(y).item() == x:
            return y.item()
        y = torch.nextafter(y, torch.tensor(math.inf if torch.exp(y).item() < x else -math.inf, dtype=torch.float64))
    raise AssertionError(f"no float64 whose exp is exactly {x}")


# (ratio, advantage) on every side of the bounds 0.75 and 1.25 (epsilon 0.25), on them, and at 1
CASES = [(r, a) for r in (0.5, 0.75, 1.0, 1.25, 1.5) for a in (-2.0, 0.0, 3.0)]


def inputs(ratios):
    logp = torch.tensor([exact_log(r) for r in ratios], dtype=torch.float64, requires_grad=True)
    assert torch.exp(logp).tolist() == list(ratios)
    return logp, torch.zeros(len(ratios), dtype=torch.float64)


def binds(ratio, advantage, low, high):
    return (advantage > 0 and ratio > high) or (advantage < 0 and ratio < low)


@pytest.mark.parametrize("epsilon", [0.25, 0.0])
def test_grpo_surrogate_gradient_on_and_off_the_clip_bounds(epsilon):
    ratios, advantages = zip(*CASES)
    logp, old_logp = inputs(ratios)
    ref_logp = torch.linspace(-1, 1, len(ratios), dtype=torch.float64)
    loss, kl, low, high = grpo.clipped_surrogate(logp, old_logp, torch.tensor(advantages, dtype=torch.float64),
                                                 epsilon, epsilon, ref_logp, beta=0.1)
    loss.sum().backward()
    bounds = (1 - epsilon, 1 + epsilon)
    for i, (r, a) in enumerate(CASES):
        clipped = binds(r, a, *bounds)
        k3_grad = 0.1 * (1 - math.exp(ref_logp[i].item() - logp[i].item()))  # d/dlogp of beta k3
        assert loss[i].item() == pytest.approx(-min(r * a, min(max(r, bounds[0]), bounds[1]) * a) + 0.1 * kl[i].item())
        assert logp.grad[i].item() == pytest.approx((0.0 if clipped else -a * r) + k3_grad, abs=1e-12), (r, a)
        assert bool(low[i] | high[i]) == clipped


def test_ratio_one_with_epsilon_zero_keeps_the_whole_policy_gradient():
    """Every token sits on both bounds of a degenerate clip range; none of them is clipped."""
    logp = torch.randn(7, dtype=torch.float64, requires_grad=True)
    adv = torch.randn(7, dtype=torch.float64)
    loss, _, _, _ = grpo.clipped_surrogate(logp, logp.detach(), adv, 0.0, 0.0)
    loss.sum().backward()
    torch.testing.assert_close(logp.grad, -adv)
    logp.grad = None
    values = torch.randn(7, dtype=torch.float64, requires_grad=True)
    returns = torch.randn(7, dtype=torch.float64)
    ones = torch.ones(7, dtype=torch.float64)
    loss, _ = ppo_rlvr.ppo_loss(logp, logp.detach(), adv, values, values.detach(), returns, ones, 7.0, 0.0, 0.0, 0.5)
    loss.backward()
    torch.testing.assert_close(logp.grad, -adv / 7)
    torch.testing.assert_close(values.grad, 0.5 * (values.detach() - returns) / 7)


@pytest.mark.parametrize("cliprange", [0.25, 0.0])
def test_ppo_policy_and_value_gradients_on_and_off_the_clip_bounds(cliprange):
    ratios, advantages = zip(*CASES)
    n = len(CASES)
    logp, old_logp = inputs(ratios)
    # values at, inside and outside old_values +- cliprange, returns on either side
    old_values = torch.zeros(n, dtype=torch.float64)
    offsets = [-0.5, -0.25, 0.0, 0.25, 0.5]
    values = torch.tensor([offsets[i % 5] for i in range(n)], dtype=torch.float64, requires_grad=True)
    returns = torch.tensor([(-1.0, 1.0, 0.1)[i % 3] for i in range(n)], dtype=torch.float64)
    mask = torch.ones(n, dtype=torch.float64)
    vf_coef, n_tokens = 0.5, 10.0
    loss, stats = ppo_rlvr.ppo_loss(logp, old_logp, torch.tensor(advantages, dtype=torch.float64), values, old_values,
                                    returns, mask, n_tokens, cliprange, cliprange, vf_coef)
    loss.backward()
    for i, (r, a) in enumerate(CASES):
        pg_clipped = binds(r, a, 1 - cliprange, 1 + cliprange)
        assert logp.grad[i].item() == pytest.approx(0.0 if pg_clipped else -a * r / n_tokens, abs=1e-12), (r, a)
        v, ret = values[i].item(), returns[i].item()
        v_clipped = min(max(v, -cliprange), cliprange)
        vf_clipped = (v_clipped - ret) ** 2 > (v - ret) ** 2
        expected = 0.0 if vf_clipped else vf_coef * (v - ret) / n_tokens
        assert values.grad[i].item() == pytest.approx(expected, abs=1e-12), (v, ret)
    pg_clipfrac = sum(binds(r, a, 1 - cliprange, 1 + cliprange) for r, a in CASES)
    assert stats["policy_clipped"].item() == pg_clipfrac
    expected_loss = sum(max(-a * r, -a * min(max(r, 1 - cliprange), 1 + cliprange)) for r, a in CASES) / n_tokens
    expected_loss += vf_coef * sum(0.5 * max((v - t) ** 2, (min(max(v, -cliprange), cliprange) - t) ** 2)
                                   for v, t in zip(values.tolist(), returns.tolist())) / n_tokens
    assert loss.item() == pytest.approx(expected_loss)
