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
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._direct import _traced, cdiv, is_fake
from .attention_bwd import fit_stages, max_shared_mem
from .gelu import _gelu_and_grad
from .layernorm import _device_info, check_inputs, fastbert_op, launch, new_empty


@triton.jit(do_not_specialize=["M"])
def _linear_gelu_fwd(
    X,  # (M, K) input rows, row stride stride_xm
    W,  # (N, K) weight, nn.Linear's layout, row stride stride_wn
    B,  # (N,) bias; read only if HAS_BIAS
    Y,  # (M, N) output, contiguous
    P,  # split K: (tiles, SPLIT_K, BLOCK_M, BLOCK_N) fp32 partial sums
    C,  # split K: (tiles,) int32 arrival counters, zero between launches
    M, N, K, K_CHUNK, stride_xm, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr, TANH: tl.constexpr, EVEN_K: tl.constexpr, IEEE: tl.constexpr,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
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
    k_start = tl.program_id(1) * K_CHUNK  # this program's K_CHUNK of K (all of it without split K)
    ks = k_start + tl.arange(0, BLOCK_K)
    # Clamped for the loads: an edge tile recomputes valid rows and never stores them.
    x_ptrs = X + (rows % M).to(tl.int64)[:, None] * stride_xm + ks[None, :]
    w_ptrs = W + (cols % N).to(tl.int64)[:, None] * stride_wn + ks[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_start, tl.minimum(k_start + K_CHUNK, K), BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
            w = tl.load(w_ptrs)
        else:
            k_ok = (k0 - k_start + ks) < K
            x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K

    if SPLIT_K > 1:
        # Each program leaves its partial sum; the last of a tile's SPLIT_K to arrive adds
        # them up in a fixed order (the result does not depend on which one that is), runs
        # the epilogue and sets the counter back to zero for the next launch.
        tile = pid_m * tiles_n + pid_n
        here = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.store(P + (tile * SPLIT_K + tl.program_id(1)) * BLOCK_M * BLOCK_N + here, acc)
        tl.debug_barrier()  # every thread's partial is written before the arrival is counted
        if tl.atomic_add(C + tile, 1, sem="acq_rel") != SPLIT_K - 1:
            return
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for s in range(SPLIT_K):
            acc += tl.load(P + (tile * SPLIT_K + s) * BLOCK_M * BLOCK_N + here, cache_modifier=".cg")
        tl.store(C + tile, 0)

    col_ok = cols < N
    y = acc
    if HAS_BIAS:
        y += tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
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
    split_k: int = 1  # the most programs one output tile's K is split across


# At most this many rows, the GEMM splits K (when a launch would leave SMs idle) and "auto"
# takes this kernel instead of cuBLAS (fastbert.ops: a batch of one or two sequences).
SMALL_M = 256


def gemm_config(device: torch.device, dtype: torch.dtype, m: int, n: int, k: int) -> GemmConfig:
    """Tile shapes: tiny under the interpreter; on Hopper 128×128 tiles over 64-deep K steps
    with 8 warps (two warpgroups), on older GPUs 32-deep steps and 4 warps; fp32 halves the K
    step. Up to SMALL_M rows, 64×64 tiles of 4 warps with K split so that the programs fill
    the SMs: at 128 rows (one sequence) the 24 to 96 tiles of a BERT layer's GEMMs cover a
    fraction of an H100's 132 SMs, and reading the weights, not the arithmetic, is the cost.
    ``benchmarks/tune.py`` sweeps the alternatives at BERT's shapes."""
    small = m <= SMALL_M
    if device.type != "cuda":
        cfg = GemmConfig(16, 32, 16, 4, 1, 1, 4 if small else 1)
    elif small:  # K steps as deep as fit in registers without spilling (sm_80 and sm_90, arch_check)
        deep = 32 if dtype == torch.float32 else 128 if _device_info(device)[1] else 64
        cfg = GemmConfig(64, 64, deep, 1, 4, 3, 8)
    elif _device_info(device)[1]:
        cfg = GemmConfig(128, 128, 32 if dtype == torch.float32 else 64, 8, 8, 3)
    else:
        cfg = GemmConfig(128, 128, 32, 8, 4, 3)
    # Each stage holds a (BLOCK_M + BLOCK_N) × BLOCK_K slice of x and weight: fewer stages
    # where shared memory is smaller (consumer GPUs, fp32), never a config that cannot build.
    per_stage = (cfg.block_m + cfg.block_n) * cfg.block_k * torch.finfo(dtype).bits // 8
    return cfg._replace(num_stages=fit_stages(cfg.num_stages, 0, per_stage, max_shared_mem(device)))


def split_k(cfg: GemmConfig, device: torch.device, tiles: int, k: int) -> int:
    """How many programs share each tile's K: enough to give every SM one program, at most
    cfg.split_k, and at least two K steps each."""
    steps = cdiv(k, cfg.block_k)
    split = max(1, min(cfg.split_k, _device_info(device)[0] // tiles, steps // 2))
    return cdiv(steps, cdiv(steps, split))  # no program without a K step


@fastbert_op("fastbert::linear_gelu_fwd", _linear_gelu_fwd)
def _fwd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tanh: bool) -> torch.Tensor:
    return _launch_gemm(x, weight, bias, tanh, True)


@fastbert_op("fastbert::linear_fwd", _linear_gelu_fwd)
def _linear_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _launch_gemm(x, weight, bias, False, False)


def linear_bias(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x @ weight.T + bias through the same GEMM with the GELU left out, without split K: a
    benchmark's way to split the fused kernel's time between its main loop and its GELU
    epilogue (``benchmarks/bench_linear_gelu.py``)."""
    return _launch_gemm(x, weight, bias, False, False, allow_split=False)


# Split K's arrival counters: one buffer per device, zeroed when it is made, in which each
# stream has its own region. Launches on one stream run one after another and each leaves
# its counters at zero, so no launch ever sees another's. A CUDA graph keeps the region of the
# stream it was captured on: graphs captured on one stream must not be replayed at the same
# time on several (PyTorch asks the same of graphs that share a memory pool).
COUNTER_SLOTS = 1024  # per stream: K is split only where the tiles leave SMs idle
MAX_STREAMS = 128
_COUNTERS: Dict[torch.device, torch.Tensor] = {}
_REGIONS: Dict[Tuple[torch.device, int], int] = {}


def _counters(device: torch.device, tiles: int, fake: bool = False) -> Optional[torch.Tensor]:
    """This stream's zeroed counters, or None where there are none yet and none can be made:
    while a CUDA graph is captured, zeroing a new buffer would run only when the graph does
    (fastbert's CUDAGraphRunner warms up first, which makes them)."""
    if fake:  # shape propagation (torch.compile's, arch_check's): nothing runs, nothing is kept
        return torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    buf = _COUNTERS.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _COUNTERS[device] = torch.zeros(MAX_STREAMS * COUNTER_SLOTS, dtype=torch.int32, device=device)
    if tiles > COUNTER_SLOTS:
        return None
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    region = _REGIONS.get((device, stream))
    if region is None:
        region = _REGIONS[(device, stream)] = sum(d == device for d, _ in _REGIONS) % MAX_STREAMS
    return buf[region * COUNTER_SLOTS:(region + 1) * COUNTER_SLOTS]


def _launch_gemm(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tanh: bool, gelu: bool,
                 allow_split: bool = True) -> torch.Tensor:
    n, k = weight.shape
    m = math.prod(x.shape[:-1])
    check_inputs("linear_gelu", 0, x, weight, bias)
    y = new_empty((*x.shape[:-1], n), x.dtype, x.device)
    if m == 0 or n == 0:
        return y
    if k == 0:  # an empty product: the bias (or zero), through the GELU, on every row
        act = bias.float() if bias is not None else torch.zeros(n, device=x.device)
        if gelu:
            act = torch.nn.functional.gelu(act, approximate="tanh" if tanh else "none")
        return y.copy_(act.expand_as(y))
    x2 = x.reshape(m, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight if weight.stride(-1) == 1 else weight.contiguous()
    cfg = gemm_config(x.device, x.dtype, m, n, k)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    # Traced (torch.compile), one program per tile: the counters are state outside the graph.
    split = split_k(cfg, x.device, tiles, k) if allow_split and not _traced() else 1
    counters = _counters(x.device, tiles, is_fake(x)) if split > 1 else None
    if counters is None:
        split = 1
    chunk = cdiv(cdiv(k, cfg.block_k), split) * cfg.block_k
    partials = torch.empty(tiles * split * cfg.block_m * cfg.block_n if split > 1 else 0,
                           dtype=torch.float32, device=x.device)
    launch(_linear_gelu_fwd, (tiles, split),
           x2, w, bias.contiguous() if bias is not None else y, y, partials,
           counters if counters is not None else partials, m, n, k, chunk, x2.stride(0), w.stride(0),
           BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, SPLIT_K=split,
           TANH=tanh, EVEN_K=bool(k % cfg.block_k == 0), IEEE=x.dtype == torch.float32,
           HAS_BIAS=bias is not None, GELU=gelu, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y


def linear_gelu(x, weight, bias, approximate="none"):
    """gelu(x @ weight.T + bias), no autograd; the signature of ``fastbert.reference.linear_gelu``
    (arguments checked by ``fastbert.functional``, which routes calls that need a gradient
    elsewhere). Eager calls run the op's body directly (kernels/_direct.py)."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"fastbert.linear_gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return (_fwd if _traced() else _fwd.body)(x, weight, bias, approximate == "tanh")


def linear(x, weight, bias=None):
    """x @ weight.T + bias, no autograd; the signature of ``fastbert.reference.linear`` (arguments
    checked by ``fastbert.functional``). "auto" runs it up to SMALL_M rows, where split K
    fills the GPU that cuBLAS's tiles leave idle."""
    return (_linear_fwd if _traced() else _linear_fwd.body)(x, weight, bias)
