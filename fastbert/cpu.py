"""CPU implementations that the "auto" backend runs in place of an eager reference where
PyTorch has a faster composition of the same math (``fastbert.ops``). They compute in fp32
(fp64 for fp64 inputs) like the references, and are tested against them.

- attention, attention_qkv: ``torch.nn.functional.scaled_dot_product_attention`` over the
  padded layout (the packed one laid out in a grid, as the reference does), about twice as
  fast on a CPU as the reference's two einsums and softmax at BERT's sizes.
"""

from __future__ import annotations

import torch.nn.functional as F

from .reference import _acc, attention_by


def _sdpa_padded(q, k, v, keep, scale: float, dropout_p: float):
    mask = real = None
    if keep is not None:
        real = keep.any(-1)
        # A sequence with no real key attends to every slot (no all-masked row, whose softmax
        # is NaN forward and backward) and its output is zeroed below, as the reference's is.
        mask = (keep | ~real[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(_acc(q).transpose(1, 2), _acc(k).transpose(1, 2), _acc(v).transpose(1, 2),
                                         attn_mask=mask, dropout_p=dropout_p, scale=scale).transpose(1, 2)
    if real is not None:
        out = out.masked_fill(~real[:, None, None, None], 0.0)
    return out.to(q.dtype)


def attention(q, k, v, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0):
    """``fastbert.reference.attention`` through scaled_dot_product_attention."""
    return attention_by(_sdpa_padded, q, k, v, attention_mask, cu_seqlens, scale, dropout_p)


def attention_qkv(qkv, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0):
    """``fastbert.reference.attention_qkv`` through scaled_dot_product_attention."""
    return attention(*qkv.unbind(-3), attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale,
                     dropout_p=dropout_p)
