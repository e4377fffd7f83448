"""CUDA implementations that the "auto" backend runs where fastbert's own kernel has yet to
show it is faster than a composition of library calls (``Op.auto`` is False; ``fastbert.ops``).
Inference only: ``fastbert.functional`` sends calls that need a gradient or run under autocast
to the differentiable composition instead.

- linear_gelu: the tanh GELU in fp16/bf16 through cuBLASLt's GELU_BIAS epilogue
  (``torch._addmm_activation``): one GEMM whose epilogue adds the bias and applies the GELU
  to the fp32 accumulator, 40.5 µs on an H100 at 4096×768→3072 against 53.1 µs for cuBLAS
  then ``bias_gelu`` and 51.2 µs for fastbert's Triton GEMM (benchmarks/PERF.md). cuBLASLt
  has no erf GELU epilogue, so the exact GELU (BERT's) stays cuBLAS then ``bias_gelu``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import ops

_EPILOGUE_DTYPES = (torch.float16, torch.bfloat16)


def gelu_tanh_epilogue_applies(x: torch.Tensor, approximate: str) -> bool:
    """cuBLASLt's epilogue computes the tanh GELU: on CUDA (not ROCm), in fp16/bf16, for a
    product with rows (an empty one goes the general way)."""
    return (approximate == "tanh" and x.is_cuda and x.dtype in _EPILOGUE_DTYPES and x.numel() > 0
            and torch.version.hip is None)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    if gelu_tanh_epilogue_applies(x, approximate):
        n, k = weight.shape
        # On CUDA both of addmm's paths give the tanh GELU: the cuBLASLt epilogue, or (shapes
        # it does not take) the GEMM then gelu(approximate="tanh").
        y = torch._addmm_activation(bias, x.reshape(-1, k), weight.t(), use_gelu=True)
        return y.view(*x.shape[:-1], n)
    h = F.linear(x, weight)
    return ops.implementation("bias_gelu", h.device, h.dtype)(h, bias, approximate)
