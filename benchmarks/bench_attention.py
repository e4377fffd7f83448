"""Fused attention against eager PyTorch and SDPA, in the same run, at BERT-base's head shape
(12 heads × 64):

- ``B=32 S=128, padding mask``: lengths uniform in [64, 128], key-padding mask;
- ``B=8 S=512``: no mask;
- ``varlen 32×[32,512]``: 32 sequences with lengths uniform in [32, 512]. fastbert runs them
  packed (``cu_seqlens``); eager and SDPA run the same batch padded to 512 with a mask, which
  is what they would be given (``fastbert-padded`` is fastbert on that padded batch).

fastbert: ``fastbert.functional.attention_qkv`` under the "triton" backend on one (…, 3, H,
D) tensor, as the model calls it (its backward writes d qkv as one tensor);
``fastbert-split``: ``fastbert.functional.attention`` on the q, k, v views of that tensor,
whose three gradients autograd then stacks into d qkv (the same kernels, plus that copy). Eager: ``softmax(q kᵀ·scale + mask) v``
as two matmuls and a softmax in the input dtype. SDPA: ``F.scaled_dot_product_attention``
on (B, H, S, D) views with a boolean (B, 1, 1, S) mask. Modes and the two GPU timers (plain
``do_bench`` and CUDA graph) are those of ``bench_layernorm.measure_op``.

TFLOP/s count useful FLOPs only, the same for every implementation: the two matmuls over real
queries × real keys, 4·H·D·Σ Lq·Lk for fwd; bwd is 2.5× that (five matmuls), fwd+bwd 3.5×.
Work on padding is not counted, so padded implementations show lower TFLOP/s.

On a CPU only eager and SDPA are timed (the Triton kernel would run under the interpreter,
which measures the interpreter), at shapes cut down so the run takes seconds; the case
names give the shapes used.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F

from fastbert import functional as fb

from .bench_layernorm import bench_step, measure_op, triton_backend
from .common import Measurement, default_device, dtype_name, tflops

HEADS, DIM = 12, 64


def _lengths(batch: int, lo: int, hi: int, device: str) -> torch.Tensor:
    return torch.randint(lo, hi + 1, (batch,), device=device)


def _qkv(*lead, dtype, device):
    return torch.randn(*lead, 3, HEADS, DIM, device=device).to(dtype).requires_grad_()


def _padded_impls(qkv: torch.Tensor, mask) -> Dict[str, Callable[[], torch.Tensor]]:
    """fastbert, eager and SDPA on one padded (B, S, 3, H, D) batch; each returns (B, S, H, D)."""
    scale = DIM ** -0.5
    keep = None if mask is None else mask.bool()[:, None, None, :]
    additive = None if mask is None else torch.zeros(keep.shape, dtype=qkv.dtype, device=qkv.device).masked_fill(
        ~keep, torch.finfo(qkv.dtype).min)

    def eager():
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        if additive is not None:
            s = s + additive
        return torch.matmul(torch.softmax(s, -1), v).transpose(1, 2)

    def sdpa():
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep).transpose(1, 2)

    return {"fastbert": triton_backend(lambda: fb.attention_qkv(qkv, mask)),
            "fastbert-split": triton_backend(lambda: fb.attention(*qkv.unbind(2), mask)), "eager": eager, "sdpa": sdpa}


def cases(dtype: torch.dtype, device: str, small: bool = False) -> List[Tuple[str, list]]:
    """(case name, [(impls, leaves, dy, useful fwd FLOPs), ...]) for each workload; ``small``
    cuts the batch for the CPU."""
    out = []
    b = 4 if small else 32
    lengths = _lengths(b, 64, 128, device)
    mask = (torch.arange(128, device=device)[None, :] < lengths[:, None]).to(torch.int64)
    qkv = _qkv(b, 128, dtype=dtype, device=device)
    flops = 4 * HEADS * DIM * float((lengths.double() ** 2).sum())
    out.append((f"B={b} H={HEADS} S=128 D={DIM}, padding mask [64,128]",
                [(_padded_impls(qkv, mask), [qkv], torch.randn_like(qkv[:, :, 0]), flops)]))

    b = 1 if small else 8
    qkv = _qkv(b, 512, dtype=dtype, device=device)
    out.append((f"B={b} H={HEADS} S=512 D={DIM}",
                [(_padded_impls(qkv, None), [qkv], torch.randn_like(qkv[:, :, 0]), 4 * HEADS * DIM * b * 512.0 ** 2)]))

    b = 4 if small else 32
    lengths = _lengths(b, 32, 512, device)
    flops = 4 * HEADS * DIM * float((lengths.double() ** 2).sum())
    mask = (torch.arange(512, device=device)[None, :] < lengths[:, None]).to(torch.int64)
    padded = _qkv(b, 512, dtype=dtype, device=device)
    impls = _padded_impls(padded, mask)
    impls["fastbert-padded"] = impls.pop("fastbert")
    del impls["fastbert-split"]
    real = mask.reshape(-1).bool()
    packed = padded.detach().reshape(b * 512, 3, HEADS, DIM)[real].clone().requires_grad_()
    cu = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    longest = int(lengths.max())
    fast = {"fastbert": triton_backend(lambda: fb.attention_qkv(packed, cu_seqlens=cu, max_seqlen=longest))}
    out.append((f"varlen {b}x[32,512] H={HEADS} D={DIM} (packed; others padded to 512)",
                [(fast, [packed], torch.randn_like(packed[:, 0]), flops),
                 (impls, [padded], torch.randn_like(padded[:, :, 0]), flops)]))
    return out


def run(quick: bool, dtype: torch.dtype, device: str) -> List[Measurement]:
    gpu = str(device).startswith("cuda")
    results = []
    for case, groups in cases(dtype, device, small=not gpu):
        for impls, leaves, dy, fwd_flops in groups:
            if not gpu:
                impls = {k: v for k, v in impls.items() if not k.startswith("fastbert")}
            if not impls:
                continue
            flops = {"fwd": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd+bwd": 3.5 * fwd_flops}
            el = dy.element_size()
            nbytes = {"fwd": 4 * dy.numel() * el, "bwd": 8 * dy.numel() * el, "fwd+bwd": 12 * dy.numel() * el}
            for m in measure_op("attention", f"{case} {dtype_name(dtype)}", impls, leaves, dy, nbytes, device, quick):
                m.tflops = tflops(flops[m.mode], m.ms)
                m.extra["useful_flops"] = flops[m.mode]
                results.append(m)
    return results


CASE_IDS = ["b32-s128-mask", "b8-s512", "varlen"]


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastbert", "sdpa", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("case", CASE_IDS)
def test_attention(benchmark, case, impl, mode):
    _, groups = cases(torch.float16, "cuda")[CASE_IDS.index(case)]
    for impls, leaves, dy, _ in groups:
        if impl in impls:
            bench_step(benchmark, impls[impl], leaves, dy, mode, "cuda")
            return


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_attention_reference_cpu(benchmark, impl, mode):
    """The references on the CPU at the cut-down masked S=128 case (the kernel needs a GPU)."""
    _, groups = cases(torch.float32, "cpu", small=True)[0]
    impls, leaves, dy, _ = groups[0]
    bench_step(benchmark, impls[impl], leaves, dy, mode, "cpu")


if __name__ == "__main__":
    for m in run(quick=True, dtype=torch.float16 if torch.cuda.is_available() else torch.float32,
                 device=default_device()):
        print(m)
