"""The feed-forward expansion for inference in one kernel: y = gelu(x @ weight.T + bias).

cuBLAS followed by ``bias_gelu`` writes the (M, N) pre-activation and reads it back: at
BERT-base's 4096 tokens × 768 → 3072 in fp16, 50 MB of the 87 MB the pair moves (36 MB
fused), and a second launch.
Here the GEMM's fp32 accumulator gets the bias and the GELU (exact or tanh, the same code
as ``bias_gelu``: ``gelu._gelu_and_grad``) in registers and only y is stored. GELU is also
taken of the fp32 sum rather than of its fp16 rounding, so y is at least as accurate as
cuBLAS + ``bias_gelu``.

A tiled GEMM: each program computes a (BLOCK_M, BLOCK_N) tile of y over K in BLOCK_K steps
(``tl.dot``: warpgroup MMAs on Hopper, mma on Ampere), programs ordered in groups of
GROUP_M row tiles so that the tiles running together share their rows of x and columns of
weight in L2. Rows and columns past the edge are clamped for the loads (any row of x is
valid to read) and masked at the store, so the inner loop has no masks when K is a
multiple of BLOCK_K.

Forward only: training keeps cuBLAS + ``bias_gelu``, whose backward needs the
pre-activation (``fastbert.functional.linear_gelu`` routes there when a gradient is needed).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._direct import _traced, cdiv
from .attention_bwd import fit_stages, max_shared_mem
from .gelu import _gelu_and_grad
from .layernorm import _device_info, check_inputs, fastbert_op, launch, new_empty


@triton.jit(do_not_specialize=["M"])
def _linear_gelu_fwd(
    X,  # (M, K) input rows, row stride stride_xm
    W,  # (N, K) weight, nn.Linear's layout, row stride stride_wn
    B,  # (N,) bias
    Y,  # (M, N) output, contiguous
    M, N, K, stride_xm, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TANH: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    GELU: tl.constexpr = True,  # False: bias only (benchmarks time the main loop without the GELU)
):
    PREC: tl.constexpr = "ieee" if IEEE else "tf32"  # fp32 inputs: exact fp32 products
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Clamped for the loads: an edge tile recomputes valid rows and never stores them.
    x_ptrs = X + (rows % M).to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptrs = W + (cols % N).to(tl.int64)[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 + ks) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    col_ok = cols < N
    y = acc + tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y, _ = _gelu_and_grad(y, TANH, False)
    ok = (rows < M)[:, None] & col_ok[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# At most this many rows (a batch of one or two sequences), smaller tiles: see gemm_config.
FEW_ROWS = 256


def gemm_config(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> GemmConfig:
    """Tile shapes: tiny under the interpreter; on Hopper 128×128 tiles over 64-deep K steps
    with 8 warps (two warpgroups), on older GPUs 32-deep steps and 4 warps; fp32 halves the K
    step. Up to FEW_ROWS rows, 64×64 tiles of 4 warps: 128×128 tiles would leave all but
    24 of an H100's 132 SMs idle at one sequence's 128 rows × 3072 (96 tiles here; the sweep
    on an H200: 5.0 µs against 5.9 for cuBLAS + bias_gelu, weights in L2), with K steps as
    deep as fit in registers (sm_80 and sm_90: ``arch_check``).
    ``benchmarks/tune.py`` sweeps the alternatives at BERT's shapes."""
    if device.type != "cuda":
        return GemmConfig(16, 32, 16, 4, 1, 1)
    if m <= FEW_ROWS:
        cfg = GemmConfig(64, 64, 32 if dtype == torch.float32 else 128 if _device_info(device)[1] else 64, 1, 4, 3)
    elif _device_info(device)[1]:
        cfg = GemmConfig(128, 128, 32 if dtype == torch.float32 else 64, 8, 8, 3)
    else:
        cfg = GemmConfig(128, 128, 32, 8, 4, 3)
    # Each stage holds a (BLOCK_M + BLOCK_N) × BLOCK_K slice of x and weight: fewer stages
    # where shared memory is smaller (consumer GPUs, fp32), never a config that cannot build.
    per_stage = (cfg.block_m + cfg.block_n) * cfg.block_k * torch.finfo(dtype).bits // 8
    return cfg._replace(num_stages=fit_stages(cfg.num_stages, 0, per_stage, max_shared_mem(device)))


@fastbert_op("fastbert::linear_gelu_fwd", _linear_gelu_fwd)
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tanh: bool) -> torch.Tensor:
    return _launch_gemm(x, weight, bias, tanh, True)


def linear_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias through the same GEMM with the GELU left out: not an op of the
    library, a benchmark's way to split the fused kernel's time between its main loop and its
    GELU epilogue (``benchmarks/bench_linear_gelu.py``)."""
    return _launch_gemm(x, weight, bias, False, False)


def _launch_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tanh: bool, gelu: bool) -> torch.Tensor:
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    check_inputs("linear_gelu", 0, x, weight, bias)
    y = new_empty((*x.shape[:-1], n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:  # an empty product: gelu(bias) on every row
        act = torch.nn.functional.gelu(bias.float(), approximate="tanh" if tanh else "none") if gelu else bias
        return y.copy_(act.expand_as(y))
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    cfg = gemm_config(x.device, x.dtype, m, n, k)
    launch(_linear_gelu_fwd, (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),),
           x2, w, bias.contiguous(), y, m, n, k, x2.stride(0), w.stride(0),
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, TANH=tanh,
           EVEN_K=bool(k % cfg.block_k == 0), IEEE=x.dtype == torch.float32, GELU=gelu,
           num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def linear_gelu(x, weight, bias, approximate="none"):
    """gelu(x @ weight.T + bias), no autograd; the signature of ``fastbert.reference.linear_gelu``
    (arguments checked by ``fastbert.functional``, which routes calls that need a gradient
    elsewhere). Eager calls run the op's body directly (kernels/_direct.py)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fastbert.linear_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return (_fwd if _traced() else _fwd.body)(x, weight, bias, approximate == "tanh")
