"""Fused attention, part two: the helpers both directions share, and the backward kernels.

The backward is FlashAttention-2's: a pre-pass computes ``delta = rowsum(dO * O)``, then
one program per block of keys recomputes the probabilities from the saved log-sum-exp and
accumulates dK and dV over every query block of its sequence, and the same program then
takes the matching block of queries and accumulates dQ over the key blocks. No atomics, so
the gradients are deterministic. (Two alternatives were built and timed on an H100, fp16
B=8 S=512 D=64, and removed: delta computed in the main kernel from O, 92 µs, and dQ added up
by the key-block programs with fp32 atomic adds, FlashAttention-2's way, 96–106 µs; the
pre-pass and the dQ pass took 80 µs; benchmarks/PERF.md.)
Dropout masks are regenerated from the same Philox seed and offsets as the forward (see
:func:`_dropout_keep`).

Sequences are addressed the same way in both layouts (see :func:`_seq_bounds`): padded
(B, S, H, D) tensors use a batch stride and start every sequence at row 0; packed (T, H, D)
tensors use a zero batch stride and start sequence b at row ``cu_seqlens[b]``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.fake_tensor import is_fake

from fastbert.backend import triton_interpreted

from ._direct import cdiv, launch, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, total, PACKED: tl.constexpr):
    """(first row, query length, key length) of sequence ``b``. Packed, the bounds are
    clamped to the ``total`` rows: the host checks cu_seqlens, and whatever it holds, no
    program reads or writes outside the tensors."""
    if PACKED:
        start = tl.minimum(tl.maximum(tl.load(CuSeqlens + b), 0), total)
        len_q = tl.minimum(tl.maximum(tl.load(CuSeqlens + b + 1), start), total) - start
        len_k = len_q
    else:
        start = b * 0
        len_q = seqlen_q + b * 0
        len_k = seqlen_k + b * 0
    return start, len_q, len_k


@triton.jit
def _dropout_keep(seed, bh, offsets, dropout_p):
    """Which scores survive dropout. The Philox key is the call's seed plus the (batch, head)
    index; the counter is query_index * drop_stride + key_index inside the sequence, so the
    forward, the backward and :func:`dropout_mask` draw the same numbers."""
    return tl.rand(seed + bh, offsets) >= dropout_p


@triton.jit
def _query_rows(q_base, g_base, lse_ptr, delta_ptr, offs_m, m_ok, offs_d, d_ok, offs_dv, dv_ok,
                stride_qm, stride_qd, stride_gm, stride_gd):
    """q and dO of the query rows ``offs_m``, their log-sum-exp in the log2 domain, and delta.
    Rows past the sequence load lse = +inf, so their probabilities are exactly 0."""
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(g_base + offs_m[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
                 mask=m_ok[:, None] & dv_ok[None, :], other=0.0)
    lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
    return q, do, lse, delta


@triton.jit(do_not_specialize=["stride_lh", "stride_lb", "rows"])
def _attn_bwd_delta(
    O, DO, Delta,                 # output, its gradient, and rowsum(dO * O) (fp32, (H, rows))
    stride_ob, stride_om, stride_oh, stride_od,
    stride_gb, stride_gm, stride_gh, stride_gd,
    stride_lh, stride_lb,
    rows, HEAD_DIM_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    pid_m, h, b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    mask = (offs_m < rows)[:, None] & (offs_d < HEAD_DIM_V)[None, :]
    b64 = b.to(tl.int64)
    o = tl.load(O + b64 * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0)
    do = tl.load(DO + b64 * stride_gb + h * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + h * stride_lh + b64 * stride_lb + offs_m, delta, mask=offs_m < rows)


@triton.jit(do_not_specialize=["stride_lh", "stride_lb", "seqlen_q", "seqlen_k", "drop_stride"])
def _attn_bwd(
    Q, K, V, DO,                  # inputs and the output gradient
    DQ, DK, DV,                   # gradients out, shaped like Q, K, V; with ONE_GRAD, DQ is the
                                  # (…, 3, H, D) gradient of all three and DK, DV are not used
    LSE, Delta,                   # fp32 (H, rows): natural-log log-sum-exp (+inf: no real key), rowsum(dO * O)
    KeyMask,                      # (B, S_k) key-padding mask, nonzero = real key (read only if HAS_MASK)
    CuSeqlens,                    # (B+1,) int32 sequence starts (read only if PACKED)
    Seed,                         # (1,) int64 dropout seed (read only if DROPOUT)
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_gb, stride_gm, stride_gh, stride_gd,
    stride_dqb, stride_dqm, stride_dqh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_g3,                    # ONE_GRAD: elements from the dq part of DQ to its dk part (dv: twice)
    stride_mb, stride_mn, stride_lh, stride_lb,
    num_heads, seqlen_q, seqlen_k, drop_stride, sm_scale, dropout_p,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M1: tl.constexpr, BLOCK_N1: tl.constexpr, BLOCK_M2: tl.constexpr, BLOCK_N2: tl.constexpr,
    PACKED: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr,
    ONE_GRAD: tl.constexpr,
):
    # torch.compile passes Python floats as fp64 scalars; the math stays in fp32.
    sm_scale, dropout_p = tl.cast(sm_scale, tl.float32), tl.cast(dropout_p, tl.float32)
    # fp32 inputs multiply in exact fp32 (not tf32); the precision is ignored for fp16/bf16.
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"
    pid, bh = tl.program_id(0), tl.program_id(1)
    b, h = bh // num_heads, bh % num_heads
    # Packed, the log-sum-exp's head stride is the token count.
    start, len_q, len_k = _seq_bounds(CuSeqlens, b, seqlen_q, seqlen_k, stride_lh, PACKED)
    b64, start64 = b.to(tl.int64), start.to(tl.int64)
    q_base = Q + b64 * stride_qb + start64 * stride_qm + h * stride_qh
    k_base = K + b64 * stride_kb + start64 * stride_kn + h * stride_kh
    v_base = V + b64 * stride_vb + start64 * stride_vn + h * stride_vh
    g_base = DO + b64 * stride_gb + start64 * stride_gm + h * stride_gh
    row_base = h * stride_lh + b64 * stride_lb + start64
    qk_scale = sm_scale * 1.4426950408889634
    seed = 0
    if DROPOUT:
        seed = tl.load(Seed)
    inv_keep = 1.0 / (1.0 - dropout_p)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V

    # Phase 1: dK and dV for the keys [pid * BLOCK_N1, +BLOCK_N1), transposed so that the
    # key index runs down the rows: pT[n, m] = P[m, n].
    offs_n = pid * BLOCK_N1 + tl.arange(0, BLOCK_N1)
    if pid * BLOCK_N1 < len_k:
        n_ok = offs_n < len_k
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        if HAS_MASK:
            key_real = tl.load(KeyMask + b64 * stride_mb + offs_n * stride_mn, mask=n_ok, other=0) != 0
        dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N1, BLOCK_DV], dtype=tl.float32)
        for start_m in range(0, len_q, BLOCK_M1):
            offs_m = start_m + tl.arange(0, BLOCK_M1)
            m_ok = offs_m < len_q
            q, do, lse, delta = _query_rows(q_base, g_base, LSE + row_base, Delta + row_base, offs_m, m_ok,
                                            offs_d, d_ok, offs_dv, dv_ok, stride_qm, stride_qd, stride_gm, stride_gd)
            pT = tl.exp2(tl.dot(k, tl.trans(q), None, input_precision=PREC) * qk_scale - lse[None, :])
            if HAS_MASK:
                pT = tl.where(key_real[:, None], pT, 0.0)
            dpT = tl.dot(v, tl.trans(do), None, input_precision=PREC)
            if DROPOUT:
                keepT = _dropout_keep(seed, bh, offs_m[None, :] * drop_stride + offs_n[:, None], dropout_p)
                dv = tl.dot(tl.where(keepT, pT * inv_keep, 0.0).to(do.dtype), do, dv, input_precision=PREC)
                dpT = tl.where(keepT, dpT * inv_keep, 0.0)
            else:
                dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)
            dsT = pT * (dpT - delta[None, :])
            dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)
        dk = dk * sm_scale
        # With ONE_GRAD every store goes through DQ, so DQ is the one tensor the launch writes.
        dk_out, dv_out = DK, DV
        if ONE_GRAD:
            dk_out, dv_out = DQ + stride_g3, DQ + 2 * stride_g3
        tl.store(dk_out + b64 * stride_dkb + (start64 + offs_n[:, None]) * stride_dkn + h * stride_dkh
                 + offs_d[None, :],
                 dk.to(dk_out.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
        tl.store(dv_out + b64 * stride_dvb + (start64 + offs_n[:, None]) * stride_dvn + h * stride_dvh
                 + offs_dv[None, :],
                 dv.to(dv_out.dtype.element_ty), mask=n_ok[:, None] & dv_ok[None, :])

    # Phase 2: dQ for the queries [pid * BLOCK_M2, +BLOCK_M2).
    offs_m = pid * BLOCK_M2 + tl.arange(0, BLOCK_M2)
    if pid * BLOCK_M2 < len_q:
        m_ok = offs_m < len_q
        q, do, lse, delta = _query_rows(q_base, g_base, LSE + row_base, Delta + row_base, offs_m, m_ok,
                                        offs_d, d_ok, offs_dv, dv_ok, stride_qm, stride_qd, stride_gm, stride_gd)
        dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)
        for start_n in range(0, len_k, BLOCK_N2):
            offs_n2 = start_n + tl.arange(0, BLOCK_N2)
            n_ok2 = offs_n2 < len_k
            k = tl.load(k_base + offs_n2[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                        mask=n_ok2[:, None] & d_ok[None, :], other=0.0)
            v = tl.load(v_base + offs_n2[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                        mask=n_ok2[:, None] & dv_ok[None, :], other=0.0)
            key_ok = n_ok2
            if HAS_MASK:
                key_real2 = tl.load(KeyMask + b64 * stride_mb + offs_n2 * stride_mn, mask=n_ok2, other=0) != 0
                key_ok = key_ok & key_real2
            p = tl.exp2(tl.dot(q, tl.trans(k), None, input_precision=PREC) * qk_scale - lse[:, None])
            p = tl.where(key_ok[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v), None, input_precision=PREC)
            if DROPOUT:
                keep = _dropout_keep(seed, bh, offs_m[:, None] * drop_stride + offs_n2[None, :], dropout_p)
                dp = tl.where(keep, dp * inv_keep, 0.0)
            ds = p * (dp - delta[:, None])
            dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)
        dq = dq * sm_scale
        tl.store(DQ + b64 * stride_dqb + (start64 + offs_m[:, None]) * stride_dqm + h * stride_dqh
                 + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------- launch helpers


def max_shared_mem(device: torch.device) -> int:
    """Bytes of shared memory one program may use on ``device`` (unbounded off the GPU)."""
    if device.type != "cuda":
        return 1 << 30
    return _smem_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _smem_of(index: int) -> int:
    props = torch.cuda.get_device_properties(index)
    return int(getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def fit_stages(stages: int, fixed: int, per_stage: int, limit: int) -> int:
    """The most pipeline stages (at least 1) whose estimated shared memory stays within 85%
    of the device limit, so that a config never fails to compile for lack of memory."""
    while stages > 1 and fixed + stages * per_stage > 0.85 * limit:
        stages -= 1
    return stages


def strides4(t: torch.Tensor, packed: bool):
    """(batch, row, head, dim) strides; packed (T, H, D) tensors have no batch stride."""
    return (0, *t.stride()) if packed else tuple(t.stride())


@dataclass(frozen=True)
class BwdConfig:
    block_m1: int  # queries per step while accumulating dK, dV
    block_n1: int  # keys per program for dK, dV
    block_m2: int  # queries per program for dQ
    block_n2: int  # keys per step while accumulating dQ
    num_warps: int
    num_stages: int


def gpu_bwd_config(dtype: torch.dtype, block_d: int, block_dv: int) -> BwdConfig:
    """The GPU's block sizes before the pipeline stages are fitted to the device's shared
    memory (``bwd_config``); ``python -m fastbert.benchmarks.sass`` compiles this one."""
    if dtype == torch.float32:
        return BwdConfig(32, 64, 64, 32, 4, 2) if max(block_d, block_dv) <= 64 else BwdConfig(16, 32, 32, 16, 4, 1)
    if max(block_d, block_dv) <= 64:  # 2 stages: an H200 sweep's first at S=512 and S=128 (PERF.md)
        return BwdConfig(32, 64, 64, 32, 4, 2)
    if max(block_d, block_dv) <= 128:
        return BwdConfig(32, 128, 128, 32, 8, 2)
    return BwdConfig(16, 64, 64, 16, 4, 1)


@functools.lru_cache(maxsize=None)
def bwd_config(device: torch.device, dtype: torch.dtype, block_d: int, block_dv: int) -> BwdConfig:
    """Block sizes for the backward. Small blocks for the interpreter (CPU tests stay fast);
    on the GPU, FlashAttention-2's shape: a tall block of the dimension a program owns and a
    thin block of the one it loops over, sized so that Q, K, V, dO tiles fit shared memory.
    At D <= 64, 64-row blocks (benchmarks/tune.py on an H100, fp16 B=8 S=512 D=64: 71.7 µs
    against 86.5 µs for 128-row blocks)."""
    if device.type != "cuda":
        return BwdConfig(32, 32, 32, 32, 1, 1)
    cfg = gpu_bwd_config(dtype, block_d, block_dv)
    es = torch.finfo(dtype).bits // 8
    width = (block_d + block_dv) * es
    fixed = max(cfg.block_n1, cfg.block_m2) * width + cfg.block_n1 * cfg.block_m1 * es
    stages = fit_stages(cfg.num_stages, fixed, max(cfg.block_m1, cfg.block_n2) * width, max_shared_mem(device))
    return BwdConfig(cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2, cfg.num_warps, stages)


def launch_backward(do, q, k, v, out, lse, key_mask, cu_seqlens, seed, max_seqlen: int, scale: float,
                    dropout_p: float, grads: Tuple[torch.Tensor, ...]) -> None:
    """Write dQ, dK, dV into ``grads``: three tensors shaped like q, k, v, or one (…, 3, H, D)
    tensor when q, k and v are the three views of one such tensor (the gradient of a fused
    QKV projection's output, written in place of a stack of three). Called inside the
    ``fastbert::attention_bwd`` and ``fastbert::attention_qkv_bwd`` ops."""
    packed = cu_seqlens is not None
    heads = q.shape[-2]
    dim, dim_v = int(q.shape[-1]), int(v.shape[-1])  # constexprs: a symbolic head dim is specialized
    if packed:
        batch, seqlen_q, seqlen_k = cu_seqlens.shape[0] - 1, max_seqlen, max_seqlen
    else:
        batch, seqlen_q, seqlen_k = q.shape[0], q.shape[1], k.shape[1]
    if batch * heads == 0 or max(seqlen_q, seqlen_k) == 0:
        for g in grads:
            g.zero_()
        return
    if triton_interpreted() and is_fake(q):  # the op's fake implementation under the interpreter
        return
    one_grad = len(grads) == 1
    # The kernel reads the three parts' strides from views; with one gradient tensor it writes
    # all three through it (a tensor a launch writes is passed once), and DK, DV are q.
    dq, dk, dv = grads[0].unbind(-3) if one_grad else grads
    written = (grads[0], q, q) if one_grad else grads
    block_d, block_dv = max(16, next_pow2(dim)), max(16, next_pow2(dim_v))

    # delta = rowsum(dO * O) per (row, head), in the log-sum-exp's (H, rows) layout.
    delta = torch.empty_like(lse)
    rows, delta_batch = (q.shape[0], 1) if packed else (seqlen_q, batch)
    block = 64 if block_dv <= 128 else 32
    if rows > 0:
        launch(_attn_bwd_delta, (cdiv(rows, block), heads, delta_batch),
            out, do, delta, *strides4(out, packed), *strides4(do, packed), lse.stride(0), 0 if packed else seqlen_q,
            rows, HEAD_DIM_V=dim_v, BLOCK_M=block, BLOCK_DV=block_dv, num_warps=4)

    cfg = bwd_config(q.device, q.dtype, block_d, block_dv)

    has_mask = key_mask is not None
    mask = key_mask.view(torch.uint8) if has_mask and key_mask.dtype == torch.bool else key_mask
    # Program i takes key block i (phase 1) and query block i (phase 2).
    programs = max(cdiv(seqlen_k, cfg.block_n1), cdiv(seqlen_q, cfg.block_m2))
    launch(_attn_bwd, (programs, batch * heads),
        q, k, v, do, *written, lse, delta,
        mask if has_mask else q, cu_seqlens if packed else q, seed if seed is not None else q,
        *strides4(q, packed), *strides4(k, packed), *strides4(v, packed), *strides4(do, packed),
        *strides4(dq, packed)[:3], *strides4(dk, packed)[:3], *strides4(dv, packed)[:3],
        grads[0].stride(-3) if one_grad else 0,
        *(mask.stride() if has_mask else (0, 0)), lse.stride(0), 0 if packed else seqlen_q,
        heads, seqlen_q, seqlen_k, seqlen_k, scale, dropout_p,
        HEAD_DIM=dim, HEAD_DIM_V=dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv,
        BLOCK_M1=cfg.block_m1, BLOCK_N1=cfg.block_n1, BLOCK_M2=cfg.block_m2, BLOCK_N2=cfg.block_n2,
        PACKED=packed, HAS_MASK=has_mask, DROPOUT=dropout_p > 0, IEEE=q.dtype == torch.float32,
        ONE_GRAD=one_grad, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
