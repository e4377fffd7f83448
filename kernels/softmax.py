"""Scaled, masked softmax with dropout: y = dropout(softmax(scale · s + mask)) over the last dim.

The additive mask is read where it lies, broadcast by stride 0 (Hugging Face's (B,1,1,S)
and (B,1,S,S) masks are never expanded in memory). Entries at or below the mask dtype's
most negative finite value (or -inf) are masked, as in ``fastbert.reference``; a row with
every entry masked gives zeros. Everything is computed in fp32, so fp16 never overflows.

Forward: narrow rows are stacked into (BLOCK_M, BLOCK_N) tiles; one read of the scores
and one write of y, plus one fp32 log-sum-exp per row, kept for backward.

Backward: recomputes the probabilities p from the scores and the log-sum-exp in fp32
(rather than reading y, which holds dropout's zeros and is rounded to the input dtype),
regenerates the dropout mask, and writes ds = scale · p · (dp − Σ p·dp).

Bytes at the minimum (fp16, M rows of N, mask bytes aside): forward 2·2MN + 4M;
backward 3·2MN + 4M.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._direct import backward_impl, cdiv, register_autograd
from ._dropout import check_dropout, draw_seed, keep_mask
from .layernorm import FWD_PER_WARP, FWD_TILE, check_inputs, fastbert_op, launch, new_empty, row_config

LOG2E = tl.constexpr(1.4426950408889634)  # exp(x) = exp2(x · log2 e): one FFMA feeds MUFU.EX2


@triton.jit
def _scaled_masked(S, MASK, offs, rows, cols, ok, N, D1, D2, ms0, ms1, ms2, msn, scale, mask_min,
                   HAS_MASK: tl.constexpr):
    """scale · s + mask in fp32, -inf where masked or outside the row."""
    s = tl.load(S + offs, mask=ok, other=0.0).to(tl.float32) * scale
    if HAS_MASK:
        # The mask's address from the row's index over the (up to) three leading dims.
        i2 = rows % D2
        i1 = (rows // D2) % D1
        i0 = rows // D2 // D1
        moffs = i0.to(tl.int64) * ms0 + i1.to(tl.int64) * ms1 + i2.to(tl.int64) * ms2
        m = tl.load(MASK + moffs[:, None] + cols[None, :].to(tl.int64) * msn, mask=ok, other=0.0).to(tl.float32)
        s = tl.where(m <= mask_min, float("-inf"), s + m)
    return tl.where(ok, s, float("-inf"))


@triton.jit(do_not_specialize=["M", "D1", "D2"])
def _softmax_mask_fwd(
    S,  # (M, N) scores
    MASK,  # additive mask, addressed through the strides below; read only if HAS_MASK
    Y,  # (M, N) probabilities after dropout, S's dtype
    LSE,  # (M,) fp32 log-sum-exp of each row (-inf for a fully masked row)
    SEED,  # (1,) int64 dropout seed; read only if DROPOUT
    M, N, D1, D2, ms0, ms1, ms2, msn, scale, mask_min, p, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
):
    # torch.compile passes Python floats as fp64 scalars; the math stays in fp32.
    scale, mask_min, p, drop_scale = (
        tl.cast(scale, tl.float32), tl.cast(mask_min, tl.float32), tl.cast(p, tl.float32), tl.cast(drop_scale, tl.float32))
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    s = _scaled_masked(S, MASK, offs, rows, cols, ok, N, D1, D2, ms0, ms1, ms2, msn, scale, mask_min, HAS_MASK)
    mx = tl.max(s, axis=1)
    mx = tl.where(mx == float("-inf"), 0.0, mx)  # a fully masked row: exp(-inf - 0) = 0, no NaN
    e = tl.exp2(s * LOG2E - (mx * LOG2E)[:, None])  # one fused multiply-add, then ex2
    den = tl.sum(e, axis=1)
    safe = tl.where(den > 0.0, den, 1.0)  # e is all zeros where den is
    y = e * (1.0 / safe)[:, None]  # one reciprocal per row, not a divide per element
    if DROPOUT:
        keep = keep_mask(tl.load(SEED), rows[:, None] * N + cols[None, :], p)
        y = tl.where(keep, y * drop_scale, 0.0)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)
    tl.store(LSE + rows, tl.where(den > 0.0, mx + tl.log(safe), float("-inf")), mask=row_ok)


@triton.jit(do_not_specialize=["M", "D1", "D2"])
def _softmax_mask_bwd(
    DY,  # (M, N) gradient of the output
    S, MASK, LSE, SEED,  # the forward's inputs and row log-sum-exps
    DS,  # (M, N) gradient of the scores, S's dtype
    M, N, D1, D2, ms0, ms1, ms2, msn, scale, mask_min, p, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
):
    # torch.compile passes Python floats as fp64 scalars; the math stays in fp32.
    scale, mask_min, p, drop_scale = (
        tl.cast(scale, tl.float32), tl.cast(mask_min, tl.float32), tl.cast(p, tl.float32), tl.cast(drop_scale, tl.float32))
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    ok = row_ok[:, None] & (cols < N)[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    s = _scaled_masked(S, MASK, offs, rows, cols, ok, N, D1, D2, ms0, ms1, ms2, msn, scale, mask_min, HAS_MASK)
    lse = tl.load(LSE + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)  # a fully masked row: every s is -inf, p = 0
    prob = tl.exp2(s * LOG2E - (lse * LOG2E)[:, None])
    dp = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
    if DROPOUT:
        keep = keep_mask(tl.load(SEED), rows[:, None] * N + cols[None, :], p)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    dot = tl.sum(prob * dp, axis=1)
    ds = scale * prob * (dp - dot[:, None])
    tl.store(DS + offs, ds.to(DS.dtype.element_ty), mask=ok)


def _mask_layout(mask: torch.Tensor, shape: torch.Size) -> Tuple[torch.Tensor, List[int], List[int], int]:
    """(mask, [D1, D2], [ms0, ms1, ms2], msn): the mask broadcast to ``shape`` by strides,
    its leading dims merged down to three so a row index finds its mask row."""
    view = mask.expand(shape)  # stride 0 on broadcast dims; nothing is copied
    dims = [(s, st) for s, st in zip(shape[:-1], view.stride()[:-1]) if s != 1]
    merged: List[Tuple[int, int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = (merged[-1][0] * size, stride)
        else:
            merged.append((size, stride))
    if len(merged) > 3:  # an unusual layout: copy it rather than refuse
        view = mask.expand(shape).contiguous()
        merged = [(math.prod(shape[:-1]), shape[-1])]
    merged = [(1, 0)] * (3 - len(merged)) + merged
    return view, [merged[1][0], merged[2][0]], [st for _, st in merged], view.stride(-1)


@fastbert_op("fastbert::softmax_mask_fwd", _softmax_mask_fwd)
def _fwd(scores: torch.Tensor, mask: Optional[torch.Tensor], scale: float, dropout_p: float,
         seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    n = scores.shape[-1]
    m = math.prod(scores.shape[:-1])
    check_inputs("softmax_mask", n, scores, mask)
    check_dropout("softmax_mask", dropout_p, m * n, seed)
    y = new_empty(scores.shape, scores.dtype, scores.device)
    lse = new_empty(m, torch.float32, scores.device)
    if m == 0 or n == 0:
        return y, lse.fill_(float("-inf"))
    s2 = scores.contiguous().view(m, n)
    mview, dims, mstrides, msn = (s2, [1, 1], [0, 0, 0], 0) if mask is None else _mask_layout(mask, scores.shape)
    mask_min = 0.0 if mask is None else torch.finfo(mask.dtype).min
    block_m, block_n, num_warps = row_config(n, scores.device, FWD_TILE, FWD_PER_WARP)
    launch(_softmax_mask_fwd, (cdiv(m, block_m),),
           s2, mview, y, lse, s2 if seed is None else seed, m, n, dims[0], dims[1], *mstrides, msn,
        scale, mask_min, dropout_p, 1.0 / (1.0 - dropout_p),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=mask is not None, DROPOUT=dropout_p > 0.0, num_warps=num_warps)
    return y, lse


@fastbert_op("fastbert::softmax_mask_bwd", _softmax_mask_bwd)
def _bwd(dy: torch.Tensor, scores: torch.Tensor, mask: Optional[torch.Tensor], lse: torch.Tensor, scale: float,
         dropout_p: float, seed: Optional[torch.Tensor]) -> torch.Tensor:
    n = scores.shape[-1]
    m = math.prod(scores.shape[:-1])
    check_inputs("softmax_mask", n, dy, scores, mask)
    check_dropout("softmax_mask", dropout_p, m * n, seed)
    ds = new_empty(scores.shape, scores.dtype, scores.device)
    if m == 0 or n == 0:
        return ds
    s2 = scores.contiguous().view(m, n)
    mview, dims, mstrides, msn = (s2, [1, 1], [0, 0, 0], 0) if mask is None else _mask_layout(mask, scores.shape)
    mask_min = 0.0 if mask is None else torch.finfo(mask.dtype).min
    block_m, block_n, num_warps = row_config(n, scores.device)
    launch(_softmax_mask_bwd, (cdiv(m, block_m),),
           dy.contiguous().view(m, n), s2, mview, lse, s2 if seed is None else seed, ds, m, n, dims[0], dims[1],
        *mstrides, msn, scale, mask_min, dropout_p, 1.0 / (1.0 - dropout_p),
        BLOCK_M=block_m, BLOCK_N=block_n, HAS_MASK=mask is not None, DROPOUT=dropout_p > 0.0, num_warps=num_warps)
    return ds


def _setup_context(ctx, inputs, output):
    scores, mask, scale, dropout_p, seed = inputs
    _, lse = output
    ctx.save_for_backward(scores, mask, lse, seed)
    ctx.scale, ctx.dropout_p = scale, dropout_p
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dy, _dlse):
    scores, mask, lse, seed = ctx.saved_tensors
    ds = backward_impl(ctx, _bwd)(dy, scores, mask, lse, ctx.scale, ctx.dropout_p, seed)
    return ds, None, None, None, None


_call = register_autograd(_fwd, _backward, _setup_context)


def softmax_mask(scores, mask=None, scale=1.0, dropout_p=0.0):
    """softmax(scale * scores + mask) over the last dim, then dropout; the signature of
    ``fastbert.reference.softmax_mask``. The mask gets no gradient."""
    seed = draw_seed(dropout_p, scores.device)
    return _call(scores, mask, float(scale), float(dropout_p), seed)[0]
