"""Causal attention over packed sequences, for transformers' AttentionInterface.

Padding-free training concatenates a micro-batch's sequences into one row [1, T] whose position
ids restart at 0 with each sequence, and passes the boundaries to the model's forward as
`cu_seq_lens_q` [N + 1] (int32, 0 first, T last) and `max_length_q` (the longest sequence):

    AttentionInterface.register("packed", packed_attention)
    lm.set_attn_implementation("packed")
    lm.model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
             max_length_q=longest, max_length_k=longest)

Every token attends causally to the tokens of its own sequence only (within the model's sliding
window, where a layer has one). On CUDA in bf16/fp16 this is PyTorch's FlashAttention over packed
sequences, `torch.nn.attention.varlen.varlen_attn` (torch >= 2.10): no padding, no [T, T] mask.
Elsewhere (CPU, fp32) the row's sequences are gathered into one right-padded batch [N, heads,
longest, D] for a single `scaled_dot_product_attention` call, and the real tokens' outputs are
gathered back: the numbers of a padded batch, with the padding only inside attention (the
projections and MLPs around it see none). Attention features that varlen_attn lacks (logit
softcapping, attention sinks, dropout, non-causal layers, an explicit mask) raise a ValueError
instead of being silently dropped.
"""

import functools
import inspect

import torch
import torch.nn.functional as F


@functools.cache
def varlen():
    """(varlen_attn, the names of its parameters), or (None, {}) before torch 2.9. Imported on first
    use, on CUDA only: the module imports triton, which must not happen before a CPU process that
    runs Triton's interpreter has switched it on."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, {}
    return varlen_attn, inspect.signature(varlen_attn).parameters


def packed_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                     softcap=None, s_aux=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """query [1, H, T, D], key and value [1, H_kv, T, D] (H a multiple of H_kv) -> ([1, T, H, D], None)."""
    unsupported = {"an attention mask": attention_mask is not None, "attention dropout": bool(dropout),
                   "attention logit softcapping": softcap is not None, "attention sinks": s_aux is not None,
                   "non-causal attention": not getattr(module, "is_causal", True),
                   "rows without sequence boundaries (cu_seq_lens_q)": cu_seq_lens_q is None}
    if any(unsupported.values()):
        raise ValueError(f"padding-free attention does not support {', '.join(k for k, v in unsupported.items() if v)} "
                         f"({type(module).__name__}); train this model with --no_padding_free")
    if query.is_cuda and query.dtype in (torch.bfloat16, torch.float16):
        varlen_attn, options = varlen()
        if "window_size" not in options:
            raise ValueError("padding-free attention needs torch.nn.attention.varlen.varlen_attn with window_size "
                             f"(torch >= 2.10, this is {torch.__version__}); pass --no_padding_free")
        # (left, 0) is causal; left = sliding_window - 1 keeps the last sliding_window tokens, as transformers does
        window = (sliding_window - 1 if sliding_window else -1, 0)
        gqa = {"enable_gqa": True} if "enable_gqa" in options else {}  # older ones take fewer kv heads as is
        q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, D]
        out = varlen_attn(q, k, v, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling,
                          window_size=window, **gqa)
        return out.unsqueeze(0), None
    return padded_attention(query, key, value, cu_seq_lens_q, max_length_q, scaling, sliding_window), None


class _Repad(torch.autograd.Function):
    """x [T, ...] -> x[slots] [N * longest, ...]: the packed tokens into their slots of the padded batch, every
    token in one real slot and the padding slots holding copies of other tokens. The gradient flows back from
    the real slots alone (one gather, no zero-filled scatter): attention gives the padding slots none."""

    @staticmethod
    def forward(ctx, x, slots, real):
        ctx.save_for_backward(real)
        return x.index_select(0, slots)

    @staticmethod
    def backward(ctx, grad):
        real, = ctx.saved_tensors
        return grad.index_select(0, real), None, None


def padded_attention(query, key, value, cu_seq_lens, max_length, scaling, sliding_window):
    """packed_attention without varlen_attn: the sequences right-padded into one batch [N, heads, longest, D],
    one scaled_dot_product_attention over it, the real tokens gathered back -> [1, T, heads, D]. Causal
    attention keeps every real query off the padding, which only follows it; the padded queries' outputs are
    dropped, so the padding slots get no gradient (neither as queries nor as keys, which only padded queries
    see) and may hold any token (here the ones that follow in the row)."""
    lengths = cu_seq_lens.diff().long()
    longest = int(max_length) if max_length is not None else int(lengths.max())
    slot = torch.arange(longest, device=query.device)
    # [N * longest]: the packed position that fills each slot of the padded batch
    source = (cu_seq_lens[:-1, None].long() + slot).clamp(max=query.shape[2] - 1).flatten()
    real = (slot < lengths[:, None]).flatten().nonzero().squeeze(1)  # the slots of real tokens, in packed order

    def padded(x):  # [1, heads, T, D] -> [N, heads, longest, D]
        return _Repad.apply(x[0].transpose(0, 1), source, real).unflatten(0, (len(lengths), longest)).transpose(1, 2)

    mask = None
    if sliding_window and longest > sliding_window:  # the same for every sequence: all start at slot 0
        mask = (slot[:, None] >= slot) & (slot[:, None] - slot < sliding_window)
    out = F.scaled_dot_product_attention(padded(query), padded(key), padded(value), attn_mask=mask,
                                         is_causal=mask is None, scale=scaling,
                                         enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).flatten(0, 1).index_select(0, real).unsqueeze(0)
