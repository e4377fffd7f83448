"""CUDAGraphRunner: bucket choice, padding into a bucket and cutting back out (on the CPU,
through the same functions the runner uses, with the eager model on the captured path),
argument checks, and graph capture and replay against the eager model (on a GPU)."""

import pytest
import torch

import fastbert
from fastbert.cuda_graphs import (CUDAGraphRunner, fill_packing, pad_to_bucket, capture_layout, run_bucket, select_bucket,
                                  slice_output, static_packing, token_bucket, token_step)
from fastbert.outputs import BaseModelOutputWithPooling
from utils import DEVICE

VOCAB = 61


def tiny_config(**kw):
    base = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                max_position_embeddings=64, type_vocab_size=2, num_labels=2)
    base.update(kw)
    return fastbert.BertConfig(**base)


def random_inputs(batch, seqlen, device="cpu", inner=()):
    shape = (batch, *inner, seqlen)
    ids = torch.randint(1, VOCAB, shape)
    types = torch.randint(0, 2, shape)
    mask = torch.ones(shape, dtype=torch.long)
    lengths = torch.randint(1, seqlen + 1, shape[:-1])
    lengths.view(-1)[0] = seqlen  # one full row
    mask[torch.arange(seqlen) >= lengths[..., None]] = 0
    return ids.to(device), mask.to(device), types.to(device)


def real_close(actual, expected, mask, per_token, atol=1e-5, rtol=1e-5, what="output"):
    """Compare at real tokens only (padded positions differ by design)."""
    assert actual.shape == expected.shape, f"{what}: {tuple(actual.shape)} != {tuple(expected.shape)}"
    if per_token:
        keep = mask.reshape(-1, mask.shape[-1]).bool()
        actual, expected = actual[keep], expected[keep]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# --------------------------------------------------------------------------- CPU: pure logic

@pytest.mark.parametrize("batch,seqlen,expected", [
    (1, 1, (1, 32)), (1, 32, (1, 32)), (2, 33, (8, 64)), (8, 64, (8, 64)), (9, 7, (32, 32)),
    (32, 512, (32, 512)), (33, 10, None), (4, 513, None), (40, 600, None),
])
def test_select_bucket(batch, seqlen, expected):
    assert select_bucket(batch, seqlen, (1, 8, 32), (32, 64, 128, 256, 512)) == expected


def test_pad_to_bucket_layout():
    ids, mask, types = random_inputs(3, 5)
    out = pad_to_bucket(ids.int(), mask.bool(), types, None, 4, 8, pad_token_id=7)
    assert out.shape == (4, 4, 8) and out.dtype == torch.long
    torch.testing.assert_close(out[0, :3, :5], ids)
    torch.testing.assert_close(out[1, :3, :5], mask)
    torch.testing.assert_close(out[2, :3, :5], types)
    torch.testing.assert_close(out[3, :3, :5], torch.arange(5).expand(3, 5))
    assert (out[0, 3:] == 7).all() and (out[0, :, 5:] == 7).all()
    assert out[1, 3:].sum() == 0 and out[1, :, 5:].sum() == 0  # padding is masked, extra rows fully
    # broadcast token types and positions, float 0/1 mask
    out = pad_to_bucket(ids, mask.float(), torch.ones(5, dtype=torch.long), torch.arange(2, 7)[None], 3, 5, 0)
    torch.testing.assert_close(out[1], mask)
    assert (out[2] == 1).all() and (out[3] == torch.arange(2, 7)).all()


HEADS = [
    (fastbert.BertModel, ("last_hidden_state", "pooler_output")),
    (fastbert.BertForSequenceClassification, ("logits",)),
    (fastbert.BertForTokenClassification, ("logits",)),
    (fastbert.BertForQuestionAnswering, ("start_logits", "end_logits")),
    (fastbert.BertForPreTraining, ("prediction_logits", "seq_relationship_logits")),
]
PER_SEQUENCE = {"pooler_output", "seq_relationship_logits"}


def _per_token(cls, name):
    return name not in PER_SEQUENCE and not (name == "logits" and cls is fastbert.BertForSequenceClassification)


@pytest.mark.parametrize("cls,names", HEADS, ids=[c.__name__ for c, _ in HEADS])
def test_bucket_padding_keeps_real_outputs(cls, names):
    """The runner's path, minus the graph: pad into a bucket, run the padded layout, cut back."""
    model = cls(tiny_config(output_hidden_states=True)).eval()
    for batch, seqlen, bucket in ((3, 11, (4, 16)), (1, 16, (1, 16)), (2, 5, (8, 32))):
        ids, mask, types = random_inputs(batch, seqlen)
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, token_type_ids=types)
            with capture_layout(model):
                full = run_bucket(model, pad_to_bucket(ids, mask, types, None, *bucket, 0))
        got = slice_output(full, batch, seqlen, bucket[0])
        assert type(got) is type(expected)
        for name in names:
            real_close(got[name], expected[name], mask, _per_token(cls, name), what=name)
        assert len(got.hidden_states) == len(expected.hidden_states) == 3
        for i, (h, e) in enumerate(zip(got.hidden_states, expected.hidden_states)):
            real_close(h, e, mask, True, what=f"hidden_states[{i}]")
    assert all(m.unpad for m in model.modules() if isinstance(m, fastbert.BertModel))  # restored


def test_bucket_padding_multiple_choice():
    model = fastbert.BertForMultipleChoice(tiny_config(output_hidden_states=True)).eval()
    ids, mask, types = random_inputs(3, 9, inner=(2,))
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, token_type_ids=types)
        with capture_layout(model):
            full = run_bucket(model, pad_to_bucket(ids, mask, types, None, 8, 16, 0))
    got = slice_output(full, 3, 9, 8)
    real_close(got.logits, expected.logits, mask, False, what="logits")
    real_close(got.hidden_states[-1], expected.hidden_states[-1], mask, True, what="hidden_states[-1]")


@pytest.mark.parametrize("total,capacity,expected", [
    (0, 16384, 1024), (1, 16384, 1024), (8700, 16384, 9216), (15360, 16384, 15360), (15361, 16384, 16384),
    (16384, 16384, 16384), (33, 256, 64), (65, 256, 128), (40, 64, 64), (100, 128, 128), (1000, 4096, 1024),
])
def test_token_bucket(total, capacity, expected):
    assert token_bucket(total, capacity) == expected


def test_token_step_is_a_tile_multiple():
    for capacity in (1, 32, 64, 100, 128, 1000, 4096, 16384, 3 * 512 * 7):
        step = token_step(capacity)
        assert step % 64 == 0 and step * 16 >= capacity and (step - 64) * 16 < capacity


def test_fill_packing_layout():
    """Real tokens first, in order; then spare rows past the B*S positions; cu_seqlens of the rows."""
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]])
    packing = static_packing(4, 4, 8, "cpu")
    assert (packing.batch, packing.seqlen, packing.max_seqlen, packing.total, packing.spare) == (4, 4, 4, 8, 64)
    fill_packing(packing, mask, [3, 0, 3, 0])
    assert packing.indices.tolist() == [0, 1, 2, 8, 10, 11, 16, 17]
    assert packing.cu_seqlens.tolist() == [0, 3, 3, 6, 6]
    fill_packing(packing, torch.zeros(16, dtype=torch.long), [0] * 4)  # nothing real: all spare
    assert packing.indices.tolist() == list(range(16, 24)) and packing.cu_seqlens.tolist() == [0] * 5
    with pytest.raises(ValueError, match="does not fit the buffers"):
        fill_packing(packing, torch.ones(16, dtype=torch.long), [4] * 4)  # 16 real tokens > 8


def _poison_spare_rows(model, total):
    """Fill the attention output of every token past the real ones with NaN (the kernel
    leaves those rows unwritten): nothing may carry them into a real or padded position."""
    def hook(module, args, output):
        context, probs = output
        context = context.clone()
        context[total:] = float("nan")
        return context, probs
    return [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, fastbert.modeling.BertSelfAttention)]


@pytest.mark.parametrize("backend", ["auto", "triton"])
@pytest.mark.parametrize("cls,names", HEADS, ids=[c.__name__ for c, _ in HEADS])
def test_packed_bucket_keeps_real_outputs(cls, names, backend):
    """The runner's packed path, minus the graph: pad into a bucket, pack its real tokens
    into a token bucket through static buffers, run, cut back. Padded positions are zeros."""
    fastbert.set_backend(backend)
    model = cls(tiny_config(output_hidden_states=True)).to(DEVICE).eval()
    cases = ((3, 11, (4, 32)), (2, 5, (8, 32)), (1, 20, (2, 64)))
    if backend == "triton" and DEVICE == "cpu":  # the interpreter is slow
        cases = cases[:1]
    for batch, seqlen, bucket in cases:
        ids, mask, types = random_inputs(batch, seqlen, DEVICE)
        inputs = pad_to_bucket(ids, mask, types, None, *bucket, 0)
        lengths = inputs[1].sum(1).tolist()
        tokens = token_bucket(sum(lengths), inputs[1].numel())
        assert tokens < inputs[1].numel()  # the case runs packed
        packing = static_packing(bucket[0], bucket[1], tokens, DEVICE)
        fill_packing(packing, inputs[1], lengths)
        hooks = _poison_spare_rows(model, sum(lengths))
        with torch.no_grad():
            expected = model(ids, attention_mask=mask, token_type_ids=types)
            with capture_layout(model, packing):
                full = run_bucket(model, inputs)
        for h in hooks:
            h.remove()
        got = slice_output(full, batch, seqlen, bucket[0])
        for name in names:
            real_close(got[name], expected[name], mask, _per_token(cls, name), what=name)
            assert not got[name].isnan().any(), f"{name}: a spare token leaked into the output"
        for i, (h, e) in enumerate(zip(got.hidden_states, expected.hidden_states)):
            real_close(h, e, mask, True, what=f"hidden_states[{i}]")
            assert (h[mask == 0] == 0).all() and (full.hidden_states[i][batch:] == 0).all()
    assert all(m.unpad and m.static_packing is None for m in model.modules() if isinstance(m, fastbert.BertModel))


def test_packed_bucket_multiple_choice():
    model = fastbert.BertForMultipleChoice(tiny_config()).eval()
    ids, mask, types = random_inputs(3, 9, inner=(2,))
    inputs = pad_to_bucket(ids, mask, types, None, 4, 16, 0)
    lengths = inputs[1].reshape(-1, 16).sum(1).tolist()
    packing = static_packing(8, 16, token_bucket(sum(lengths), 128), "cpu")
    fill_packing(packing, inputs[1], lengths)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, token_type_ids=types)
        with capture_layout(model, packing):
            full = run_bucket(model, inputs)
    real_close(slice_output(full, 3, 9, 4).logits, expected.logits, mask, False, what="logits")


def test_static_packing_must_fit_the_input():
    model = fastbert.BertModel(tiny_config()).eval()
    ids, mask, _ = random_inputs(2, 8)
    with capture_layout(model, static_packing(4, 8, 16, "cpu")), pytest.raises(ValueError, match="static packing"):
        model(ids, attention_mask=mask)


def test_slice_output_copies():
    out = BaseModelOutputWithPooling(last_hidden_state=torch.randn(4, 8, 3), pooler_output=torch.randn(4, 3))
    got = slice_output(out, 4, 8, 4)
    assert got.last_hidden_state.data_ptr() != out.last_hidden_state.data_ptr()
    out.last_hidden_state.fill_(0.0)
    assert got.last_hidden_state.abs().sum() > 0
    assert got.pooler_output.shape == (4, 3) and got.hidden_states is None


def test_runner_refuses_a_cpu_model():
    model = fastbert.BertModel(tiny_config()).eval()
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        CUDAGraphRunner(model, batch_sizes=(1, 2), seq_lens=(8, 16))


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(batch_sizes=()), ValueError, "batch_sizes must be a non-empty"),
    (dict(batch_sizes=(1, 0)), ValueError, "batch_sizes"),
    (dict(batch_sizes=(1, 2.5)), ValueError, "batch_sizes"),
    (dict(batch_sizes=8), TypeError, "batch_sizes must be a sequence"),
    (dict(seq_lens=(8, -16)), ValueError, "seq_lens"),
    (dict(seq_lens=(32, 128)), ValueError, "max_position_embeddings=64"),
    (dict(dtype=torch.int8), ValueError, "dtype must be"),
    (dict(warmup_iters=0), ValueError, "warmup_iters"),
])
def test_runner_validates_arguments(kwargs, error, match):
    model = fastbert.BertModel(tiny_config()).eval()
    args = dict(batch_sizes=(1, 2), seq_lens=(8, 16))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        CUDAGraphRunner(model, **args)


def test_runner_needs_a_fastbert_eval_model():
    with pytest.raises(TypeError, match="no fastbert.BertModel"):
        CUDAGraphRunner(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="takes a fastbert model"):
        CUDAGraphRunner("bert-base-uncased")
    with pytest.raises(ValueError, match="eval mode"):
        CUDAGraphRunner(fastbert.BertModel(tiny_config()).train(), seq_lens=(16,))


# --------------------------------------------------------------------------- GPU: capture and replay

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
def test_reset_after_weight_change():
    model = _gpu_model()
    runner = CUDAGraphRunner(model, batch_sizes=(2,), seq_lens=(16,))
    _check_against_eager(runner, model, 2, 12, ("last_hidden_state",), fastbert.BertModel)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    runner.reset()
    assert runner.captured == []
    _check_against_eager(runner, model, 2, 12, ("last_hidden_state", "pooler_output"), fastbert.BertModel)


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
