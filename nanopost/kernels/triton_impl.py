"""Triton implementation of `linear_logprobs`: the [N, V] logits never exist in memory.

Forward: a grid of (row block, vocab split) programs. Each walks the BLOCK_V-wide vocab blocks of
its split, computes the logit tile hidden[rows] @ weight[cols].T in fp32 (looping over H in
BLOCK_H steps), and keeps per row an online running max m, sum of exp(z - m), sum of
exp(z - m) * (z - m) (for the entropy) and the target logit. A few torch ops merge the splits.

Backward: recomputes each logit tile from hidden, weight and the saved log-sum-exp, forms the
logit gradient tile in registers and multiplies it into grad_hidden and grad_weight:
- default: one program per (row block, vocab block) tile, fp32 atomic adds (fast, but the order
  of the additions, hence the last bits of the gradients, varies from run to run);
- deterministic: one pass where each program owns a row block and walks the vocab (grad_hidden),
  one where each owns a vocab block and walks the rows (grad_weight). No atomics, a fixed order,
  bitwise reproducible; the logits are recomputed twice instead of once.
Gradients are accumulated in fp32: grad_hidden in an [N, H] buffer, grad_weight in a buffer
covering one vocab chunk at a time (at most GRAD_WEIGHT_CHUNK_ELEMENTS values, 128 MiB), copied
into the output in the weight's dtype after each chunk.
"""

import os

import torch
import triton
import triton.language as tl

# fp32 elements of the grad_weight accumulator (128 MiB): the vocab is processed in chunks of
# this many / H rows, in whole vocab blocks (37376 rows at H = 896, 8192 at H = 4096).
GRAD_WEIGHT_CHUNK_ELEMENTS = 2**25


def deterministic_default():
    """Deterministic backward when torch asks for deterministic algorithms or NANOPOST_DETERMINISTIC=1."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("NANOPOST_DETERMINISTIC") == "1"


def launch_config(dtype, shared_memory):
    """(tile sizes, launch options) on a CUDA device whose blocks may use `shared_memory` bytes.

    bf16/fp16: tiles of 128 rows x 128 vocab columns, walked over H in steps of 64 elements (32 KiB
    per pipeline stage), 3 stages. fp32: 128 rows x 64 columns in steps of 32 elements, because the
    backward also keeps its fp32 logit-gradient tile in shared memory and how much more it keeps
    there depends on the Triton release: with 128 columns Triton 3.8 needs 176 KiB, more than an
    A100 block may use (163 KiB); 3 stages where a block may use 128 KiB, else 2 (sm_86, sm_89).
    tests/test_kernels_aot.py compiles every kernel with these for sm_80, sm_89 and sm_90 and checks
    that each fits; nanopost/kernels/README.md lists what each uses.
    """
    if dtype == torch.float32:
        stages = 3 if shared_memory >= 128 * 1024 else 2
        return dict(BLOCK_N=128, BLOCK_V=64, BLOCK_H=32), dict(num_warps=8, num_stages=stages)
    return dict(BLOCK_N=128, BLOCK_V=128, BLOCK_H=64), dict(num_warps=8, num_stages=3)


def _device_config(tensor):
    """(tile sizes, launch options, SM count) for `tensor`'s device. Off CUDA (the interpreter: tiny
    tests, many ragged edges) 16-wide tiles, the least tl.dot allows."""
    if not tensor.is_cuda:
        return dict(BLOCK_N=16, BLOCK_V=16, BLOCK_H=16), {}, 4
    props = torch.cuda.get_device_properties(tensor.device)
    return (*launch_config(tensor.dtype, props.shared_memory_per_block_optin), props.multi_processor_count)


def _dot_precision(dtype):
    # fp32 inputs follow torch's TF32 switch; bf16/fp16 tiles are exact products either way
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


@triton.jit
def _logit_tile(hidden_ptr, weight_ptr, rows, cols, n_rows, vocab, hidden_dim, stride_hidden, stride_weight,
                inv_temperature, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                BLOCK_H: tl.constexpr):
    """hidden[rows] @ weight[cols].T / temperature in fp32; 0 where a row or column is out of range."""
    offs_h = tl.arange(0, BLOCK_H)
    # int64 offsets: V * H and N * H can pass 2**31
    h_ptrs = hidden_ptr + rows[:, None].to(tl.int64) * stride_hidden + offs_h[None, :]
    w_ptrs = weight_ptr + cols[None, :].to(tl.int64) * stride_weight + offs_h[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden_dim, BLOCK_H)):
        h_left = hidden_dim - k * BLOCK_H
        h = tl.load(h_ptrs, mask=(rows[:, None] < n_rows) & (offs_h[None, :] < h_left), other=0.0)
        w = tl.load(w_ptrs, mask=(cols[None, :] < vocab) & (offs_h[:, None] < h_left), other=0.0)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        h_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    return acc * inv_temperature


@triton.jit
def _forward_kernel(hidden_ptr, weight_ptr, targets_ptr, max_ptr, sum_exp_ptr, sum_exp_shifted_ptr,
                    target_logit_ptr, n_rows, vocab, hidden_dim, stride_hidden, stride_weight, inv_temperature,
                    blocks_per_split, WITH_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    targets = tl.load(targets_ptr + rows, mask=rows < n_rows, other=-1)
    running_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    sum_exp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    sum_exp_shifted = tl.zeros((BLOCK_N,), dtype=tl.float32)  # sum exp(z - m) * (z - m)
    target_logit = tl.zeros((BLOCK_N,), dtype=tl.float32)
    first_block = split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, tl.cdiv(vocab, BLOCK_V))
    for block in range(first_block, last_block):
        cols = block * BLOCK_V + tl.arange(0, BLOCK_V)
        z = _logit_tile(hidden_ptr, weight_ptr, rows, cols, n_rows, vocab, hidden_dim, stride_hidden,
                        stride_weight, inv_temperature, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        in_vocab = cols[None, :] < vocab
        z = tl.where(in_vocab, z, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(z, axis=1))
        rescale = tl.exp(running_max - new_max)
        shifted = z - new_max[:, None]
        exp_shifted = tl.exp(shifted)
        if WITH_ENTROPY:
            # re-base the old terms on the new max: each (z - m_old) becomes (z - m_old) + (m_old - m_new);
            # before the first block sum_exp is 0 and m_old is -inf, so that term is skipped
            rebase = tl.where(sum_exp > 0, running_max - new_max, 0.0) * sum_exp
            sum_exp_shifted = (rescale * (sum_exp_shifted + rebase)
                               + tl.sum(exp_shifted * tl.where(in_vocab, shifted, 0.0), axis=1))
        sum_exp = sum_exp * rescale + tl.sum(exp_shifted, axis=1)
        running_max = new_max
        target_logit += tl.sum(tl.where(cols[None, :] == targets[:, None], z, 0.0), axis=1)
    out = split * n_rows + rows
    row_mask = rows < n_rows
    tl.store(max_ptr + out, running_max, mask=row_mask)
    tl.store(sum_exp_ptr + out, sum_exp, mask=row_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(sum_exp_shifted_ptr + out, sum_exp_shifted, mask=row_mask)


@triton.jit
def _accumulate(out_ptr, out_rows, out_mask, stride_out, grad_tile, other_ptr, other_rows, other_mask, stride_other,
                hidden_dim, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[out_rows, :] += grad_tile @ other[other_rows, :], BLOCK_H columns at a time, in fp32."""
    offs_h = tl.arange(0, BLOCK_H)
    out_ptrs = out_ptr + out_rows[:, None].to(tl.int64) * stride_out + offs_h[None, :]
    other_ptrs = other_ptr + other_rows[:, None].to(tl.int64) * stride_other + offs_h[None, :]
    for k in range(0, tl.cdiv(hidden_dim, BLOCK_H)):
        in_h = offs_h[None, :] < hidden_dim - k * BLOCK_H
        other = tl.load(other_ptrs, mask=other_mask[:, None] & in_h, other=0.0)
        update = tl.dot(grad_tile, other, input_precision=DOT_PRECISION)
        mask = out_mask[:, None] & in_h
        if ATOMIC:
            tl.atomic_add(out_ptrs, update, mask=mask)
        else:
            tl.store(out_ptrs, tl.load(out_ptrs, mask=mask) + update, mask=mask)
        out_ptrs += BLOCK_H
        other_ptrs += BLOCK_H


@triton.jit
def _backward_kernel(hidden_ptr, weight_ptr, targets_ptr, lse_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
                     grad_hidden_ptr, grad_weight_ptr, n_rows, vocab, vocab_offset, hidden_dim, stride_hidden,
                     stride_weight, inv_temperature, num_steps, STEP_N: tl.constexpr, STEP_V: tl.constexpr,
                     GRAD_HIDDEN: tl.constexpr, GRAD_WEIGHT: tl.constexpr, ATOMIC: tl.constexpr,
                     HAS_GRAD_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """Tile (program_id(0) + step * STEP_N, program_id(1) + step * STEP_V) for step < num_steps.

    `weight` and `grad_weight` cover the vocab rows [vocab_offset, vocab_offset + vocab).
    """
    for step in range(num_steps):
        rows = (tl.program_id(0) + step * STEP_N) * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = (tl.program_id(1) + step * STEP_V) * BLOCK_V + tl.arange(0, BLOCK_V)
        row_mask = rows < n_rows
        col_mask = cols < vocab
        z = _logit_tile(hidden_ptr, weight_ptr, rows, cols, n_rows, vocab, hidden_dim, stride_hidden,
                        stride_weight, inv_temperature, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_H)
        # grad_logp is already 0 at ignored rows, so those rows contribute nothing
        log_p = z - tl.load(lse_ptr + rows, mask=row_mask, other=0.0)[:, None]
        p = tl.exp(log_p)
        grad_logp = tl.load(grad_logp_ptr + rows, mask=row_mask, other=0.0)[:, None]
        targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)[:, None]
        # d logp_t / d z_j = [j = t] - p_j
        grad_z = grad_logp * (tl.where(cols[None, :] + vocab_offset == targets, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            # d H / d z_j = -p_j (log p_j + H)
            grad_entropy = tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0)[:, None]
            entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)[:, None]
            grad_z -= grad_entropy * p * (log_p + entropy)
        grad_z = tl.where(col_mask[None, :], grad_z * inv_temperature, 0.0).to(hidden_ptr.dtype.element_ty)
        if GRAD_HIDDEN:
            _accumulate(grad_hidden_ptr, rows, row_mask, hidden_dim, grad_z, weight_ptr, cols, col_mask,
                        stride_weight, hidden_dim, ATOMIC, DOT_PRECISION, BLOCK_H)
        if GRAD_WEIGHT:
            _accumulate(grad_weight_ptr, cols, col_mask, hidden_dim, tl.trans(grad_z), hidden_ptr, rows, row_mask,
                        stride_hidden, hidden_dim, ATOMIC, DOT_PRECISION, BLOCK_H)
        if not ATOMIC:
            # the next step reads what this one stored; keep the program's threads in order
            tl.debug_barrier()


# the backward's passes, as constexprs of _backward_kernel: which gradients a program accumulates,
# how it walks its tiles, and whether it adds atomically
ATOMIC_PASS = dict(STEP_N=0, STEP_V=0, GRAD_HIDDEN=True, GRAD_WEIGHT=True, ATOMIC=True)
GRAD_HIDDEN_PASS = dict(STEP_N=0, STEP_V=1, GRAD_HIDDEN=True, GRAD_WEIGHT=False, ATOMIC=False)
GRAD_WEIGHT_PASS = dict(STEP_N=1, STEP_V=0, GRAD_HIDDEN=False, GRAD_WEIGHT=True, ATOMIC=False)


def _forward(hidden, weight, targets, inv_temperature, with_entropy, config):
    n_rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    blocks, launch, n_sm = config
    n_row_blocks = triton.cdiv(n_rows, blocks["BLOCK_N"])
    n_vocab_blocks = triton.cdiv(vocab, blocks["BLOCK_V"])
    # split the vocab so that about 4 programs per SM run even when N is small
    blocks_per_split = triton.cdiv(n_vocab_blocks, min(n_vocab_blocks, triton.cdiv(4 * n_sm, n_row_blocks)))
    n_splits = triton.cdiv(n_vocab_blocks, blocks_per_split)
    parts = torch.empty(4, n_splits, n_rows, dtype=torch.float32, device=hidden.device)
    split_max, split_sum_exp, split_sum_exp_shifted, split_target_logit = parts
    _forward_kernel[(n_row_blocks, n_splits)](
        hidden, weight, targets, split_max, split_sum_exp, split_sum_exp_shifted, split_target_logit,
        n_rows, vocab, hidden_dim, hidden.stride(0), weight.stride(0), inv_temperature, blocks_per_split,
        WITH_ENTROPY=with_entropy, DOT_PRECISION=_dot_precision(hidden.dtype), **blocks, **launch)
    row_max = split_max.max(0).values
    rescale = torch.exp(split_max - row_max)
    sum_exp = (split_sum_exp * rescale).sum(0)
    lse = row_max + torch.log(sum_exp)
    target_logit = split_target_logit.sum(0)
    entropy = None
    if with_entropy:
        # H = log S - E[z - m] with S = sum exp(z - m), E[z - m] = sum exp(z - m) (z - m) / S
        rebased = rescale * (split_sum_exp_shifted + (split_max - row_max) * split_sum_exp)
        entropy = torch.log(sum_exp) - rebased.sum(0) / sum_exp
    return lse, target_logit, entropy


def _backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy, inv_temperature, deterministic,
              config):
    n_rows, hidden_dim = hidden.shape
    vocab = weight.shape[0]
    blocks, launch, _ = config
    n_row_blocks = triton.cdiv(n_rows, blocks["BLOCK_N"])
    fp32_grad = dict(dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros(n_rows, hidden_dim, **fp32_grad)
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    if grad_entropy is None:
        entropy = None  # unread without its gradient: one specialization fewer to compile
    common = dict(HAS_GRAD_ENTROPY=grad_entropy is not None, DOT_PRECISION=_dot_precision(hidden.dtype), **blocks,
                  **launch)

    def launch_tiles(grid, weight_rows, grad_weight_rows, vocab_offset, num_steps, **mode):
        _backward_kernel[grid](
            hidden, weight_rows, targets, lse, entropy, grad_logp, grad_entropy, grad_hidden, grad_weight_rows,
            n_rows, weight_rows.shape[0], vocab_offset, hidden_dim, hidden.stride(0), weight.stride(0),
            inv_temperature, num_steps, **mode, **common)

    if deterministic:
        launch_tiles((n_row_blocks, 1), weight, None, 0, triton.cdiv(vocab, blocks["BLOCK_V"]), **GRAD_HIDDEN_PASS)
    chunk_rows = min(vocab, max(1, GRAD_WEIGHT_CHUNK_ELEMENTS // hidden_dim // blocks["BLOCK_V"]) * blocks["BLOCK_V"])
    chunk_buffer = torch.empty(chunk_rows, hidden_dim, **fp32_grad)  # reused: one chunk alive at a time
    for start in range(0, vocab, chunk_rows):
        end = min(start + chunk_rows, vocab)
        accumulator = chunk_buffer[: end - start].zero_()
        n_vocab_blocks = triton.cdiv(end - start, blocks["BLOCK_V"])
        if deterministic:
            launch_tiles((1, n_vocab_blocks), weight[start:end], accumulator, start, n_row_blocks, **GRAD_WEIGHT_PASS)
        else:
            launch_tiles((n_row_blocks, n_vocab_blocks), weight[start:end], accumulator, start, 1, **ATOMIC_PASS)
        grad_weight[start:end] = accumulator
    del chunk_buffer, accumulator
    return grad_hidden.to(hidden.dtype), grad_weight


class _LinearLogprobsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, ignore_index, with_entropy, deterministic):
        # the kernels assume unit stride along H
        hidden, weight = hidden.contiguous(), weight.contiguous()
        valid = targets != ignore_index
        config = _device_config(hidden)
        lse, target_logit, entropy = _forward(hidden, weight, targets, 1.0 / temperature, with_entropy, config)
        logp = torch.where(valid, target_logit - lse, 0.0)
        if with_entropy:
            entropy = torch.where(valid, entropy, 0.0)
        ctx.save_for_backward(hidden, weight, targets, valid, lse, entropy)
        ctx.temperature, ctx.deterministic, ctx.config = temperature, deterministic, config
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, valid, lse, entropy = ctx.saved_tensors
        grad_logp = torch.zeros_like(lse) if grad_logp is None else torch.where(valid, grad_logp.float(), 0.0)
        if grad_entropy is not None:
            grad_entropy = torch.where(valid, grad_entropy.float(), 0.0)
        grad_hidden, grad_weight = _backward(hidden, weight, targets, lse, entropy, grad_logp, grad_entropy,
                                             1.0 / ctx.temperature, ctx.deterministic, ctx.config)
        return grad_hidden, grad_weight, None, None, None, None, None


def linear_logprobs_triton(hidden, weight, targets, temperature=1.0, ignore_index=-100, with_entropy=False,
                           deterministic=None):
    """Same contract as `nanopost.kernels.linear_logprobs`; hidden and weight share one dtype.

    deterministic: bitwise reproducible gradients (two recomputing passes, no atomics). None means
    `deterministic_default()`.
    """
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if deterministic is None:
        deterministic = deterministic_default()
    return _LinearLogprobsTriton.apply(hidden, weight, targets.long(), float(temperature), ignore_index,
                                       with_entropy, deterministic)
