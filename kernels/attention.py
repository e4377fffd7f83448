"""Fused attention, flash-style: ``softmax(q kᵀ · scale + key-padding mask) v`` without ever
forming the S×S score matrix.

One kernel family serves both layouts. Padded q, k, v are (B, S, H, D) with an optional
(B, S_k) key-padding mask of any dtype (nonzero = real key), read one key block at a time,
so masks need not be prefixes. Packed q, k, v are (T, H, D) with ``cu_seqlens``; sequence b
owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``. Tensors are read through their strides, so the
(…, 3, H, D) views the model slices out of its fused QKV projection are never copied.

The forward keeps a running max and sum per query row (online softmax) over key blocks and
saves the natural-log log-sum-exp in fp32, (H, rows); a row with no real key gets zeros and
a log-sum-exp of +inf, which makes every recomputed probability in the backward exactly 0.
Head dims are padded to a power of two (at least 16) inside the kernel with masked loads.
fp16/bf16 multiply on tensor cores with fp32 accumulation; fp32 inputs use exact fp32
products (``input_precision="ieee"``), not tf32, so fp32 matches the eager reference to
fp32 rounding. fp64 inputs and head dims over 256 run the eager reference.

Dropout draws Philox numbers in-kernel (``tl.rand``) from a seed that
:func:`attention` takes from torch's generator on the tensor's device (capture-safe under
CUDA graphs); the backward regenerates the same mask. :func:`dropout_mask` returns that
mask for tests.

Both directions are ``torch.library.triton_op`` custom ops (``fastbert::attention_fwd``,
``fastbert::attention_bwd``) joined by ``register_autograd``, so autograd and
``torch.compile(fullgraph=True)`` see through them. ``fastbert::attention_qkv_fwd``/``_bwd``
run the same kernels on one (…, 3, H, D) tensor (the model's fused QKV projection) and give
its gradient as one tensor, so that no stack of dq, dk, dv follows the backward.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake
from torch.library import triton_op

from fastbert import reference
from fastbert.backend import triton_interpreted

from ._direct import backward_impl, cdiv, launch, next_pow2, register_autograd
from ._dropout import draw_seed
from .attention_bwd import _dropout_keep, _seq_bounds, fit_stages, launch_backward, max_shared_mem, strides4

MAX_HEAD_DIM = 256


@triton.jit
def _fwd_step(acc, l_i, m_i, q, k_ptrs, v_ptrs, mask_ptrs, offs_m, offs_n, start_n, len_k, d_ok, dv_ok,
              seed, bh, drop_stride, dropout_p, qk_scale,
              BOUNDS: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
              POS_SCALE: tl.constexpr):
    """One key block of the online softmax. ``BOUNDS`` masks keys past the sequence end (only
    the last block needs it); ``HAS_MASK`` applies the key-padding mask. With a positive
    scale (``POS_SCALE``) the row max is taken on the unscaled scores and scaled once, and
    each probability is ``exp2(s · scale - max)``: one fused multiply-add per score where a
    multiply and a subtract were (sm_90 main loop 330 -> 297 instructions at D=64)."""
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"  # fp32 inputs: exact fp32 products, not tf32
    kn = start_n + offs_n
    if BOUNDS:
        n_ok = kn < len_k
        k = tl.load(k_ptrs, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
    else:
        n_ok = kn >= 0
        k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
    if HAS_MASK:
        n_ok = n_ok & (tl.load(mask_ptrs, mask=n_ok, other=0) != 0)
    s = tl.dot(q, tl.trans(k), None, input_precision=PREC)
    if not POS_SCALE:  # max(s · scale) is max(s) · scale only for scale > 0: scale first
        s = s * qk_scale
        qk_scale = 1.0
    if BOUNDS or HAS_MASK:
        s = tl.where(n_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # log2 domain
    # A row that has seen no real key yet keeps m = -inf; shift by 0 so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s * qk_scale - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, offs_m[:, None] * drop_stride + kn[None, :], dropout_p)
        p = tl.where(keep, p, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["stride_lh", "stride_lb", "seqlen_q", "seqlen_k", "drop_stride"])
def _attn_fwd(
    Q, K, V,                      # inputs, any strides
    O,                            # output (contiguous, shaped like Q with V's head dim)
    LSE,                          # fp32 (H, rows): natural-log log-sum-exp per query row
    KeyMask,                      # (B, S_k) key-padding mask, nonzero = real key (read only if HAS_MASK)
    CuSeqlens,                    # (B+1,) int32 sequence starts (read only if PACKED)
    Seed,                         # (1,) int64 dropout seed (read only if DROPOUT)
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh,
    stride_mb, stride_mn, stride_lh, stride_lb,
    num_heads, seqlen_q, seqlen_k, drop_stride, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    STORE_LSE: tl.constexpr,      # write LSE (the backward's; not needed without one)
    POS_SCALE: tl.constexpr,      # sm_scale > 0 (always, unless a caller passes its own scale)
):
    # torch.compile passes Python floats as fp64 scalars; the math stays in fp32.
    sm_scale, dropout_p = tl.cast(sm_scale, tl.float32), tl.cast(dropout_p, tl.float32)
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    # Packed, the log-sum-exp's head stride is the token count.
    start, len_q, len_k = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, stride_lh, PACKED)
    if pid_m * BLOCK_M >= len_q:
        return
    b64, start64 = b.to(tl.int64), start.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    m_ok = offs_m < len_q
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    q = tl.load(Q + b64 * stride_qb + start64 * stride_qm + h * stride_qh
                + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + b64 * stride_kb + start64 * stride_kn + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_ptrs = V + b64 * stride_vb + start64 * stride_vn + h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd
    mask_ptrs = KeyMask + b64 * stride_mb + offs_n * stride_mn
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    qk_scale = sm_scale * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    full = (len_k // BLOCK_N) * BLOCK_N
    for start_n in range(0, full, BLOCK_N):
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs + start_n * stride_kn, v_ptrs + start_n * stride_vn,
                                  mask_ptrs + start_n * stride_mn, offs_m, offs_n, start_n, len_k, d_ok, dv_ok,
                                  seed, bh, drop_stride, dropout_p, qk_scale,
                                  BOUNDS=False, HAS_MASK=HAS_MASK, DROPOUT=DROPOUT, IEEE=IEEE, POS_SCALE=POS_SCALE)
    if full < len_k:
        acc, l_i, m_i = _fwd_step(acc, l_i, m_i, q, k_ptrs + full * stride_kn, v_ptrs + full * stride_vn,
                                  mask_ptrs + full * stride_mn, offs_m, offs_n, full, len_k, d_ok, dv_ok,
                                  seed, bh, drop_stride, dropout_p, qk_scale,
                                  BOUNDS=True, HAS_MASK=HAS_MASK, DROPOUT=DROPOUT, IEEE=IEEE, POS_SCALE=POS_SCALE)

    empty = l_i == 0.0  # no real key: zeros out, +inf log-sum-exp
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    if DROPOUT:
        out = out * (1.0 / (1.0 - dropout_p))
    lse = tl.where(empty, float("inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    if STORE_LSE:
        tl.store(LSE + h * stride_lh + b64 * stride_lb + start64 + offs_m, lse, mask=m_ok)
    tl.store(O + b64 * stride_ob + (start64 + offs_m[:, None]) * stride_om + h * stride_oh + offs_dv[None, :],
             out.to(O.dtype.element_ty), mask=m_ok[:, None] & dv_ok[None, :])


@triton.jit
def _dropout_mask_kernel(Keep, Seed, stride_b, stride_h, stride_m, num_heads, seqlen_q, seqlen_k, drop_stride,
                         dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # torch.compile passes Python floats as fp64 scalars; the math stays in fp32.
    dropout_p = tl.cast(dropout_p, tl.float32)
    pid_m, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _dropout_keep(tl.load(Seed), bh, offs_m[:, None] * drop_stride + offs_n[None, :], dropout_p)
    b, h = bh // num_heads, bh % num_heads
    tl.store(Keep + b.to(tl.int64) * stride_b + h * stride_h + offs_m[:, None] * stride_m + offs_n[None, :],
             keep.to(tl.int8), mask=(offs_m < seqlen_q)[:, None] & (offs_n < seqlen_k)[None, :])


# --------------------------------------------------------------------------- launchers


@dataclass(frozen=True)
class FwdConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


@functools.lru_cache(maxsize=None)
def fwd_config(device: torch.device, dtype: torch.dtype, block_d: int, block_dv: int, short: bool) -> FwdConfig:
    """Forward block sizes: tiny on the interpreter; on the GPU, 64 queries against 64-key
    blocks with 4 warps for head dims up to 64 (benchmarks/tune.py on an H100, fp16 D=64:
    21.1 µs at B=8 S=512 against 26.8 µs for 128 queries, 47.6 against 53.2 µs on 32 packed
    sequences, 11.1 against 13.3 µs at B=32 S=128), 128 queries and 8 warps for D=128 (64
    when every sequence is that ``short``), smaller tiles for fp32 and D=256. Stages shrink
    to fit shared memory."""
    if device.type != "cuda":
        return FwdConfig(32, 32, 1, 1)
    width = max(block_d, block_dv)
    if dtype == torch.float32:
        cfg = FwdConfig(64, 32, 4, 2) if width <= 128 else FwdConfig(32, 32, 4, 1)
    elif width <= 64:
        cfg = FwdConfig(64, 64, 4, 3)
    elif width <= 128:
        cfg = FwdConfig(64 if short else 128, 64, 8, 3)
    else:
        cfg = FwdConfig(64, 32, 4, 2)
    es = torch.finfo(dtype).bits // 8
    fixed = cfg.block_m * (block_d + cfg.block_n) * es
    stages = fit_stages(cfg.num_stages, fixed, cfg.block_n * (block_d + block_dv) * es, max_shared_mem(device))
    return FwdConfig(cfg.block_m, cfg.block_n, cfg.num_warps, stages)


def _geometry(q, k, cu_seqlens, max_seqlen):
    """(packed, batch, seqlen_q, seqlen_k): lengths are the padded ones, or max_seqlen when packed."""
    if cu_seqlens is not None:
        return True, cu_seqlens.shape[0] - 1, max_seqlen, max_seqlen
    return False, q.shape[0], q.shape[1], k.shape[1]


def _launch_forward(q, k, v, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p, store_lse: bool = True):
    packed, batch, seqlen_q, seqlen_k = _geometry(q, k, cu_seqlens, max_seqlen)
    heads = q.shape[-2]
    dim, dim_v = int(q.shape[-1]), int(v.shape[-1])  # constexprs: a symbolic head dim is specialized
    out = torch.empty((*q.shape[:-1], dim_v), dtype=q.dtype, device=q.device)
    rows = q.shape[0] if packed else batch * seqlen_q
    lse = torch.empty((heads, rows), dtype=torch.float32, device=q.device) if store_lse else None
    if batch * heads == 0 or seqlen_q == 0 or _tracing_interpreted(q):
        return out, lse
    block_d, block_dv = max(16, next_pow2(dim)), max(16, next_pow2(dim_v))
    cfg = fwd_config(q.device, q.dtype, block_d, block_dv, bool(seqlen_q <= 64))
    has_mask = key_mask is not None
    mask = key_mask.view(torch.uint8) if has_mask and key_mask.dtype == torch.bool else key_mask
    launch(_attn_fwd, (cdiv(seqlen_q, cfg.block_m), batch * heads),
        q, k, v, out, lse if store_lse else q, mask if has_mask else q, cu_seqlens if packed else q,
        seed if seed is not None else q,
        *strides4(q, packed), *strides4(k, packed), *strides4(v, packed), *strides4(out, packed)[:3],
        *(mask.stride() if has_mask else (0, 0)), rows, 0 if packed else seqlen_q,
        heads, seqlen_q, seqlen_k, seqlen_k, scale, dropout_p,
        HEAD_DIM=dim, HEAD_DIM_V=dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        PACKED=packed, HAS_MASK=has_mask, DROPOUT=dropout_p > 0, IEEE=q.dtype == torch.float32,
        STORE_LSE=store_lse, POS_SCALE=scale > 0, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, lse


# --------------------------------------------------------------------------- custom ops


def _tracing_interpreted(t: torch.Tensor) -> bool:
    """Fake tensors reach the launchers under the interpreter only when the op's fake
    implementation runs; an interpreted kernel cannot run on them, so skip them."""
    return triton_interpreted() and is_fake(t)


def _custom_op(name: str):
    """``triton_op`` on the GPU, so torch.compile sees (and can fuse around) the kernels. Under
    the interpreter wrap_triton cannot trace, so the op is an opaque ``custom_op`` whose fake
    implementation is the same function with the launches skipped."""
    def register(fn):
        if not triton_interpreted():
            op = triton_op(name, mutates_args=())(fn)
        else:
            op = torch.library.custom_op(name, mutates_args=())(fn)
            op.register_fake(fn)
        op.body = fn  # called directly by eager calls (kernels/_direct.py)
        return op
    return register


@_custom_op("fastbert::attention_fwd")
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: Optional[torch.Tensor],
                  cu_seqlens: Optional[torch.Tensor], seed: Optional[torch.Tensor], max_seqlen: int,
                  scale: float, dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp). ``seed`` is a (1,) int64 tensor, required when dropout_p > 0."""
    return _launch_forward(q, k, v, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p)


@_custom_op("fastbert::attention_bwd")
def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, key_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                  seed: Optional[torch.Tensor], max_seqlen: int, scale: float,
                  dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) from the forward's inputs, output and log-sum-exp."""
    grads = tuple(torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    launch_backward(grad_out, q, k, v, out, lse, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p, grads)
    return grads


def _setup_context(ctx, inputs, output):
    q, k, v, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_mask, cu_seqlens, seed)
    ctx.meta = (max_seqlen, scale, dropout_p)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_mask, cu_seqlens, seed = ctx.saved_tensors
    bwd = backward_impl(ctx, attention_bwd)
    dq, dk, dv = bwd(grad_out, q, k, v, out, lse, key_mask, cu_seqlens, seed, *ctx.meta)
    return dq, dk, dv, None, None, None, None, None, None


def _infer(q, k, v, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p):
    """The forward when no backward will follow: (output, None), no log-sum-exp."""
    return _launch_forward(q, k, v, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p, store_lse=False)


_call = register_autograd(attention_fwd, _backward, _setup_context, infer=_infer)


# The same kernels on one (…, 3, H, D) tensor, the output of a fused QKV projection: the
# forward reads q, k and v as its views, and the backward writes their gradients into one
# tensor of that shape, which autograd hands straight to the projection's backward. With
# q, k, v as separate inputs, autograd would stack their three gradients into that tensor:
# a copy of 3·T·H·D elements per layer and step.

@_custom_op("fastbert::attention_qkv_fwd")
def attention_qkv_fwd(qkv: torch.Tensor, key_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                      seed: Optional[torch.Tensor], max_seqlen: int, scale: float,
                      dropout_p: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """(output, log-sum-exp) of attention over q, k, v = qkv.unbind(-3)."""
    return _launch_forward(*qkv.unbind(-3), key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p)


@_custom_op("fastbert::attention_qkv_bwd")
def attention_qkv_bwd(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                      key_mask: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor], seed: Optional[torch.Tensor],
                      max_seqlen: int, scale: float, dropout_p: float) -> torch.Tensor:
    """The gradient of qkv: dq, dk, dv along its dim -3."""
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    launch_backward(grad_out, *qkv.unbind(-3), out, lse, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p,
                    (dqkv,))
    return dqkv


def _setup_context_qkv(ctx, inputs, output):
    qkv, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse, key_mask, cu_seqlens, seed)
    ctx.meta = (max_seqlen, scale, dropout_p)
    ctx.mark_non_differentiable(lse)


def _backward_qkv(ctx, grad_out, grad_lse):
    qkv, out, lse, key_mask, cu_seqlens, seed = ctx.saved_tensors
    dqkv = backward_impl(ctx, attention_qkv_bwd)(grad_out, qkv, out, lse, key_mask, cu_seqlens, seed, *ctx.meta)
    return dqkv, None, None, None, None, None, None


def _infer_qkv(qkv, key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p):
    return _launch_forward(*qkv.unbind(-3), key_mask, cu_seqlens, seed, max_seqlen, scale, dropout_p, store_lse=False)


_call_qkv = register_autograd(attention_qkv_fwd, _backward_qkv, _setup_context_qkv, infer=_infer_qkv)


# --------------------------------------------------------------------------- public entry points


def attention(q, k, v, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0):
    """The fused kernel behind ``fastbert.functional.attention`` (arguments already checked there).

    For the packed layout ``max_seqlen`` must be at least the longest sequence (as in
    flash-attn); ``fastbert.functional`` computes it when it is not given.
    """
    if not _kernel_runs(q, v):
        return reference.attention(q, k, v, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                   scale=scale, dropout_p=dropout_p)
    extra = _launch_args(q, k, cu_seqlens, max_seqlen, scale, dropout_p)
    return _call(q, k, v, attention_mask, cu_seqlens, *extra)[0]


def attention_qkv(qkv, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0):
    """The fused kernel behind ``fastbert.functional.attention_qkv``: :func:`attention` over
    q, k, v = qkv.unbind(-3), whose gradient is one tensor shaped like qkv."""
    # qkv has q's (and k's, v's) dtype, head dim and sequence dim: it stands in for them below.
    if not _kernel_runs(qkv, qkv):
        return reference.attention_qkv(qkv, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                       scale=scale, dropout_p=dropout_p)
    extra = _launch_args(qkv, qkv, cu_seqlens, max_seqlen, scale, dropout_p)
    return _call_qkv(qkv, attention_mask, cu_seqlens, *extra)[0]


def _kernel_runs(q: torch.Tensor, v: torch.Tensor) -> bool:
    """False for what the eager reference runs instead: fp64, head dims over MAX_HEAD_DIM."""
    return q.dtype != torch.float64 and 0 < q.shape[-1] <= MAX_HEAD_DIM and 0 < v.shape[-1] <= MAX_HEAD_DIM


def _launch_args(q, k, cu_seqlens, max_seqlen, scale, dropout_p) -> Tuple[Optional[torch.Tensor], int, float, float]:
    """(seed, max_seqlen, scale, dropout_p) as the ops take them."""
    if cu_seqlens is not None and max_seqlen is None:
        max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if dropout_p > 0:
        rows, cols = (max_seqlen, max_seqlen) if cu_seqlens is not None else (q.shape[1], k.shape[1])
        if rows * cols >= 2 ** 31:  # the Philox counter is the int32 query * S_k + key
            raise ValueError(f"fastbert.attention: dropout supports at most 2**31 scores per head, got {rows}x{cols}")
    return draw_seed(float(dropout_p), q.device), int(max_seqlen or 0), scale, float(dropout_p)


def dropout_mask(seed: torch.Tensor, batch: int, heads: int, seqlen_q: int, seqlen_k: int, dropout_p: float) -> torch.Tensor:
    """The (B, H, S_q, S_k) bool keep-mask the kernels draw for ``seed`` (for tests). For the
    packed layout pass seqlen_q = seqlen_k = max_seqlen and read sequence b's mask from
    ``[b, :, :len_b, :len_b]``."""
    keep = torch.empty((batch, heads, seqlen_q, seqlen_k), dtype=torch.int8, device=seed.device)
    if keep.numel():
        block = 64
        _dropout_mask_kernel[(cdiv(seqlen_q, block), cdiv(seqlen_k, block), batch * heads)](
            keep, seed, keep.stride(0), keep.stride(1), keep.stride(2), heads, seqlen_q, seqlen_k, seqlen_k,
            float(dropout_p), BLOCK_M=block, BLOCK_N=block)
    return keep.bool()
