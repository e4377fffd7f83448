"""Bias + GELU: y = gelu(x + bias), exact (erf) or tanh form, computed in fp32.

Forward: an elementwise pass over (BLOCK_M, BLOCK_N) tiles, the bias loaded once per tile:
one read of x and one write of y. x + bias is not stored; backward recomputes it.

Backward: dx = dy · gelu'(x + bias). Each program walks a column block over a range of
rows and keeps the column sums of dx (the bias gradient) in fp32 registers; the
per-program partial sums are added by ``layernorm.sum_partials``. No atomics.

Bytes at the minimum (fp16, M×N): forward 2·2MN; backward 3·2MN (dy, x, dx), plus the
partials (G×N fp32, G ≈ 2 per SM × column blocks) written and read once.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
import triton
import triton.language as tl

from ._direct import backward_impl, cdiv, next_pow2, register_autograd
from .layernorm import _device_info, check_inputs, fastbert_op, launch, new_empty, sum_partials

_SQRT_HALF = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
# exp(c·x) as exp2(c·log2(e)·x): the constant folded, so one multiply feeds MUFU.EX2.
_NEG_2_LOG2E = tl.constexpr(-2.8853900817779268)
_NEG_HALF_LOG2E = tl.constexpr(-0.7213475204444817)


@triton.jit
def _tanh(u):
    # From exp(-2|u|), which never overflows: saturates cleanly to ±1.
    e = tl.exp2(tl.abs(u) * _NEG_2_LOG2E)
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0.0, -t, t)


@triton.jit
def _normal_cdf(h):
    """Φ(h) = 0.5·erfc(−h/√2) in fp32, from two fixed polynomials. With x = h/√2: for |x| < 1,
    erf(x) = x·A(x²) (A: degree 5, fit to erf(x)/x on [0, 1]); for |x| ≥ 1, erfc(|x|) = 2^B(|x|)
    (B: degree 8, fit to log2 erfc on [1, 4]; erfc(4) = 1.5e-8, taken as 0 beyond). The
    halves of Φ are folded into the coefficients (A / 2, and B − 1). Both polynomials are
    evaluated and one result selected: libdevice's erff instead loads the coefficients of the
    polynomial it picks per element, a third of this kernel's instructions (sm_90 SASS of the
    forward at 4096×3072: 40 → 32 instructions per element). The tail comes from erfc
    directly, so Φ keeps its relative accuracy for very negative h, where 0.5·(1 + erf)
    cancels. Against fp64 over h in [−12, 12], h·Φ(h) in fp32 is within 3.9e-7 absolute,
    1.5e-6 relative where |h·Φ| > 1e-3 (PyTorch's fp32 GELU: 2.2e-4), and 2.6e-6 relative
    for h in (−5.6, −1) (PyTorch's: 1.0)."""
    x = h * _SQRT_HALF
    ax = tl.abs(x)
    u = x * x
    a = -0.00028158232453279197  # A / 2
    a = a * u + 0.0024588063824921846
    a = a * u + -0.013355685397982597
    a = a * u + 0.05640091374516487
    a = a * u + -0.1880616396665573
    a = a * u + 0.5641895532608032
    t = tl.minimum(ax, 4.0)  # B is only used on [1, 4); the clamp keeps it finite for any input
    b = 2.3080588107404765e-06  # B − 1: 2^(B − 1) = erfc / 2
    b = b * t + -6.535147986141965e-05
    b = b * t + 0.0008514844230376184
    b = b * t + -0.006820617709308863
    b = b * t + 0.037982601672410965
    b = b * t + -0.15856623649597168
    b = b * t + -0.9118026494979858
    b = b * t + -1.6304181814193726
    b = b * t + -0.9995801448822021
    half_tail = tl.where(ax < 4.0, tl.exp2(b), 0.0)  # erfc(|x|) / 2
    big = tl.where(x > 0.0, 1.0 - half_tail, half_tail)
    return tl.where(ax < 1.0, x * a + 0.5, big)


@triton.jit
def _gelu_and_grad(h, TANH: tl.constexpr, WANT_GRAD: tl.constexpr):
    """gelu(h), and gelu'(h) when WANT_GRAD (else 0), for fp32 h."""
    if TANH:
        t = _tanh((h + 0.044715 * h * h * h) * _SQRT_2_OVER_PI)
        y = 0.5 * h * (1.0 + t)
        dy = 0.0
        if WANT_GRAD:
            dy = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * h * h)
    else:
        cdf = _normal_cdf(h)
        y = h * cdf
        dy = 0.0
        if WANT_GRAD:
            dy = cdf + h * _INV_SQRT_2PI * tl.exp2(h * h * _NEG_HALF_LOG2E)
    return y, dy


@triton.jit(do_not_specialize=["M"])
def _bias_gelu_fwd(
    X,  # (M, N) input
    B,  # (N,) bias
    Y,  # (M, N) output, X's dtype
    M, N,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ok = (rows < M)[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    h = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) + b[None, :]
    y, _ = _gelu_and_grad(h, TANH, False)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _bias_gelu_bwd(
    DY,  # (M, N) gradient of the output
    X, B,  # the forward's inputs
    DX,  # (M, N) gradient of X, X's dtype
    PART,  # (G, N) fp32 per-program partial column sums of DX (the bias gradient)
    M, N, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TANH: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        ok = (rows < end)[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) + b[None, :]
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        _, grad = _gelu_and_grad(h, TANH, True)
        dx = tl.where(ok, dy * grad, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        acc += dx
    tl.store(PART + pid * N + cols, tl.sum(acc, axis=0), mask=col_ok)


# Elements per program: the sweep (benchmarks/tune.py) on an H100 timed the forward at
# 4096x3072 in 17.6 µs with 2048-element tiles of 4 warps, 19.2 µs with 4096 of 8.
FWD_ELEMS, BWD_ELEMS = 2048, 4096


# The backward: 4096-element tiles of 8 warps, four programs per SM. The sweep ("bias_gelu
# bwd") on an H100 at 4096x3072: 36.4 µs, against 41.0 µs with 8192-element tiles of 16 warps
# and two programs per SM (eager PyTorch 46.4 µs in the same run's benchmark).
BWD_PER_SM = 4


def bwd_config(n: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, programs per SM) of the backward for rows of ``n``."""
    return (*_tile(n, device, BWD_ELEMS), BWD_PER_SM)


def _tile(n: int, device: torch.device, elems: int) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps): ~``elems`` elements per tile, at most 1024 columns wide."""
    block_n = min(next_pow2(max(n, 1)), 1024)
    block_m = max(1, elems // block_n)
    max_warps = 16 if _device_info(device)[1] else 8
    return block_m, block_n, min(max(block_m * block_n // 512, 1), max_warps)


def _rows(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    return t.contiguous().view(m, n)


@fastbert_op("fastbert::bias_gelu_fwd", _bias_gelu_fwd)
def _fwd(x: torch.Tensor, bias: torch.Tensor, tanh: bool) -> torch.Tensor:
    n = x.shape[-1]
    m = math.prod(x.shape[:-1])
    check_inputs("bias_gelu", 0, x, bias)
    y = new_empty(x.shape, x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, num_warps = _tile(n, x.device, FWD_ELEMS)
    launch(_bias_gelu_fwd, (cdiv(m, block_m), cdiv(n, block_n)),
           _rows(x, m, n), bias.contiguous(), y, m, n, BLOCK_M=block_m, BLOCK_N=block_n, TANH=tanh,
        num_warps=num_warps)
    return y


@fastbert_op("fastbert::bias_gelu_bwd", _bias_gelu_bwd)
def _bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor, tanh: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[-1]
    m = math.prod(x.shape[:-1])
    check_inputs("bias_gelu", 0, dy, x, bias)
    dx = new_empty(x.shape, x.dtype, x.device)
    db = new_empty(n, bias.dtype, x.device)
    if m == 0 or n == 0:
        return dx, db.fill_(0.0)
    block_m, block_n, num_warps, per_sm = bwd_config(n, x.device)
    col_blocks = cdiv(n, block_n)
    # About ``per_sm`` programs per SM over the whole grid: each walks several row tiles, so
    # the partial sums stay a small fraction of the bytes moved.
    grid_m = max(1, min(cdiv(m, block_m), cdiv(per_sm * _device_info(x.device)[0], col_blocks)))
    rows_per_prog = cdiv(cdiv(m, grid_m), block_m) * block_m
    grid_m = cdiv(m, rows_per_prog)
    part = new_empty((1, grid_m, n), torch.float32, x.device)
    launch(_bias_gelu_bwd, (grid_m, col_blocks),
           _rows(dy, m, n), _rows(x, m, n), bias.contiguous(), dx, part, m, n, rows_per_prog,
        BLOCK_M=block_m, BLOCK_N=block_n, TANH=tanh, num_warps=num_warps)
    sum_partials(part, [db])
    return dx, db


def _setup_context(ctx, inputs, output):
    x, bias, tanh = inputs
    ctx.save_for_backward(x, bias)
    ctx.tanh = tanh


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, db = backward_impl(ctx, _bwd)(dy, x, bias, ctx.tanh)
    return dx, db, None


_call = register_autograd(_fwd, _backward, _setup_context)


def bias_gelu(x, bias, approximate="none"):
    """gelu(x + bias); the signature of ``fastbert.reference.bias_gelu``."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fastbert.bias_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _call(x, bias, approximate == "tanh")
