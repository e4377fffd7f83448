"""linear and linear_gelu: fastbert's GEMM (inference), with the bias and the GELU in its
epilogue and K split across programs for a few rows, against the eager reference, and the
routing of ``fastbert.functional.linear`` and ``linear_gelu`` (gradients, autocast, mixed
dtypes, the row count "auto" takes the kernel for)."""

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import functional as fb
from fastbert import ops, reference
from fastbert.kernels import layernorm as kernels
from fastbert.kernels import linear_gelu as lg_kernels
from test_layernorm import assert_compiles_for_hopper
from utils import ATOL, CUDA, DEVICE, DTYPES, assert_lowp_close, dtype_params, randn

APPROX = pytest.mark.parametrize("approximate", ["none", "tanh"])


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    """Every buffer the launcher allocates starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(kernels, "DEBUG_FILL_NAN", True)


def inputs(lead, k, n, dtype, device=DEVICE):
    x = randn(*lead, k, scale=2.0).to(dtype)
    w = randn(n, k, scale=max(k, 1) ** -0.5 * 2).to(dtype)
    b = randn(n).to(dtype)
    return x, w, b


def check_parity(lead, k, n, approximate, dtype):
    x, w, b = inputs(lead, k, n, dtype)
    with torch.no_grad(), fastbert.use_backend("triton"):
        out = fb.linear_gelu(x, w, b, approximate)
    same = reference.linear_gelu(x, w, b, approximate) if dtype == torch.float32 else \
        F.gelu(F.linear(x, w, b), approximate=approximate)  # PyTorch in the same dtype
    ref = reference.linear_gelu(x.double(), w.double(), b.double(), approximate)
    assert out.dtype == dtype and out.shape == (*lead, n)
    assert_lowp_close(out, same, ref, ATOL[dtype] * max(1.0, k / 64))


# ---------------------------------------------------------------------------------------
# The kernel (the interpreter on the CPU, the GPU where there is one)
# ---------------------------------------------------------------------------------------

@dtype_params()
@APPROX
@pytest.mark.parametrize("lead,k,n", [((5,), 24, 40), ((33,), 40, 17), ((2, 7), 32, 96), ((1,), 16, 16),
                                      ((70,), 48, 33)])
def test_matches_reference(lead, k, n, approximate, dtype):
    check_parity(lead, k, n, approximate, dtype)


@dtype_params()
def test_the_gemm_without_its_gelu(dtype):
    """linear_bias, the benchmarks' way to time the main loop alone: the same GEMM with the
    bias and no GELU, as close to the truth as F.linear in the same dtype."""
    for lead, k, n in (((33,), 40, 17), ((2, 7), 32, 96)):
        x, w, b = inputs(lead, k, n, dtype)
        out = lg_kernels.linear_bias(x, w, b)
        ref = F.linear(x.double(), w.double(), b.double())
        same = ref.to(dtype) if dtype == torch.float32 else F.linear(x, w, b)
        assert out.dtype == dtype and out.shape == (*lead, n)
        assert_lowp_close(out, same, ref, ATOL[dtype] * max(1.0, k / 64))
    x, w, b = inputs((3,), 0, 5, dtype)
    assert torch.equal(lg_kernels.linear_bias(x, w, b), b.expand(3, 5))


@dtype_params()
def test_padded_rows(dtype):
    """Rows of zeros (the padded positions of an unpacked batch) give gelu(bias) exactly as
    the reference does; the rows around them are unaffected."""
    x, w, b = inputs((4, 9), 40, 72, dtype)
    x[1, 5:] = 0
    x[3] = 0  # a fully padded sequence
    with torch.no_grad(), fastbert.use_backend("triton"):
        out = fb.linear_gelu(x, w, b)
    ref = reference.linear_gelu(x.double(), w.double(), b.double())
    assert_lowp_close(out, F.gelu(F.linear(x, w, b)), ref, ATOL[dtype] * 2)
    torch.testing.assert_close(out[3], reference.bias_gelu(torch.zeros_like(out[3]), b), atol=ATOL[dtype], rtol=0)


def test_strided_inputs_and_mixed_bias_dtype():
    x, w, b = inputs((6,), 40, 24, torch.float16)
    wide = randn(6, 80).half()
    x = wide[:, ::2]  # non-contiguous rows
    wt = randn(40, 24).half().t()  # a transposed weight (column-major)
    with torch.no_grad(), fastbert.use_backend("triton"):
        out = fb.linear_gelu(x, wt, b.float())
    ref = reference.linear_gelu(x.double(), wt.double(), b.double())
    same = F.gelu(F.linear(x, wt, b))
    assert_lowp_close(out, same, ref, ATOL[torch.float16])


def test_empty_shapes():
    with torch.no_grad(), fastbert.use_backend("triton"):
        x, w, b = inputs((0,), 16, 8, torch.float32)
        assert fb.linear_gelu(x, w, b).shape == (0, 8)
        x, w, b = inputs((3,), 0, 8, torch.float32)  # an empty product: gelu(bias)
        torch.testing.assert_close(fb.linear_gelu(x, w, b), F.gelu(b).expand(3, 8))


# ---------------------------------------------------------------------------------------
# Split K: a few rows, K shared by several programs of each tile
# ---------------------------------------------------------------------------------------

def _grids(monkeypatch):
    grids = []
    real = lg_kernels.launch
    monkeypatch.setattr(lg_kernels, "launch", lambda kernel, grid, *a, **k: (grids.append(grid), real(kernel, grid, *a, **k)))
    return grids


@dtype_params()
@pytest.mark.parametrize("gelu", [True, False], ids=["gelu", "linear"])
@pytest.mark.parametrize("lead,k,n,bias", [((5,), 100, 20, True), ((2, 3), 64, 30, False), ((1,), 200, 8, True)])
def test_split_k_matches_reference(monkeypatch, lead, k, n, bias, gelu, dtype):
    """Few rows and tiles: each tile's K is split (odd K too, the last chunk shorter), the last
    program to arrive sums the partials, and every counter is back at zero afterwards."""
    monkeypatch.setattr(lg_kernels, "_device_info", lambda device: (8, False))  # 8 SMs to fill
    grids = _grids(monkeypatch)
    x, w, b = inputs(lead, k, n, dtype)
    b = b if bias or gelu else None
    with torch.no_grad(), fastbert.use_backend("triton"):
        out = fb.linear_gelu(x, w, b) if gelu else fb.linear(x, w, b)
    ref = (reference.linear_gelu if gelu else reference.linear)(x.double(), w.double(), None if b is None else b.double())
    same = F.linear(x, w, b)
    same = F.gelu(same) if gelu else same
    assert grids[-1][1] > 1, grids  # K was split
    assert out.shape == (*lead, n) and out.dtype == dtype
    assert_lowp_close(out, same, ref, ATOL[dtype] * max(1.0, k / 64))
    assert all(int(c.abs().sum()) == 0 for c in lg_kernels._COUNTERS.values())


def test_split_k_is_deterministic_and_matches_one_program_per_tile(monkeypatch):
    """The partials are summed in one order whichever program arrives last: the same bits on
    every call, and within fp32 rounding of the unsplit GEMM."""
    x, w, b = inputs((7,), 256, 24, torch.float32)
    with torch.no_grad(), fastbert.use_backend("triton"):
        first, again = fb.linear(x, w, b), fb.linear(x, w, b)
        monkeypatch.setattr(lg_kernels, "split_k", lambda *a: 1)
        whole = fb.linear(x, w, b)
    assert torch.equal(first, again)
    torch.testing.assert_close(first, whole, atol=1e-5, rtol=1e-5)


def test_split_k_choice(monkeypatch):
    """Enough programs to give each SM one, at least two K steps each, never an empty chunk;
    no split once the tiles alone fill the GPU."""
    monkeypatch.setattr(lg_kernels, "_device_info", lambda device: (132, True))
    cfg, gpu, split_k = lg_kernels.GemmConfig(64, 64, 128, 1, 4, 3, 8), torch.device("cuda"), lg_kernels.split_k
    assert split_k(cfg, gpu, 24, 3072) == 5  # 128 rows, 768 columns: 24 tiles of 24 K steps
    assert split_k(cfg, gpu, 24, 768) == 3  # 6 K steps: 3 programs of 2
    assert split_k(cfg, gpu, 96, 768) == 1  # 132 // 96
    assert split_k(cfg, gpu, 200, 3072) == 1
    assert split_k(cfg._replace(split_k=4), gpu, 2, 3072) == 4
    for tiles in range(1, 140):
        for k in (1, 127, 128, 129, 700, 3072):
            split, steps = split_k(cfg, gpu, tiles, k), lg_kernels.cdiv(k, 128)
            assert 1 <= split <= 8 and (split - 1) * lg_kernels.cdiv(steps, split) < steps


# ---------------------------------------------------------------------------------------
# Routing: the kernel only where nothing needs a gradient
# ---------------------------------------------------------------------------------------

def _count_launches(monkeypatch):
    calls = []
    real = lg_kernels.launch
    monkeypatch.setattr(lg_kernels, "launch", lambda *a, **k: (calls.append(1), real(*a, **k)))
    return calls


def test_gradients_go_through_the_gemm_and_bias_gelu(monkeypatch):
    launches = _count_launches(monkeypatch)
    x, w, b = inputs((9,), 24, 40, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with fastbert.use_backend("triton"):
        out = fb.linear_gelu(*leaves, "tanh")
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert not launches
    ref_leaves = [t.double().requires_grad_() for t in (x, w, b)]
    ref = reference.linear_gelu(*ref_leaves, "tanh")
    ref_grads = torch.autograd.grad(ref, ref_leaves, torch.ones_like(ref))
    torch.testing.assert_close(out, ref.float(), atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r.float(), atol=1e-4, rtol=1e-4)


def test_the_kernel_runs_without_grad_and_only_where_selected(monkeypatch):
    launches = _count_launches(monkeypatch)
    x, w, b = inputs((9,), 24, 40, torch.float32)
    with fastbert.use_backend("triton"):
        fb.linear_gelu(x, w, b)  # no input needs a gradient
    assert len(launches) == 1
    with torch.autocast(x.device.type, dtype=torch.bfloat16), fastbert.use_backend("triton"):
        y = fb.linear_gelu(x, w, b)  # autocast: the GEMM in bf16, as F.linear would
    assert y.dtype == torch.bfloat16
    with fastbert.use_backend("eager"):
        fb.linear_gelu(x, w, b)
    fb.linear_gelu(x, w, b)  # "auto" on the CPU: F.linear + bias_gelu
    assert len(launches) == 1
    # On the GPU "auto" takes the kernel up to SMALL_M rows and cuBLAS (+ bias_gelu) above.
    cuda = torch.device("cuda")
    for op in ("linear", "linear_gelu"):
        assert ops.OPS[op].auto_rows == lg_kernels.SMALL_M
        assert ops.implementation(op, cuda) is ops.OPS[op].reference
        assert ops.implementation(op, cuda, rows=lg_kernels.SMALL_M + 1) is ops.OPS[op].reference
        assert ops.implementation(op, cuda, rows=lg_kernels.SMALL_M) is ops.load_kernel(op)[0]


def test_linear_routing(monkeypatch):
    """fb.linear: the kernel without grad where selected; F.linear (autograd, autocast) otherwise."""
    launches = _count_launches(monkeypatch)
    x, w, b = inputs((9,), 24, 40, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b)]
    with fastbert.use_backend("triton"):
        out = fb.linear(*leaves)
        assert not launches and out.grad_fn is not None
        grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
        ref = torch.autograd.grad(F.linear(*leaves), leaves, torch.ones_like(out))
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            assert fb.linear(x, w, b).dtype == torch.bfloat16 and not launches
        torch.testing.assert_close(fb.linear(x, w), F.linear(x, w), atol=1e-5, rtol=1e-5)
        assert len(launches) == 1
    with fastbert.use_backend("eager"):
        fb.linear(x, w, b)
    assert len(launches) == 1


def test_bad_arguments():
    x, w, b = inputs((4,), 8, 6, torch.float32)
    with pytest.raises(ValueError, match=r"linear_gelu: weight must have shape \(out_features, 8\)"):
        fb.linear_gelu(x, w.t(), b)
    with pytest.raises(ValueError, match=r"linear_gelu: bias must have shape \(6,\)"):
        fb.linear_gelu(x, w, b[:5])
    with pytest.raises(ValueError, match="linear_gelu: x must be float16, bfloat16, float32 or float64"):
        fb.linear_gelu(x.long(), w, b)
    with pytest.raises(ValueError, match="linear_gelu: weight is torch.float64 but x is torch.float32"):
        fb.linear_gelu(x, w.double(), b)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        fb.linear_gelu(x, w, b, "erf")
    with pytest.raises(ValueError, match="linear_gelu: x must have at least one dim"):
        fb.linear_gelu(x[0, 0], w, b)
    with pytest.raises(ValueError, match="linear_gelu: bias must be a tensor, got None"):
        fb.linear_gelu(x, w, None)
    with pytest.raises(ValueError, match=r"linear: weight must have shape \(out_features, 8\)"):
        fb.linear(x, w.t())
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(6,\)"):
        fb.linear(x, w, b[:5])
    with pytest.raises(ValueError, match="linear: x must be float16, bfloat16, float32 or float64"):
        fb.linear(x.int(), w)
    if CUDA:
        with pytest.raises(ValueError, match="linear_gelu: weight is on cpu"):
            fb.linear_gelu(x, w.cpu(), b)
        with pytest.raises(ValueError, match="linear: bias is on cpu"):
            fb.linear(x, w, b.cpu())


# ---------------------------------------------------------------------------------------
# The op layer, and compiled for Hopper without a GPU
# ---------------------------------------------------------------------------------------

def test_opcheck():
    x, w, b = inputs((3,), 16, 24, torch.float32)
    torch.library.opcheck(torch.ops.fastbert.linear_gelu_fwd.default, (x, w, b, False))
    torch.library.opcheck(torch.ops.fastbert.linear_fwd.default, (x, w, b))
    torch.library.opcheck(torch.ops.fastbert.linear_fwd.default, (x, w, None))


def test_torch_compile_fullgraph():
    ops.load_kernel("linear_gelu")
    x, w, b = inputs((5,), 16, 24, torch.float32)

    def f(x):
        return fb.linear_gelu(x, w, b) * 2

    backend = "inductor" if CUDA else "aot_eager"
    with torch.no_grad(), fastbert.use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True, backend=backend)(x)
        eager = f(x)
    torch.testing.assert_close(compiled, eager)


def test_compiles_for_hopper(monkeypatch, tmp_path):
    """Compiled for sm_90 and sm_80 without a GPU (see tests/test_layernorm.py), at the
    shipped Hopper configs, both GELU forms and none (linear, linear_bias), with and without
    a bias, fp16, bf16 and fp32 (exact fp32 products), K a multiple of BLOCK_K or not, and
    the small-batch configs with K split (their arrival counters and the reduction)."""
    monkeypatch.setattr(lg_kernels, "_device_info", lambda device: (132, True))
    monkeypatch.setattr(lg_kernels, "max_shared_mem", lambda device: 232448)  # an H100's opt-in limit
    cuda = torch.device("cuda")
    cfg = lg_kernels.gemm_config(cuda, torch.float16, 4096, 3072, 768)
    assert cfg == lg_kernels.GemmConfig(128, 128, 64, 8, 8, 3)
    small = lg_kernels.gemm_config(cuda, torch.float16, 128, 768, 3072)
    assert small.block_m == 64 and small.split_k > 1
    fp32 = lg_kernels.gemm_config(cuda, torch.float32, 4096, 3072, 768)
    small32 = lg_kernels.gemm_config(cuda, torch.float32, 128, 768, 3072)
    assert (small.block_k, small32.block_k) == (128, 32)
    mod = "fastbert.kernels.linear_gelu"
    specs = []
    for dt, tanh, even, c, gelu, bias, split in (
            ("fp16", False, True, cfg, True, True, 1), ("bf16", True, False, cfg, True, True, 1),
            ("fp32", False, True, fp32, True, True, 1), ("fp16", False, True, cfg, False, True, 1),
            ("fp16", False, True, small, True, True, 6), ("bf16", False, False, small, False, False, 4),
            ("fp32", False, True, small32, False, True, 6)):
        args = {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "Y": f"*{dt}", "P": "*fp32", "C": "*i32", "M": "i32",
                "N": "i32", "K": "i32", "K_CHUNK": "i32", "stride_xm": "i32", "stride_wn": "i32"}
        specs.append((mod, "_linear_gelu_fwd", args,
                      {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": c.group_m,
                       "SPLIT_K": split, "TANH": tanh, "EVEN_K": even, "IEEE": dt == "fp32", "HAS_BIAS": bias,
                       "GELU": gelu}, c.num_warps))
    assert_compiles_for_hopper(specs, tmp_path)


def test_stages_fit_shared_memory(monkeypatch):
    """Fewer pipeline stages where shared memory is small: 64 KB (a Turing GPU) holds one
    stage of fp32 128×128×32 tiles; 99 KB (consumer Ampere) three of fp16, two of fp32."""
    monkeypatch.setattr(lg_kernels, "_device_info", lambda device: (40, False))
    cuda = torch.device("cuda")
    monkeypatch.setattr(lg_kernels, "max_shared_mem", lambda device: 64 * 1024)
    assert lg_kernels.gemm_config(cuda, torch.float32, 4096, 3072, 768).num_stages == 1
    monkeypatch.setattr(lg_kernels, "max_shared_mem", lambda device: 99 * 1024)
    assert lg_kernels.gemm_config(cuda, torch.float16, 4096, 3072, 768).num_stages == 3
    assert lg_kernels.gemm_config(cuda, torch.float32, 4096, 3072, 768).num_stages == 2


# ---------------------------------------------------------------------------------------
# GPU: BERT shapes, bf16, the model
# ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(4096, 768, 3072), (4096, 1024, 4096), (77, 768, 3072), (300, 768, 768),
                                   (128, 768, 3072), (1, 1024, 4096)],
                         ids=lambda s: "x".join(map(str, s)))
@APPROX
def test_gpu_matches_reference(shape, approximate, dtype):
    m, k, n = shape
    check_parity((m,), k, n, approximate, dtype)


@pytest.mark.gpu
def test_gpu_model_inference_with_the_fused_ffn():
    """BertModel (fp16) with the fused expansion under "triton" against cuBLAS + bias_gelu
    ("auto" at 512 rows): the same hidden states within fp16 rounding of the GELU's input."""
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(num_hidden_layers=2)).to("cuda", torch.float16).eval()
    ids = torch.randint(1, 30000, (8, 64), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 40:] = 0
    with torch.no_grad():
        expected = model(ids, attention_mask=mask).last_hidden_state
        with fastbert.use_backend("triton"):
            got = model(ids, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expected[keep], atol=3e-2, rtol=1e-2)


@pytest.mark.gpu
def test_gpu_tanh_gelu_model_matches_hf_in_fp16():
    """A gelu_new BertModel in fp16 under "auto" is as close to the fp32 model as
    transformers' own fp16 model is."""
    import copy
    from hf_bert import PADDINGS, config_kwargs, inputs as hf_inputs, twins
    hf, ours = twins("BertModel", **config_kwargs("h96-6h-3l-gelu_new", hidden_size=256, num_attention_heads=4,
                                                   intermediate_size=1024))
    hf, ours = hf.cuda().eval(), ours.cuda().half().eval()
    hf16 = copy.deepcopy(hf).half()
    ids, tt, mask = (t.cuda() for t in hf_inputs(PADDINGS["mixed"]))
    with torch.no_grad():
        ref = hf(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        theirs = hf16(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
        got = ours(ids, token_type_ids=tt, attention_mask=mask).last_hidden_state
    keep = mask.bool()
    err = (got[keep].double() - ref[keep].double()).abs().max().item()
    hf_err = (theirs[keep].double() - ref[keep].double()).abs().max().item()
    assert err <= 2 * hf_err + 1e-2, (err, hf_err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(128, 768, 2304), (128, 768, 768), (128, 3072, 768), (1, 768, 768), (256, 1024, 1024),
                                   (37, 500, 300)], ids=lambda s: "x".join(map(str, s)))
def test_gpu_linear_matches_reference(shape, dtype):
    """fb.linear under "auto" at a BERT layer's shapes for one sequence (K split), against
    cuBLAS in the same dtype and fp64; without a bias too."""
    m, k, n = shape
    x, w, b = inputs((m,), k, n, dtype)
    with torch.no_grad():
        for bias in (b, None):
            out = fb.linear(x, w, bias)
            ref = F.linear(x.double(), w.double(), None if bias is None else bias.double())
            assert_lowp_close(out, F.linear(x, w, bias), ref, ATOL[dtype] * max(1.0, k / 64))
    assert all(int(c.abs().sum()) == 0 for c in lg_kernels._COUNTERS.values())


@pytest.mark.gpu
def test_gpu_split_k_in_a_cuda_graph(monkeypatch):
    """Captured before any split-K launch made the counters (one program per tile then) and
    after, warmed up on another stream as PyTorch asks: each replay gives the eager result,
    and the counters end at zero."""
    grids = _grids(monkeypatch)
    x, w, b = inputs((128,), 3072, 768, torch.float16)
    with torch.no_grad():
        eager = fb.linear(x, w, b)
        for fresh in (True, False):
            if fresh:
                lg_kernels._COUNTERS.clear()
            else:
                side = torch.cuda.Stream()
                with torch.cuda.stream(side):
                    fb.linear(x, w, b)  # warm-up: makes the counters
                torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fb.linear(x, w, b)
            assert (grids[-1][1] == 1) == fresh, grids
            for _ in range(3):
                graph.replay()
                torch.cuda.synchronize()
                torch.testing.assert_close(out, eager, atol=2e-3, rtol=2e-3)
    assert all(int(c.abs().sum()) == 0 for c in lg_kernels._COUNTERS.values())


@pytest.mark.gpu
def test_gpu_one_sequence_model_matches_eager():
    """BERT-base at B=1 S=128, fp16: "auto" (the GEMMs with K split) against the "eager"
    backend (cuBLAS and PyTorch ops) within fp16 rounding."""
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(num_hidden_layers=4)).to("cuda", torch.float16).eval()
    ids = torch.randint(1, 30000, (1, 128), device="cuda")
    with torch.no_grad():
        got = model(ids).last_hidden_state
        with fastbert.use_backend("eager"):
            expected = model(ids).last_hidden_state
    torch.testing.assert_close(got, expected, atol=3e-2, rtol=1e-2)
