"""bias_gelu: the Triton kernel (through fastbert.functional under the "triton" backend)
against the eager reference, forward and both gradients, exact and tanh forms."""

import pytest
import torch

import fastbert
from fastbert import functional as fb
from fastbert.kernels import layernorm as kernels
from fastbert.kernels import gelu as gelu_kernels
from test_layernorm import assert_compiles_for_hopper
from utils import ATOL, DEVICE, DTYPES, assert_lowp_close, dtype_params, randn

APPROX = pytest.mark.parametrize("approximate", ["none", "tanh"])


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(kernels, "DEBUG_FILL_NAN", True)


def run(backend, x, bias, dy, approximate, x_dtype, bias_dtype):
    x = x.to(x_dtype).requires_grad_()
    bias = bias.to(bias_dtype).requires_grad_()
    with fastbert.use_backend(backend):
        out = fb.bias_gelu(x, bias, approximate)
    dx, db = torch.autograd.grad(out, (x, bias), dy.to(out.dtype))
    return out.detach(), dx, db


def check_parity(x, bias, dy, approximate, x_dtype, bias_dtype):
    out, dx, db = run("triton", x, bias, dy, approximate, x_dtype, bias_dtype)
    same = run("eager", x, bias, dy, approximate, x_dtype, bias_dtype)
    # float64 copies of the very inputs the kernel saw (rounded to their dtypes)
    ref = run("eager", x.to(x_dtype), bias.to(bias_dtype), dy.to(x_dtype), approximate, torch.float64, torch.float64)
    assert (out.dtype, dx.dtype, db.dtype) == (x_dtype, x_dtype, bias_dtype)
    atol = ATOL[x_dtype]
    assert_lowp_close(out, same[0], ref[0], atol)
    assert_lowp_close(dx, same[1], ref[1], atol, what="dx")
    # dbias sums over every row: per-program partial sums round differently from PyTorch's
    # pairwise reduction, by up to ~sqrt(rows) more.
    rows = x.numel() // x.shape[-1]
    assert_lowp_close(db, same[2], ref[2], ATOL[bias_dtype] * max(1.0, rows ** 0.5), what="dbias")


@dtype_params()
@APPROX
@pytest.mark.parametrize("shape", [(3, 37, 96), (2, 3072), (1, 2000), (9, 1)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, approximate, dtype):
    x = randn(*shape, scale=3.0)  # reaches both tails of the GELU
    check_parity(x, randn(shape[-1]), randn(*shape), approximate, dtype, dtype)


def test_fp32_bias_with_fp16_input():
    check_parity(randn(4, 9, 96), randn(96), randn(4, 9, 96), "none", torch.float16, torch.float32)


# The exact GELU evaluates both of its polynomials and selects one; for |h| in the thousands
# the unused one overflows to inf, which numpy (the interpreter) reports and the GPU ignores.
@pytest.mark.filterwarnings("ignore:overflow encountered in multiply:RuntimeWarning")
def test_large_inputs_do_not_overflow():
    x = torch.tensor([[-1e4, -80.0, -10.0, 0.0, 10.0, 80.0, 1e4, 6e4]], device=DEVICE)
    for dtype in (torch.float32, torch.float16):
        for approximate in ("none", "tanh"):
            out, dx, _ = run("triton", x, torch.zeros(8, device=DEVICE), torch.ones_like(x), approximate, dtype, dtype)
            ref, rdx, _ = run("eager", x, torch.zeros(8, device=DEVICE), torch.ones_like(x), approximate, dtype, dtype)
            assert torch.isfinite(out).all() and torch.isfinite(dx).all()
            torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(dx, rdx, atol=1e-3, rtol=1e-3)


def test_exact_gelu_accuracy_over_its_whole_range():
    """The kernel's Φ (two fixed polynomials, kernels/gelu.py) on a dense fp32 grid over
    [-12, 12] against fp64: within 1e-6·|h| + 1e-7 everywhere, and within 1e-5 relative down
    the negative tail to h = -5.6, where the 0.5·(1 + erf) form that PyTorch evaluates in fp32
    cancels (below, |gelu(h)| < 5e-8 and the kernel gives 0)."""
    h = torch.linspace(-12.0, 12.0, 240_001, device=DEVICE)
    h = torch.cat([h, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 0.9999999, 1.0000001, -0.9999999, -1.0000001,
                                    1.4142134, -1.4142134, 5.6568537, -5.6568537], device=DEVICE)])
    zero = torch.zeros(1, device=DEVICE)
    with fastbert.use_backend("triton"):
        got = fb.bias_gelu(h[:, None], zero).flatten().double()
    ref = torch.nn.functional.gelu(h.double())
    err = (got - ref).abs()
    assert (err <= 1e-6 * h.double().abs() + 1e-7).all(), f"max error {err.max():.3g} at h={h[err.argmax()]:.7g}"
    tail = (h < -1.0) & (h > -5.6)
    rel = err[tail] / ref[tail].abs()
    assert rel.max() < 1e-5, f"relative error {rel.max():.3g} at h={h[tail][rel.argmax()]:.7g}"
    torch_fp32 = torch.nn.functional.gelu(h).double()  # the cancelling form, for contrast
    assert ((torch_fp32 - ref).abs()[tail] / ref[tail].abs()).max() > 10 * rel.max()


def test_non_contiguous_input_and_broadcast_gradient():
    x = randn(96, 13).t().requires_grad_()  # (13, 96), transposed
    b = randn(192)[::2].requires_grad_()
    with fastbert.use_backend("triton"):
        fb.bias_gelu(x, b).sum().backward()  # a stride-0 gradient
    x2, b2 = x.detach().contiguous().double().requires_grad_(), b.detach().contiguous().double().requires_grad_()
    with fastbert.use_backend("eager"):
        fb.bias_gelu(x2, b2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.grad, b2.grad.float(), atol=1e-4, rtol=1e-5)


def test_empty_input():
    out, dx, db = run("triton", randn(0, 96), randn(96), randn(0, 96), "none", torch.float32, torch.float32)
    assert out.shape == (0, 96) and dx.shape == (0, 96)
    assert torch.equal(db, torch.zeros(96, device=DEVICE))


def test_refuses_float64():
    with fastbert.use_backend("triton"), pytest.raises(ValueError, match="float64"):
        fb.bias_gelu(randn(2, 8, dtype=torch.float64), randn(8, dtype=torch.float64))


def test_opcheck():
    x, b = randn(3, 16, requires_grad=True), randn(16, requires_grad=True)
    torch.library.opcheck(torch.ops.fastbert.bias_gelu_fwd.default, (x, b, True))
    torch.library.opcheck(torch.ops.fastbert.bias_gelu_bwd.default, (randn(3, 16), x, b, False),
                          test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph():
    """Traced whole (no graph break) by dynamo and AOTAutograd; on the CPU the op stays
    opaque (the interpreter cannot be traced), so aot_eager stands in for Inductor."""
    fastbert.ops.load_kernel("bias_gelu")  # the registry imports kernels lazily, outside the graph
    x, b, dy = randn(5, 96), randn(96), randn(5, 96)

    def f(x, b):
        return fastbert.functional.bias_gelu(x, b, "tanh") * 2

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    with fastbert.use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend=backend)
        xs, bs = x.clone().requires_grad_(), b.clone().requires_grad_()
        out = compiled(xs, bs)
        grads = torch.autograd.grad(out, (xs, bs), dy)
    ref, rdx, rdb = run("eager", x, b, dy, "tanh", torch.float32, torch.float32)
    torch.testing.assert_close(out, 2 * ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], 2 * rdx, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[1], 2 * rdb, atol=1e-4, rtol=1e-5)


def test_compiles_for_hopper(monkeypatch, tmp_path):
    """Compiled for sm_90 without a GPU (see tests/test_layernorm.py); both GELU forms."""
    monkeypatch.setattr(gelu_kernels, "_device_info", lambda device: (132, True))
    mod = "fastbert.kernels.gelu"
    fwd = {"X": "*fp16", "B": "*fp16", "Y": "*fp16", "M": "i32", "N": "i32"}
    bwd = {"DY": "*bf16", "X": "*bf16", "B": "*fp32", "DX": "*bf16", "PART": "*fp32", "M": "i32", "N": "i32",
           "rows_per_prog": "i32"}
    (fm, fn, fw), (bm, bn, bw) = (gelu_kernels._tile(3072, torch.device("cuda"), e)
                                  for e in (gelu_kernels.FWD_ELEMS, gelu_kernels.BWD_ELEMS))
    assert_compiles_for_hopper([
        (mod, "_bias_gelu_fwd", fwd, {"BLOCK_M": fm, "BLOCK_N": fn, "TANH": True}, fw),
        (mod, "_bias_gelu_bwd", bwd, {"BLOCK_M": bm, "BLOCK_N": bn, "TANH": False}, bw),
    ], tmp_path)


GPU_CASES = ([((32, 128, 3072), a, d) for d in DTYPES for a in ("none", "tanh")]  # BERT-base FFN
             + [((7, 5000), "tanh", torch.bfloat16), ((3, 40000), "none", torch.float16)])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,approximate,dtype", GPU_CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c).split(".")[-1])
def test_gpu_matches_reference(shape, approximate, dtype):
    x = randn(*shape, scale=3.0)
    check_parity(x, randn(shape[-1]), randn(*shape), approximate, dtype, dtype)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture():
    x, b = randn(64, 3072, dtype=torch.float16), randn(3072, dtype=torch.float16)
    with fastbert.use_backend("triton"):
        fb.bias_gelu(x, b)  # compile the kernel outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fb.bias_gelu(x, b)
        x.copy_(randn(64, 3072, dtype=torch.float16))
        graph.replay()
        with fastbert.use_backend("eager"):
            ref = fb.bias_gelu(x, b)
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
