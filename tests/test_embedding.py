"""embedding: the C++ kernels of fastbert._C, through fastbert.functional, against the eager
reference: forward and all five gradients, dropout, bad ids, opcheck, torch.compile, the
extension's build. The CUDA kernels' tests are in tests/test_embedding_cuda.py."""

import os
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import functional as fb
from fastbert import ops, reference
from utils import ATOL, assert_lowp_close

K, WHY = ops.load_kernel("embedding")
if K is None:  # the build is part of the install; a missing one must fail loudly, not skip
    raise ImportError(f"fastbert._C is not built: {WHY}")
from fastbert.kernels import embedding as kernels  # noqa: E402

EPS = 1e-12
GRADS = ("word", "position", "token_type", "ln_weight", "ln_bias")


def make(shape, hidden, vocab=(53, 19, 3), dtype=torch.float32, id_dtype=torch.int64, device="cpu", ln_dtype=None):
    """Seeded ids (every id drawn, so rows repeat) and tables; the tables are fp32 masters."""
    ids = tuple(torch.randint(0, n, shape, dtype=id_dtype, device=device) for n in vocab)
    tables = [torch.randn(n, hidden) for n in vocab] + [1 + 0.5 * torch.randn(hidden), torch.randn(hidden)]
    dts = [dtype] * 3 + [ln_dtype or dtype] * 2
    return ids, [t.to(device=device, dtype=d) for t, d in zip(tables, dts)]


def run(backend, ids, tables, dy, dropout_p=0.0, padding_idx=None, dtype=None):
    """Output and the five gradients, for leaf copies of ``tables`` (cast to ``dtype``)."""
    leaves = [(t if dtype is None else t.to(dtype)).detach().clone().requires_grad_() for t in tables]
    input_ids, pos_ids, type_ids = ids[0], ids[1], ids[2]
    with fastbert.use_backend(backend):
        out = fb.embedding(input_ids, type_ids, pos_ids, *leaves, EPS, dropout_p, padding_idx)
    grads = torch.autograd.grad(out, leaves, dy.to(out.dtype))
    return out.detach(), dict(zip(GRADS, grads))


def assert_fp32_close(out, ref, what, tol=1e-6):
    """Within ``tol`` of the reference, relative to the tensor's scale."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, what
    err = (out.double() - ref.double()).abs().max().item() if out.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g})"


def test_auto_backend_runs_the_cpp_kernel_on_cpu():
    assert ops.implementation("embedding", torch.device("cpu")) is kernels.embedding
    assert "fastbert::embedding_fwd" in str(torch.ops.fastbert.embedding_fwd.default._schema)


@pytest.mark.parametrize("shape,hidden,id_dtype", [
    ((3, 37), 96, torch.int64),      # padded (B, S)
    ((41,), 100, torch.int32),       # packed (T,), a hidden size that is not a multiple of 8
    ((2, 9), 768, torch.int64),      # BERT-base width
    ((5,), 7, torch.int32),
], ids=["3x37x96", "41x100-int32", "2x9x768", "5x7-int32"])
def test_fp32_matches_reference(shape, hidden, id_dtype):
    ids, tables = make(shape, hidden, id_dtype=id_dtype)
    dy = torch.randn(*shape, hidden)
    out, grads = run("auto", ids, tables, dy, padding_idx=0)
    ref, ref_grads = run("eager", ids, tables, dy, padding_idx=0)
    assert_fp32_close(out, ref, "output")
    for k in GRADS:
        assert_fp32_close(grads[k], ref_grads[k], f"d{k}")


def test_repeated_ids_accumulate_and_padding_row_gets_no_gradient():
    ids, tables = make((4, 33), 64, vocab=(5, 7, 2))  # 132 tokens over 5 words: every row repeats
    ids = (ids[0].index_fill(1, torch.tensor([0, 3, 4]), 2),) + ids[1:]  # plenty of the padding id
    dy = torch.randn(4, 33, 64)
    _, grads = run("auto", ids, tables, dy, padding_idx=2)
    _, ref_grads = run("eager", ids, tables, dy, padding_idx=2)
    assert grads["word"][2].abs().max() == 0
    assert (grads["word"][[0, 1, 3, 4]].abs().sum(1) > 0).all()
    for k in GRADS:
        assert_fp32_close(grads[k], ref_grads[k], f"d{k}")
    # a negative padding_idx counts from the end, as in F.embedding
    _, neg = run("auto", ids, tables, dy, padding_idx=-3)
    assert torch.equal(neg["word"], grads["word"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape,hidden", [((3, 37), 96), ((29,), 100)], ids=["3x37x96", "29x100"])
def test_low_precision_matches_reference(shape, hidden, dtype):
    ids, tables = make(shape, hidden)
    dy = torch.randn(*shape, hidden)
    low = [t.to(dtype) for t in tables]
    out, grads = run("auto", ids, low, dy)
    same, same_grads = run("eager", ids, low, dy)
    ref, ref_grads = run("eager", ids, low, dy.to(dtype), dtype=torch.float64)
    assert out.dtype == dtype
    assert_lowp_close(out, same, ref, ATOL[dtype])
    for k in GRADS:
        assert grads[k].dtype == dtype, k
        assert_lowp_close(grads[k], same_grads[k], ref_grads[k], ATOL[dtype], what=f"d{k}")


def test_fp32_layernorm_parameters_with_fp16_tables():
    ids, tables = make((3, 11), 40, dtype=torch.float16, ln_dtype=torch.float32)
    dy = torch.randn(3, 11, 40)
    out, grads = run("auto", ids, tables, dy)
    same, same_grads = run("eager", ids, tables, dy)
    ref, ref_grads = run("eager", ids, tables, dy.half(), dtype=torch.float64)
    assert out.dtype == torch.float16 and grads["ln_weight"].dtype == torch.float32
    assert_lowp_close(out, same, ref, ATOL[torch.float16])
    for k in GRADS:
        assert_lowp_close(grads[k].to(ref_grads[k].dtype), same_grads[k], ref_grads[k], ATOL[torch.float16], f"d{k}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_cpu_output_rounds_as_torch_does(dtype):
    """The CPU op narrows its fp32 rows with AVX2/F16C code where the CPU has it: ties to even,
    overflow to inf, subnormals and NaN as ``Tensor.to`` rounds them. With a zero LayerNorm weight
    every output row is the fp32 bias, rounded; 517 columns run the 8-wide loop and its tail."""
    hidden = 8 * 64 + 5
    torch.manual_seed(0)
    low = torch.randn(hidden).to(dtype)
    ties = (low.float() + torch.nextafter(low, torch.full_like(low, float("inf"))).float()) / 2
    bias = torch.randn(hidden) * 2.0 ** torch.randint(-28, 16, (hidden,)).float()
    bias[: hidden // 2] = ties[: hidden // 2]
    specials = [float("nan"), float("inf"), -float("inf"), 65520.0, -65520.0, 3.4e38, 1e-7, -3e-6, -0.0, 2.0 ** -140]
    bias[-len(specials):] = torch.tensor(specials)
    bias[-len(specials) - 1] = torch.tensor(0x7FFFFFFF, dtype=torch.int32).view(torch.float32)  # rounding would carry
    ids, tables = make((2, 3), hidden, dtype=dtype, ln_dtype=torch.float32)
    tables[3], tables[4] = torch.zeros(hidden), bias
    with fastbert.use_backend("auto"):
        out = fb.embedding(ids[0], ids[2], ids[1], *tables, EPS, 0.0, None)
    torch.testing.assert_close(out, bias.to(dtype).expand_as(out), rtol=0, atol=0, equal_nan=True)


def test_float64_tables():
    """"auto" keeps fp64 on the reference; "triton" runs the C++ kernel, which computes in fp64."""
    ids, tables = make((2, 5), 24, dtype=torch.float64)
    dy = torch.randn(2, 5, 24, dtype=torch.float64)
    assert ops.implementation("embedding", torch.device("cpu"), torch.float64) is reference.embedding
    with fastbert.use_backend("triton"):
        assert ops.implementation("embedding", torch.device("cpu"), torch.float64) is kernels.embedding
    out, grads = run("triton", ids, tables, dy)
    ref, ref_grads = run("eager", ids, tables, dy)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)
    for k in GRADS:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-12, rtol=1e-12)


def test_strided_ids_need_no_copy_and_match():
    ids, tables = make((4, 6), 32)
    pos = torch.arange(6).expand(4, 6)               # batch stride 0, as the model passes them
    tt = torch.randint(0, 3, (6, 4)).t()             # transposed
    word = torch.randint(0, 53, (4, 6, 2))[..., 0]   # a strided slice
    dy = torch.randn(4, 6, 32)
    out, grads = run("auto", (word, pos, tt), tables, dy)
    ref, ref_grads = run("eager", (word.contiguous(), pos.contiguous(), tt.contiguous()), tables, dy)
    assert_fp32_close(out, ref, "output")
    for k in GRADS:
        assert_fp32_close(grads[k], ref_grads[k], f"d{k}")
    # three dims: the kernel takes a contiguous copy
    ids3, _ = make((2, 3, 4), 32)
    out3, _ = run("auto", tuple(i.transpose(0, 2) for i in ids3), tables, torch.randn(4, 3, 2, 32))
    ref3, _ = run("eager", tuple(i.transpose(0, 2).contiguous() for i in ids3), tables, torch.randn(4, 3, 2, 32))
    assert_fp32_close(out3, ref3, "3-D ids")


@pytest.mark.parametrize("shape", [(0,), (2, 0)])
def test_empty_input(shape):
    ids, tables = make(shape, 16)
    out, grads = run("auto", ids, tables, torch.randn(*shape, 16))
    assert out.shape == (*shape, 16)
    for k in GRADS:
        assert grads[k].abs().max() == 0, k


def test_backward_is_deterministic_across_runs_threads_and_modes():
    ids, tables = make((8, 40), 48, vocab=(9, 40, 2))
    dy = torch.randn(8, 40, 48)
    threads = torch.get_num_threads()
    runs = []
    try:
        for n, deterministic in ((threads, False), (threads, True), (1, True), (threads, True)):
            torch.set_num_threads(n)
            torch.use_deterministic_algorithms(deterministic)
            runs.append(run("auto", ids, tables, dy)[1])
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    for other in runs[1:]:
        for k in GRADS:
            assert torch.equal(runs[0][k], other[k]), k


def test_opcheck():
    ids, tables = make((3, 7), 20)
    word, pos, tt = ids
    tables = [t.requires_grad_() for t in tables]
    seed = torch.tensor([1234], dtype=torch.int64)
    for p, s, pad in ((0.0, None, None), (0.2, seed, 3)):
        torch.library.opcheck(torch.ops.fastbert.embedding_fwd.default, (word, tt, pos, *tables, EPS, p, s, pad))
    out, mean, rstd = torch.ops.fastbert.embedding_fwd(word, tt, pos, *tables, EPS, 0.2, seed, 3)
    args = (torch.randn_like(out), word, tt, pos, *[t.detach() for t in tables[:4]], mean, rstd, 0.2, seed, 3)
    torch.library.opcheck(torch.ops.fastbert.embedding_bwd.default, args)


BAD_IDS = [
    ("input_ids", -1, "input_ids contains -1, outside the valid range [0, 53)"),
    ("input_ids", 53, "input_ids contains 53, outside the valid range [0, 53)"),
    ("input_ids", 2**40, "input_ids contains 1099511627776"),
    ("position_ids", 19, "position_ids contains 19, outside the valid range [0, 19)"),
    ("token_type_ids", 3, "token_type_ids contains 3, outside the valid range [0, 3)"),
    ("token_type_ids", -7, "token_type_ids contains -7"),
]


@pytest.mark.parametrize("name,value,message", BAD_IDS, ids=[f"{n}={v}" for n, v, _ in BAD_IDS])
def test_bad_ids_raise_naming_the_value(name, value, message):
    ids, tables = make((3, 10), 16)
    ids = dict(zip(("input_ids", "position_ids", "token_type_ids"), (i.clone() for i in ids)))
    ids[name][1, 4] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fb.embedding(ids["input_ids"], ids["token_type_ids"], ids["position_ids"], *tables, EPS)
    if name == "input_ids" and value < 2**31:  # int32 ids take the same path
        with pytest.raises(ValueError, match=f"contains {value}"):
            fb.embedding(ids["input_ids"].int(), ids["token_type_ids"], ids["position_ids"], *tables, EPS)


def tiny_model():
    cfg = fastbert.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                              intermediate_size=37, max_position_embeddings=16, type_vocab_size=2)
    return fastbert.BertModel(cfg).eval()


@pytest.mark.parametrize("with_mask", [False, True], ids=["padded", "packed"])
def test_bad_ids_raise_through_the_model(with_mask):
    model = tiny_model()
    ids = torch.randint(1, 50, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    kw = {"attention_mask": mask} if with_mask else {}
    bad = ids.clone()
    bad[0, 3] = 50
    with pytest.raises(ValueError, match=r"input_ids contains 50, outside the valid range \[0, 50\)"):
        model(bad, **kw)
    with pytest.raises(ValueError, match="token_type_ids contains 2"):
        model(ids, token_type_ids=torch.full_like(ids, 2), **kw)
    with pytest.raises(ValueError, match="position_ids contains 16"):
        model(ids, position_ids=torch.arange(8, 17).expand(2, 9), **kw)


@pytest.mark.parametrize("with_mask", [False, True], ids=["padded", "packed"])
def test_model_matches_eager_backend(with_mask):
    """BertModel (output and embedding gradients) with the kernel, held to an fp64 copy of the
    model by the low-precision rule against the eager fp32 run: the model's 0.02-std tables
    make the embedding LayerNorm's rstd ~30, which magnifies fp32 rounding in both."""
    model = tiny_model().train()
    for m in model.modules():  # dropout off, gradients on
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    kw = {"attention_mask": mask} if with_mask else {}
    results, dy = [], torch.randn(3, 9, 32)  # not out.pow(2).sum(): after a LayerNorm its gradient is ~0
    for backend, dtype in (("auto", torch.float32), ("eager", torch.float32), ("eager", torch.float64)):
        model.to(dtype).zero_grad()
        with fastbert.use_backend(backend):
            out = model(ids, **kw).last_hidden_state
        out.backward(dy.to(dtype))
        emb = model.embeddings
        results.append([out.detach()] + [p.grad.clone() for p in (emb.word_embeddings.weight, emb.position_embeddings.weight,
                                                                   emb.token_type_embeddings.weight, emb.LayerNorm.weight)])
    for name, a, b, ref in zip(("last_hidden_state", "dword", "dposition", "dtoken_type", "dln_weight"), *results):
        assert_lowp_close(a, b, ref, 1e-6 * max(1.0, ref.abs().max().item()), what=name)


def test_dropout_statistics_and_backward_consistency():
    p, shape, hidden = 0.25, (16, 24), 128
    ids, tables = make(shape, hidden)
    dy = torch.randn(*shape, hidden)
    plain, _ = run("auto", ids, tables, dy)
    torch.manual_seed(7)
    out, grads = run("auto", ids, tables, dy, dropout_p=p)
    keep = out != 0
    frac = keep.float().mean().item()
    n = keep.numel()
    assert abs(frac - (1 - p)) < 5 * (p * (1 - p) / n) ** 0.5, frac
    assert 0.6 < keep.float().mean(-1).min() and keep.float().mean(-1).max() < 0.9  # no row all kept or all dropped
    torch.testing.assert_close(out[keep], plain[keep] / (1 - p), atol=1e-6, rtol=1e-6)
    # the backward applies the forward's mask: compare with the reference on dy * mask / (1 - p)
    _, ref_grads = run("eager", ids, tables, dy * keep / (1 - p))
    for k in GRADS:
        assert_fp32_close(grads[k], ref_grads[k], f"d{k}")
    # the same seed gives the same mask; the next call draws a new one
    torch.manual_seed(7)
    again, _ = run("auto", ids, tables, dy, dropout_p=p)
    fresh, _ = run("auto", ids, tables, dy, dropout_p=p)
    assert torch.equal(again, out) and not torch.equal(fresh != 0, keep)


def test_torch_compile_fullgraph():
    ids, tables = make((2, 7), 24)
    dy = torch.randn(2, 7, 24)

    def f(word, pos, tt, *t):
        return fb.embedding(word, tt, pos, *t, EPS, 0.0, 0) * 2

    ops.load_kernel("embedding")  # torch.compile cannot trace the import
    compiled = torch.compile(f, fullgraph=True)  # inductor: the fake and autograd registrations in use
    leaves = [t.clone().requires_grad_() for t in tables]
    out = compiled(*ids, *leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    ref, ref_grads = run("eager", ids, tables, dy * 2, padding_idx=0)
    assert_fp32_close(out.detach(), ref * 2, "compiled output")
    for k, g in zip(GRADS, grads):
        assert_fp32_close(g, ref_grads[k], f"compiled d{k}")


_COEXIST = """
import torch, sys
order = sys.argv[1]
if order == "python-first":
    import fastbert.kernels.layernorm, fastbert.kernels.embedding
else:
    import fastbert.kernels.embedding, fastbert.kernels.layernorm
assert torch.ops.fastbert.embedding_fwd.default and torch.ops.fastbert.embedding_bwd.default
names = {str(op) for op in torch.ops.fastbert}
assert names - {"embedding_fwd", "embedding_bwd"}, names  # the triton_op ones too
x = torch.randn(3, 8)
w = torch.ones(8)
y = torch.ops.fastbert.embedding_fwd(torch.tensor([1]), torch.tensor([0]), torch.tensor([2]), torch.randn(4, 8),
                                     torch.randn(4, 8), torch.randn(2, 8), w, torch.zeros(8), 1e-5, 0.0, None, None)[0]
assert y.shape == (1, 8)
print("ok", sorted(names))
"""

_NO_EXT = """
import sys
sys.modules["fastbert._C"] = None  # as if the extension were not built
import torch, fastbert
from fastbert import ops, functional as fb
kernel, why = ops.load_kernel("embedding")
assert kernel is None and "pip install --no-build-isolation -e ." in why, why
assert ops.implementation("embedding", torch.device("cpu")) is fastbert.reference.embedding
t = [torch.randn(5, 8), torch.randn(4, 8), torch.randn(2, 8), torch.ones(8), torch.zeros(8)]
assert fb.embedding(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), *t, 1e-5).shape == (1, 2, 8)
try:
    fb.embedding(torch.tensor([[1, 5]]), torch.tensor([[0, 1]]), torch.tensor([[0, 1]]), *t, 1e-5)
except ValueError as e:
    assert "input_ids contains 5" in str(e), e
else:
    raise AssertionError("no error for a bad id")
print("ok")
"""


def _python(code, *args):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr


def test_cpp_and_python_ops_share_the_namespace():
    for order in ("python-first", "cpp-first"):
        _python(_COEXIST, order)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the ELF symbols of a Linux build")
def test_extension_shares_the_cpp_runtime_with_torch():
    """fastbert._C must use the process's libstdc++, not a static copy: with a copy, a C++
    exception thrown in the extension (the bad-id ValueError) and caught in torch crashed the
    process. dlsym on the extension's handle finds its own definition first, if it has one."""
    import ctypes

    import fastbert._C

    def address(lib):
        return ctypes.cast(lib.__cxa_allocate_exception, ctypes.c_void_p).value

    assert address(ctypes.CDLL(fastbert._C.__file__)) == address(ctypes.CDLL("libstdc++.so.6"))


_OPENMP_RUNTIMES = """
import fastbert._C, torch
with open(fastbert._C.__file__, "rb") as f:
    assert b"GOMP_parallel" in f.read()
torch.ones(4096).sum()  # torch's OpenMP runtime is loaded by now
with open("/proc/self/maps") as maps:
    runtimes = {line.split()[-1] for line in maps if "/libgomp" in line or "/libiomp" in line}
assert len(runtimes) == 1, runtimes
print("ok")
"""


@pytest.mark.skipif(not sys.platform.startswith("linux") or not torch.backends.openmp.is_available(),
                    reason="reads the ELF strings and the process maps of a Linux build on OpenMP")
def test_extension_runs_on_torchs_openmp_threads():
    """``at::parallel_for`` threads come from an ``#pragma omp parallel`` compiled into the
    extension: built without ``-fopenmp`` the CPU op ran on one thread whatever
    ``torch.get_num_threads()`` said (4096x768 fp32 forward: 7.4 ms on one thread and 7.9 on two,
    then 3.3 on two). The extension must call OpenMP's runtime, and that must be torch's only
    copy: in a fresh interpreter with torch and the extension alone (in the test process,
    other libraries may have loaded their own, as scikit-learn's wheels do)."""
    _python(_OPENMP_RUNTIMES)


def test_missing_extension_falls_back_with_a_message():
    _python(_NO_EXT)
