"""Chunked torch implementation of `linear_logprobs`: the path off CUDA, and the reference the
Triton kernels are tested against.

Rows of `hidden` are processed in chunks, so at most [chunk, V] fp32 logits exist at once, in the
forward and in the backward (which recomputes them instead of saving them).
"""

import torch

# Logit elements per chunk: 2**25 fp32 values is 128 MiB, i.e. about 220 rows at V = 151936.
CHUNK_ELEMENTS = 2**25


def _chunks(n_rows, vocab):
    step = max(1, CHUNK_ELEMENTS // vocab)
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


class _LinearLogprobs(torch.autograd.Function):
    """Each chunk's [rows, V] work runs in place where it can: the fp32 logits (then log-probs) and one more
    buffer for the probabilities, and the weight's gradient accumulates in place ([V, H] once)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        weight32 = weight.float()
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, 0)
        logp = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        lse = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(n_rows, dtype=torch.float32, device=hidden.device) if with_entropy else None
        for start, end in _chunks(n_rows, vocab):
            logits = hidden[start:end].float() @ weight32.T
            if temperature != 1.0:
                logits /= temperature
            chunk_lse = torch.logsumexp(logits, dim=-1)
            lse[start:end] = chunk_lse
            target_logit = logits.gather(1, safe_targets[start:end, None]).squeeze(1)
            logp[start:end] = torch.where(valid[start:end], target_logit - chunk_lse, 0.0)
            if with_entropy:
                log_probs = logits.sub_(chunk_lse[:, None])
                chunk_entropy = -log_probs.exp().mul_(log_probs).sum(-1)
                entropy[start:end] = torch.where(valid[start:end], chunk_entropy, 0.0)
        ctx.save_for_backward(hidden, weight, safe_targets, valid, lse, entropy if with_entropy else lse)
        ctx.temperature, ctx.with_entropy = temperature, with_entropy
        ctx.mark_non_differentiable(lse)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, valid, lse, entropy = ctx.saved_tensors
        temperature = ctx.temperature
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        weight32 = weight.float()
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        use_entropy = ctx.with_entropy and grad_entropy is not None
        for start, end in _chunks(n_rows, vocab):
            h32 = hidden[start:end].float()
            logits = h32 @ weight32.T
            if temperature != 1.0:
                logits /= temperature
            log_probs = logits.sub_(lse[start:end, None])
            probs = log_probs.exp()
            if use_entropy:
                # d H / d z_j = -p_j (log p_j + H), weighted by the entropy's gradient (in log_probs' memory)
                g_ent = torch.where(valid[start:end], grad_entropy[start:end].float(), 0.0)
                entropy_term = log_probs.add_(entropy[start:end, None]).mul_(probs).mul_(g_ent[:, None])
            # d logp_t / d z_j = [j = t] - p_j
            if grad_logp is not None:
                g_logp = torch.where(valid[start:end], grad_logp[start:end].float(), 0.0)
                grad_z = probs.mul_(-g_logp[:, None]).scatter_add_(1, targets[start:end, None], g_logp[:, None])
            else:
                grad_z = probs.zero_()
            if use_entropy:
                grad_z -= entropy_term
            if temperature != 1.0:
                grad_z /= temperature
            torch.mm(grad_z, weight32, out=grad_hidden[start:end])
            grad_weight.addmm_(grad_z.T, h32)
        return grad_hidden.to(hidden.dtype), grad_weight.to(weight.dtype), None, None, None, None


def linear_logprobs_torch(hidden, weight, targets, temperature=1.0, ignore_index=-100, with_entropy=False):
    """Same contract as `nanopost.kernels.linear_logprobs`, in chunked torch."""
    logp, entropy = _LinearLogprobs.apply(hidden, weight, targets, float(temperature), ignore_index, with_entropy)
    return logp, entropy
