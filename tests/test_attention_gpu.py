"""Fused attention on a GPU: BERT shapes in every dtype, long packed batches, scattered masks,
dropout against its mask, the fused-QKV entry and the backward's sweep block shapes, and
Inductor with CUDA graphs. The helpers and the CPU tests: tests/test_attention.py and
tests/test_attention_bwd.py."""

import pytest
import torch

import fastbert
import test_attention as cpu_tests
from fastbert import functional as fb
import test_attention_bwd as bwd_tests
from test_attention import _check, _cu_seqlens, _keep_mask, _unbind
from test_attention_bwd import BACKWARD_VARIANTS, _backward_variant, _split_and_fused, _variant_id
from utils import DEVICE, randn

GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("batch,seqlen,dim", [(8, 128, 64), (4, 512, 64), (2, 384, 128), (3, 200, 26), (2, 77, 256)])
def test_gpu_bert_shapes(dtype, batch, seqlen, dim):
    lengths = torch.randint(1, seqlen + 1, (batch,))
    lengths[0] = seqlen
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None]).to(DEVICE)
    _check([randn(batch, seqlen, 3, 12 if dim <= 64 else 4, dim, dtype=dtype)], _unbind, attention_mask=mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_gpu_packed_varlen(dtype):
    lengths = torch.randint(32, 513, (32,)).tolist()
    lengths[3] = 0
    lengths[5] = 1
    _check([randn(sum(lengths), 3, 12, 64, dtype=dtype)], _unbind, cu_seqlens=_cu_seqlens(lengths))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_scattered_mask_and_long_sequence(dtype):
    _check([randn(2, 300, 3, 4, 64, dtype=dtype)], _unbind, attention_mask=_keep_mask("scattered", 2, 300))
    _check([randn(1, 4096, 3, 2, 64, dtype=dtype)], _unbind)


@pytest.mark.gpu
def test_gpu_dropout_matches_its_mask():
    cpu_tests.test_dropout_forward_and_backward_use_the_same_mask("padded")
    cpu_tests.test_dropout_forward_and_backward_use_the_same_mask("packed")
    cpu_tests.test_dropout_mask_statistics()


@pytest.mark.gpu
@pytest.mark.parametrize("fields", BACKWARD_VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_gpu_backward_variants(monkeypatch, fields, dtype):
    """The backward at the sweep's block shapes, at BERT-base's heads, against the reference:
    padded with a mask, packed, one d qkv tensor."""
    _backward_variant(monkeypatch, **fields)
    _check([randn(8, 128, 3, 12, 64, dtype=dtype)], _unbind, attention_mask=_keep_mask("mixed", 8, 128))
    lengths = torch.randint(1, 513, (12,)).tolist()
    _check([randn(sum(lengths), 3, 12, 64, dtype=dtype)], _unbind, cu_seqlens=_cu_seqlens(lengths))
    bwd_tests.test_backward_variants_match_reference(monkeypatch, fields, "qkv-fp16")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("layout", ["masked", "packed"])
def test_gpu_qkv_entry_gives_the_split_entrys_bits(dtype, layout):
    """The model's entry (one d qkv tensor written by the kernel) against attention on the
    views of qkv, at BERT-base's heads, with dropout: the same bits."""
    if layout == "packed":
        lengths = torch.randint(1, 257, (16,)).tolist()
        qkv, kw = randn(sum(lengths), 3, 12, 64, dtype=dtype), dict(cu_seqlens=_cu_seqlens(lengths))
    else:
        qkv, kw = randn(8, 128, 3, 12, 64, dtype=dtype), dict(attention_mask=_keep_mask("mixed", 8, 128))
    grad = randn(*qkv.shape[:-3], 12, 64, dtype=dtype)
    (out, dqkv), (out_fused, dqkv_fused) = _split_and_fused(qkv, grad, dropout_p=0.1, **kw)
    assert torch.equal(out_fused, out) and torch.equal(dqkv_fused, dqkv)


@pytest.mark.gpu
@pytest.mark.parametrize("entry", ["split", "qkv"])
def test_gpu_torch_compile_inductor_and_cuda_graphs(entry):
    """Inductor (fullgraph) and a captured CUDA graph agree with eager, forward and d qkv,
    through attention on the q, k, v views and through attention_qkv."""
    torch._dynamo.reset()
    qkv = randn(4, 128, 3, 12, 64, dtype=torch.float16, requires_grad=True)
    mask = _keep_mask("mixed", 4, 128)

    def f(qkv):
        return fb.attention(*qkv.unbind(-3), mask) if entry == "split" else fb.attention_qkv(qkv, mask)

    with fastbert.use_backend("triton"):
        eager = f(qkv)
        compiled = torch.compile(f, fullgraph=True)(qkv)
        torch.testing.assert_close(compiled, eager, atol=2e-3, rtol=2e-3)
        (g_eager,) = torch.autograd.grad(eager.float().sum(), qkv)
        (g_compiled,) = torch.autograd.grad(compiled.float().sum(), qkv)
        torch.testing.assert_close(g_compiled, g_eager, atol=2e-3, rtol=2e-3)

        static = qkv.detach().clone()
        f(static)  # compile the kernels before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = f(static)
        static.copy_(randn(*static.shape, dtype=static.dtype))
        graph.replay()
        torch.testing.assert_close(captured, f(static))
