"""add_layernorm against eager PyTorch at BERT-base's shape: 4096 tokens × 768, fp16.

fastbert: ``fastbert.functional.add_layernorm(x, residual, w, b, eps, x_bias=xb)`` under the
"triton" backend. Eager: ``F.layer_norm(x + xb + residual, ...)`` in the input dtype, the
code a user would write. Modes: "fwd" (inference, no autograd), "bwd" (the gradients of
every input from a kept forward), "fwd+bwd".

Two timings on a GPU, each its own case so that speed-ups compare like with like:
- plain: ``triton.testing.do_bench`` (L2 flushed before each call; includes the host's
  launch cost whenever that exceeds the kernel's time, as an eager caller would see it);
- ", CUDA graph": ``do_bench_cudagraph`` (host cost gone, L2 not flushed: the kernels' own
  time, as under ``torch.compile(mode="reduce-overhead")``). The bwd mode alone is not
  graphed: its forward ran outside the capture stream.

GB/s counts the bytes the op must move at the minimum, for both implementations alike:
fwd reads x and residual and writes y (3·MN elements); bwd reads dy, x and residual and
writes one gradient (4·MN; without dropout d x = d residual); fwd+bwd the sum (7·MN).

On a CPU only the eager reference is timed (a Triton kernel there would run under the
interpreter, which measures the interpreter).
"""

from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn.functional as F

from fastbert import functional as fb

from .common import Measurement, bench_step, default_device, dtype_name, measure_op, triton_backend

SHAPE = (4096, 768)
EPS = 1e-12


def setup(dtype: torch.dtype, device: str, shape=SHAPE):
    m, n = shape

    def p(*s):
        return torch.randn(*s, device=device).to(dtype).requires_grad_()

    x, r, xb, w, b = p(m, n), p(m, n), p(n), p(n), p(n)
    leaves = [x, r, w, b, xb]
    impls = {
        "fastbert": triton_backend(lambda: fb.add_layernorm(x, r, w, b, EPS, x_bias=xb)),
        "eager": lambda: F.layer_norm(x + xb + r, (n,), w, b, EPS),
    }
    return impls, leaves, torch.randn(m, n, device=device).to(dtype)


def run(quick: bool, dtype: torch.dtype, device: str) -> List[Measurement]:
    impls, leaves, dy = setup(dtype, device)
    if not str(device).startswith("cuda"):
        impls = {"eager": impls["eager"]}
    el = torch.empty((), dtype=dtype).element_size()
    mn = SHAPE[0] * SHAPE[1]
    nbytes = {"fwd": 3 * mn * el, "bwd": 4 * mn * el, "fwd+bwd": 7 * mn * el}
    case = f"{SHAPE[0]}x{SHAPE[1]} {dtype_name(dtype)}"
    return measure_op("add_layernorm", case, impls, leaves, dy, nbytes, device, quick)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastbert", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_add_layernorm(benchmark, impl, mode):
    impls, leaves, dy = setup(torch.float16, "cuda")
    bench_step(benchmark, impls[impl], leaves, dy, mode, "cuda")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_add_layernorm_eager_cpu(benchmark, mode):
    """The eager reference on the CPU, at a smaller shape (the kernel needs a GPU)."""
    impls, leaves, dy = setup(torch.float32, "cpu", (512, 768))
    bench_step(benchmark, impls["eager"], leaves, dy, mode, "cpu")


if __name__ == "__main__":
    for m in run(quick=True, dtype=torch.float16 if torch.cuda.is_available() else torch.float32,
                 device=default_device()):
        print(m)
