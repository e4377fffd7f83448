"""embedding on the GPU: the CUDA kernels of fastbert._C (csrc/embedding_cuda.cu) against the
eager reference at BERT shapes in every dtype, bad ids, determinism, dropout masks equal to
the CPU kernel's, opcheck, CUDA-graph capture, deferred id checks and a compute-sanitizer run.
Run on an H100/H200 after `pip install --no-build-isolation --no-deps -e .`; the helpers are
the CPU tests' (tests/test_embedding.py)."""

import pytest
import torch

import fastbert
from fastbert import functional as fb
from fastbert import reference
from test_embedding import BAD_IDS, EPS, GRADS, kernels, make, run
from utils import ATOL, CUDA, assert_lowp_close

gpu = pytest.mark.gpu


def _cuda_kernels():
    if not (CUDA and kernels.build_info()["cuda"]):
        pytest.fail("fastbert._C was built without its CUDA kernels on a CUDA machine")


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("shape,hidden,vocab", [
    ((32, 128), 768, (30522, 512, 2)),   # BERT-base, padded
    ((4093,), 768, (30522, 512, 2)),     # packed
    ((8, 128), 1024, (30522, 512, 2)),   # BERT-large
    ((3, 37), 384, (1000, 64, 2)),       # MiniLM width
    ((3, 37), 100, (1000, 64, 3)),       # not 16-byte aligned: the any-size kernels
    ((2, 33), 2048, (500, 64, 2)),       # wider than the register-resident kernels
], ids=["base-32x128", "packed-4093", "large-8x128", "384", "100", "2048"])
def test_gpu_matches_reference(shape, hidden, vocab, dtype):
    _cuda_kernels()
    ids, tables = make(shape, hidden, vocab=vocab, device="cuda")
    ids = (ids[0].index_fill(-1, torch.tensor([0], device="cuda"), 0),) + ids[1:]  # some padding ids
    dy = torch.randn(*shape, hidden, device="cuda")
    low = [t.to(dtype) for t in tables]
    out, grads = run("auto", ids, low, dy, padding_idx=0)
    same, same_grads = run("eager", ids, low, dy, padding_idx=0)
    ref, ref_grads = run("eager", ids, low, dy.to(dtype), padding_idx=0, dtype=torch.float64)
    def atol(ref):  # fp32: relative to the tensor's scale (dln sums 4096 tokens)
        return ATOL[dtype] if dtype != torch.float32 else 2e-6 * max(1.0, ref.abs().max().item())

    assert_lowp_close(out, same, ref, atol(ref))
    assert grads["word"][0].abs().max() == 0
    for k in GRADS:
        assert_lowp_close(grads[k], same_grads[k], ref_grads[k], atol(ref_grads[k]), f"d{k}")


@gpu
@pytest.mark.parametrize("name,value,message", BAD_IDS, ids=[f"{n}={v}" for n, v, _ in BAD_IDS])
def test_gpu_bad_ids_raise_and_the_context_survives(name, value, message):
    _cuda_kernels()
    ids, tables = make((4, 64), 768, device="cuda", dtype=torch.float16)
    ids = dict(zip(("input_ids", "position_ids", "token_type_ids"), (i.clone() for i in ids)))
    ids[name][2, 17] = value
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        fb.embedding(ids["input_ids"], ids["token_type_ids"], ids["position_ids"], *tables, EPS)
    torch.cuda.synchronize()  # a later op still works: no device-side assert, no sticky error
    a = torch.randn(64, 64, device="cuda")
    torch.testing.assert_close((a @ torch.eye(64, device="cuda")).cpu(), a.cpu())
    good = [i.clamp(0, n - 1) for i, n in zip((ids["input_ids"], ids["position_ids"], ids["token_type_ids"]), (53, 19, 3))]
    out = fb.embedding(good[0], good[2], good[1], *tables, EPS)
    assert torch.isfinite(out).all()


@gpu
def test_gpu_backward_is_deterministic():
    _cuda_kernels()
    ids, tables = make((32, 128), 768, vocab=(30522, 512, 2), device="cuda", dtype=torch.float16)
    ids = (torch.randint(0, 40, ids[0].shape, device="cuda"),) + ids[1:]  # heavy repeats
    dy = torch.randn(32, 128, 768, device="cuda")
    runs = []
    try:
        for deterministic in (False, True, True):
            torch.use_deterministic_algorithms(deterministic)
            runs.append(run("auto", ids, tables, dy, padding_idx=0)[1])
    finally:
        torch.use_deterministic_algorithms(False)
    for other in runs[1:]:
        for k in GRADS:
            assert torch.equal(runs[0][k], other[k]), k


@gpu
def test_gpu_dropout_mask_equals_the_cpu_mask():
    _cuda_kernels()
    ids, tables = make((4, 50), 96)
    seed = torch.tensor([987654321], dtype=torch.int64)
    args = lambda dev: ([i.to(dev) for i in (ids[0], ids[2], ids[1])] + [t.to(dev) for t in tables]  # noqa: E731
                        + [EPS, 0.3, seed.to(dev), None])
    cpu = torch.ops.fastbert.embedding_fwd(*args("cpu"))[0]
    gpu_out = torch.ops.fastbert.embedding_fwd(*args("cuda"))[0].cpu()
    assert torch.equal(cpu != 0, gpu_out != 0)
    torch.testing.assert_close(gpu_out, cpu, atol=1e-5, rtol=1e-5)


@gpu
def test_gpu_opcheck_and_cuda_graph():
    _cuda_kernels()
    ids, tables = make((3, 7), 64, device="cuda")
    word, pos, tt = ids
    torch.library.opcheck(torch.ops.fastbert.embedding_fwd.default,
                          (word, tt, pos, *[t.requires_grad_() for t in tables], EPS, 0.0, None, 0))
    tables = [t.detach() for t in tables]
    static = word.clone()
    fb.embedding(static, tt, pos, *tables, EPS)  # warm-up outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fb.embedding(static, tt, pos, *tables, EPS)
    static.copy_(torch.randint(0, 53, static.shape, device="cuda"))
    graph.replay()
    torch.testing.assert_close(out, reference.embedding(static, tt, pos, *tables, EPS), atol=1e-5, rtol=1e-5)
    static[0, 0] = 53  # a bad id in a replay is recorded (never read) and raised by the next eager call
    graph.replay()
    with pytest.raises(ValueError, match="CUDA graph"):
        fb.embedding(word, tt, pos, *tables, EPS)
    fb.embedding(word, tt, pos, *tables, EPS)  # the record is cleared


@gpu
def test_gpu_assume_valid_ids_defers_the_check():
    """Under fastbert.assume_valid_ids() the forward does not wait for the id check: a bad id
    is never read (its token's output is zeros) and the next checked call raises."""
    _cuda_kernels()
    ids, tables = make((2, 9), 64, device="cuda")
    word, pos, tt = ids
    bad = word.clone()
    bad[1, 3] = 53
    with fastbert.assume_valid_ids():
        out = fb.embedding(bad, tt, pos, *tables, EPS)
        good = fb.embedding(word, tt, pos, *tables, EPS)  # inside the block nothing raises
    assert (out[1, 3] == 0).all() and torch.isfinite(out).all()
    torch.testing.assert_close(good, reference.embedding(word, tt, pos, *tables, EPS), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="did not check its ids"):
        fb.embedding(word, tt, pos, *tables, EPS)
    fb.embedding(word, tt, pos, *tables, EPS)  # the record is cleared


@gpu
def test_gpu_sanitizer_short():
    """Small fwd+bwd with dropout, odd and aligned widths, and a bad id: for
    ``compute-sanitizer --tool memcheck python -m pytest tests/test_embedding_cuda.py -k sanitizer``."""
    _cuda_kernels()
    for hidden, dtype in ((96, torch.float16), (100, torch.bfloat16), (64, torch.float32)):
        ids, tables = make((3, 37), hidden, device="cuda")
        out, grads = run("auto", ids, [t.to(dtype) for t in tables], torch.randn(3, 37, hidden, device="cuda"),
                         dropout_p=0.1, padding_idx=1)
        assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads.values())
    bad = ids[0].clone()
    bad[1, 1] = 10**6
    with pytest.raises(ValueError, match="input_ids contains 1000000"):
        fb.embedding(bad, ids[2], ids[1], *tables, EPS)
    torch.cuda.synchronize()
