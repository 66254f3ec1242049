"""The Triton kernels on a GPU at real LM-head shapes, judged as Apple's Cut Cross-Entropy tests
judge theirs: against an fp32 truth computed from the same low-precision inputs, the error of
linear_logprobs must be no worse than that of a naive computation in the input dtype (full
logits in that dtype, then log_softmax in fp32) plus a small margin.

Each check runs in a child process (`python tests/test_kernels_gpu.py CHECK ARGS`): triton picks
interpreter or compiler once per process, and tests/test_kernels_triton.py turns the interpreter
on for the pytest process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def run_in_child(check, **kwargs):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    subprocess.run([sys.executable, __file__, check, json.dumps(kwargs)], check=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("n,h,v", [(2169, 896, 151936), (2169, 4096, 128256)], ids=["qwen2.5-0.5b", "llama-3-8b"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_no_worse_than_naive_in_same_dtype(n, h, v, dtype):
    run_in_child("check_against_naive", n=n, h=h, v=v, dtype=dtype)


def test_fp32_matches_fp64_on_ragged_vocab():
    run_in_child("check_fp32", n=333, h=200, v=50257)


def test_deterministic_mode_is_bitwise_repeatable():
    run_in_child("check_deterministic", n=2169, h=896, v=151936)


def test_offsets_past_int32():
    # V * H > 2**31: element offsets into the weight overflow int32
    run_in_child("check_against_naive", n=64, h=16512, v=131072, dtype="bfloat16")


# ---- the checks, run in the child process ----

def make(n, h, v, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    hidden = torch.randn(n, h, device="cuda", generator=g).to(dtype)
    weight = (torch.randn(v, h, device="cuda", generator=g) * 2 * h**-0.5).to(dtype)
    targets = torch.randint(0, v, (n,), device="cuda", generator=g)
    targets[::7] = -100
    w_logp = torch.rand(n, device="cuda", generator=g) + 0.5
    w_ent = torch.randn(n, device="cuda", generator=g)
    return hidden, weight, targets, w_logp, w_ent


def full_logits(compute_dtype):
    """Plain autograd over the whole [N, V] logits, computed in `compute_dtype`."""
    def fn(hidden, weight, targets, temperature=1.0, with_entropy=True):
        logits = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
        logits = logits.to(torch.promote_types(compute_dtype, torch.float32)) / temperature
        logprobs = torch.log_softmax(logits, -1)
        valid = targets != -100
        logp = logprobs.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1) * valid
        entropy = -(logprobs.exp() * logprobs).sum(-1) * valid
        return logp, entropy
    return fn


def outputs(fn, hidden, weight, targets, w_logp, w_ent, **kwargs):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = fn(h, w, targets, temperature=0.9, with_entropy=True, **kwargs)
    ((logp * w_logp).sum() + (entropy * w_ent).sum()).backward()
    return dict(logp=logp.detach(), entropy=entropy.detach(), grad_hidden=h.grad, grad_weight=w.grad)


def check_against_naive(n, h, v, dtype):
    from nanopost import kernels
    from nanopost.kernels.triton_impl import linear_logprobs_triton

    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = make(n, h, v, getattr(torch, dtype))
    truth = outputs(full_logits(torch.float32), *inputs)
    naive = outputs(full_logits(inputs[0].dtype), *inputs)
    logp, _ = kernels.linear_logprobs(inputs[0].detach().requires_grad_(), inputs[1], inputs[2])
    assert "Triton" in type(logp.grad_fn).__name__, type(logp.grad_fn)
    for deterministic in (False, True):
        ours = outputs(linear_logprobs_triton, *inputs, deterministic=deterministic)
        for name, x in ours.items():
            assert x.dtype == naive[name].dtype and torch.isfinite(x).all(), name
            err = (x.float() - truth[name]).abs().mean().item()
            naive_err = (naive[name].float() - truth[name]).abs().mean().item()
            scale = truth[name].abs().mean().item()
            assert err <= 1.1 * naive_err + 1e-6 * scale, (name, deterministic, err, naive_err, scale)


def check_fp32(n, h, v):
    from nanopost.kernels.triton_impl import linear_logprobs_triton

    torch.backends.cuda.matmul.allow_tf32 = False
    inputs = make(n, h, v, torch.float32)
    truth = outputs(full_logits(torch.float64), *(x.double() if x.is_floating_point() else x for x in inputs))
    for deterministic in (False, True):
        ours = outputs(linear_logprobs_triton, *inputs, deterministic=deterministic)
        for name, x in ours.items():
            scale = truth[name].abs().max()
            assert ((x.double() - truth[name]).abs().max() / scale).item() < 1e-5, (name, deterministic)


def check_deterministic(n, h, v):
    from nanopost.kernels.triton_impl import linear_logprobs_triton

    inputs = make(n, h, v, torch.bfloat16)
    first, second = (outputs(linear_logprobs_triton, *inputs, deterministic=True) for _ in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name
    fast = outputs(linear_logprobs_triton, *inputs, deterministic=False)
    for name in first:
        assert (fast[name].float() - first[name].float()).abs().max() <= 1e-2 * first[name].float().abs().max(), name


if __name__ == "__main__":
    globals()[sys.argv[1]](**json.loads(sys.argv[2]))
