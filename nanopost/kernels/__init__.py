"""Log-probabilities of target tokens under a linear head, without materializing [N, V] logits.

    logp, entropy = linear_logprobs(hidden, weight, targets, temperature=1.0,
                                    ignore_index=-100, with_entropy=False)

hidden [N, H] (bf16/fp16/fp32), weight [V, H], targets [N] (int). Returns logp [N] fp32, the
log-softmax of hidden @ weight.T / temperature at each target (0 where targets == ignore_index),
and entropy [N] fp32 of that softmax (0 at ignored positions) or None. Both are differentiable
w.r.t. hidden and weight; gradients come back in the inputs' dtypes. Logits are accumulated in fp32.

SFT loss is -logp.sum() / n_loss_tokens; DPO sums logp per sequence; PPO and GRPO use per-token
logp (at the sampling temperature) and entropy.

On CUDA tensors of one dtype, with triton installed, this runs the Triton kernels of
`nanopost.kernels.triton_impl`; elsewhere the chunked torch reference of `nanopost.kernels.reference`. The Triton
backward is bitwise reproducible (at some cost) when `torch.use_deterministic_algorithms(True)`
is on or NANOPOST_DETERMINISTIC=1; see nanopost/kernels/README.md.
"""

import importlib.util

import torch

from nanopost.kernels.reference import linear_logprobs_torch

__all__ = ["linear_logprobs", "linear_logprobs_torch"]


def _check(hidden, weight, targets, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1:
        raise ValueError(f"expected hidden [N, H], weight [V, H], targets [N]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if hidden.shape[1] != weight.shape[1] or hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}, "
                         f"targets {tuple(targets.shape)}")
    if targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be int32 or int64, got {targets.dtype}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


# triton is imported only when a CUDA call needs it, so `import nanopost.kernels` works without it
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def linear_logprobs(hidden, weight, targets, temperature=1.0, ignore_index=-100, with_entropy=False):
    _check(hidden, weight, targets, temperature)
    if hidden.is_cuda and weight.is_cuda and hidden.dtype == weight.dtype and _HAS_TRITON:
        from nanopost.kernels.triton_impl import linear_logprobs_triton

        return linear_logprobs_triton(hidden, weight, targets, temperature, ignore_index, with_entropy)
    return linear_logprobs_torch(hidden, weight, targets.long(), temperature, ignore_index, with_entropy)
