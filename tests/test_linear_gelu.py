"""linear_gelu: the fused GEMM + bias + GELU kernel (inference) against the eager reference,
and the routing of ``fastbert.functional.linear_gelu`` (gradients, autocast, mixed dtypes)."""

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
    fb.linear_gelu(x, w, b)  # "auto" keeps cuBLAS + bias_gelu until the kernel is measured ahead
    assert len(launches) == 1
    assert ops.implementation("linear_gelu", torch.device("cuda")) is reference.linear_gelu


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
    if CUDA:
        with pytest.raises(ValueError, match="linear_gelu: weight is on cpu"):
            fb.linear_gelu(x, w.cpu(), b)


# ---------------------------------------------------------------------------------------
# The op layer, and compiled for Hopper without a GPU
# ---------------------------------------------------------------------------------------

def test_opcheck():
    x, w, b = inputs((3,), 16, 24, torch.float32)
    torch.library.opcheck(torch.ops.fastbert.linear_gelu_fwd.default, (x, w, b, False))


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
    shipped Hopper configs for many rows and for a few (one sequence), both GELU forms and
    none (linear_bias), fp16, bf16 and fp32 (exact fp32 products), K a multiple of BLOCK_K or
    not."""
    monkeypatch.setattr(lg_kernels, "_device_info", lambda device: (132, True))
    monkeypatch.setattr(lg_kernels, "max_shared_mem", lambda device: 232448)  # an H100's opt-in limit
    cuda = torch.device("cuda")
    cfg = lg_kernels.gemm_config(cuda, torch.float16, 4096, 3072, 768)
    assert cfg == lg_kernels.GemmConfig(128, 128, 64, 8, 8, 3)
    fp32 = lg_kernels.gemm_config(cuda, torch.float32, 4096, 3072, 768)
    few, few32 = (lg_kernels.gemm_config(cuda, dt, lg_kernels.FEW_ROWS, 3072, 768)
                  for dt in (torch.float16, torch.float32))
    assert few == lg_kernels.GemmConfig(64, 64, 128, 1, 4, 3) and few32.block_k == 32
    assert lg_kernels.gemm_config(cuda, torch.float16, lg_kernels.FEW_ROWS + 1, 3072, 768) == cfg
    mod = "fastbert.kernels.linear_gelu"
    specs = []
    for dt, tanh, even, c, gelu in (("fp16", False, True, cfg, True), ("bf16", True, False, cfg, True),
                                    ("fp32", False, True, fp32, True), ("fp16", False, True, cfg, False),
                                    ("fp16", False, True, few, True), ("bf16", False, False, few, False),
                                    ("fp32", False, True, few32, True)):
        args = {"X": f"*{dt}", "W": f"*{dt}", "B": f"*{dt}", "Y": f"*{dt}", "M": "i32", "N": "i32", "K": "i32",
                "stride_xm": "i32", "stride_wn": "i32"}
        specs.append((mod, "_linear_gelu_fwd", args,
                      {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "BLOCK_K": c.block_k, "GROUP_M": c.group_m,
                       "TANH": tanh, "EVEN_K": even, "IEEE": dt == "fp32", "GELU": gelu}, c.num_warps))
    for dt, tanh, persistent, gelu in (("fp16", False, False, True), ("bf16", True, True, True),
                                       ("fp16", False, True, False)):  # the TMA variant (tune.py's candidates)
        args = {"X": f"tensordesc<{dt}[128, 64]>", "W": f"tensordesc<{dt}[128, 64]>", "B": f"*{dt}", "Y": f"*{dt}",
                "M": "i32", "N": "i32", "K": "i32"}
        specs.append((mod, "_linear_gelu_tma", args, {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8,
                                                      "TANH": tanh, "PERSISTENT": persistent, "GELU": gelu}, 8))
    assert_compiles_for_hopper(specs, tmp_path)


# ---------------------------------------------------------------------------------------
# The TMA variant: tiles loaded by Hopper's tensor memory accelerator (a sweep candidate)
# ---------------------------------------------------------------------------------------

def tma_config(per_sm: int) -> "lg_kernels.GemmConfig":
    return lg_kernels.GemmConfig(128, 128, 64, 8, 8, 3, True, per_sm) if CUDA else \
        lg_kernels.GemmConfig(16, 32, 16, 2, 1, 1, True, per_sm)


def launched_kernels(monkeypatch) -> list:
    """The names of the kernels the linear_gelu launcher starts from now on."""
    names, launch = [], lg_kernels.launch
    monkeypatch.setattr(lg_kernels, "launch", lambda kernel, *a, **k: (names.append(kernel.__name__),
                                                                       launch(kernel, *a, **k)))
    return names


@pytest.mark.parametrize("dtype", [torch.float16] + ([torch.bfloat16] if CUDA else []),
                         ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("per_sm", [0, 1, 2], ids=["per-tile", "persistent", "persistent-2"])
@pytest.mark.parametrize("lead,k,n", [((37,), 48, 80), ((2, 3), 40, 24), ((1,), 16, 16), ((70,), 200, 136)])
def test_tma_kernel_matches_reference(monkeypatch, lead, k, n, per_sm, dtype):
    """Odd row counts, K not a multiple of BLOCK_K (TMA's zero fill past the edge), several
    tiles per persistent program; the TMA kernel is the one that ran (on a GPU: a Hopper)."""
    if CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs a Hopper or newer GPU")
    monkeypatch.setattr(lg_kernels, "gemm_config", lambda *a: tma_config(per_sm))
    names = launched_kernels(monkeypatch)
    for approximate in ("none", "tanh"):
        check_parity(lead, k, n, approximate, dtype)
    x, w, b = inputs(lead, k, n, dtype)
    out = lg_kernels.linear_bias(x, w, b)
    assert_lowp_close(out, F.linear(x, w, b), F.linear(x.double(), w.double(), b.double()), ATOL[dtype] * max(1.0, k / 64))
    assert set(names) == {"_linear_gelu_tma"}


def test_tma_kernel_falls_back_to_pointer_loads(monkeypatch):
    """Rows that do not start on 16 bytes (K = 20 halves) and fp32 inputs take the pointer
    kernel under a TMA config, with the same answer."""
    monkeypatch.setattr(lg_kernels, "gemm_config", lambda *a: tma_config(0))
    names = launched_kernels(monkeypatch)
    check_parity((9,), 20, 24, "none", torch.float16)
    check_parity((9,), 32, 24, "none", torch.float32)
    x, w, b = inputs((9,), 64, 24, torch.float16)
    lg_kernels.linear_gelu(x[:, 8:40], w[:, :32], b)  # a column slice: rows 128 bytes apart, 16-byte aligned
    assert names == ["_linear_gelu_fwd", "_linear_gelu_fwd", "_linear_gelu_tma"]


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
    ("auto"): the same hidden states within fp16 rounding of the GELU's input."""
    torch.manual_seed(0)
    model = fastbert.BertModel(fastbert.BertConfig(num_hidden_layers=2)).to("cuda", torch.float16).eval()
    ids = torch.randint(1, 30000, (4, 64), device="cuda")
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
