"""The Triton kernels of nanopost.kernels.triton_impl, run by the Triton interpreter on CPU in fp32 at tiny
shapes, against the torch reference and a plain fp64 torch computation.

Triton chooses between interpreting and compiling when it is imported, once per process, so
tests/conftest.py turns the interpreter on before anything imports triton, for the whole pytest
process (tests/test_kernels_gpu.py and tests/test_kernels_aot.py do their triton work in child
processes without it); this module also does, for a run that does not load that conftest.
"""

import os
import sys

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError("triton was imported without TRITON_INTERPRET=1; run this file in a pytest process of its own")
os.environ["TRITON_INTERPRET"] = "1"

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from nanopost import kernels  # noqa: E402
from nanopost.kernels import triton_impl  # noqa: E402
from nanopost.kernels.reference import linear_logprobs_torch  # noqa: E402
from test_kernels_aot import TARGETS  # noqa: E402
from test_kernels_torch import make, plain  # noqa: E402


def run(fn, hidden, weight, targets, w_logp, w_ent, **kwargs):
    """Values and gradients of sum(w_logp * logp + w_ent * entropy); a None weight drops its term."""
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logp, entropy = fn(h, w, targets, with_entropy=True, **kwargs)
    loss = 0.0
    if w_logp is not None:
        loss = loss + (logp * w_logp).sum()
    if w_ent is not None:
        loss = loss + (entropy * w_ent).sum()
    loss.backward()
    return logp.detach(), None if entropy is None else entropy.detach(), h.grad, w.grad


def rel_err(x, ref):
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-12)).item()


def assert_matches(triton_out, ref_out, grad_tol=2e-5):
    for name, x, ref in zip(("logp", "entropy"), triton_out[:2], ref_out[:2]):
        if ref is not None:
            assert x.dtype == torch.float32, name
            torch.testing.assert_close(x.double(), ref.double(), rtol=1e-5, atol=1e-5, msg=name)
    for name, x, ref in zip(("grad_hidden", "grad_weight"), triton_out[2:], ref_out[2:]):
        assert rel_err(x, ref) < grad_tol, name


# ragged in every dim at the interpreter's 16-wide tiles: V = 101 and 17 leave 5 and 1 columns in
# the last vocab block (as 50257 and 32001 do at 128-wide tiles), H = 24 half a block
@pytest.mark.parametrize("n,h,v", [(33, 24, 101), (16, 16, 16), (1, 8, 3), (5, 40, 17)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_reference_and_fp64(n, h, v, temperature, deterministic):
    hidden, weight, targets = make(n, h, v)
    g = torch.Generator().manual_seed(1)
    w_logp, w_ent = torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g)
    got = run(triton_impl.linear_logprobs_triton, hidden, weight, targets, w_logp, w_ent,
              temperature=temperature, deterministic=deterministic)
    assert_matches(got, run(linear_logprobs_torch, hidden, weight, targets, w_logp, w_ent, temperature=temperature))
    assert_matches(got, run(plain, hidden.double(), weight.double(), targets, w_logp, w_ent, temperature=temperature))
    ignored = targets == -100
    assert (got[0][ignored] == 0).all() and (got[1][ignored] == 0).all() and (got[2][ignored] == 0).all()


def gpu_tile_sizes():
    """The distinct tile sizes launch_config picks on each GPU target (launch options do not change
    what the interpreter computes), with the (target, dtype) pairs that use them."""
    users = {}
    for target, limits in TARGETS.items():
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            blocks, _ = triton_impl.launch_config(dtype, limits["shared_memory"])
            users.setdefault(tuple(blocks.items()), []).append(f"{target}-{str(dtype).removeprefix('torch.')}")
    return [pytest.param(dict(blocks), id="x".join(str(v) for _, v in blocks) + ":" + ",".join(names))
            for blocks, names in users.items()]


@pytest.mark.parametrize("blocks", gpu_tile_sizes())
@pytest.mark.parametrize("deterministic", [False, True])
def test_gpu_tile_sizes_on_a_real_vocab(monkeypatch, blocks, deterministic):
    # the tiles used on CUDA, in fp32 numerics: V = 32001 leaves 1 column in the last vocab block,
    # H half a BLOCK_H step past a whole one, N = 3 rows of a BLOCK_N row block
    monkeypatch.setattr(triton_impl, "_device_config", lambda tensor: (blocks, {}, 4))
    hidden, weight, targets = make(3, blocks["BLOCK_H"] + 16, 32001)
    w_logp, w_ent = torch.tensor([1.0, 0.5, 2.0]), torch.tensor([0.3, -1.0, 0.7])
    got = run(triton_impl.linear_logprobs_triton, hidden, weight, targets, w_logp, w_ent, deterministic=deterministic)
    assert_matches(got, run(plain, hidden.double(), weight.double(), targets, w_logp, w_ent), grad_tol=1e-4)


@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_weight_in_vocab_chunks(monkeypatch, deterministic):
    # 3 vocab blocks per grad_weight chunk: 101 rows make 3 chunks, the last one ragged
    hidden, weight, targets = make(20, 24, 101)
    monkeypatch.setattr(triton_impl, "GRAD_WEIGHT_CHUNK_ELEMENTS", 3 * 16 * 24)
    w_logp, w_ent = torch.ones(20), torch.full((20,), 0.5)
    got = run(triton_impl.linear_logprobs_triton, hidden, weight, targets, w_logp, w_ent,
              deterministic=deterministic)
    assert_matches(got, run(plain, hidden.double(), weight.double(), targets, w_logp, w_ent))


def test_deterministic_gradients_are_bitwise_repeatable():
    hidden, weight, targets = make(40, 24, 101, seed=3)
    w_logp, w_ent = torch.rand(40) + 0.5, torch.randn(40)
    first, second = (run(triton_impl.linear_logprobs_triton, hidden, weight, targets, w_logp, w_ent,
                         temperature=0.9, deterministic=True) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # the atomic path sums in another order: equal up to rounding only
    fast = run(triton_impl.linear_logprobs_triton, hidden, weight, targets, w_logp, w_ent,
               temperature=0.9, deterministic=False)
    assert_matches(fast, first)


def test_deterministic_default_follows_torch_and_env(monkeypatch):
    monkeypatch.delenv("NANOPOST_DETERMINISTIC", raising=False)
    assert not triton_impl.deterministic_default()
    monkeypatch.setenv("NANOPOST_DETERMINISTIC", "1")
    assert triton_impl.deterministic_default()
    monkeypatch.delenv("NANOPOST_DETERMINISTIC")
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    assert triton_impl.deterministic_default()


def test_logp_only_entropy_only_and_custom_ignore_index():
    hidden, weight, targets = make(18, 16, 40, ignore_frac=0.0)
    targets[4] = 7  # an ignore_index that is also a vocab id
    w = torch.rand(18) + 0.5
    for w_logp, w_ent in ((w, None), (None, w)):  # one of the two output gradients is None
        got = run(triton_impl.linear_logprobs_triton, hidden, weight, targets, w_logp, w_ent,
                  ignore_index=7, deterministic=False)
        assert_matches(got, run(linear_logprobs_torch, hidden, weight, targets, w_logp, w_ent, ignore_index=7))
        assert got[0][4] == 0 and got[1][4] == 0 and (got[2][4] == 0).all()
    logp, entropy = triton_impl.linear_logprobs_triton(hidden, weight, targets)
    assert entropy is None and logp.dtype == torch.float32


def test_entropy_of_peaked_and_uniform_distributions():
    # large logits: entropy near 0, where lse - E[z] would cancel badly; zero weights: log V exactly
    hidden, weight, targets = make(20, 16, 101, scale=60.0, ignore_frac=0.0)
    _, entropy = triton_impl.linear_logprobs_triton(hidden, weight, targets, with_entropy=True)
    _, ref = plain(hidden, weight, targets)
    assert ref.min() < 1e-3
    torch.testing.assert_close(entropy.double(), ref, rtol=1e-4, atol=1e-6)
    logp, entropy = triton_impl.linear_logprobs_triton(hidden, torch.zeros_like(weight), targets, with_entropy=True)
    torch.testing.assert_close(entropy, torch.full((20,), torch.log(torch.tensor(101.0)).item()))
    torch.testing.assert_close(logp, -entropy)


def test_mixed_dtypes_are_rejected():
    hidden, weight, targets = make(4, 16, 20)
    with pytest.raises(ValueError, match="share a dtype"):
        triton_impl.linear_logprobs_triton(hidden.double(), weight, targets)


def test_import_kernels_does_not_import_triton_and_cpu_uses_torch():
    code = ("import sys, torch\nfrom nanopost import kernels\n"
            "hidden = torch.randn(3, 8, requires_grad=True)\n"
            "logp, _ = kernels.linear_logprobs(hidden, torch.randn(5, 8), torch.tensor([0, 1, 2]))\n"
            "assert 'triton' not in sys.modules, 'triton imported'\n"
            "assert type(logp.grad_fn).__name__ == '_LinearLogprobsBackward', type(logp.grad_fn)\n")
    root = Path(kernels.__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env=env)


def test_benchmark_script_starts_without_gpu():
    root = Path(kernels.__file__).parents[2]
    result = subprocess.run([sys.executable, str(root / "bench" / "fused_head.py"), "--help"], capture_output=True,
                            text=True, check=True, cwd=root)
    assert "--hidden" in result.stdout
