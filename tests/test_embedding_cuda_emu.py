"""embedding: the CUDA kernels of csrc/ run on the CPU through the emulator
(tests/cuda_emulator.py, tests/cuda_emu/), so their logic is tested on every machine: forward
and the five gradients against the eager reference in fp32, fp16 and bf16 on the
register-resident and the any-size paths, runs of equal ids across many 32-token chunks (the
fixup's ballots), dropout masks equal to the C++ CPU kernel's, the bad-id record, and an
emulator that reports broken warp rules. The same kernels on a GPU: tests/test_embedding_cuda.py."""

import pytest
import torch

import cuda_emulator as emu
from fastbert import reference
from test_embedding import EPS, GRADS, assert_fp32_close, make, run
from utils import ATOL, assert_lowp_close

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dtype_params = pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])


def emulated(ids, tables, dy, padding_idx=None, dropout_p=0.0, seed=None, num_sms=132):
    """Output, the five gradients, mean and rstd from the emulated CUDA kernels."""
    word_ids, pos_ids, type_ids = ids
    out, mean, rstd, bad = emu.embedding_fwd(word_ids, type_ids, pos_ids, *tables, EPS, dropout_p, seed)
    assert bad is None, f"valid ids recorded as bad: {bad}"
    grads = emu.embedding_bwd(dy.to(out.dtype), word_ids, type_ids, pos_ids, *tables[:4], mean, rstd, dropout_p, seed,
                              padding_idx, num_sms)
    return out, dict(zip(GRADS, grads)), mean, rstd


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` whose data starts one element past a 16-byte boundary."""
    out = torch.empty(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    out.copy_(t)
    assert out.data_ptr() % 16 != 0
    return out


def assert_matches_reference(ids, tables, dy, dtype, padding_idx=0, num_sms=132):
    out, grads, mean, rstd = emulated(ids, tables, dy, padding_idx, num_sms=num_sms)
    same, same_grads = run("eager", ids, tables, dy, padding_idx=padding_idx)
    ref, ref_grads = run("eager", ids, tables, dy.to(dtype), padding_idx=padding_idx, dtype=torch.float64)

    def atol(ref):  # fp32: relative to the tensor's scale (the table gradients add up many rows)
        return ATOL[dtype] if dtype != torch.float32 else 2e-6 * max(1.0, ref.abs().max().item())

    assert_lowp_close(out, same, ref, atol(ref))
    x = sum(reference._acc(torch.nn.functional.embedding(i, t)).double() for i, t in zip(ids, tables[:3]))
    torch.testing.assert_close(mean.double(), x.mean(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(rstd.double(), (x.var(-1, unbiased=False) + EPS).rsqrt(), atol=1e-5, rtol=1e-4)
    if padding_idx is not None:
        assert grads["word"][padding_idx].abs().max() == 0
    for k in GRADS:
        assert_lowp_close(grads[k], same_grads[k], ref_grads[k], atol(ref_grads[k]), f"d{k}")


def test_emulator_reports_broken_warp_rules():
    """A full-mask shuffle after half the warp exited, and lanes at different collectives:
    undefined on a GPU, errors here (so the kernels below are held to the warp rules)."""
    rc, message = emu.selftest(0)
    assert rc != 0 and "16 of 32 lanes" in message
    rc, message = emu.selftest(1)
    assert rc != 0 and "different warp collectives" in message


@dtype_params
@pytest.mark.parametrize("shape,hidden,vocab,layout", [
    ((3, 37), 768, (53, 19, 3), "aligned"),      # register-resident: 6 (fp32) or 3 (fp16/bf16) vectors per lane
    ((41,), 100, (53, 19, 3), "aligned"),        # fp32: one vector per lane, lanes past the row idle; 16-bit: any-size
    ((5,), 64, (53, 19, 3), "aligned"),          # half the lanes (fp32) or most (16-bit) hold no column
    ((2, 33), 2048, (500, 64, 2), "aligned"),    # wider than the registers hold: any-size
    ((3, 37), 768, (53, 19, 3), "misaligned"),   # tables one element off 16 bytes: any-size at BERT width
], ids=["3x37x768", "41x100", "5x64", "2x33x2048", "misaligned-768"])
def test_matches_reference(shape, hidden, vocab, layout, dtype):
    ids, tables = make(shape, hidden, vocab=vocab)
    ids = (ids[0].index_fill(-1, torch.tensor([0]), 0),) + ids[1:]  # some padding ids
    tables = [t.to(dtype) for t in tables]
    if layout == "misaligned":
        tables = [misaligned(t) for t in tables[:3]] + tables[3:]
    assert_matches_reference(ids, tables, torch.randn(*shape, hidden), dtype)


@pytest.mark.parametrize("tokens,num_sms", [(1200, 132), (1200, 2), (1088, 132), (1024, 132)],
                         ids=["38-chunks", "38-chunks-2-sms", "34-chunks", "32-chunks"])
def test_runs_of_equal_ids_across_many_chunks(tokens, num_sms):
    """One token type over all tokens: a run across every chunk, which the fixup finds with
    ballots of 32 chunk starts (38 chunks: a full ballot, then a partial one; 34: one full
    ballot that ends the loop; 32: one partial). Three words (runs of ~13 chunks), positions
    that repeat; with 2 SMs the backward's blocks loop over the tokens and sum many partials."""
    ids, tables = make((tokens,), 128, vocab=(3, 512, 1))
    before = emu.collectives()
    assert_matches_reference(ids, tables, torch.randn(tokens, 128), torch.float32, padding_idx=None, num_sms=num_sms)
    assert emu.collectives() > before


@pytest.mark.parametrize("shape,hidden,vocab,dtype", [
    ((3, 37), 768, (53, 19, 3), torch.float16),
    ((41,), 100, (53, 19, 3), torch.float16),
    ((1200,), 96, (3, 512, 1), torch.float32),
], ids=["vector-fp16", "any-size-fp16", "long-runs-fp32"])
def test_same_bits_in_either_thread_order(shape, hidden, vocab, dtype):
    """Every output has the same bits when the threads and blocks run last first: no thread
    reads what another writes without a barrier between them (a stride-32 zeroing of a
    2 * hidden row that another lane then added into was such a race), and no two blocks write
    one place."""
    ids, tables = make(shape, hidden, vocab=vocab, dtype=dtype)
    ids = (ids[0].index_fill(-1, torch.tensor([0]), 0),) + ids[1:]
    dy = torch.randn(*shape, hidden)
    first = emulated(ids, tables, dy, padding_idx=0, num_sms=4)
    with emu.reversed_order():
        last = emulated(ids, tables, dy, padding_idx=0, num_sms=4)
    assert torch.equal(first[0], last[0])
    for k in GRADS:
        assert torch.equal(first[1][k], last[1][k]), f"d{k} depends on the thread order"


def test_int32_ids_and_positions_expanded_over_the_batch():
    ids, tables = make((3, 37), 96, vocab=(53, 64, 2), id_dtype=torch.int32)
    ids = (ids[0], torch.arange(37, dtype=torch.int32).expand(3, 37), ids[2])  # batch stride 0, as the model passes them
    assert ids[1].stride(0) == 0
    assert_matches_reference(ids, tables, torch.randn(3, 37, 96), torch.float32)


@pytest.mark.parametrize("shape,hidden,dtype", [((3, 37), 768, torch.float32), ((41,), 100, torch.float16)],
                         ids=["vector-fp32", "any-size-fp16"])
def test_dropout_matches_the_cpu_kernel(shape, hidden, dtype):
    """The same Philox bits on both devices: the CUDA kernels drop exactly the elements the
    C++ CPU kernel drops, forward and backward."""
    ids, tables = make(shape, hidden, dtype=dtype)
    word_ids, pos_ids, type_ids = ids
    seed = torch.tensor([1234567], dtype=torch.int64)
    dy = torch.randn(*shape, hidden).to(dtype)
    out, grads, mean, rstd = emulated(ids, tables, dy, padding_idx=0, dropout_p=0.25, seed=seed)
    cpu_out, cpu_mean, cpu_rstd = torch.ops.fastbert.embedding_fwd(word_ids, type_ids, pos_ids, *tables, EPS, 0.25, seed, 0)
    dropped = out == 0
    assert 0.2 < dropped.float().mean().item() < 0.3
    assert torch.equal(dropped, cpu_out == 0)
    torch.testing.assert_close(out, cpu_out, atol=ATOL[dtype], rtol=ATOL[dtype])
    cpu_grads = torch.ops.fastbert.embedding_bwd(dy, word_ids, type_ids, pos_ids, *tables[:4], cpu_mean, cpu_rstd, 0.25,
                                                 seed, 0)
    for k, g in zip(GRADS, cpu_grads):
        scale = max(1.0, g.abs().max().item())
        torch.testing.assert_close(grads[k].float(), g.float(), atol=4 * ATOL[dtype] * scale, rtol=4 * ATOL[dtype], msg=k)


@pytest.mark.parametrize("hidden,dtype", [(768, torch.float32), (100, torch.float16)], ids=["vector-fp32", "any-size-fp16"])
def test_bad_ids_leave_zero_rows_and_record_the_first(hidden, dtype):
    """The kernels never read a row for a bad id: they write zeros there and record the
    smallest (token << 2 | kind), which the host turns into the error message."""
    ids, tables = make((4, 16), hidden, dtype=dtype)
    word_ids, pos_ids, type_ids = (i.clone() for i in ids)
    word_ids[1, 1] = 53          # token 17: one past the word table
    type_ids[0, 5] = -1          # token 5: negative token type
    pos_ids[3, 0] = 1 << 40      # token 48: far outside the position table
    out, _, _, bad = emu.embedding_fwd(word_ids, type_ids, pos_ids, *tables, EPS)
    assert bad == (5 << 2) | 2
    flat = out.reshape(16 * 4, hidden)
    assert flat[[5, 17, 48]].abs().max() == 0
    good = torch.ones(64, dtype=torch.bool)
    good[[5, 17, 48]] = False
    ref = reference.embedding(word_ids.clamp(0, 52), type_ids.clamp(0, 2), pos_ids.clamp(0, 18), *tables, EPS)
    torch.testing.assert_close(flat[good], ref.reshape(64, hidden)[good], atol=ATOL[dtype], rtol=ATOL[dtype])


def test_no_tokens():
    ids, tables = make((0,), 64)
    out, grads, _, _ = emulated(ids, tables, torch.randn(0, 64))
    assert out.shape == (0, 64)
    assert grads["ln_weight"].abs().max() == 0 and grads["ln_bias"].abs().max() == 0
    assert all(grads[k].abs().max() == 0 for k in ("word", "position", "token_type"))


def test_fp32_layernorm_parameters_with_16_bit_tables():
    """Mixed precision keeps LayerNorm's weight and bias in fp32 (param_is_float)."""
    ids, tables = make((3, 37), 768, dtype=torch.float16, ln_dtype=torch.float32)
    dy = torch.randn(3, 37, 768)
    out, grads, _, _ = emulated(ids, tables, dy, padding_idx=0)
    same, same_grads = run("eager", ids, tables, dy, padding_idx=0)
    ref, ref_grads = run("eager", ids, tables, dy.half(), padding_idx=0, dtype=torch.float64)
    assert grads["ln_weight"].dtype == torch.float32
    assert_lowp_close(out, same, ref, ATOL[torch.float16])
    for k in GRADS:
        assert_lowp_close(grads[k], same_grads[k], ref_grads[k], ATOL[torch.float16], f"d{k}")
