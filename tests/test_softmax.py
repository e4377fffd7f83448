"""softmax_mask: the Triton kernel (through fastbert.functional under the "triton" backend)
against the eager reference: both mask layouts, -inf and finfo.min masks, fully masked and
length-1 rows, the scores gradient, and dropout."""

import pytest
import torch

import fastbert
from fastbert import functional as fb
from fastbert import reference
from fastbert.kernels import layernorm as kernels
from test_layernorm import assert_compiles_for_hopper, hopper_config
from utils import ATOL, DEVICE, DTYPES, assert_lowp_close, dtype_params, randn

SCALE = 0.125


@pytest.fixture(autouse=True)
def _nan_filled_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN, so an unwritten element fails."""
    monkeypatch.setattr(kernels, "DEBUG_FILL_NAN", True)


def padding_mask(lengths, s, dtype, fill="min"):
    """HF's (B, 1, 1, S) additive mask: 0 for real keys, finfo.min (or -inf) for padding."""
    keep = torch.arange(s, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    value = torch.finfo(dtype).min if fill == "min" else float("-inf")
    return torch.zeros(len(lengths), 1, 1, s, dtype=dtype, device=DEVICE).masked_fill(~keep[:, None, None, :], value)


def square_mask(b, s, dtype, q=None):
    """A (B, 1, Q, S) mask (Q = S unless given): random additive values, some -inf, one fully
    masked query row."""
    q = s if q is None else q
    mask = randn(b, 1, q, s).masked_fill(torch.rand(b, 1, q, s, device=DEVICE) < 0.3, float("-inf"))
    mask[0, 0, min(2, q - 1), :] = float("-inf")
    return mask.to(dtype)


def run(backend, scores, mask, dy, dtype, dropout_p=0.0):
    s = scores.to(dtype).requires_grad_()
    with fastbert.use_backend(backend):
        out = fb.softmax_mask(s, mask, SCALE, dropout_p)
    ds, = torch.autograd.grad(out, (s,), dy.to(out.dtype))
    return out.detach(), ds


def check_parity(scores, mask, dtype):
    dy = randn(*scores.shape)
    out, ds = run("triton", scores, mask, dy, dtype)
    same, same_ds = run("eager", scores, mask, dy, dtype)
    # float64 copies of the inputs the kernel saw; the mask keeps its dtype (it decides what is masked)
    ref, ref_ds = run("eager", scores.to(dtype), mask, dy.to(dtype), torch.float64)
    assert out.dtype == ds.dtype == dtype
    assert_lowp_close(out, same, ref, ATOL[dtype])
    assert_lowp_close(ds, same_ds, ref_ds, ATOL[dtype], what="dscores")
    return out, ds


@dtype_params()
@pytest.mark.parametrize("fill", ["min", "-inf"])
def test_padding_mask(fill, dtype):
    # no padding, some padding, one real key, no real key at all
    mask = padding_mask([37, 20, 1, 0], 37, dtype, fill)
    out, ds = check_parity(randn(4, 3, 37, 37, scale=4.0), mask, dtype)
    assert torch.equal(out[3], torch.zeros_like(out[3])) and torch.equal(ds[3], torch.zeros_like(ds[3]))
    assert torch.equal(out[2, :, :, 0], torch.ones_like(out[2, :, :, 0]))
    assert (out[1, ..., 20:] == 0).all()


@dtype_params()
def test_square_mask(dtype):
    out, ds = check_parity(randn(2, 3, 37, 37, scale=4.0), square_mask(2, 37, dtype), dtype)
    assert (out[0, :, 2] == 0).all() and (ds[0, :, 2] == 0).all()


@dtype_params()
def test_no_mask(dtype):
    check_parity(randn(3, 5, 96, scale=4.0), None, dtype)


def test_mask_dtype_differs_from_scores():
    """An fp32 mask with fp16 scores and an fp16 mask (finfo(fp16).min) with fp32 scores."""
    check_parity(randn(3, 2, 9, 37), padding_mask([37, 5, 0], 37, torch.float32), torch.float16)
    check_parity(randn(3, 2, 9, 37), padding_mask([37, 5, 0], 37, torch.float16), torch.float32)


def test_length_one_rows_and_other_layouts():
    check_parity(randn(3, 2, 5, 1), padding_mask([1, 0, 1], 1, torch.float32), torch.float32)
    # a mask broadcast over keys and one over the batch
    check_parity(randn(2, 3, 7, 11), randn(2, 1, 7, 1), torch.float32)
    check_parity(randn(2, 3, 7, 11), randn(7, 11), torch.float32)


def test_fp16_scores_never_overflow():
    scores = torch.tensor([[60000.0, -60000.0, 65000.0, 0.0]], device=DEVICE, dtype=torch.float16)
    with fastbert.use_backend("triton"):
        out = fb.softmax_mask(scores, None, 4.0)
    assert torch.isfinite(out).all()
    assert out[0, 2] == 1 and out[0, :2].sum() == 0


def test_non_contiguous_scores_and_broadcast_gradient():
    scores = randn(2, 37, 3, 37).transpose(1, 2).requires_grad_()  # (2, 3, 37, 37), not contiguous
    mask = padding_mask([30, 37], 37, torch.float32)
    with fastbert.use_backend("triton"):
        (fb.softmax_mask(scores, mask, SCALE) * torch.arange(37.0, device=DEVICE)).sum().backward()
    ref = scores.detach().contiguous().double().requires_grad_()
    with fastbert.use_backend("eager"):
        (fb.softmax_mask(ref, mask, SCALE) * torch.arange(37.0, device=DEVICE)).sum().backward()
    torch.testing.assert_close(scores.grad, ref.grad.float(), atol=1e-5, rtol=1e-5)


def test_empty_input():
    out, ds = run("triton", randn(0, 3, 5, 5), None, randn(0, 3, 5, 5), torch.float32)
    assert out.shape == ds.shape == (0, 3, 5, 5)


def test_reference_keeps_nan_and_zeroes_fully_masked_rows():
    """The eager reference gives zeros only to rows whose every key is masked; a NaN score
    stays visible (a NaN row), as softmax gives it without a mask."""
    scores = torch.randn(1, 1, 3, 4)
    scores[0, 0, 0, 1] = float("nan")
    mask = torch.zeros(1, 1, 3, 4)
    mask[0, 0, 2] = torch.finfo(torch.float32).min
    p = reference.softmax_mask(scores, mask)
    assert p[0, 0, 0].isnan().all() and torch.isfinite(p[0, 0, 1]).all() and not p[0, 0, 2].any()


def test_refuses_what_it_cannot_run():
    with fastbert.use_backend("triton"):
        with pytest.raises(ValueError, match="float64"):
            fb.softmax_mask(randn(2, 8, dtype=torch.float64))
        with pytest.raises(ValueError, match="too long"):
            fb.softmax_mask(randn(1, kernels.MAX_N + 1))


def test_dropout_mask_is_consistent_between_forward_and_backward():
    """The dropped positions are the zeros of the output; with that keep mask a float64
    computation reproduces the output and the scores gradient; keep rate 1-p within 5 sigma."""
    p = 0.2
    scores, dy, mask = randn(3, 2, 37, 37), randn(3, 2, 37, 37), padding_mask([37, 30, 0], 37, torch.float32)
    out, ds = run("triton", scores, mask, dy, torch.float32, dropout_p=p)
    s64 = scores.double().requires_grad_()
    with fastbert.use_backend("eager"):
        probs = fb.softmax_mask(s64, mask, SCALE)
    real = probs.detach() > 0
    keep = out != 0
    kept = keep[real].float()
    assert abs(kept.mean().item() - (1 - p)) < 5 * (p * (1 - p) / kept.numel()) ** 0.5
    expected = probs * keep / (1 - p)
    ref_ds, = torch.autograd.grad(expected, (s64,), dy.double())
    torch.testing.assert_close(out, expected.detach().float(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ds, ref_ds.float(), atol=1e-6, rtol=1e-5)


def test_dropout_follows_the_torch_seed():
    scores, dy = randn(2, 3, 5, 37), randn(2, 3, 5, 37)
    torch.manual_seed(7)
    a, da = run("triton", scores, None, dy, torch.float32, dropout_p=0.5)
    torch.manual_seed(7)
    b, db = run("triton", scores, None, dy, torch.float32, dropout_p=0.5)
    c, _ = run("triton", scores, None, dy, torch.float32, dropout_p=0.5)
    assert torch.equal(a, b) and torch.equal(da, db)
    assert not torch.equal(a, c)


def test_opcheck():
    s, mask = randn(2, 3, 4, 5, requires_grad=True), padding_mask([5, 2], 5, torch.float32)
    torch.library.opcheck(torch.ops.fastbert.softmax_mask_fwd.default, (s, mask, 0.5, 0.0, None))
    _, lse = torch.ops.fastbert.softmax_mask_fwd(s, mask, 0.5, 0.0, None)
    torch.library.opcheck(torch.ops.fastbert.softmax_mask_bwd.default, (randn(2, 3, 4, 5), s, mask, lse, 0.5, 0.0, None),
                          test_utils=("test_schema", "test_faketensor"))


def test_compiles_for_hopper(monkeypatch, tmp_path):
    """Compiled for sm_90 without a GPU (see tests/test_layernorm.py): mask and dropout on."""
    mod = "fastbert.kernels.softmax"
    common = {"MASK": "*fp32", "LSE": "*fp32", "SEED": "*i64", "M": "i32", "N": "i32", "D1": "i32", "D2": "i32",
              "ms0": "i32", "ms1": "i32", "ms2": "i32", "msn": "i32", "scale": "fp32", "mask_min": "fp32",
              "p": "fp32", "drop_scale": "fp32"}
    (fm, fn, fwarps), (bm, bn, warps) = hopper_config(monkeypatch, 128, forward=True), hopper_config(monkeypatch, 128)
    flags = {"HAS_MASK": True, "DROPOUT": True}
    assert_compiles_for_hopper([
        (mod, "_softmax_mask_fwd", dict(common, S="*fp16", Y="*fp16"), dict(flags, BLOCK_M=fm, BLOCK_N=fn), fwarps),
        (mod, "_softmax_mask_bwd", dict(common, DY="*fp16", S="*fp16", DS="*fp16"), dict(flags, BLOCK_M=bm, BLOCK_N=bn),
         warps),
    ], tmp_path)


# ---------------------------------------------------------------------------------------
# GPU: BERT shapes, bf16, long rows, torch.compile
# ---------------------------------------------------------------------------------------

GPU_CASES = ([((32, 12, 128, 128), layout, d) for d in DTYPES for layout in ("padding", "square")]  # BERT-base
             + [((4, 16, 512, 512), "padding", torch.float16), ((2, 2, 3, 4096), "square", torch.bfloat16)])


@pytest.mark.gpu
@pytest.mark.parametrize("shape,layout,dtype", GPU_CASES,
                         ids=lambda c: "x".join(map(str, c)) if isinstance(c, tuple) else str(c).split(".")[-1])
def test_gpu_matches_reference(shape, layout, dtype):
    b, s = shape[0], shape[-1]
    lengths = torch.randint(0, s + 1, (b,)).tolist()
    mask = padding_mask(lengths, s, dtype) if layout == "padding" else square_mask(b, s, dtype, q=shape[-2])
    check_parity(randn(*shape, scale=4.0), mask, dtype)


@pytest.mark.gpu
def test_gpu_longest_rows():
    check_parity(randn(3, kernels.MAX_N, scale=4.0), None, torch.float16)


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph_with_dropout():
    fastbert.ops.load_kernel("softmax_mask")
    scores, mask = randn(4, 12, 128, 128, dtype=torch.float16), padding_mask([128, 100, 3, 64], 128, torch.float16)

    def f(s):
        return fastbert.functional.softmax_mask(s, mask, SCALE, 0.1)

    with fastbert.use_backend("triton"):
        compiled = torch.compile(f, fullgraph=True)
        s = scores.clone().requires_grad_()
        a = compiled(s)
        b = compiled(s)
        a.float().sum().backward()
    assert not torch.equal(a, b)  # a fresh seed on every call, not one frozen into the graph
    assert torch.isfinite(s.grad).all()
