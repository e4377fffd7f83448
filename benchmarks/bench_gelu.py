"""bias_gelu against eager PyTorch at BERT-base's feed-forward shape: 4096 tokens × 3072, fp16.

fastbert: ``fastbert.functional.bias_gelu(x, bias)`` (exact erf GELU) under the "triton"
backend. Eager: ``F.gelu(x + bias)`` in the input dtype. Modes, timings (plain and CUDA
graph) and the CPU policy (eager only) are those of ``bench_layernorm``.

GB/s counts the bytes the op must move at the minimum: fwd reads x and writes y (2·MN
elements); bwd reads dy and x and writes dx (3·MN; the bias gradient is a column sum of dx
that the fused kernel takes on the way); fwd+bwd the sum (5·MN).

Two forward-only rows on a GPU tell memory from arithmetic: "fastbert-tanh" (the tanh form,
fewer instructions per element than erf) and "copy" (``x.clone()``, the same bytes and no
arithmetic: the bandwidth the forward could reach). If the erf kernel is slower than both,
its arithmetic, not its memory traffic, sets its time.
"""

from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn.functional as F

from fastbert import functional as fb

from .common import Measurement, bench_step, default_device, dtype_name, measure_op, triton_backend

SHAPE = (4096, 3072)


def setup(dtype: torch.dtype, device: str, shape=SHAPE):
    m, n = shape
    x = torch.randn(m, n, device=device).to(dtype).requires_grad_()
    bias = torch.randn(n, device=device).to(dtype).requires_grad_()
    impls = {
        "fastbert": triton_backend(lambda: fb.bias_gelu(x, bias)),
        "eager": lambda: F.gelu(x + bias),
    }
    return impls, [x, bias], torch.randn(m, n, device=device).to(dtype)


def run(quick: bool, dtype: torch.dtype, device: str) -> List[Measurement]:
    impls, leaves, dy = setup(dtype, device)
    if not str(device).startswith("cuda"):
        impls = {"eager": impls["eager"]}
    else:
        x, bias = leaves
        impls["fastbert-tanh"] = triton_backend(lambda: fb.bias_gelu(x, bias, "tanh"))
        impls["copy"] = lambda: x.clone()
    el = torch.empty((), dtype=dtype).element_size()
    mn = SHAPE[0] * SHAPE[1]
    nbytes = {"fwd": 2 * mn * el, "bwd": 3 * mn * el, "fwd+bwd": 5 * mn * el}
    case = f"{SHAPE[0]}x{SHAPE[1]} {dtype_name(dtype)}"
    return measure_op("bias_gelu", case, impls, leaves, dy, nbytes, device, quick, fwd_only=("fastbert-tanh", "copy"))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastbert", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bias_gelu(benchmark, impl, mode):
    impls, leaves, dy = setup(torch.float16, "cuda")
    bench_step(benchmark, impls[impl], leaves, dy, mode, "cuda")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_bias_gelu_eager_cpu(benchmark, mode):
    """The eager reference on the CPU, at a smaller shape (the kernel needs a GPU)."""
    impls, leaves, dy = setup(torch.float32, "cpu", (256, 3072))
    bench_step(benchmark, impls["eager"], leaves, dy, mode, "cpu")


if __name__ == "__main__":
    for m in run(quick=True, dtype=torch.float16 if torch.cuda.is_available() else torch.float32,
                 device=default_device()):
        print(m)
