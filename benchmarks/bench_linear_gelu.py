"""linear_gelu (inference) at BERT's feed-forward expansion: gelu(x @ W.T + b), fp16.

Forward only, each row on the same x (M × K) and W (N × K):

- "fastbert": the fused GEMM (``fastbert.functional.linear_gelu`` under the "triton" backend,
  no gradient): the bias and the GELU applied to the GEMM's fp32 accumulator, y stored once;
- "cublas+bias_gelu": what the "auto" backend runs today, ``F.linear`` (cuBLAS) and then
  fastbert's ``bias_gelu`` kernel;
- "eager": ``F.gelu(F.linear(x, W, b))``;
- "cublas": ``F.linear(x, W, b)`` alone, the GEMM with no activation: the time the fused
  kernel would reach if its epilogue were free;
- on a GPU, "fastbert-no-gelu": the fused kernel with its GELU left out (bias only), so that
  its time splits into main loop (against "cublas") and GELU epilogue (against "fastbert");
- on a GPU, the tanh form both ways: "fastbert-tanh" (the fused kernel) and
  "cublaslt-gelu-tanh", ``torch._addmm_activation(b, x, W.T, use_gelu=True)``, cuBLASLt's
  GELU_BIAS epilogue. cuBLASLt's GELU is the tanh approximation (and that call is the exact
  GELU on a CPU), so it can stand in only for models whose ``hidden_act`` is a tanh GELU,
  not for BERT's erf.

The "auto" backend takes the fused kernel (``Op.auto`` in ``fastbert/ops.py``) once these
rows show it ahead of "cublas+bias_gelu" at BERT-base and BERT-large's shapes.

One sequence (128 rows), on a GPU: "fastbert" (the kernel's few-rows tiles) against
"cublas+bias_gelu" and "cublas".

TFLOP/s counts the GEMM's 2·M·N·K; GB/s the bytes of x, W, b and y.
"""

from __future__ import annotations

from typing import List

import pytest
import torch
import torch.nn.functional as F

from fastbert import functional as fb

from .common import Measurement, bench_step, default_device, dtype_name, measure_op, triton_backend

# (tokens, in_features, out_features): BERT-base and BERT-large at 4096 tokens.
SHAPES = [(4096, 768, 3072), (4096, 1024, 4096)]
# One BERT-base sequence's expansion.
ONE_SEQUENCE = (128, 768, 3072)


def setup(dtype: torch.dtype, device: str, shape=SHAPES[0]):
    m, k, n = shape
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) * k ** -0.5).to(dtype)
    b = torch.randn(n, device=device).to(dtype)
    impls = {
        "fastbert": triton_backend(lambda: fb.linear_gelu(x, w, b)),
        "cublas+bias_gelu": triton_backend(lambda: fb.bias_gelu(F.linear(x, w), b)),
        "eager": lambda: F.gelu(F.linear(x, w, b)),
        "cublas": lambda: F.linear(x, w, b),
    }
    return impls, [x, w, b]


def run(quick: bool, dtype: torch.dtype, device: str) -> List[Measurement]:
    on_gpu = str(device).startswith("cuda")
    out = []
    for shape in (SHAPES[:1] if quick or not on_gpu else SHAPES) + ([ONE_SEQUENCE] if on_gpu else []):
        m, k, n = shape if on_gpu else (256, shape[1], shape[2])
        impls, leaves = setup(dtype, device, (m, k, n))
        if not on_gpu:
            impls = {"eager": impls["eager"]}
        elif shape == ONE_SEQUENCE:
            impls = {name: impls[name] for name in ("fastbert", "cublas+bias_gelu", "cublas")}
        else:
            x, w, b = leaves
            impls["fastbert-tanh"] = triton_backend(lambda x=x, w=w, b=b: fb.linear_gelu(x, w, b, "tanh"))
            from fastbert.kernels.linear_gelu import linear_bias
            impls["fastbert-no-gelu"] = lambda x=x, w=w, b=b: linear_bias(x, w, b)
            impls["cublaslt-gelu-tanh"] = lambda x=x, w=w, b=b: torch._addmm_activation(b, x, w.t(), use_gelu=True)
        el = torch.empty((), dtype=dtype).element_size()
        nbytes = {"fwd": (m * k + n * k + n + m * n) * el}
        flops = 2.0 * m * n * k
        case = f"{m}x{k}->{n} {dtype_name(dtype)}"
        dy = torch.empty(0)
        for meas in measure_op("linear_gelu", case, impls, leaves, dy, nbytes, device, quick, fwd_only=list(impls)):
            meas.tflops = flops / (meas.ms * 1e-3) / 1e12
            out.append(meas)
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastbert", "cublas+bias_gelu", "cublas"])
def test_linear_gelu(benchmark, impl):
    impls, leaves = setup(torch.float16, "cuda")
    bench_step(benchmark, impls[impl], leaves, None, "fwd", "cuda")


def test_linear_gelu_eager_cpu(benchmark):
    """The eager reference on the CPU, at a smaller shape (the kernel needs a GPU)."""
    impls, leaves = setup(torch.float32, "cpu", (256, 768, 3072))
    bench_step(benchmark, impls["eager"], leaves, None, "fwd", "cpu")


if __name__ == "__main__":
    for m in run(quick=True, dtype=torch.float16 if torch.cuda.is_available() else torch.float32,
                 device=default_device()):
        print(m)
