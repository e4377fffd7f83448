"""Residual add + LayerNorm: y = LN(dropout(x + x_bias) + residual) over the last dim.

Forward: one pass over each row, statistics in fp32, output in x's dtype; mean and rstd
(fp32, one each per row) are kept for backward. The sum h = dropout(x + x_bias) + residual
is not stored: backward recomputes it from x and residual (regenerating the dropout mask),
which costs backward the same bytes that storing h would cost forward, and keeps the
forward (the inference path) at one read of x and residual and one write of y.

Backward: each program walks a block of rows, writes dh (= d residual; also d x without
dropout, so that tensor is returned for both) and keeps fp32 partial sums of dweight,
dbias and dx_bias in registers; a second small kernel sums the per-program partials.
No atomics, so the result is deterministic.

Bytes at the minimum (fp16, M rows of N): forward 3·2MN (x, residual, y) + 8M; backward
4·2MN (dy, x, residual, dh) + 8M, plus 2·2MN for dx when it differs from dh (dropout).
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch._subclasses.functional_tensor import FunctionalTensorMode
from torch.library import triton_op

from ._direct import backward_impl, cdiv, interpreted, launch, next_pow2, register_autograd
from ._dropout import check_dropout, draw_seed, keep_mask

MAX_N = 16384  # one row is normalised inside one program's registers
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _sum_inputs(X, XB, R, offs, cols, ok, col_ok, rand_offs, seed, p, drop_scale,
                HAS_XBIAS: tl.constexpr, DROPOUT: tl.constexpr):
    """h = dropout(x + x_bias) + residual in fp32, and the keep mask (all True without dropout)."""
    h = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_XBIAS:
        h += tl.load(XB + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    keep = ok
    if DROPOUT:
        keep = keep_mask(seed, rand_offs, p)
        h = tl.where(keep, h * drop_scale, 0.0)
    h += tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
    return h, keep


@triton.jit(do_not_specialize=["M"])
def _add_layernorm_fwd(
    X,  # (M, N) the sublayer output
    XB,  # (N,) bias added to X before dropout; read only if HAS_XBIAS
    R,  # (M, N) the residual
    W, B,  # (N,) LayerNorm weight and bias
    Y,  # (M, N) output, X's dtype
    MEAN, RSTD,  # (M,) fp32 row statistics, kept for backward
    SEED,  # (1,) int64 dropout seed; read only if DROPOUT
    M, N, eps, p, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_XBIAS: tl.constexpr, DROPOUT: tl.constexpr,
    STATS: tl.constexpr,  # write MEAN and RSTD (not needed without a backward)
):
    # torch.compile passes Python floats as fp64 scalars; the math stays in fp32.
    eps, p, drop_scale = tl.cast(eps, tl.float32), tl.cast(p, tl.float32), tl.cast(drop_scale, tl.float32)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok, col_ok = rows < M, cols < N
    ok = row_ok[:, None] & col_ok[None, :]
    offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    # int32 Philox counters: the launcher refuses dropout on 2**31 elements or more.
    h, keep = _sum_inputs(X, XB, R, offs, cols, ok, col_ok, rows[:, None] * N + cols[None, :], seed, p,
                          drop_scale, HAS_XBIAS, DROPOUT)
    mean = tl.sum(h, axis=1) / N
    d = tl.where(ok, h - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps)
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=ok)
    if STATS:
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit(do_not_specialize=["M", "rows_per_prog"])
def _add_layernorm_bwd(
    DY,  # (M, N) gradient of the output
    X, XB, R, W, MEAN, RSTD, SEED,  # the forward's inputs and statistics
    DH,  # (M, N) gradient of the residual (and of X without dropout), residual's dtype
    DX,  # (M, N) gradient of X, X's dtype; written only if STORE_DX
    PART,  # (3, G, N) fp32 per-program partial sums of dweight, dbias, dx_bias
    M, N, rows_per_prog, p, drop_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_XBIAS: tl.constexpr, DROPOUT: tl.constexpr,
    STORE_DX: tl.constexpr,
):
    # torch.compile passes Python floats as fp64 scalars; the math stays in fp32.
    p, drop_scale = tl.cast(p, tl.float32), tl.cast(drop_scale, tl.float32)
    pid = tl.program_id(0)
    G = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    seed = 0
    if DROPOUT:
        seed = tl.load(SEED)
    acc_dw = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_dxb = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    start = pid * rows_per_prog
    end = tl.minimum(start + rows_per_prog, M)
    for r0 in range(start, end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        row_ok = rows < end
        ok = row_ok[:, None] & col_ok[None, :]
        offs = rows.to(tl.int64)[:, None] * N + cols[None, :]
        h, keep = _sum_inputs(X, XB, R, offs, cols, ok, col_ok, rows[:, None] * N + cols[None, :], seed, p,
                              drop_scale, HAS_XBIAS, DROPOUT)
        mean = tl.load(MEAN + rows, mask=row_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = tl.where(ok, (h - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        c1 = tl.sum(xhat * g, axis=1) / N
        c2 = tl.sum(g, axis=1) / N
        dh = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DH + offs, dh.to(DH.dtype.element_ty), mask=ok)
        dx = dh
        if DROPOUT:
            dx = tl.where(keep, dh * drop_scale, 0.0)
        if STORE_DX:
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=ok)
        acc_dw += dy * xhat
        acc_db += dy
        if HAS_XBIAS:
            acc_dxb += dx
    tl.store(PART + pid * N + cols, tl.sum(acc_dw, axis=0), mask=col_ok)
    tl.store(PART + (G + pid) * N + cols, tl.sum(acc_db, axis=0), mask=col_ok)
    if HAS_XBIAS:
        tl.store(PART + (2 * G + pid) * N + cols, tl.sum(acc_dxb, axis=0), mask=col_ok)


@triton.jit(do_not_specialize=["G"])
def _sum_partials(
    PART,  # (K, G, N) fp32 partial sums, one row per program of the main kernel
    O0, O1, O2,  # (N,) the K <= 3 sums, each in its own dtype; an unused one is PART
    G, N,
    K: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
):
    k = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    acc = tl.zeros([BLOCK_G, BLOCK_N], dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        gs = g0 + tl.arange(0, BLOCK_G)
        ok = (gs < G)[:, None] & col_ok[None, :]
        acc += tl.load(PART + (k * G + gs)[:, None].to(tl.int64) * N + cols[None, :], mask=ok, other=0.0)
    total = tl.sum(acc, axis=0)
    # K is a constexpr so that a kernel for fewer sums has no store to the unused pointers.
    if k == 0:
        tl.store(O0 + cols, total.to(O0.dtype.element_ty), mask=col_ok)
    if K > 1:
        if k == 1:
            tl.store(O1 + cols, total.to(O1.dtype.element_ty), mask=col_ok)
    if K > 2:
        if k == 2:
            tl.store(O2 + cols, total.to(O2.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _device_info(device: torch.device) -> Tuple[int, bool]:
    """(streaming multiprocessors, is Hopper or newer); a small stand-in off the GPU."""
    if device.type != "cuda":
        return 4, False
    props = torch.cuda.get_device_properties(device)
    return props.multi_processor_count, props.major >= 9


def num_programs(device: torch.device, blocks: int, per_sm: int = 2) -> int:
    """Programs for a kernel that walks row blocks and leaves one partial sum each: enough
    to fill the GPU, few enough that the partials stay small next to the tensors."""
    return max(1, min(blocks, per_sm * _device_info(device)[0]))


# Forward launches: 2048-element tiles, 1024 elements (32 per thread) per warp. The sweep
# (benchmarks/tune.py) on an H100: add_layernorm 4096x768 5.16 µs against 5.73 µs for
# 4096-element tiles of 8 warps; softmax_mask 32x12x128x128 8.61 µs against 9.76 µs.
FWD_TILE, FWD_PER_WARP = 2048, 1024


@functools.lru_cache(maxsize=None)
def _row_config(n: int, device: torch.device, tile: int = 4096, per_warp: int = 512) -> Tuple[int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps) for a whole row of ``n`` per program row: the row is
    padded to a power of two, narrow rows are stacked to ~``tile`` elements per program,
    and warps grow with the tile, one per ``per_warp`` elements (to 16 on Hopper, whose SMs
    hold more warps per block)."""
    block_n = next_pow2(max(n, 1))
    block_m = max(1, tile // block_n)
    elems = block_m * block_n
    max_warps = 16 if _device_info(device)[1] else 8
    num_warps = min(max(elems // per_warp, 1), max_warps)
    return block_m, block_n, num_warps


def row_config(n: int, device: torch.device, tile: int = 4096, per_warp: int = 512) -> Tuple[int, int, int]:
    """:func:`_row_config` for a plain int: a symbolic ``n`` is specialized (see ``next_pow2``)."""
    return _row_config(int(n), device, tile, per_warp)


# Backward launches: 2048-element tiles, 512 elements (16 per thread) per warp, and four
# programs per SM, each walking a run of rows and leaving one partial sum of d weight / d bias.
# The sweep (benchmarks/tune.py, "add_layernorm bwd") on an H100 at 4096x768: 10.7 µs, against
# 18.0 µs for 4096-element tiles of 8 warps, two per SM (eager PyTorch 32.3 µs in the same
# run's benchmark). Its fastest, 4096-element tiles of 4 warps (10.4 µs), holds 32 elements
# per thread and spills with dropout (255 registers, a 24-byte stack); this one takes 168.
BWD_TILE, BWD_PER_WARP, BWD_PER_SM = 2048, 512, 4


def bwd_config(n: int, device: torch.device) -> Tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, programs per SM) of the backward for rows of ``n``."""
    return (*row_config(n, device, BWD_TILE, BWD_PER_WARP), BWD_PER_SM)


def sum_partials(part: torch.Tensor, outs) -> None:
    """outs[k] = part[k].sum(0), in each output's dtype; part is (K, G, N) fp32.

    No tensor a launch writes may be passed twice (tests/test_launches.py): torch.compile
    gives each written argument its own copy, and the copy of an unwritten alias would
    replace the results. The pointers of sums not asked for are ``part``, which is read only."""
    k, g, n = part.shape
    outs = list(outs) + [part] * (3 - len(outs))
    block_n, block_g, num_warps = partials_config(int(k), int(n), part.device)
    if interpreted(_sum_partials):  # the interpreter pays per program, not per element
        block_n, block_g, num_warps = min(next_pow2(n), 1024), 64, 4
    launch(_sum_partials, (cdiv(n, block_n), k),
           part, outs[0], outs[1], outs[2], g, n, K=k, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=num_warps)


def partials_config(k: int, n: int, device: torch.device) -> Tuple[int, int, int]:
    """(BLOCK_N, BLOCK_G, num_warps) of :func:`sum_partials` for k sums of n columns. The sums
    are short (a few hundred partials), so the time is load latency: each program reads up to
    512 partials of its columns in one step (more take further steps; fewer are masked, so
    the block does not depend on the token count, which torch.compile may keep symbolic),
    and the columns are split finely enough that the programs number about one per SM or
    more (bias_gelu's backward at 4096x3072 on an H100: 192 programs of 16 columns, one step
    each, where 48 programs of 64 columns took 5 dependent steps)."""
    block_n = 32 if cdiv(n, 32) * k >= _device_info(device)[0] else 16
    return block_n, 512, 8


def check_inputs(op: str, n: int, *tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is not None and t.dtype not in _DTYPES:
            raise ValueError(f"fastbert.{op}: the Triton kernel takes float16, bfloat16 or float32, got {t.dtype} "
                             "(use the 'eager' backend for float64)")
    if n > MAX_N:
        raise ValueError(f"fastbert.{op}: rows of {n} elements are too long for the Triton kernel "
                         f"(at most {MAX_N})")


# Tests set this so that an element a kernel fails to write shows up as NaN.
DEBUG_FILL_NAN = False


def new_empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.empty for kernel outputs (NaN-filled under DEBUG_FILL_NAN)."""
    t = torch.empty(shape, dtype=dtype, device=device)
    return t.fill_(float("nan")) if DEBUG_FILL_NAN else t


def _rows(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    return t.contiguous().view(m, n)


def _opaque(mode, op, types, args, kwargs):
    return mode.__torch_dispatch__(op, types, args, kwargs)


def fastbert_op(name: str, kernel):
    """``triton_op(name)``. On the GPU torch.compile traces into the op and sees its Triton
    launches. Under TRITON_INTERPRET ``kernel`` cannot be traced, so the op stays opaque in
    compiled graphs (it runs, interpreted, when the graph runs)."""
    def register(fn):
        op = triton_op(name, mutates_args=())(fn)
        if interpreted(kernel):
            op.register_torch_dispatch(FunctionalTensorMode, _opaque)
        op.body = fn  # called directly by eager calls (kernels/_direct.py)
        return op
    return register


# ---------------------------------------------------------------------------------------
# The ops
# ---------------------------------------------------------------------------------------

@fastbert_op("fastbert::add_layernorm_fwd", _add_layernorm_fwd)
def _fwd(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
         x_bias: Optional[torch.Tensor], dropout_p: float, seed: Optional[torch.Tensor]
         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _launch_forward(x, residual, weight, bias, eps, x_bias, dropout_p, seed, True)


def _infer(x, residual, weight, bias, eps, x_bias, dropout_p, seed):
    """The forward when no backward will follow: (y, None, None), the row statistics neither
    allocated nor written."""
    return _launch_forward(x, residual, weight, bias, eps, x_bias, dropout_p, seed, False)


def _launch_forward(x, residual, weight, bias, eps, x_bias, dropout_p, seed, stats: bool):
    n = x.shape[-1]
    m = math.prod(x.shape[:-1])
    check_inputs("add_layernorm", n, x, residual, weight, bias, x_bias)
    check_dropout("add_layernorm", dropout_p, m * n, seed)
    y = new_empty(x.shape, torch.promote_types(x.dtype, residual.dtype), x.device)  # as the reference
    mean = new_empty(m, torch.float32, x.device) if stats else None
    rstd = new_empty(m, torch.float32, x.device) if stats else None
    if m == 0 or n == 0:
        return (y, mean.fill_(0.0), rstd.fill_(0.0)) if stats else (y, None, None)
    x2, r2 = _rows(x, m, n), _rows(residual, m, n)
    block_m, block_n, num_warps = row_config(n, x.device, FWD_TILE, FWD_PER_WARP)
    launch(_add_layernorm_fwd, (cdiv(m, block_m),),
           x2, x2 if x_bias is None else x_bias.contiguous(), r2, weight.contiguous(), bias.contiguous(), y,
        mean if stats else x2, rstd if stats else x2, x2 if seed is None else seed, m, n, eps, dropout_p,
        1.0 / (1.0 - dropout_p), BLOCK_M=block_m, BLOCK_N=block_n, HAS_XBIAS=x_bias is not None,
        DROPOUT=dropout_p > 0.0, STATS=stats, num_warps=num_warps)
    return y, mean, rstd


def _shares_dx(x: torch.Tensor, residual: torch.Tensor, dropout_p: float) -> bool:
    """Without dropout, d x equals d residual: one tensor serves both when the dtypes agree."""
    return dropout_p == 0.0 and x.dtype == residual.dtype


@fastbert_op("fastbert::add_layernorm_bwd", _add_layernorm_bwd)
def _bwd(dy: torch.Tensor, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
         x_bias: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor, dropout_p: float,
         seed: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(d residual, d x or empty when it is d residual, d weight, d bias, d x_bias or empty)."""
    n = x.shape[-1]
    m = math.prod(x.shape[:-1])
    check_inputs("add_layernorm", n, dy, x, residual, weight, bias, x_bias)
    check_dropout("add_layernorm", dropout_p, m * n, seed)
    store_dx = not _shares_dx(x, residual, dropout_p)
    dh = new_empty(x.shape, residual.dtype, x.device)
    dx = new_empty(x.shape if store_dx else (0,), x.dtype, x.device)
    dw = new_empty(n, weight.dtype, x.device)
    db = new_empty(n, bias.dtype, x.device)
    dxb = new_empty(n if x_bias is not None else 0, x.dtype if x_bias is None else x_bias.dtype, x.device)
    if m == 0 or n == 0:
        return dh, dx, dw.fill_(0.0), db.fill_(0.0), dxb.fill_(0.0)
    x2, r2, dy2 = _rows(x, m, n), _rows(residual, m, n), _rows(dy, m, n)
    block_m, block_n, num_warps, per_sm = bwd_config(n, x.device)
    grid = num_programs(x.device, cdiv(m, block_m), per_sm)
    rows_per_prog = cdiv(cdiv(m, grid), block_m) * block_m
    grid = cdiv(m, rows_per_prog)
    k = 3 if x_bias is not None else 2
    part = new_empty((k, grid, n), torch.float32, x.device)
    launch(_add_layernorm_bwd, (grid,),
           dy2, x2, x2 if x_bias is None else x_bias.contiguous(), r2, weight.contiguous(), mean, rstd,
        x2 if seed is None else seed, dh, dx if store_dx else x2, part, m, n, rows_per_prog, dropout_p,
        1.0 / (1.0 - dropout_p), BLOCK_M=block_m, BLOCK_N=block_n, HAS_XBIAS=x_bias is not None,
        DROPOUT=dropout_p > 0.0, STORE_DX=store_dx, num_warps=num_warps)
    sum_partials(part, [dw, db, dxb] if x_bias is not None else [dw, db])
    return dh, dx, dw, db, dxb


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, x_bias, dropout_p, seed = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, residual, weight, bias, x_bias, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, dy, _dmean, _drstd):
    x, residual, weight, bias, x_bias, mean, rstd, seed = ctx.saved_tensors
    dh, dx, dw, db, dxb = backward_impl(ctx, _bwd)(dy, x, residual, weight, bias, x_bias, mean, rstd, ctx.dropout_p,
                                                   seed)
    if _shares_dx(x, residual, ctx.dropout_p):
        dx = dh
    return dx, dh, dw, db, None, (dxb if x_bias is not None else None), None, None


_call = register_autograd(_fwd, _backward, _setup_context, infer=_infer)


def add_layernorm(x, residual, weight, bias, eps, x_bias=None, dropout_p=0.0):
    """LN(dropout(x + x_bias) + residual) over the last dim; the signature of
    ``fastbert.reference.add_layernorm``."""
    seed = draw_seed(dropout_p, x.device)
    return _call(x, residual, weight, bias, float(eps), x_bias, float(dropout_p), seed)[0]
