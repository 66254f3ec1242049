"""The chunked torch path of nanopost.kernels.linear_logprobs against a plain fp32 torch computation."""

import pytest
import torch

from nanopost.kernels import reference
from nanopost.kernels import linear_logprobs

pytestmark = pytest.mark.math


def plain(hidden, weight, targets, temperature=1.0, ignore_index=-100, with_entropy=True):
    """logp and entropy in fp64 through a full log_softmax (entropy is always returned; with_entropy
    only lets this stand in for linear_logprobs)."""
    logits = hidden.double() @ weight.double().T / temperature
    logprobs = torch.log_softmax(logits, -1)
    valid = targets != ignore_index
    logp = logprobs.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1) * valid
    entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
    return logp, entropy


def rel_err(x, ref):
    return ((x.double() - ref).abs().max() / ref.abs().max()).item()


def make(n, h, v, seed=0, ignore_frac=0.2, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * scale
    weight = torch.randn(v, h, generator=g) / h**0.5
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("n,h,v", [(7, 16, 50257), (5, 8, 151936), (33, 24, 101), (1, 4, 3)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_and_grads_match_plain_fp32(n, h, v, temperature, monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 4 * v)  # force several chunks
    hidden, weight, targets = make(n, h, v)
    w_logp, w_ent = torch.randn(n).abs(), torch.randn(n)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = linear_logprobs(h1, w1, targets, temperature=temperature, with_entropy=True)
    ((logp * w_logp).sum() + (entropy * w_ent).sum()).backward()

    h2, w2 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref_logp, ref_ent = plain(h2, w2, targets, temperature, -100)
    ((ref_logp * w_logp).sum() + (ref_ent * w_ent).sum()).backward()

    assert logp.dtype == torch.float32 and entropy.dtype == torch.float32
    torch.testing.assert_close(logp.double(), ref_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy.double(), ref_ent, rtol=5e-5, atol=1e-5)
    # fp32 sums over up to 151936 vocab terms (a plain fp32 autograd computation errs by about
    # 5e-5 of the scale too): judge gradients relative to their scale
    assert rel_err(h1.grad, h2.grad) < 2e-4 and rel_err(w1.grad, w2.grad) < 2e-4
    ignored = targets == -100
    assert (logp[ignored] == 0).all() and (entropy[ignored] == 0).all()
    assert (h1.grad[ignored] == 0).all()


def test_without_entropy_and_bf16_inputs():
    hidden, weight, targets = make(9, 16, 1000)
    hb, wb = hidden.bfloat16().requires_grad_(), weight.bfloat16().requires_grad_()
    logp, entropy = linear_logprobs(hb, wb, targets)
    assert entropy is None and logp.dtype == torch.float32
    logp.sum().backward()
    assert hb.grad.dtype == torch.bfloat16 and wb.grad.dtype == torch.bfloat16
    ref, _ = plain(hb.detach().float(), wb.detach().float(), targets, 1.0, -100)
    torch.testing.assert_close(logp.double(), ref, rtol=1e-5, atol=1e-4)


def test_custom_ignore_index_and_bad_input():
    hidden, weight, targets = make(6, 8, 50, ignore_frac=0.0)
    targets[2] = 7
    logp, _ = linear_logprobs(hidden, weight, targets, ignore_index=7)
    assert logp[2] == 0 and (logp[[0, 1, 3, 4, 5]] < 0).all()
    with pytest.raises(ValueError, match="shape mismatch"):
        linear_logprobs(hidden, weight[:, :4], targets)
    with pytest.raises(ValueError, match="temperature"):
        linear_logprobs(hidden, weight, targets, temperature=0.0)
