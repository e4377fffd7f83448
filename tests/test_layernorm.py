"""add_layernorm: the Triton kernel (through fastbert.functional under the "triton" backend)
against the eager reference, forward and every gradient, and its dropout."""

import json
import os
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import functional as fb
from fastbert.kernels import layernorm as kernels
from utils import ATOL, CUDA, DEVICE, DTYPES, assert_lowp_close, dtype_params, randn

EPS = 1e-12
NAMES = ("x", "residual", "weight", "bias", "x_bias")
PARAMS = ("weight", "bias", "x_bias")  # gradients reduced over rows


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(kernels, "DEBUG_FILL_NAN", True)


def inputs(shape, with_x_bias=True):
    n = shape[-1]
    return {"x": randn(*shape), "residual": randn(*shape), "weight": 1 + 0.5 * randn(n), "bias": randn(n),
            "x_bias": randn(n) if with_x_bias else None}


def run(backend, master, dtypes, dy, dropout_p=0.0, eps=EPS):
    """Output and the gradient of every tensor input, for copies of ``master`` cast to ``dtypes``."""
    leaves = {k: None if v is None else v.to(dtypes[k]).requires_grad_() for k, v in master.items()}
    with fastbert.use_backend(backend):
        out = fb.add_layernorm(leaves["x"], leaves["residual"], leaves["weight"], leaves["bias"], eps,
                               x_bias=leaves["x_bias"], dropout_p=dropout_p)
    names = [k for k in NAMES if leaves[k] is not None]
    grads = torch.autograd.grad(out, [leaves[k] for k in names], dy.to(out.dtype))
    return out.detach(), dict(zip(names, grads))


def check_parity(master, dtypes, dy, atol):
    out, grads = run("triton", master, dtypes, dy)
    same, same_grads = run("eager", master, dtypes, dy)
    # float64 copies of the very inputs the kernel saw (rounded to their dtypes)
    rounded = {k: None if v is None else v.to(dtypes[k]) for k, v in master.items()}
    out_dtype = torch.promote_types(dtypes["x"], dtypes["residual"])  # an fp32 residual stream stays fp32
    ref, ref_grads = run("eager", rounded, {k: torch.float64 for k in master}, dy.to(out_dtype))
    assert out.dtype == same.dtype == out_dtype
    assert_lowp_close(out, same, ref, atol)
    rows = dy.numel() // dy.shape[-1]
    for k, g in grads.items():
        assert g.dtype == dtypes[k], k
        # The parameter gradients are sums over every row: the kernel adds per-program partial
        # sums where PyTorch reduces pairwise, so their rounding may grow like sqrt(rows).
        tol = atol * max(1.0, rows ** 0.5) if k in PARAMS else atol
        assert_lowp_close(g, same_grads[k], ref_grads[k], tol, what=f"d{k}")


@dtype_params()
@pytest.mark.parametrize("shape", [(3, 37, 96), (5, 7, 384), (1, 768), (2, 3, 1000), (2, 1024), (2, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(shape, dtype):
    master = inputs(shape, with_x_bias=shape[-1] != 1000)
    check_parity(master, {k: dtype for k in master}, randn(*shape), ATOL[dtype])


def test_mixed_dtypes_like_autocast():
    """fp16 activations with fp32 LayerNorm parameters; each gradient in its input's dtype."""
    master = inputs((4, 9, 96))
    dtypes = {"x": torch.float16, "residual": torch.float32, "weight": torch.float32, "bias": torch.float32,
              "x_bias": torch.float16}
    check_parity(master, dtypes, randn(4, 9, 96), ATOL[torch.float16])


def test_non_contiguous_inputs_and_gradient():
    x = randn(96, 13).t()  # (13, 96), transposed
    r = randn(2, 13, 96)[1]
    w, b = randn(192)[::2], randn(96)
    dy = randn(96, 13).t()
    xs = [t.clone().requires_grad_() for t in (x, r, w, b)]
    with fastbert.use_backend("triton"):
        out = fb.add_layernorm(*xs, EPS)
    grads = torch.autograd.grad(out, xs, dy)
    ys = [t.contiguous().requires_grad_() for t in (x, r, w, b)]
    with fastbert.use_backend("eager"):
        ref = fb.add_layernorm(*ys, EPS)
    ref_grads = torch.autograd.grad(ref, ys, dy.contiguous())
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, atol=1e-4, rtol=1e-4)


def test_broadcast_gradient_from_sum():
    """out.sum().backward() hands the kernel a stride-0 gradient."""
    master = inputs((3, 96))
    leaves = {k: v.clone().requires_grad_() for k, v in master.items()}
    with fastbert.use_backend("triton"):
        fb.add_layernorm(leaves["x"], leaves["residual"], leaves["weight"], leaves["bias"], EPS,
                         x_bias=leaves["x_bias"]).sum().backward()
    _, ref_grads = run("eager", master, {k: torch.float64 for k in master}, torch.ones(3, 96, device=DEVICE))
    for k in NAMES:
        torch.testing.assert_close(leaves[k].grad, ref_grads[k].float(), atol=1e-4, rtol=1e-4)


def test_empty_input():
    master = inputs((0, 96))
    out, grads = run("triton", master, {k: torch.float32 for k in master}, randn(0, 96))
    assert out.shape == (0, 96) and grads["x"].shape == (0, 96) and grads["residual"].shape == (0, 96)
    for k in ("weight", "bias", "x_bias"):
        assert torch.equal(grads[k], torch.zeros(96, device=DEVICE)), k


def test_refuses_what_it_cannot_run():
    with fastbert.use_backend("triton"):
        with pytest.raises(ValueError, match="float64"):
            fb.add_layernorm(randn(2, 8, dtype=torch.float64), randn(2, 8, dtype=torch.float64),
                             randn(8, dtype=torch.float64), randn(8, dtype=torch.float64), EPS)
        with pytest.raises(ValueError, match="too long"):
            n = kernels.MAX_N + 1
            fb.add_layernorm(randn(1, n), randn(1, n), randn(n), randn(n), EPS)


def test_dropout_mask_is_consistent_between_forward_and_backward():
    """With dropout the kernel's dx is d residual scaled by 1/(1-p) where kept and 0 where
    dropped; that keep mask, fed to a float64 computation, reproduces the forward output
    and every gradient; the keep rate is 1-p within 5 sigma."""
    p, shape = 0.3, (3, 37, 96)
    master, dy = inputs(shape), randn(*shape)
    out, grads = run("triton", master, {k: torch.float32 for k in master}, dy, dropout_p=p)
    keep = grads["x"] != 0
    torch.testing.assert_close(grads["x"], torch.where(keep, grads["residual"] / (1 - p), 0.0), rtol=1e-6, atol=0)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5

    leaves = {k: v.double().requires_grad_() for k, v in master.items()}
    h = (leaves["x"] + leaves["x_bias"]) * keep / (1 - p) + leaves["residual"]
    ref = torch.nn.functional.layer_norm(h, (96,), leaves["weight"], leaves["bias"], EPS)
    ref_grads = torch.autograd.grad(ref, [leaves[k] for k in NAMES], dy.double())
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    for k, rg in zip(NAMES, ref_grads):
        torch.testing.assert_close(grads[k], rg.float(), atol=1e-4, rtol=1e-4, msg=k)


def test_dropout_follows_the_torch_seed():
    master, dy = inputs((4, 96)), randn(4, 96)
    fp32 = {k: torch.float32 for k in master}
    torch.manual_seed(123)
    a, _ = run("triton", master, fp32, dy, dropout_p=0.5)
    torch.manual_seed(123)
    b, _ = run("triton", master, fp32, dy, dropout_p=0.5)
    c, _ = run("triton", master, fp32, dy, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_inference_skips_the_row_statistics(monkeypatch):
    """Where nothing needs a gradient the forward writes y alone (the row mean and rstd exist
    for the backward), and y is what autograd's forward gives: the same bits under the
    interpreter, within an ulp or two of fp32 compiled."""
    stats = []
    real = kernels.launch
    monkeypatch.setattr(kernels, "launch", lambda kernel, grid, *args, **meta:
                        (stats.append(meta.get("STATS")), real(kernel, grid, *args, **meta)))
    x, r, w, b, xb = randn(5, 7, 48), randn(5, 7, 48), randn(48), randn(48), randn(48)
    with fastbert.use_backend("triton"):
        with torch.no_grad():
            plain = fb.add_layernorm(x, r, w, b, 1e-5, x_bias=xb)
        no_leaf_needs_grad = fb.add_layernorm(x, r, w, b, 1e-5, x_bias=xb)
        trained = fb.add_layernorm(x.requires_grad_(), r, w, b, 1e-5, x_bias=xb)
    assert stats == [False, False, True]
    assert torch.equal(plain, no_leaf_needs_grad)
    if x.is_cuda:  # two compiled variants: ptxas may contract a multiply-add in one and not the other
        torch.testing.assert_close(plain, trained.detach(), rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(plain, trained.detach())
    assert trained.requires_grad and not plain.requires_grad


def test_symbolic_sizes_give_plain_int_block_sizes():
    """A block size is a kernel's compile-time constant: under dynamic shapes (torch.compile,
    opcheck's test_aot_dispatch_dynamic) a symbolic row length is specialized, never passed
    on as a SymInt constexpr (which the launch cannot hash)."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from fastbert.kernels._direct import next_pow2
    env = ShapeEnv()
    n = env.create_symintnode(env.create_symbol(48, ConstantSource("n")), hint=48)
    assert isinstance(n, torch.SymInt)
    assert next_pow2(n) == 64 and type(next_pow2(n)) is int
    config = kernels.row_config(n, torch.device("cpu"))
    assert config == kernels.row_config(48, torch.device("cpu")) and all(type(v) is int for v in config)


def test_opcheck():
    x, r = randn(3, 16, requires_grad=True), randn(3, 16, requires_grad=True)
    w, b, xb = (randn(16, requires_grad=True) for _ in range(3))
    torch.library.opcheck(torch.ops.fastbert.add_layernorm_fwd.default, (x, r, w, b, 1e-5, xb, 0.0, None))
    dy = randn(3, 16)
    _, mean, rstd = torch.ops.fastbert.add_layernorm_fwd(x, r, w, b, 1e-5, xb, 0.0, None)
    torch.library.opcheck(torch.ops.fastbert.add_layernorm_bwd.default, (dy, x, r, w, b, xb, mean, rstd, 0.0, None),
                          test_utils=("test_schema", "test_faketensor"))


# ---------------------------------------------------------------------------------------
# Compiled for Hopper and Ampere without a GPU: the interpreter accepts code that Triton's
# compiler refuses (non-constexpr globals, say), so the kernels are also compiled for sm_90
# and sm_80 here, in a process without TRITON_INTERPRET (Triton ships ptxas). The float
# scalars are compiled as fp32 (Triton's launcher) and as fp64 (what torch.compile's Inductor
# passes for a Python float: the attention forward once failed to build under Inductor on an
# H200 that way, its loop-carried state turned fp64, while every eager test passed).
# ---------------------------------------------------------------------------------------

_AOT = r"""
import importlib, json, sys, warnings
warnings.filterwarnings("ignore")
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def build(fn, args, constexprs, warps):
    # The failures of fn built for sm_90 and sm_80, with fp32 and with fp64 scalars.
    failures = []
    for arch in (90, 80):
        for scalar in ("fp32", "fp64"):
            sig = {a: "constexpr" if a in constexprs else scalar if args[a] == "fp32" else args[a] for a in fn.arg_names}
            try:
                triton.compile(ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", arch, 32),
                               options={"num_warps": warps})
            except Exception as exc:
                failures.append(f"sm_{arch}, {scalar} scalars: {type(exc).__name__}: {str(exc)[-2000:]}")
    return failures

@triton.jit
def _known_good(X, N, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(X + offs, tl.load(X + offs, mask=offs < N) * 2, mask=offs < N)

broken = build(_known_good, {"X": "*fp32", "N": "i32"}, {"BLOCK": 128}, 4)
if broken:
    print(json.dumps({"harness": broken[0]}))
    sys.exit(0)
failures = []
for module, name, args, constexprs, warps in json.loads(sys.argv[1]):
    for failure in build(getattr(importlib.import_module(module), name), args, constexprs, warps):
        failures.append(f"{name} {constexprs} num_warps={warps}, {failure}")
print(json.dumps({"failures": failures}))
"""


def hopper_config(monkeypatch, n, forward=False):
    """(BLOCK_M, BLOCK_N, num_warps) that the row kernels' launchers pick for width ``n`` on an
    H100, for the forward or the backward kernel."""
    monkeypatch.setattr(kernels, "_device_info", lambda device: (132, True))
    if forward:
        return kernels.row_config(n, torch.device("cuda"), kernels.FWD_TILE, kernels.FWD_PER_WARP)
    return kernels.row_config(n, torch.device("cuda"))


def assert_compiles_for_hopper(specs, tmp_path):
    """Each (module, kernel, {arg: type}, {constexpr: value}, num_warps) compiles for sm_90 and
    sm_80, with fp32 and with fp64 float scalars (the "fp32" entries of {arg: type})."""
    if CUDA:
        pytest.skip("the GPU tests compile the kernels for the GPU at hand")
    script = tmp_path / "aot_compile.py"  # Triton reads a kernel's source from its file
    script.write_text(_AOT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(script), json.dumps(specs)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "harness" in result:
        pytest.skip(f"this Triton cannot compile for sm_90/sm_80 without a GPU ({result['harness']})")
    assert not result["failures"], "\n".join(result["failures"])


def _ln_args(x, w):
    common = {"X": x, "XB": x, "R": x, "W": w, "MEAN": "*fp32", "RSTD": "*fp32", "SEED": "*i64", "M": "i32", "N": "i32",
              "p": "fp32", "drop_scale": "fp32"}
    fwd = dict(common, B=w, Y=x, eps="fp32")
    bwd = dict(common, DY=x, DH=x, DX=x, PART="*fp32", rows_per_prog="i32")
    return fwd, bwd


@pytest.mark.parametrize("k,g,n", [(3, 300, 50), (1, 700, 70), (2, 1, 33)])
def test_sum_partials_at_the_gpu_config(monkeypatch, k, g, n):
    """The partial sums with the block sizes the GPU gets (one step up to 512 partials, more
    steps beyond), run here by the interpreter: each output is its column sum, in its dtype."""
    monkeypatch.setattr(kernels, "interpreted", lambda kernel: False)
    monkeypatch.setattr(kernels, "_device_info", lambda device: (132, True))
    part = randn(k, g, n, dtype=torch.float32)
    outs = [torch.empty(n, dtype=d, device=DEVICE) for d in (torch.float32, torch.float16, torch.bfloat16)[:k]]
    kernels.sum_partials(part, outs)
    for out, want in zip(outs, part.double().sum(1)):
        torch.testing.assert_close(out.double(), want.to(out.dtype).double(), atol=2e-5 if out.dtype == torch.float32 else 0,
                                   rtol=1e-5 if out.dtype == torch.float32 else 8e-3)


def test_partials_config_reads_each_column_in_one_step(monkeypatch):
    """On an H100 (132 SMs): up to 512 partials of a column in one step, and at least one
    program per SM where 16-column programs allow it."""
    monkeypatch.setattr(kernels, "_device_info", lambda device: (132, True))
    for k, n in ((3, 768), (1, 3072), (2, 1024), (1, 8192)):
        block_n, block_g, warps = kernels.partials_config(k, n, torch.device("cuda"))
        assert block_g == 512 and block_g * block_n <= 16384 and warps == 8
        assert kernels.cdiv(n, block_n) * k >= 132 or block_n == 16


def test_compiles_for_hopper(monkeypatch, tmp_path):
    mod = "fastbert.kernels.layernorm"
    fwd, bwd = _ln_args("*fp16", "*fp32")
    fm, fn, fwarps = hopper_config(monkeypatch, 768, forward=True)
    bm, bn, warps = hopper_config(monkeypatch, 768)
    flags = {"HAS_XBIAS": True, "DROPOUT": True}
    assert_compiles_for_hopper([
        (mod, "_add_layernorm_fwd", fwd, dict(flags, BLOCK_M=fm, BLOCK_N=fn, STATS=True), fwarps),
        (mod, "_add_layernorm_fwd", fwd, dict(flags, BLOCK_M=fm, BLOCK_N=fn, STATS=False), fwarps),
        (mod, "_add_layernorm_bwd", bwd, dict(flags, BLOCK_M=bm, BLOCK_N=bn, STORE_DX=True), warps),
        *[(mod, "_sum_partials", {"PART": "*fp32", "O0": "*fp16", "O1": "*fp32", "O2": "*bf16", "G": "i32", "N": "i32"},
           {"K": k, "BLOCK_G": bg, "BLOCK_N": bn}, warps)
          for k, (bn, bg, warps) in ((3, kernels.partials_config(3, 768, torch.device("cuda"))),
                                     (1, kernels.partials_config(1, 3072, torch.device("cuda"))),
                                     (2, (32, 64, 4)))],
    ], tmp_path)


# ---------------------------------------------------------------------------------------
# GPU: BERT shapes, bf16, wide rows, torch.compile
# ---------------------------------------------------------------------------------------

GPU_CASES = ([((32, 128, 768), d) for d in DTYPES]  # BERT-base, every dtype; then wide and odd rows
             + [((2, 3, 8192), torch.bfloat16), ((7, 5000), torch.float16), ((3, 16384), torch.float32)])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,dtype", GPU_CASES, ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple)
                         else str(c).split(".")[-1])
def test_gpu_matches_reference(shape, dtype):
    master = inputs(shape)
    check_parity(master, {k: dtype for k in master}, randn(*shape), ATOL[dtype])


@pytest.mark.gpu
def test_gpu_dropout_matches_reference_with_the_same_mask():
    p, shape = 0.1, (16, 128, 768)
    master, dy = inputs(shape), randn(*shape)
    out, grads = run("triton", master, {k: torch.float32 for k in master}, dy, dropout_p=p)
    keep = grads["x"] != 0
    assert abs(keep.float().mean().item() - (1 - p)) < 5 * (p * (1 - p) / keep.numel()) ** 0.5
    h = (master["x"].double() + master["x_bias"].double()) * keep / (1 - p) + master["residual"].double()
    ref = torch.nn.functional.layer_norm(h, (768,), master["weight"].double(), master["bias"].double(), EPS)
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    fastbert.ops.load_kernel("add_layernorm")
    master, dy = inputs((8, 128, 768)), randn(8, 128, 768)
    fp16 = {k: torch.float16 for k in master}

    def f(x, r, w, b, xb):
        return fastbert.functional.add_layernorm(x, r, w, b, EPS, x_bias=xb) * 2

    with fastbert.use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True)
        leaves = [master[k].to(torch.float16).requires_grad_() for k in NAMES]
        out = compiled(*leaves)
        grads = torch.autograd.grad(out, leaves, dy.half())
    ref, ref_grads = run("eager", master, fp16, dy)
    torch.testing.assert_close(out, 2 * ref, atol=2e-2, rtol=1e-2)
    for k, g in zip(NAMES, grads):
        torch.testing.assert_close(g, 2 * ref_grads[k], atol=5e-2, rtol=1e-2, msg=k)

