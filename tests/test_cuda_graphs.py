"""CUDAGraphRunner on the CPU: bucket choice, padding into a bucket and cutting back out
(through the same functions the runner uses, with the eager model on the captured path),
staging inputs into a graph's static buffer, packing, and argument checks. Capture and
replay on a GPU: tests/test_cuda_graphs_capture.py."""

import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastbert
from fastbert.cuda_graphs import (CUDAGraphRunner, fill_packing, pad_to_bucket, capture_layout, run_bucket, select_bucket,
                                  slice_output, static_packing, token_bucket, token_step)
from fastbert.graph_inputs import StaticInputs
from fastbert.outputs import BaseModelOutputWithPooling
from utils import CUDA, DEVICE

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
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    packing = static_packing(4, 4, 8, "cpu")
    assert (packing.batch, packing.seqlen, packing.max_seqlen, packing.total, packing.spare) == (4, 4, 4, 8, 64)
    fill_packing(packing, mask)
    assert packing.indices.tolist() == [0, 1, 2, 8, 10, 11, 16, 17]
    assert packing.cu_seqlens.tolist() == [0, 3, 3, 6, 6]
    fill_packing(packing, torch.zeros(16, dtype=torch.bool))  # nothing real: all spare
    assert packing.indices.tolist() == list(range(16, 24)) and packing.cu_seqlens.tolist() == [0] * 5
    with pytest.raises(ValueError, match="does not fit the buffers"):
        fill_packing(packing, torch.ones(16, dtype=torch.bool))  # 16 real tokens > 8
    with pytest.raises(ValueError, match="does not fit the buffers of 4 rows of 4"):
        fill_packing(packing, torch.ones(12, dtype=torch.bool))


def test_unpad_mask_packs_any_mask():
    """unpad_mask computes the packing on the host from one read of the mask and sends it to
    the mask's device: the real tokens' positions in order, cu_seqlens and the longest
    length, for any pattern of real tokens (holes, empty rows, left padding), any mask
    dtype, and None without padding."""
    from fastbert.padding import unpad_mask
    g = torch.Generator().manual_seed(0)
    for batch, seqlen in ((1, 1), (3, 7), (5, 16), (0, 4)):
        keep = torch.rand(batch, seqlen, generator=g) < 0.6
        keep[:1, :1] = True
        for mask in (keep, keep.long(), keep.float() * 0.5):
            packing = unpad_mask(mask.to(DEVICE))
            if bool(keep.all()):
                assert packing is None
                continue
            lengths = keep.sum(1)
            assert packing.indices.device.type == packing.cu_seqlens.device.type == DEVICE
            assert packing.indices.tolist() == torch.nonzero(keep.reshape(-1)).flatten().tolist()
            assert packing.cu_seqlens.dtype == torch.int32
            assert packing.cu_seqlens.tolist() == [0] + torch.cumsum(lengths, 0).tolist()
            assert packing.max_seqlen == int(lengths.max())
            assert packing.leading_pad == any(bool(n) and not bool(f) for n, f in zip(lengths, keep[:, 0]))
    assert unpad_mask(torch.ones(2, 3, dtype=torch.long)) is None


def test_left_padded_rows_run_padded():
    """The runner's choice of a packed or a padded graph: right-padded rows pack, a row that
    starts with padding (padding_side="left") runs padded, as in the eager model, and so
    does a runner with unpadding off. Rows with no real token never force the padded graph."""
    from types import SimpleNamespace
    model = fastbert.BertModel(tiny_config()).eval()
    runner = SimpleNamespace(model=model, unpad=True, device=torch.device("cpu"))
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])

    def real(mask, shape, rows, bucket_len=4):
        out = CUDAGraphRunner._real_tokens(runner, mask, shape, rows, bucket_len)
        return out if out is None else (tuple(out.shape), out.dtype, out.device.type, out.sum(1).tolist())
    assert real(right, right.shape, 3) == ((3, 4), torch.bool, "cpu", [3, 2, 0])
    assert real(right.bool(), right.shape, 5)[-1] == [3, 2, 0, 0, 0]  # rows past the batch
    assert real(right.float() * -0.5, right.shape, 4)[-1] == [3, 2, 0, 0]
    assert real(right.view(3, 1, 4), (3, 1, 4), 4)[-1] == [3, 2, 0, 0]
    assert real(None, (2, 3, 4), 12, 6) == ((12, 6), torch.bool, "cpu", [4] * 6 + [0] * 6)  # no mask: bucket padding
    assert real(None, (3, 4), 3) is None  # no mask, the bucket filled: the padded graph, nothing built
    assert CUDAGraphRunner._real_tokens(runner, right, right.shape, 3, 6)[:, 4:].sum() == 0  # the bucket's columns
    left = right.flip(1)
    assert real(left, left.shape, 3) is None
    runner.unpad = False
    assert real(right, right.shape, 3) is None


def test_range_check_names_the_input():
    """The range check reads the inputs themselves (one read per device they are on, here
    the ids on the test device and the rest on the CPU), before any capture or staging, and
    names the input out of range."""
    from types import SimpleNamespace
    runner = SimpleNamespace(_limits=(VOCAB, 2, 2, 64))
    ids = torch.randint(1, VOCAB, (2, 10), dtype=torch.int32, device=DEVICE)
    cases = [((ids, None, torch.ones(10, dtype=torch.int32), torch.arange(54, 64)[None]), None),
             ((ids.index_fill(1, torch.tensor([3], device=DEVICE), VOCAB), None, None, None), f"input_ids contains {VOCAB}"),
             ((ids.index_fill(1, torch.tensor([0], device=DEVICE), -3), None, None, None), "input_ids contains -3"),
             ((ids, None, torch.full((2, 10), 2), None), "token_type_ids contains 2"),
             ((ids, None, None, torch.arange(55, 65)), "position_ids contains 64"),
             ((ids, None, torch.zeros(10, dtype=torch.long), torch.full((10,), -1)), "position_ids contains -1")]
    for args, message in cases:
        if message is None:
            CUDAGraphRunner._check_ranges(runner, args)
            continue
        with pytest.raises(ValueError, match=rf"^CUDAGraphRunner: {message}, outside the valid range \[0, "):
            CUDAGraphRunner._check_ranges(runner, args)


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
        real = inputs[1].bool().cpu()
        tokens = token_bucket(int(real.sum()), inputs[1].numel())
        assert tokens < inputs[1].numel()  # the case runs packed
        packing = static_packing(bucket[0], bucket[1], tokens, DEVICE)
        fill_packing(packing, real)
        hooks = _poison_spare_rows(model, int(real.sum()))
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
    real = inputs[1].reshape(-1, 16).bool()
    packing = static_packing(8, 16, token_bucket(int(real.sum()), 128), "cpu")
    fill_packing(packing, real)
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


def _stage_args(rng: random.Random, shape):
    """Random arguments of a call of ``shape``: ids int32 or int64; each optional input missing
    or given in one of the forms the runner accepts (masks of any dtype, broadcast token
    types and positions)."""
    ids = torch.randint(0, VOCAB, shape, dtype=rng.choice([torch.int32, torch.int64]))
    mask = None if rng.random() < 0.5 else rng.choice([torch.bool, torch.int32, torch.int64, torch.float32])
    if mask is torch.bool:
        mask = torch.rand(shape) < 0.7
    elif mask is not None:
        mask = torch.tensor([0.0, 1.0, 1.0, 2.0, -1.0, 0.5, float("nan")])[torch.randint(0, 7, shape)].to(mask)
    optional = []
    for high in (2, 64):  # token types, positions
        form = None if rng.random() < 0.5 else rng.choice(["full", "row", "broadcast", "scalar"])
        extent = {"full": shape, "row": shape[-1:], "broadcast": (1,) * (len(shape) - 1) + shape[-1:],
                  "scalar": ()}.get(form)
        optional.append(None if form is None else torch.randint(0, high, extent, dtype=rng.choice([torch.int32, torch.int64])))
    return [ids, mask, *optional]


STAGE_DEVICES = ["cpu", "cuda"] if CUDA else ["cpu"]


@pytest.mark.parametrize("device", STAGE_DEVICES)
@pytest.mark.parametrize("start", ["capture", "unknown"])
@pytest.mark.parametrize("bucket", [(4, 8), (3, 2, 7), (1, 5)], ids=["2d", "multiple_choice", "batch1"])
def test_staging_matches_pad_to_bucket(bucket, start, device):
    """Sequences of calls whose shapes grow and shrink within the bucket (often repeating the
    last shape), with inputs given or missing, on the buffer's device or the CPU: after
    every call the buffer is exactly what pad_to_bucket makes of the same arguments."""
    rng = random.Random(f"{bucket}-{start}")
    staged = StaticInputs(bucket, pad_token_id=3, device=device)
    if start == "unknown":
        staged.buffer.random_(-9, 99)
        staged.forget()
    shape = None
    for step in range(120):
        if shape is None or rng.random() < 0.6:
            shape = (rng.randint(1, bucket[0]), *bucket[1:-1], rng.randint(1, bucket[-1]))
        args = _stage_args(rng, shape)
        staged.stage(*[t if t is None or rng.random() < 0.5 else t.to(device) for t in args])
        expected = pad_to_bucket(*args, bucket[0], bucket[-1], 3)
        described = [None if t is None else (t.dtype, tuple(t.shape)) for t in args]
        assert torch.equal(staged.buffer.cpu(), expected), f"call {step}: {described}"


class _Writes(TorchDispatchMode):
    """Records each op that writes a tensor, as (op, the plane of ``buffer`` it writes, or None)."""

    def __init__(self, buffer):
        super().__init__()
        self.storage, self.plane_numel, self.ops = buffer.untyped_storage().data_ptr(), buffer[0].numel(), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        values = dict(zip((a.name for a in func._schema.arguments), args), **kwargs)
        for a in func._schema.arguments:
            if a.alias_info is not None and a.alias_info.is_write:
                t = values[a.name]
                plane = t.storage_offset() // self.plane_numel if t.untyped_storage().data_ptr() == self.storage else None
                self.ops.append((func.overloadpacket.__name__, plane))
        return func(*args, **kwargs)


def test_staging_writes_only_what_changed():
    staged = StaticInputs((4, 8), pad_token_id=5, device="cpu")
    buffer = staged.buffer  # as a capture reads it: pad ids, mask 1, token type 0, positions over the bucket
    assert (buffer[0] == 5).all() and (buffer[1] == 1).all() and (buffer[2] == 0).all()
    assert torch.equal(buffer[3], torch.arange(8).expand(4, 8))
    ids, types = torch.randint(1, VOCAB, (4, 5)), torch.randint(0, 2, (4, 5))
    mask = torch.tensor([[1, 1, 1, 1, 0]] * 4)

    def writes(*args):
        with _Writes(buffer) as recorded:
            staged.stage(*args)
        assert torch.equal(buffer, pad_to_bucket(*args, 4, 8, 5))
        return recorded.ops

    # First call: the ids; the capture's mask and positions reach past the input's length.
    assert writes(ids, None, None, None) == [("copy_", 0), ("fill_", 1), ("fill_", 3)]
    assert writes(ids, None, None, None) == [("copy_", 0)]  # the implicit planes already hold their values
    assert writes(ids.int(), None, types, None) == [("copy_", 0), ("copy_", 2)]
    assert writes(ids, None, types[0], None) == [("copy_", 0), ("copy_", 2)]  # given values are always written
    assert writes(ids, None, None, None) == [("copy_", 0), ("fill_", 2)]
    assert writes(ids, mask.bool(), None, None) == [("copy_", 0), ("copy_", 1)]
    assert writes(ids, mask, None, None) == [("copy_", 0), ("ne", 1)]
    assert writes(ids, mask.float(), None, None) == [("copy_", 0), ("ne", 1)]
    assert writes(ids, None, None, None) == [("copy_", 0), ("fill_", 1)]
    # Shrinking pads what the last call reached past the new corner; growing writes the new part.
    assert writes(ids[:, :4], None, None, None) == [("fill_", 0), ("copy_", 0), ("fill_", 1), ("fill_", 3)]
    assert writes(ids[:3, :4], None, None, None) == [("fill_", 0), ("copy_", 0), ("fill_", 1), ("fill_", 3)]
    assert writes(ids[:2, :3], None, None, None) == [("fill_", 0), ("copy_", 0), ("fill_", 1), ("fill_", 1),
                                                     ("fill_", 3), ("copy_", 3)]
    assert writes(ids[:3, :4], None, None, None) == [("copy_", 0), ("fill_", 1), ("copy_", 3)]
    assert writes(ids[:, :4], None, None, None) == [("copy_", 0), ("fill_", 1), ("copy_", 3)]
    assert writes(ids[:, :4], None, None, torch.arange(4)) == [("copy_", 0), ("copy_", 3)]
    assert writes(ids[:2], None, None, None) == [("fill_", 0), ("copy_", 0), ("fill_", 1), ("fill_", 1),
                                                 ("fill_", 3), ("copy_", 3)]
    staged.forget()  # unknown values: every plane is written
    assert writes(ids, None, None, None) == [("fill_", 0), ("copy_", 0), ("fill_", 1), ("fill_", 1), ("fill_", 2),
                                             ("fill_", 3), ("copy_", 3)]
    with pytest.raises(RuntimeError, match="size"):  # a write that fails leaves its plane unknown
        staged.stage(ids[:2, :3], None, None, torch.arange(7))
    assert writes(ids, None, None, None) == [("copy_", 0), ("fill_", 1), ("fill_", 3), ("copy_", 3)]


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
