"""CUDAGraphRunner on a GPU: capture and replay against the eager model in every bucket, head
models, half precision, fallback, input checks, inputs staged across calls, weights written
in place and replaced, packed graphs, and no device sync on the replay path. The bucket logic's CPU
tests: tests/test_cuda_graphs.py."""

import pytest
import torch

import fastbert
from fastbert.cuda_graphs import CUDAGraphRunner, pad_to_bucket, select_bucket
from test_cuda_graphs import HEADS, VOCAB, _per_token, random_inputs, real_close, tiny_config

def _gpu_model(cls=fastbert.BertModel, dtype=torch.float32, **kw):
    torch.manual_seed(0)
    return cls(tiny_config(max_position_embeddings=128, **kw)).to("cuda", dtype).eval()


def _check_against_eager(runner, model, batch, seqlen, names, cls, atol=1e-5, rtol=1e-5, device="cuda"):
    ids, mask, types = random_inputs(batch, seqlen, device)
    got = runner(ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        expected = model(ids.cuda(), attention_mask=mask.cuda(), token_type_ids=types.cuda())
    for name in names:
        real_close(got[name], expected[name], mask.cuda(), _per_token(cls, name), atol, rtol,
                   what=f"{name} at batch {batch}, length {seqlen}")
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "eager"])
def test_graphs_match_eager_in_every_bucket(backend):
    fastbert.set_backend(backend)
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(1, 4, 8), seq_lens=(16, 32, 128), unpad=False)
    names = ("last_hidden_state", "pooler_output")
    shapes = ((1, 16), (1, 5), (3, 16), (4, 9), (2, 32), (8, 17), (5, 128), (8, 100), (6, 1))
    for batch, seqlen in shapes:  # B and S at, and below, their bucket's
        _check_against_eager(runner, model, batch, seqlen, names, fastbert.BertModel)
    buckets = {select_bucket(b, s, runner.batch_sizes, runner.seq_lens) for b, s in shapes}
    assert runner.captured == sorted((b, (), s, b * s) for b, s in buckets)  # one padded graph per bucket, reused
    # Inputs from the CPU are moved to the GPU; int32 ids work.
    ids, mask, types = random_inputs(2, 12)
    got = runner(ids.int(), attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        expected = model(ids.cuda(), attention_mask=mask.cuda(), token_type_ids=types.cuda())
    real_close(got.last_hidden_state, expected.last_hidden_state, mask.cuda(), True)
    assert got.last_hidden_state.device.type == "cuda"


@pytest.mark.gpu
def test_graphs_without_mask_and_with_positions():
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(4,), seq_lens=(32,))
    ids = torch.randint(1, VOCAB, (3, 20), device="cuda")
    positions = torch.randint(0, 128, (3, 20), device="cuda")
    got = runner(ids, position_ids=positions)
    with torch.no_grad():
        expected = model(ids, position_ids=positions)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_repeated_calls_see_fresh_inputs_and_keep_old_outputs():
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(8,), seq_lens=(32,))
    first = _check_against_eager(runner, model, 6, 20, ("last_hidden_state",), fastbert.BertModel)
    kept = first.last_hidden_state.clone()
    for batch, seqlen in ((6, 20), (2, 31), (8, 3)):  # same bucket, new data each time
        _check_against_eager(runner, model, batch, seqlen, ("last_hidden_state", "pooler_output"), fastbert.BertModel)
    assert {key[:3] for key in runner.captured} == {(8, (), 32)}
    torch.testing.assert_close(first.last_hidden_state, kept, atol=0, rtol=0)  # not overwritten by later replays


@pytest.mark.gpu
def test_staged_inputs_across_calls():
    """Calls in one bucket that alternate given and missing inputs, shapes, dtypes and devices:
    after each, the graph's buffer is what pad_to_bucket makes of the call, and the outputs
    match the eager model's."""
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(4,), seq_lens=(32,), unpad=False)
    ids, mask, types = random_inputs(4, 32)
    calls = [(ids[:3, :20], None, None, None), (ids[:3, :20], None, None, None), (ids, mask, types, None),
             (ids[:2, :9], None, types[0, :9], None), (ids[:2, :9].int(), mask[:2, :9].bool(), None, torch.arange(9)),
             (ids[:, :25], None, None, None), (ids[:1, :25], mask[:1, :25].float(), types[:1, :25], None)]
    for device in ("cuda", "cpu"):
        for call in calls:
            got = runner(*[None if t is None else t.to(device) for t in call])
            (graph,) = runner._graphs.values()
            expected_inputs = pad_to_bucket(*call, 4, 32, runner.pad_token_id)
            assert torch.equal(graph.inputs.buffer.cpu(), expected_inputs)
            real = torch.ones(call[0].shape, dtype=torch.long) if call[1] is None else call[1].long()
            with torch.no_grad():
                expected = model(call[0].cuda(), *[None if t is None else t.cuda() for t in (real, *call[2:])])
            real_close(got.last_hidden_state, expected.last_hidden_state, real.cuda(), True,
                       what=f"last_hidden_state of a call of shape {tuple(call[0].shape)} from {device}")


HEAD_CASES = [(cls, names) for cls, names in HEADS if cls is not fastbert.BertModel]


@pytest.mark.gpu
@pytest.mark.parametrize("cls,names", HEAD_CASES, ids=[c.__name__ for c, _ in HEAD_CASES])
def test_graphs_of_head_models(cls, names):
    model = _gpu_model(cls)
    runner = CUDAGraphRunner(model, batch_sizes=(2, 8), seq_lens=(16, 64))
    for batch, seqlen in ((2, 16), (1, 7), (5, 40), (8, 64)):
        _check_against_eager(runner, model, batch, seqlen, names, cls)


@pytest.mark.gpu
def test_graphs_of_multiple_choice():
    model = _gpu_model(fastbert.BertForMultipleChoice)
    runner = CUDAGraphRunner(model, batch_sizes=(4,), seq_lens=(16,))
    runner.capture_all(inner_shape=(3,))
    assert runner.captured == [(4, (3,), 16, 192)]
    ids, mask, types = random_inputs(2, 11, "cuda", inner=(3,))
    got = runner(ids, attention_mask=mask, token_type_ids=types)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_graphs_in_half_precision(dtype):
    model = _gpu_model(fastbert.BertForSequenceClassification)
    runner = CUDAGraphRunner(model, batch_sizes=(1, 8), seq_lens=(32, 128), dtype=dtype)
    assert next(model.parameters()).dtype == dtype
    for batch, seqlen in ((1, 30), (7, 128), (8, 50)):
        # Same kernels, same dtype, bucket padding only: agreement well within half precision.
        got = _check_against_eager(runner, model, batch, seqlen, ("logits",), fastbert.BertForSequenceClassification,
                                   atol=2e-2, rtol=2e-2)
        assert got.logits.dtype == dtype


@pytest.mark.gpu
def test_capture_all_and_fallback():
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(1, 2), seq_lens=(8, 16))
    runner.capture_all()
    assert runner.captured == [(1, (), 8, 8), (1, (), 16, 16), (2, (), 8, 16), (2, (), 16, 32)]
    for batch, seqlen in ((1, 8), (2, 3), (2, 16)):
        _check_against_eager(runner, model, batch, seqlen, ("last_hidden_state",), fastbert.BertModel)
    with pytest.warns(UserWarning, match="exceeds the largest bucket"):
        _check_against_eager(runner, model, 3, 10, ("last_hidden_state", "pooler_output"), fastbert.BertModel)
    _check_against_eager(runner, model, 2, 40, ("last_hidden_state",), fastbert.BertModel)  # longer than 16
    assert len(runner.captured) == 4
    strict = CUDAGraphRunner(model, batch_sizes=(1, 2), seq_lens=(8, 16), fallback=False)
    with pytest.raises(ValueError, match=r"batch 3 and length 10 exceeds the largest bucket \(batch 2, length 16\)"):
        strict(torch.randint(1, VOCAB, (3, 10), device="cuda"))


@pytest.mark.gpu
def test_graph_inputs_are_checked():
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(2,), seq_lens=(16,))
    ids = torch.randint(1, VOCAB, (2, 10), device="cuda")
    with pytest.raises(ValueError, match=f"input_ids contains {VOCAB}"):
        runner(torch.cat([ids[:, :9], torch.full((2, 1), VOCAB, device="cuda")], 1))
    with pytest.raises(ValueError, match="token_type_ids contains 2"):
        runner(ids, token_type_ids=torch.full_like(ids, 2))
    with pytest.raises(ValueError, match="does not fit input_ids"):
        runner(ids, attention_mask=torch.ones(2, 9, dtype=torch.long, device="cuda"))
    with pytest.raises(ValueError, match="input_ids must be an int32 or int64"):
        runner(ids.float())
    _check_against_eager(runner, model, 2, 10, ("last_hidden_state",), fastbert.BertModel)  # still works after
    model.train()
    with pytest.raises(RuntimeError, match="training mode"):
        runner(ids)


@pytest.mark.gpu
def test_weights_written_in_place_and_replaced():
    """Graphs read the parameters (and the fused QKV weight, a view of them) in place: an
    in-place write takes effect at the next replay; replaced parameters need reset()."""
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(2,), seq_lens=(16,))
    torch.manual_seed(1)
    ids, mask, types = random_inputs(2, 12, "cuda")

    def check(what):
        got = runner(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        real_close(got, expected, mask, True, 1e-5, 1e-5, what=what)
        return got.clone()

    before = check("before")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    after = check("after an in-place write")
    assert runner.captured and len(runner.captured) == 1  # the same graph, replayed
    assert (after - before)[mask.bool()].abs().max() > 1e-3
    model.double().float()  # new tensors for every parameter
    runner.reset()
    assert runner.captured == []
    check("after reset")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
def test_packed_graphs(dtype):
    """Ragged batches run packed: one graph per token bucket, real positions as eager,
    zeros at padded positions; a padded runner on the same inputs agrees."""
    model = _gpu_model(dtype=dtype)
    packed = CUDAGraphRunner(model, batch_sizes=(8,), seq_lens=(128,))
    padded = CUDAGraphRunner(model, batch_sizes=(8,), seq_lens=(128,), unpad=False)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for batch, seqlen in ((8, 128), (5, 100), (8, 17), (2, 128), (8, 128)):
        got = _check_against_eager(packed, model, batch, seqlen, ("last_hidden_state", "pooler_output"),
                                   fastbert.BertModel, **tol)
        assert got.last_hidden_state.isfinite().all()
    assert all(key[:3] == (8, (), 128) for key in packed.captured)
    assert any(key[3] < 8 * 128 for key in packed.captured), "no input ran packed"
    ids, mask, types = random_inputs(6, 128, "cuda")
    mask[:, :40], mask[:, 40:] = 1, 0  # every row exactly 40 real tokens
    a, b = packed(ids, mask, types), padded(ids, mask, types)
    assert (8, (), 128, 256) in packed.captured  # 6 x 40 real tokens -> the 256-token bucket
    real_close(a.last_hidden_state, b.last_hidden_state, mask, True, **tol)
    assert (a.last_hidden_state[mask == 0] == 0).all()
    torch.testing.assert_close(a.pooler_output, b.pooler_output, **tol)


@pytest.mark.gpu
def test_packed_graph_of_cpu_inputs_and_of_a_missing_mask():
    """Row lengths come from the host for a CPU mask or no mask (bucket padding only)."""
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(8,), seq_lens=(64,))
    _check_against_eager(runner, model, 3, 50, ("last_hidden_state",), fastbert.BertModel, device="cpu")
    ids = torch.randint(1, VOCAB, (3, 40), device="cuda")
    got = runner(ids)
    with torch.no_grad():
        expected = model(ids)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=1e-5, rtol=1e-5)
    assert (8, (), 64, 128) in runner.captured  # 3 x 40 = 120 real tokens


@pytest.mark.gpu
def test_replay_does_not_sync():
    """The replay path (without the input check) must not read device values back: with
    the GPU busy, a call returns while the work queued before it is still running."""
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(1,), seq_lens=(32,), check_inputs=False)
    ids = torch.randint(1, VOCAB, (1, 32), device="cuda")
    runner(ids)
    torch.cuda.synchronize()
    big = torch.randn(4096, 4096, device="cuda")
    for _ in range(20):
        big = big @ big  # keep the GPU busy for a while
        big = big / big.norm()
    start = torch.cuda.Event(enable_timing=True)
    start.record()
    runner(ids)  # must queue behind the matmuls rather than wait for them
    assert not start.query(), "the replay path waited for the GPU (a device sync)"
    torch.cuda.synchronize()
    # A ragged batch with its mask on the host (as a tokenizer returns it) runs packed: the
    # packing is computed on the host and sent without waiting for the GPU either.
    runner = CUDAGraphRunner(model, batch_sizes=(4,), seq_lens=(64,), check_inputs=False)
    ids = torch.randint(1, VOCAB, (4, 64), device="cuda")
    mask = (torch.arange(64) < torch.tensor([[64], [10], [33], [1]])).long()
    expected = runner(ids, attention_mask=mask).last_hidden_state
    assert runner.captured[0][3] < 4 * 64, "the ragged batch did not run packed"
    torch.cuda.synchronize()
    for _ in range(20):
        big = big @ big
        big = big / big.norm()
    start.record()
    got = runner(ids, attention_mask=mask).last_hidden_state
    assert not start.query(), "the packed replay path waited for the GPU (a device sync)"
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
