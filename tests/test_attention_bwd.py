"""The attention backward beyond the split q, k, v entry (tests/test_attention.py): the
gradient of a fused QKV tensor written as one tensor (``attention_qkv``), and the backward at
the block shapes of the launch-config sweep's candidates, against the reference. Under the
interpreter on the CPU; tests/test_attention_gpu.py runs them at BERT shapes."""

import pytest
import torch

import fastbert
import test_attention as base
from fastbert import functional as fb
from fastbert import reference
from test_attention import H, _check, _cu_seqlens, _eager_same_dtype, _fused_qkv, _keep_mask, _unbind
from utils import ATOL, DEVICE, assert_lowp_close, randn


def _split_and_fused(qkv, grad, seed=0, **kw):
    """(output, d qkv) of ``attention(*qkv.unbind(-3))`` and of ``attention_qkv(qkv)`` under the
    triton backend, each from the same torch seed (the dropout seed is drawn from it)."""
    results = []
    for fn in (lambda t: fb.attention(*t.unbind(-3), **kw), lambda t: fb.attention_qkv(t, **kw)):
        leaf = qkv.detach().clone().requires_grad_()
        torch.manual_seed(seed)
        with fastbert.use_backend("triton"):
            out = fn(leaf)
        out.backward(grad)
        results.append((out.detach(), leaf.grad))
    return results


@pytest.mark.parametrize("layout,dtype,dropout", [
    ("padded", torch.float32, 0.0), ("masked", torch.float16, 0.0), ("masked", torch.float32, 0.2),
    ("packed", torch.float16, 0.0), ("packed", torch.float32, 0.2), ("strided", torch.float16, 0.0),
], ids=lambda c: str(c).replace("torch.", ""))
def test_qkv_entry_gives_the_split_entrys_bits(layout, dtype, dropout):
    """attention_qkv runs the same kernels as attention on the views of qkv, and writes the
    three gradients into one tensor instead of three that autograd stacks: the output and
    d qkv are bit for bit those of the split entry (whose every gradient is checked against
    the reference above), with fully padded rows, empty and length-1 sequences, dropout."""
    if layout == "packed":
        lengths = [5, 0, 19, 1, 12]
        qkv = _fused_qkv(sum(lengths), dim=26, dtype=dtype)
        kw = dict(cu_seqlens=_cu_seqlens(lengths))
    elif layout == "strided":  # a (B, 3, S, H, D) tensor seen as (B, S, 3, H, D): read through its strides
        qkv = randn(4, 3, 19, H, 16, dtype=dtype).transpose(1, 2)
        kw = dict(attention_mask=_keep_mask("mixed", 4, 19))
    else:
        qkv = _fused_qkv(4, 19, dim=16, dtype=dtype)
        kw = dict(attention_mask=_keep_mask("mixed", 4, 19) if layout == "masked" else None)
    grad = randn(*qkv.shape[:-3], H, qkv.shape[-1], dtype=dtype)
    (out, dqkv), (out_fused, dqkv_fused) = _split_and_fused(qkv, grad, dropout_p=dropout, **kw)
    assert torch.equal(out_fused, out)
    assert dqkv_fused.shape == qkv.shape and dqkv_fused.dtype == dtype
    assert torch.equal(dqkv_fused, dqkv)
    if layout in ("masked", "strided"):
        assert out_fused[3].abs().max() == 0 and not dqkv_fused.isnan().any()


def test_qkv_entry_matches_reference_and_cpu_composition():
    """Every implementation of attention_qkv gives attention's answer on the same views."""
    from fastbert import cpu

    qkv = _fused_qkv(3, 11, dim=16, dtype=torch.float32)
    mask = _keep_mask("mixed", 3, 11)
    ref = reference.attention(*qkv.unbind(-3), mask)
    torch.testing.assert_close(reference.attention_qkv(qkv, mask), ref, atol=0, rtol=0)
    torch.testing.assert_close(cpu.attention_qkv(qkv.cpu(), mask.cpu()), ref.cpu(), atol=2e-6, rtol=1e-5)
    with fastbert.use_backend("triton"):
        torch.testing.assert_close(fb.attention_qkv(qkv, mask), ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("shape,kw,match", [
    ((2, 9, H, 16), {}, r"qkv must be \(B, S, 3, H, D\) when padded, got \(2, 9, 2, 16\)"),
    ((2, 9, 4, H, 16), {}, r"qkv must be \(B, S, 3, H, D\) when padded"),
    ((9, 3, H, 16, 1), dict(cu_seqlens=[0, 9]), r"qkv must be \(T, 3, H, D\) when packed"),
    ((2, 9, 3, H, 16), dict(attention_mask=(2, 8)), r"attention_mask must be \(batch, key_len\) = \(2, 9\)"),
])
def test_qkv_entry_refuses_bad_shapes(shape, kw, match):
    if "cu_seqlens" in kw:
        kw = dict(cu_seqlens=torch.tensor(kw["cu_seqlens"], dtype=torch.int32, device=DEVICE))
    if "attention_mask" in kw:
        kw = dict(attention_mask=torch.ones(kw["attention_mask"], device=DEVICE))
    with fastbert.use_backend("triton"), pytest.raises(ValueError, match=f"fastbert.attention_qkv: {match}"):
        fb.attention_qkv(randn(*shape), **kw)
    with pytest.raises(ValueError, match="fastbert.attention_qkv: qkv must be float16, bfloat16, float32 or float64"):
        fb.attention_qkv(torch.zeros(2, 9, 3, H, 16, dtype=torch.int64, device=DEVICE))


def _backward_variant(monkeypatch, **fields):
    """Run the backward with the shipped config's ``fields`` replaced; returns the list of
    (kernel name, launch meta) of every backward launch."""
    import dataclasses

    from fastbert.kernels import attention_bwd

    shipped = attention_bwd.bwd_config
    monkeypatch.setattr(attention_bwd, "bwd_config", lambda *a: dataclasses.replace(shipped(*a), **fields))
    launched = []
    real_launch = attention_bwd.launch
    monkeypatch.setattr(attention_bwd, "launch",
                        lambda k, *a, **kw: (launched.append((k.__name__, kw)), real_launch(k, *a, **kw)))
    return launched


# Block shapes of the sweep's candidates (benchmarks/tune.py) unlike the interpreter's 32/32/32/32:
# thin query steps and wide key blocks, and 64 everywhere (the shipped config's closest rival).
BACKWARD_VARIANTS = [dict(block_m1=16, block_n1=64, block_m2=64, block_n2=16),
                     dict(block_m1=64, block_n1=64, block_m2=64, block_n2=64)]


def _variant_id(fields) -> str:
    return "{block_m1}-{block_n1}-{block_m2}-{block_n2}".format(**fields)


@pytest.mark.parametrize("fields", BACKWARD_VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("case", ["padded-fp16", "packed-fp32", "qkv-fp16", "dropout-padded", "dropout-packed"])
def test_backward_variants_match_reference(monkeypatch, fields, case):
    """The backward at the sweep's block shapes gives the reference's gradients (the blocks
    decide which rows and keys each program masks): masks with fully padded rows, packed
    sequences of length 0 and 1, one d qkv tensor (attention_qkv), dropout."""
    launched = _backward_variant(monkeypatch, **fields)
    if case == "padded-fp16":
        _check([_fused_qkv(4, 19, dim=16, dtype=torch.float16)], _unbind, attention_mask=_keep_mask("mixed", 4, 19))
    elif case == "packed-fp32":
        lengths = [5, 0, 19, 1, 12]
        _check([_fused_qkv(sum(lengths), dim=26, dtype=torch.float32)], _unbind, cu_seqlens=_cu_seqlens(lengths))
    elif case == "qkv-fp16":
        qkv = _fused_qkv(3, 21, dim=16, dtype=torch.float16)
        grad = randn(3, 21, H, 16, dtype=torch.float16)
        mask = _keep_mask("mixed", 3, 21)
        with fastbert.use_backend("triton"):
            leaf = qkv.clone().requires_grad_()
            fb.attention_qkv(leaf, mask).backward(grad)
        ref = qkv.double().requires_grad_()
        reference.attention(*ref.unbind(-3), mask).backward(grad.double())
        same = qkv.clone().requires_grad_()
        _eager_same_dtype(*same.unbind(-3), mask).backward(grad)
        assert_lowp_close(leaf.grad, same.grad, ref.grad, ATOL[torch.float16], "d qkv")
    else:
        base.test_dropout_forward_and_backward_use_the_same_mask(case.split("-")[1])
    assert {name for name, _ in launched} == {"_attn_bwd", "_attn_bwd_delta"}
    blocks = [(meta["BLOCK_M1"], meta["BLOCK_N1"], meta["BLOCK_M2"], meta["BLOCK_N2"])
              for name, meta in launched if name == "_attn_bwd"]
    assert blocks and set(blocks) == {tuple(fields.values())}


def test_backward_is_deterministic():
    """No atomics: the same bits on every run, as torch.use_deterministic_algorithms asks. The
    interpreter runs programs one after another, so this bites on a GPU (the suite's run there,
    where DEVICE is cuda), where they run at once."""
    qkv, mask = _fused_qkv(2, 13, dim=16, dtype=torch.float32), _keep_mask("mixed", 2, 13)
    grad = randn(2, 13, H, 16)
    runs = [_split_and_fused(qkv, grad, attention_mask=mask)[1][1] for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_opcheck_qkv():
    qkv, mask = randn(2, 5, 3, 1, 16), _keep_mask("mixed", 2, 5)
    torch.library.opcheck(torch.ops.fastbert.attention_qkv_fwd.default, (qkv, mask, None, None, 5, 0.25, 0.0))
    out, lse = torch.ops.fastbert.attention_qkv_fwd(qkv, mask, None, None, 5, 0.25, 0.0)
    torch.library.opcheck(torch.ops.fastbert.attention_qkv_bwd.default,
                          (randn(2, 5, 1, 16), qkv, out, lse, mask, None, None, 5, 0.25, 0.0))
