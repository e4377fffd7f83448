"""Eager PyTorch references for the ops.

Each computes in fp32 (fp64 for fp64 inputs) and returns the input dtype. They are the
ground truth the kernels are tested against and the implementation on devices without a
kernel. Arguments are validated by ``fastbert.functional``, not here.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast to the accumulation dtype: fp64 stays fp64, everything else becomes fp32."""
    return t if t.dtype == torch.float64 else t.float()


def masked_value(dtype: torch.dtype) -> float:
    """Additive mask entries at or below this count as masked: -inf or the dtype's most
    negative finite value, which is what Hugging Face writes into its masks."""
    return torch.finfo(dtype).min if dtype.is_floating_point else float("-inf")


def embedding(input_ids, token_type_ids, position_ids, word_weight, position_weight,
              token_type_weight, ln_weight, ln_bias, eps, dropout_p=0.0, padding_idx=None):
    """LN(W_word[ids] + W_pos[pos] + W_type[tt]), then dropout; output in the table dtype."""
    x = (_acc(F.embedding(input_ids, word_weight, padding_idx=padding_idx))
         + _acc(F.embedding(position_ids, position_weight))
         + _acc(F.embedding(token_type_ids, token_type_weight)))
    y = F.layer_norm(x, ln_weight.shape, _acc(ln_weight), _acc(ln_bias), eps)
    return F.dropout(y, dropout_p, training=dropout_p > 0).to(word_weight.dtype)


def add_layernorm(x, residual, weight, bias, eps, x_bias=None, dropout_p=0.0):
    """LN(dropout(x + x_bias) + residual) over the last dim, in the wider of x's and the
    residual's dtypes (under autocast a bf16 GEMM output joins an fp32 residual stream, which
    stays fp32, as ``x + residual`` then LayerNorm keep it in HF)."""
    h = _acc(x) if x_bias is None else _acc(x) + _acc(x_bias)
    h = F.dropout(h, dropout_p, training=dropout_p > 0) + _acc(residual)
    return F.layer_norm(h, weight.shape, _acc(weight), _acc(bias), eps).to(torch.promote_types(x.dtype, residual.dtype))


def bias_gelu(x, bias, approximate="none"):
    """gelu(x + bias); approximate="none" is the exact erf form, "tanh" the tanh form."""
    return F.gelu(_acc(x) + _acc(bias), approximate=approximate).to(x.dtype)


def linear_gelu(x, weight, bias, approximate="none"):
    """gelu(x @ weight.T + bias), the product and the GELU in the accumulation dtype."""
    return F.gelu(F.linear(_acc(x), _acc(weight), _acc(bias)), approximate=approximate).to(x.dtype)


def softmax_mask(scores, mask=None, scale=1.0, dropout_p=0.0):
    """softmax(scale * scores + mask) over the last dim, then dropout.

    ``mask`` is additive and broadcasts against ``scores`` (HF's (B,1,1,S) or (B,1,S,S)).
    Entries at or below :func:`masked_value` are masked; a row with every entry masked
    gives zeros, not NaN and not a uniform distribution.
    """
    s = _acc(scores) * scale
    if mask is not None:
        masked = mask <= masked_value(mask.dtype)
        s = (s + _acc(mask)).masked_fill(masked, float("-inf"))
    p = torch.softmax(s, dim=-1)
    if mask is not None:  # rows with every key masked (a NaN score still gives a NaN row)
        p = p.masked_fill(masked.all(-1, keepdim=True), 0.0)
    return F.dropout(p, dropout_p, training=dropout_p > 0).to(scores.dtype)


def _attention_padded(q, k, v, keep: Optional[torch.Tensor], scale: float, dropout_p: float):
    s = torch.einsum("bqhd,bkhd->bhqk", _acc(q), _acc(k)) * scale
    if keep is not None:
        s = s.masked_fill(~keep[:, None, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    if keep is not None:
        p = p.masked_fill(~keep.any(-1)[:, None, None, None], 0.0)  # fully padded sequences
    p = F.dropout(p, dropout_p, training=dropout_p > 0)
    return torch.einsum("bhqk,bkhd->bqhd", p, _acc(v)).to(q.dtype)


def attention(q, k, v, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0):
    """softmax(q kᵀ · scale + key-padding mask) v.

    Padded layout: q, k, v are (B, S, H, D) and ``attention_mask`` (B, S_k) is 1 for real
    keys. Packed layout: q, k, v are (T, H, D) and ``cu_seqlens`` (B+1, int32) marks where
    each sequence starts. A query with no real key gets zeros, as do rows after the last
    sequence (the spare tokens of a CUDA-graph bucket; the kernel leaves them unwritten).
    """
    return attention_by(_attention_padded, q, k, v, attention_mask, cu_seqlens, scale, dropout_p)


def attention_qkv(qkv, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0):
    """:func:`attention` over q, k, v = qkv.unbind(-3): qkv is (B, S, 3, H, D), or (T, 3, H, D)
    packed."""
    return attention(*qkv.unbind(-3), attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, scale=scale,
                     dropout_p=dropout_p)


def attention_by(padded, q, k, v, attention_mask, cu_seqlens, scale, dropout_p):
    """:func:`attention` through ``padded(q, k, v, keep, scale, dropout_p)``, which takes the
    padded layout and a (B, S_k) boolean key mask (or None). The packed layout is laid out in
    a (batch, longest) grid with a key mask, one batched call rather than one per sequence,
    and the real rows are taken back out."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if cu_seqlens is None:
        keep = None if attention_mask is None else attention_mask.bool()
        return padded(q, k, v, keep, scale, dropout_p)
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in zip(bounds[:-1], bounds[1:])]
    batch, longest, total = len(lengths), max(lengths, default=0), bounds[-1]
    spare = q.new_zeros((q.shape[0] - total, *q.shape[1:-1], v.shape[-1]))
    if batch == 0 or longest == 0:
        return torch.cat([q.new_zeros((total, *q.shape[1:-1], v.shape[-1])), spare])
    seq = torch.repeat_interleave(torch.arange(batch), torch.tensor(lengths))
    slots = (seq * longest + torch.arange(total) - torch.tensor(bounds[:-1])[seq]).to(q.device)

    def grid(x):  # (total, ...) -> (batch, longest, ...), zeros in the padding
        rows = x.new_zeros((batch * longest, *x.shape[1:])).index_copy(0, slots, x[:total])
        return rows.view(batch, longest, *x.shape[1:])

    keep = torch.zeros(batch * longest, dtype=torch.bool, device=q.device).index_fill(0, slots, True)
    out = padded(grid(q), grid(k), grid(v), keep.view(batch, longest), scale, dropout_p)
    return torch.cat([out.flatten(0, 1).index_select(0, slots), spare])
