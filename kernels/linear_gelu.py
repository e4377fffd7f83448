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
multiple of BLOCK_K. ``_linear_gelu_tma`` is the same GEMM with the tiles of x and weight
loaded by Hopper's TMA, optionally persistent (a config with ``tma``; ``benchmarks/tune.py``
times it against the pointer kernel, which the shipped configs keep until it is measured
ahead).

Forward only: training keeps cuBLAS + ``bias_gelu``, whose backward needs the
pre-activation (``fastbert.functional.linear_gelu`` routes there when a gradient is needed).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # a Triton without host-side tensor descriptors: the pointer kernel only
    TensorDescriptor = None

from ._direct import _traced, cdiv
from .attention_bwd import fit_stages, max_shared_mem
from .gelu import _gelu_and_grad
from .layernorm import _device_info, check_inputs, fastbert_op, launch, new_empty


@triton.jit
def _tile_coords(tile, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of the ``tile``-th program: groups of GROUP_M row tiles walk
    the column tiles together, so the tiles running at once share x's rows and weight's
    columns in L2."""
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % group_m, (tile % per_group) // group_m


@triton.jit
def _bias_gelu_tile(acc, B, cols, N, TANH: tl.constexpr, GELU: tl.constexpr):
    """The epilogue on the fp32 accumulator: + bias, then the GELU (unless GELU is False)."""
    y = acc + tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if GELU:
        y, _ = _gelu_and_grad(y, TANH, False)
    return y


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
    pid_m, pid_n = _tile_coords(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
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

    y = _bias_gelu_tile(acc, B, cols, N, TANH, GELU)
    ok = (rows < M)[:, None] & (cols < N)[None, :]
    tl.store(Y + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit(do_not_specialize=["M"])
def _linear_gelu_tma(
    X,  # TensorDescriptor of the (M, K) input, blocks of (BLOCK_M, BLOCK_K)
    W,  # TensorDescriptor of the (N, K) weight, blocks of (BLOCK_N, BLOCK_K)
    B,  # (N,) bias
    Y,  # (M, N) output, contiguous
    M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TANH: tl.constexpr, PERSISTENT: tl.constexpr, GELU: tl.constexpr = True,
):
    """The same GEMM with Hopper's tensor memory accelerator: the tiles of x and weight
    arrive by TMA (zeros past the edges, so no masks and no clamping); y is stored from
    registers as in _linear_gelu_fwd, which leaves the shared memory to the pipeline (two
    programs of 128×128×64 tiles and 3 stages fit an SM). PERSISTENT: a program per SM (or two) walks the tiles, its loop
    flattened with the K loop so the next tile's loads are in flight during the epilogue."""
    tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile in tl.range(tl.program_id(0), tiles, tl.num_programs(0), flatten=PERSISTENT):
        pid_m, pid_n = _tile_coords(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
        off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(X.load([off_m, k0]), W.load([off_n, k0]).T, acc)
        rows, cols = off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N)
        y = _bias_gelu_tile(acc, B, cols, N, TANH, GELU)
        ok = (rows < M)[:, None] & (cols < N)[None, :]
        tl.store(Y + rows.to(tl.int64)[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=ok)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool = False  # Hopper's TMA for the tiles (fp16/bf16, 16-byte aligned rows), see _linear_gelu_tma
    per_sm: int = 0    # with tma: persistent programs per SM; 0: a program per tile


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
    meta = dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, TANH=tanh,
                GELU=gelu, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    if cfg.tma and tma_fits(cfg, x2, w):
        programs = min(tiles, cfg.per_sm * _device_info(x.device)[0]) if cfg.per_sm else tiles
        launch(_linear_gelu_tma, (programs,), TensorDescriptor.from_tensor(x2, [cfg.block_m, cfg.block_k]),
               TensorDescriptor.from_tensor(w, [cfg.block_n, cfg.block_k]), bias.contiguous(), y, m, n, k,
               PERSISTENT=cfg.per_sm > 0, **meta)
        return y
    launch(_linear_gelu_fwd, (tiles,), x2, w, bias.contiguous(), y, m, n, k, x2.stride(0), w.stride(0),
           EVEN_K=bool(k % cfg.block_k == 0), IEEE=x.dtype == torch.float32, **meta)
    return y


def tma_fits(cfg: GemmConfig, x2: torch.Tensor, w: torch.Tensor) -> bool:
    """The TMA kernel can run: Triton has host-side tensor descriptors, the call is not being
    traced (torch.compile sees the pointer kernel), the inputs are fp16 or bf16, and every
    tile's rows start on 16 bytes (TMA's alignment rule for the base and row strides), on a
    Hopper or newer GPU (or the interpreter)."""
    if TensorDescriptor is None or _traced() or x2.dtype not in (torch.float16, torch.bfloat16):
        return False
    if x2.is_cuda and not _device_info(x2.device)[1]:
        return False  # TMA is Hopper's
    size = x2.element_size()
    return all(t.data_ptr() % 16 == 0 and t.stride(0) * size % 16 == 0 for t in (x2, w)) and cfg.block_k * size >= 16


def linear_gelu(x, weight, bias, approximate="none"):
    """gelu(x @ weight.T + bias), no autograd; the signature of ``fastbert.reference.linear_gelu``
    (arguments checked by ``fastbert.functional``, which routes calls that need a gradient
    elsewhere). Eager calls run the op's body directly (kernels/_direct.py)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fastbert.linear_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return (_fwd if _traced() else _fwd.body)(x, weight, bias, approximate == "tanh")
