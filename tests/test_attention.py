"""Fused attention (kernels/attention.py) against the eager reference: forward and dq, dk, dv,
padded and packed layouts, masks, dropout, custom-op registration, and the model on top.

On the CPU the Triton kernels run under the interpreter (small blocks), so shapes are tiny
and odd; tests/test_attention_gpu.py runs BERT shapes in every dtype on a GPU.
"""

import inspect

import pytest
import torch

import fastbert
from fastbert import functional as fb
from fastbert import reference
from fastbert.kernels import attention as kernel

from utils import ATOL, DEVICE, assert_lowp_close, randn

H = 2


def _keep_mask(kind, batch, seqlen, dtype=torch.int64):
    """(B, S) key-padding masks: "mixed" has a full row, a prefix, a length-1 row and a fully
    padded row (then repeats); "scattered" is random 0/1, not a prefix."""
    if kind is None:
        return None
    if kind == "scattered":
        mask = torch.rand(batch, seqlen) < 0.6
        mask[0, 0] = False
    else:
        lengths = [seqlen, (seqlen * 2) // 3, 1, 0]
        mask = torch.arange(seqlen)[None, :] < torch.tensor([lengths[b % 4] for b in range(batch)])[:, None]
    return mask.to(device=DEVICE, dtype=dtype)


def _cu_seqlens(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


def _eager_same_dtype(q, k, v, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None):
    """Eager attention computed in the inputs' dtype (softmax in fp32, as PyTorch's own
    low-precision attention does): the yardstick of the low-precision rule."""
    if cu_seqlens is not None:
        b = cu_seqlens.tolist()
        return torch.cat([_eager_same_dtype(q[s:e][None], k[s:e][None], v[s:e][None], scale=scale)[0]
                          for s, e in zip(b[:-1], b[1:])])
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bqhd,bkhd->bhqk", q, k).float() * scale
    if attention_mask is not None:
        keep = attention_mask.bool()[:, None, None, :]
        s = s.masked_fill(~keep, float("-inf"))
    p = torch.softmax(s, -1)
    if attention_mask is not None:
        p = p.masked_fill(~keep.any(-1, keepdim=True), 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", p.to(q.dtype), v)


def _run(fn, leaves, split, grad, **kw):
    """Output and the gradients of ``leaves`` for fn(*split(leaves), **kw) against ``grad``."""
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*split(*leaves), **kw)
    out.backward(grad.to(out.dtype))
    return out.detach(), [t.grad for t in leaves]


def _per_input(grads):
    """dq, dk, dv, also when q, k, v are views of one fused leaf."""
    return grads[0].unbind(-3) if len(grads) == 1 else grads


def _check(leaves, split, atol=None, **kw):
    """Kernel (through fastbert.functional under the triton backend) vs the fp64 reference,
    forward and every gradient, with the low-precision rule."""
    dtype = leaves[0].dtype
    atol = ATOL[dtype] if atol is None else atol

    def triton_attention(*args, **kw):
        with fastbert.use_backend("triton"):
            return fb.attention(*args, **kw)

    ref_kw = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in kw.items()}
    q, _, v = split(*leaves)
    grad = randn(*q.shape[:-1], v.shape[-1], dtype=torch.float64)
    out, grads = _run(triton_attention, leaves, split, grad, **kw)
    ref64, g64 = _run(reference.attention, [t.double() for t in leaves], split, grad, **ref_kw)
    same, g_same = _run(reference.attention if dtype == torch.float32 else _eager_same_dtype, leaves, split, grad, **kw)
    assert out.dtype == dtype
    assert_lowp_close(out, same, ref64, atol, "output")
    for name, g, gs, gr in zip(("dq", "dk", "dv"), _per_input(grads), _per_input(g_same), _per_input(g64)):
        assert g.dtype == dtype
        assert_lowp_close(g, gs, gr, atol, name)
    return out


def _fused_qkv(*lead, dim, dtype):
    """One (…, 3, H, D) tensor, split into q, k, v views as BertSelfAttention does."""
    return randn(*lead, 3, H, dim, dtype=dtype)


def _unbind(qkv):
    return qkv.unbind(-3)


CASES = [  # (dtype, head dim, mask kind)
    (torch.float32, 16, "mixed"), (torch.float32, 26, "mixed"), (torch.float32, 32, None),
    (torch.float16, 16, None), (torch.float16, 26, "mixed"), (torch.float16, 32, "mixed"),
]


@pytest.mark.parametrize("dtype,dim,mask_kind", CASES, ids=lambda c: str(c).replace("torch.", ""))
def test_padded_matches_reference(dtype, dim, mask_kind):
    """Non-contiguous q, k, v views of one fused QKV tensor, as the model passes them; the
    mixed mask covers full, prefix, length-1 and fully padded rows (those give zeros)."""
    batch, seqlen = 4, 37
    mask = _keep_mask(mask_kind, batch, seqlen)
    qkv = _fused_qkv(batch, seqlen, dim=dim, dtype=dtype)
    out = _check([qkv], _unbind, attention_mask=mask)
    if mask is not None:
        assert out[3].abs().max() == 0  # no real key: zeros, not NaN


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32], ids=["bool", "float"])
def test_scattered_mask(mask_dtype):
    """Masks need not be prefixes: any 0/1 pattern, in any dtype; q and k lengths differ and
    v has its own head dim and a custom scale."""
    batch, seqlen_k = 3, 37
    mask = _keep_mask("scattered", batch, seqlen_k, mask_dtype)
    leaves = [randn(batch, 23, H, 26), randn(batch, seqlen_k, H, 26), randn(batch, seqlen_k, H, 16)]
    _check(leaves, lambda q, k, v: (q, k, v), attention_mask=mask, scale=0.3)


@pytest.mark.parametrize("scale", [-0.4, 0.0], ids=["negative", "zero"])
def test_scales_that_are_not_positive(scale):
    """The forward takes its row max on unscaled scores only when the scale is positive;
    a negative or zero scale (uniform attention) takes the other path, and a fully padded
    row still gives zeros."""
    batch, seqlen = 4, 37
    mask = _keep_mask("mixed", batch, seqlen)
    out = _check([_fused_qkv(batch, seqlen, dim=16, dtype=torch.float32)], _unbind, attention_mask=mask, scale=scale)
    assert out[3].abs().max() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_packed_matches_reference(dtype):
    """Packed (T, H, D) with cu_seqlens, including an empty and a length-1 sequence."""
    lengths = [5, 0, 37, 1, 20]
    qkv = _fused_qkv(sum(lengths), dim=26, dtype=dtype)
    _check([qkv], _unbind, cu_seqlens=_cu_seqlens(lengths), max_seqlen=max(lengths))


def test_padded_and_packed_agree():
    lengths = [37, 11, 1, 30]
    batch, seqlen = len(lengths), 37
    mask = (torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]).to(DEVICE)
    qkv = _fused_qkv(batch, seqlen, dim=32, dtype=torch.float32)
    grad = randn(batch, seqlen, H, 32) * mask[:, :, None, None]  # padded query rows do not exist when packed
    with fastbert.use_backend("triton"):
        padded, (g_padded,) = _run(fb.attention, [qkv], _unbind, grad, attention_mask=mask)
        real = mask.reshape(-1)
        packed, (g_packed,) = _run(fb.attention, [qkv.reshape(batch * seqlen, 3, H, 32)[real]], _unbind,
                                   grad.reshape(batch * seqlen, H, 32)[real], cu_seqlens=_cu_seqlens(lengths))
    torch.testing.assert_close(packed, padded.reshape(batch * seqlen, H, 32)[real], atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(g_packed, g_padded.reshape(batch * seqlen, 3, H, 32)[real], atol=2e-6, rtol=1e-5)
    assert g_padded.reshape(batch * seqlen, 3, H, 32)[~real].abs().max() == 0  # padded keys get no gradient


def test_empty_inputs():
    with fastbert.use_backend("triton"):
        q = randn(0, 5, H, 16, requires_grad=True)
        out = fb.attention(q, q, q)
        out.sum().backward()
        assert out.shape == (0, 5, H, 16) and q.grad.shape == q.shape
        t = randn(0, H, 16, requires_grad=True)
        out = fb.attention(t, t, t, cu_seqlens=torch.zeros(3, dtype=torch.int32, device=DEVICE))
        out.sum().backward()
        assert out.shape == (0, H, 16) and t.grad.shape == t.shape


@pytest.mark.parametrize("cu,match", [
    ([0, 5, 3, 9], "must not decrease"),
    ([0, 4, 8], "ends at 8 but there are 9 tokens"),
    ([1, 4, 9], "must start at 0"),
])
def test_invalid_cu_seqlens(cu, match):
    t = randn(9, H, 16)
    with fastbert.use_backend("triton"), pytest.raises(ValueError, match=match):
        fb.attention(t, t, t, cu_seqlens=torch.tensor(cu, dtype=torch.int32, device=DEVICE))
    with fastbert.use_backend("triton"), pytest.raises(ValueError, match="cu_seqlens must be int32"):
        fb.attention(t, t, t, cu_seqlens=torch.tensor([0, 9], device=DEVICE))
    with pytest.raises(ValueError, match="head dims must be at least 1"):
        fb.attention(*(randn(1, 3, H, 0),) * 3)
    with pytest.raises(ValueError, match="the head dim must be at least 1"):
        fb.attention_qkv(randn(1, 3, 3, H, 0))


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_max_seqlen_shorter_than_a_sequence_raises(backend):
    """A max_seqlen below the longest sequence would leave rows unwritten: it raises. A longer
    one, or none, gives the same answer."""
    t = randn(9, H, 16)
    cu = torch.tensor([0, 2, 7, 9], dtype=torch.int32, device=DEVICE)
    with fastbert.use_backend(backend):
        with pytest.raises(ValueError, match="max_seqlen is 4 but the longest sequence in cu_seqlens has 5 tokens"):
            fb.attention(t, t, t, cu_seqlens=cu, max_seqlen=4)
        exact = fb.attention(t, t, t, cu_seqlens=cu)
        torch.testing.assert_close(fb.attention(t, t, t, cu_seqlens=cu, max_seqlen=5), exact)
        torch.testing.assert_close(fb.attention(t, t, t, cu_seqlens=cu, max_seqlen=8), exact)


# --------------------------------------------------------------------------- dropout


def test_dropout_mask_statistics():
    p = 0.3
    seed = torch.tensor([1234], dtype=torch.int64, device=DEVICE)
    keep = kernel.dropout_mask(seed, 4, 3, 37, 41, p)
    assert keep.shape == (4, 3, 37, 41)
    n = keep.numel()
    assert abs(keep.float().mean().item() - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5)
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])
    assert torch.equal(keep, kernel.dropout_mask(seed, 4, 3, 37, 41, p))  # same seed, same mask
    assert not torch.equal(keep, kernel.dropout_mask(seed + 1, 4, 3, 37, 41, p))


def _reference_with_keep(q, k, v, mask, keep, p, scale):
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if mask is not None:
        s = s.masked_fill(~mask.bool()[:, None, None, :], float("-inf"))
    probs = torch.softmax(s, -1)
    if mask is not None:
        probs = probs.masked_fill(~mask.bool().any(-1)[:, None, None, None], 0.0)
    return torch.einsum("bhqk,bkhd->bqhd", probs * keep / (1 - p), v)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_dropout_forward_and_backward_use_the_same_mask(layout):
    """The forward's output and all three gradients equal the reference computed with the
    mask :func:`dropout_mask` regenerates from the same seed, so forward and backward agree."""
    p, dim, seed = 0.25, 16, torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    scale = dim ** -0.5
    if layout == "padded":
        batch, seqlen = 4, 37
        mask = _keep_mask("mixed", batch, seqlen)
        leaves = [randn(batch, seqlen, 3, H, dim)]
        call = lambda q, k, v: kernel.attention_fwd(q, k, v, mask, None, seed, seqlen, scale, p)[0]
        keep = kernel.dropout_mask(seed, batch, H, seqlen, seqlen, p).double()
        ref = lambda q, k, v: _reference_with_keep(q, k, v, mask, keep, p, scale)
    else:
        lengths = [5, 0, 37, 20]
        cu, longest = _cu_seqlens(lengths), max(lengths)
        leaves = [randn(sum(lengths), 3, H, dim)]
        call = lambda q, k, v: kernel.attention_fwd(q, k, v, None, cu, seed, longest, scale, p)[0]
        keep = kernel.dropout_mask(seed, len(lengths), H, longest, longest, p).double()
        bounds = cu.tolist()

        def ref(q, k, v):
            return torch.cat([_reference_with_keep(q[a:e][None], k[a:e][None], v[a:e][None], None,
                                                   keep[i:i + 1, :, :e - a, :e - a], p, scale)[0]
                              for i, (a, e) in enumerate(zip(bounds[:-1], bounds[1:]))])
    grad = randn(*leaves[0].shape[:-3], H, dim)
    out, (g,) = _run(call, leaves, _unbind, grad)
    ref_out, (g_ref,) = _run(ref, [leaves[0].double()], _unbind, grad)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g.double(), g_ref, atol=1e-5, rtol=1e-5)
    assert 0.6 < keep.mean().item() < 0.9


def test_dropout_seed_comes_from_torch_generator():
    q, k, v = _unbind(randn(2, 37, 3, H, 16))
    with fastbert.use_backend("triton"):
        torch.manual_seed(7)
        first = fb.attention(q, k, v, dropout_p=0.2)
        torch.manual_seed(7)
        again = fb.attention(q, k, v, dropout_p=0.2)
        other = fb.attention(q, k, v, dropout_p=0.2)
        plain = fb.attention(q, k, v)
    torch.manual_seed(7)
    explicit = kernel.attention_fwd(q, k, v, None, None, kernel.draw_seed(0.2, q.device), 37, 0.25, 0.2)[0]
    assert torch.equal(first, again) and torch.equal(first, explicit)
    assert not torch.equal(first, other) and not torch.equal(first, plain)


def test_dropout_refuses_counter_overflow():
    t = randn(46341, 1, 16)
    with fastbert.use_backend("triton"), pytest.raises(ValueError, match=r"at most 2\*\*31 scores per head"):
        fb.attention(t, t, t, cu_seqlens=_cu_seqlens([46341]), dropout_p=0.1)


def test_inference_writes_no_log_sum_exp(monkeypatch):
    """Where nothing needs a gradient the forward stores the output alone (the log-sum-exp is
    the backward's), padded and packed, with the same bits as with autograd."""
    stored = []
    real = kernel.launch
    monkeypatch.setattr(kernel, "launch", lambda k, grid, *args, **meta:
                        (stored.append(meta.get("STORE_LSE")), real(k, grid, *args, **meta)))
    q, k, v = (randn(2, 9, H, 16) for _ in range(3))
    mask = _keep_mask("mixed", 2, 9)
    cu = torch.tensor([0, 4, 13], dtype=torch.int32, device=DEVICE)
    qp, kp, vp = (t.reshape(18, H, 16)[:13] for t in (q, k, v))
    with fastbert.use_backend("triton"):
        for args, kwargs in (((q, k, v, mask), {}), ((qp, kp, vp), dict(cu_seqlens=cu, max_seqlen=9))):
            with torch.no_grad():
                plain = fb.attention(*args, **kwargs)
            leaves = [t.clone().requires_grad_() for t in args[:3]]
            trained = fb.attention(*leaves, *args[3:], **kwargs)
            assert torch.equal(plain, trained.detach())
    assert stored == [False, True, False, True]


# --------------------------------------------------------------------------- registration


def test_opcheck():
    q, k, v = (randn(1, 5, 1, 16) for _ in range(3))
    torch.library.opcheck(torch.ops.fastbert.attention_fwd.default, (q, k, v, None, None, None, 5, 0.25, 0.0))
    out, lse = torch.ops.fastbert.attention_fwd(q, k, v, None, None, None, 5, 0.25, 0.0)
    torch.library.opcheck(torch.ops.fastbert.attention_bwd.default,
                          (randn(1, 5, 1, 16), q, k, v, out, lse, None, None, None, 5, 0.25, 0.0))


def test_torch_compile_fullgraph():
    """Autograd and torch.compile trace the custom ops without graph breaks (aot_eager on the
    CPU; Inductor on the GPU test below)."""
    qkv = randn(2, 9, 3, H, 16, requires_grad=True)
    mask = _keep_mask("mixed", 2, 9)

    for entry in (lambda qkv: fb.attention(*qkv.unbind(-3), mask), lambda qkv: fb.attention_qkv(qkv, mask)):
        def f(qkv):
            return entry(qkv).square().sum()

        torch._dynamo.reset()
        with fastbert.use_backend("triton"):
            eager = f(qkv)  # resolves the kernel outside the compiled region
            (g_eager,) = torch.autograd.grad(eager, qkv)
            compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(qkv)
            (g_compiled,) = torch.autograd.grad(compiled, qkv)
        torch.testing.assert_close(compiled, eager)
        torch.testing.assert_close(g_compiled, g_eager)


# --------------------------------------------------------------------------- in the model


@pytest.mark.parametrize("unpad", [True, False], ids=["packed", "padded"])
def test_model_matches_eager(monkeypatch, unpad):
    """A tiny BertModel with a padded 2-D mask: the triton attention (other ops eager, so
    that only attention is under test) gives eager's hidden states at real positions and
    eager's parameter gradients, on the unpadded path (default) and with unpad=False."""
    dispatch = fb.implementation
    monkeypatch.setattr(fb, "implementation",
                        lambda name, device, *dtype: dispatch(name, device, *dtype) if name.startswith("attention")
                        else fastbert.ops.OPS[name].reference)
    cfg = fastbert.BertConfig(vocab_size=60, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                              intermediate_size=96, max_position_embeddings=32)
    model = fastbert.BertModel(cfg).to(DEVICE).eval()
    model.unpad = unpad
    ids = torch.randint(1, 60, (3, 13), device=DEVICE)
    mask = (torch.arange(13)[None, :] < torch.tensor([13, 7, 1])[:, None]).long().to(DEVICE)
    results = {}
    for backend in ("eager", "triton"):
        model.zero_grad()
        with fastbert.use_backend(backend):
            hidden = model(ids, attention_mask=mask).last_hidden_state
        hidden[mask.bool()].square().sum().backward()
        results[backend] = hidden.detach(), model.encoder.layer[0].attention.self.query.weight.grad.clone()
    (h_eager, g_eager), (h_triton, g_triton) = results["eager"], results["triton"]
    real = mask.bool()
    torch.testing.assert_close(h_triton[real], h_eager[real], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g_triton, g_eager, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- compiled for the GPU

def _arg_types(fn, ptr="*fp16"):
    """{arg: Triton type} for a kernel: tensors in ``ptr`` (fp32 for LSE/Delta, int for masks,
    lengths and seeds), float scalars fp32 (the harness adds fp64), integers i32."""
    special = {"LSE": "*fp32", "Delta": "*fp32", "KeyMask": "*u8", "Keep": "*i8", "CuSeqlens": "*i32", "Seed": "*i64"}
    types = {}
    for name in inspect.signature(fn.fn if hasattr(fn, "fn") else fn).parameters:
        if name in ("sm_scale", "dropout_p"):
            types[name] = "fp32"
        elif name[0].isupper() and "_" not in name:
            types[name] = special.get(name, ptr)
        else:
            types[name] = "i32"
    return types


def test_compiles_for_hopper(tmp_path):
    """The kernels at the block sizes the launchers pick on an H100/H200 (forward fp16 64x64
    at D=64 and 128x64 at D=128, fp32 64x32, for positive and other scales; backward fp16
    32/64 at D=64, the sweep's 64/64, 32/128 at D=128, fp32 32/64, with three gradient
    tensors and with one), every feature on."""
    from test_layernorm import assert_compiles_for_hopper

    from fastbert.kernels import attention_bwd

    mod, bwd_mod = "fastbert.kernels.attention", "fastbert.kernels.attention_bwd"
    flags = dict(HEAD_DIM=64, HEAD_DIM_V=64, BLOCK_D=64, BLOCK_DV=64, PACKED=True, HAS_MASK=True, DROPOUT=True)
    fwd = dict(flags, STORE_LSE=True, POS_SCALE=True)
    specs = [(mod, "_attn_fwd", _arg_types(kernel._attn_fwd), dict(fwd, BLOCK_M=64, BLOCK_N=64, IEEE=False), 4),
             (mod, "_attn_fwd", _arg_types(kernel._attn_fwd),
              dict(fwd, BLOCK_M=64, BLOCK_N=64, IEEE=False, STORE_LSE=False, POS_SCALE=False), 4),
             (mod, "_attn_fwd", _arg_types(kernel._attn_fwd), dict(fwd, BLOCK_M=128, BLOCK_N=64, IEEE=False), 4),
             (mod, "_attn_fwd", _arg_types(kernel._attn_fwd, "*fp32"),
              dict(fwd, BLOCK_M=64, BLOCK_N=32, IEEE=True, PACKED=False), 4),
             (mod, "_dropout_mask_kernel", _arg_types(kernel._dropout_mask_kernel), dict(BLOCK_M=64, BLOCK_N=64), 4),
             (bwd_mod, "_attn_bwd_delta", _arg_types(attention_bwd._attn_bwd_delta),
              dict(HEAD_DIM_V=64, BLOCK_M=64, BLOCK_DV=64), 4)]
    for m1, n1, m2, n2, ptr, one_grad in ((32, 64, 64, 32, "*fp16", False), (32, 64, 64, 32, "*fp16", True),
                                          (64, 64, 64, 64, "*fp16", True), (32, 128, 128, 32, "*fp16", False),
                                          (32, 64, 64, 32, "*fp32", True)):
        specs.append((bwd_mod, "_attn_bwd", _arg_types(attention_bwd._attn_bwd, ptr),
                      dict(flags, BLOCK_M1=m1, BLOCK_N1=n1, BLOCK_M2=m2, BLOCK_N2=n2, IEEE=ptr == "*fp32",
                           ONE_GRAD=one_grad), 4))
    assert_compiles_for_hopper(specs, tmp_path)
