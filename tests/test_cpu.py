"""fastbert/cpu.py: the compositions of PyTorch ops that the "auto" backend runs on CPU
tensors in place of the eager reference, against that reference (outputs and gradients)."""

import pytest
import torch

import fastbert
from fastbert import cpu, reference
from test_attention import H, _keep_mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["padded", "scattered", "packed"])
def test_cpu_composition_matches_the_reference(layout, dtype):
    """fastbert.cpu.attention (what "auto" runs on CPU tensors: scaled_dot_product_attention)
    equals the reference, output and the three gradients: padded with a prefix, a length-1 and
    a fully padded row, a scattered mask, and packed with an empty sequence and spare rows."""
    torch.manual_seed(0)
    if layout == "packed":
        lengths = [7, 0, 1, 12, 5]
        total = sum(lengths)
        q, k, v = (torch.randn(total + 3, H, 16, dtype=dtype, requires_grad=True) for _ in range(3))
        kwargs = dict(cu_seqlens=torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32),
                      max_seqlen=12)
        args = ()
    else:
        q, k, v = (torch.randn(4, 11, H, 16, dtype=dtype, requires_grad=True) for _ in range(3))
        mask = _keep_mask("mixed" if layout == "padded" else "scattered", 4, 11).cpu()
        args, kwargs = (mask,), {}
    dy = torch.randn(q.shape[:-1] + (16,), dtype=dtype)
    results = []
    for fn in (cpu.attention, reference.attention):
        out = fn(q, k, v, *args, **kwargs)
        results.append((out, torch.autograd.grad(out, (q, k, v), dy)))
    (out, grads), (ref, ref_grads) = results
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-5)
    if dtype == torch.bfloat16:
        tol = dict(atol=2e-2, rtol=2e-2)
    assert out.dtype == dtype and torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **tol)
    for g, r, name in zip(grads, ref_grads, "qkv"):
        assert torch.isfinite(g).all(), name
        torch.testing.assert_close(g, r, **tol, msg=f"d{name}")
    if layout == "packed":
        assert (out[-3:] == 0).all()  # spare rows after the last sequence
    elif layout == "padded":
        assert (out[3] == 0).all()  # the fully padded sequence (the "mixed" mask's fourth row)
    fastbert.set_backend("auto")
    assert fastbert.ops.implementation("attention", torch.device("cpu"), dtype) is cpu.attention
    assert fastbert.ops.implementation("attention_qkv", torch.device("cpu"), dtype) is cpu.attention_qkv
