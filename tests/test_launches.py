"""Every Triton launch, watched: no tensor a kernel writes is also passed as another argument.

torch.compile functionalizes a traced launch (``wrap_triton``): each argument the kernel may
write becomes its own copy, and after the launch each copy replaces the tensor it was made
from, one after the other. Two arguments that are one tensor therefore come back as
whichever copy is replaced last, and if the kernel wrote the other one, its results are lost
(compiled gradients silently wrong, eager ones right). Placeholders for pointers a launch
does not use must be inputs, never an output. The launches here run eagerly (the interpreter
on the CPU); which arguments a kernel wrote is read off their bytes before and after.
"""

from __future__ import annotations

import inspect
import sys

import pytest
import torch

import fastbert
import fastbert.functional as fb
from fastbert import ops
from utils import DEVICE, randn

KERNELS = ("add_layernorm", "bias_gelu", "linear_gelu", "softmax_mask", "attention")


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage()).clone()


@pytest.fixture
def launches(monkeypatch):
    """Runs every launch of fastbert's Triton kernels through a check; yields the kernels seen."""
    for name in KERNELS:
        ops.load_kernel(name)
    seen, problems = [], []

    def watch(real):
        def launch(kernel, grid, *args, **meta):
            fn = getattr(kernel, "fn", kernel)
            params = list(inspect.signature(fn).parameters)
            tensors = [(p, a) for p, a in zip(params, args) if isinstance(a, torch.Tensor) and a.numel() > 0]
            before = {p: _storage_bytes(a) for p, a in tensors}
            real(kernel, grid, *args, **meta)
            seen.append(fn.__name__)
            written = [(p, a) for p, a in tensors if not torch.equal(before[p], _storage_bytes(a))]
            for p, a in written:
                for q, b in tensors:
                    if q != p and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr():
                        problems.append(f"{fn.__name__}: {p} (written) and {q} are one tensor")
        return launch

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("fastbert.kernels.") and hasattr(module, "launch"):
            monkeypatch.setattr(module, "launch", watch(module.launch))
    yield seen
    assert not problems, "\n".join(sorted(set(problems)))


def _run(fn, *inputs, grad=True):
    """fn(*inputs) under the triton backend, then its backward when ``grad``."""
    with fastbert.use_backend("triton"):
        if not grad:
            with torch.no_grad():
                return fn(*inputs)
        inputs = [t.detach().requires_grad_() if t is not None and t.is_floating_point() else t for t in inputs]
        out = fn(*inputs)
        leaves = [t for t in inputs if t is not None and t.requires_grad]
        torch.autograd.grad(out, leaves, torch.randn_like(out))


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("x_bias,dropout", [(False, 0.0), (True, 0.0), (True, 0.2)])
def test_add_layernorm(launches, grad, x_bias, dropout):
    n = 48
    x, r, w, b = randn(5, n), randn(5, n), randn(n), randn(n)
    xb = randn(n) if x_bias else None
    _run(lambda x, r, w, b, xb: fb.add_layernorm(x, r, w, b, 1e-5, xb, dropout), x, r, w, b, xb, grad=grad)
    assert "_add_layernorm_fwd" in launches
    assert ("_sum_partials" in launches) == grad


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_bias_gelu(launches, grad, approximate):
    _run(lambda x, b: fb.bias_gelu(x, b, approximate), randn(7, 40), randn(40), grad=grad)
    assert ("_sum_partials" in launches) == grad


def test_linear_gelu(launches):
    _run(lambda x, w, b: fb.linear_gelu(x, w, b), randn(7, 24), randn(40, 24), randn(40), grad=False)
    assert launches == ["_linear_gelu_fwd"]


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("masked,dropout", [(False, 0.0), (True, 0.0), (True, 0.25)])
def test_softmax_mask(launches, grad, masked, dropout):
    mask = torch.zeros(2, 1, 1, 9, device=DEVICE)
    mask[1, ..., 6:] = torch.finfo(torch.float32).min
    _run(lambda s: fb.softmax_mask(s, mask if masked else None, 0.5, dropout), randn(2, 3, 9, 9), grad=grad)
    assert ("_softmax_mask_bwd" in launches) == grad


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("layout", ["padded", "masked", "packed"])
def test_attention(launches, grad, layout):
    heads, dim = 2, 16
    if layout == "packed":
        cu = torch.tensor([0, 3, 11], dtype=torch.int32, device=DEVICE)
        q, k, v = (randn(11, heads, dim) for _ in range(3))
        _run(lambda q, k, v: fb.attention(q, k, v, cu_seqlens=cu, max_seqlen=8), q, k, v, grad=grad)
    else:
        mask = None
        if layout == "masked":
            mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
            mask[1, 4:] = False
        q, k, v = (randn(2, 9, heads, dim) for _ in range(3))
        _run(lambda q, k, v: fb.attention(q, k, v, mask), q, k, v, grad=grad)
    assert ("_attn_bwd" in launches) == grad


@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
@pytest.mark.parametrize("layout", ["masked", "packed"])
def test_attention_qkv(launches, grad, layout):
    """One gradient tensor for q, k and v: the launch writes it through DQ alone."""
    if layout == "packed":
        cu = torch.tensor([0, 3, 11], dtype=torch.int32, device=DEVICE)
        _run(lambda qkv: fb.attention_qkv(qkv, cu_seqlens=cu, max_seqlen=8), randn(11, 3, 2, 16), grad=grad)
    else:
        mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
        mask[1, 4:] = False
        _run(lambda qkv: fb.attention_qkv(qkv, mask), randn(2, 9, 3, 2, 16), grad=grad)
    assert ("_attn_bwd" in launches) == grad
