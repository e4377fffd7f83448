"""Shared test helpers: devices and dtypes to run on, seeded inputs, and the low-precision
comparison rule (flash-attention's)."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# bf16 dot products are wrong under the Triton interpreter, so bf16 runs on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-9}


def unavailable_kernels(names) -> list:
    """The ops among ``names`` without a kernel here. The Triton kernels ship with fastbert, so
    a missing one fails the calling test; only the C++ extension may be absent (a build with
    FASTBERT_SKIP_EXT=1), and then its name is returned for a skip."""
    from fastbert import ops
    missing = [name for name in names if not ops.kernel_available(name)]
    broken = {name: ops.load_kernel(name)[1] for name in missing if name != "embedding"}
    assert not broken, f"fastbert kernels fail to import: {broken}"
    return missing


def dtype_params():
    return pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])


def randn(*shape, dtype=torch.float32, device=DEVICE, requires_grad=False, scale=1.0):
    t = (torch.randn(*shape, dtype=torch.float32) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))


def assert_lowp_close(out: torch.Tensor, same_dtype: torch.Tensor, ref64: torch.Tensor, atol: float, what: str = "output"):
    """|out - ref64| <= 2 * |same_dtype - ref64| + atol, elementwise: the kernel may be at
    most twice as far from the fp64 truth as PyTorch computing in the same dtype."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    err = (out.double() - ref64.double()).abs()
    bound = 2 * (same_dtype.double() - ref64.double()).abs() + atol
    worst = (err - bound).argmax()
    assert (err <= bound).all(), (f"{what}: error {err.flatten()[worst]:.3g} exceeds bound {bound.flatten()[worst]:.3g} "
                                  f"(max error {err.max():.3g})")
