"""embedding against eager PyTorch: 4096 tokens (B=32, S=128) × 768, BERT-base's tables.

fastbert: ``fastbert.functional.embedding`` under the "auto" backend, i.e. fastbert._C's CUDA
kernel on a GPU and its C++ kernel on the CPU. Eager: three ``F.embedding`` + two adds +
``F.layer_norm`` in the table dtype, the code a user would write. Modes: "fwd" (no autograd),
"bwd" (gradients of the three tables and the LayerNorm parameters from a kept forward),
"fwd+bwd".

GPU timings (fp16 by default), each its own case so speed-ups compare like with like:
- plain: ``triton.testing.do_bench``. fastbert's forward includes the id check's 8-byte
  copy and stream sync, so this is the time a caller waits per forward;
- ", CUDA graph": ``do_bench_cudagraph``: no host cost and no sync (inside a graph the check
  is deferred to the next eager call), i.e. the kernels' own time.
- "fastbert-unchecked" (forward only): the same call under ``fastbert.assume_valid_ids()``,
  which skips the copy and the sync; its plain time against "fastbert"'s is the price of the
  id check.

CPU timings (always fp32, whatever dtype is asked: fp16 arithmetic on a CPU is not what
anyone runs): medians of synchronous wall-clock repeats. "eager+check" adds the range check
the eager path needs (``torch.aminmax`` over each id tensor), which fastbert's kernels do in
the same pass.

GB/s counts the minimum bytes, the same for both implementations: fwd reads the ids and the
three gathered rows and writes the output; bwd reads dy, the ids and the three rows (to
recompute x-hat) and writes three gradient rows per token; fwd+bwd is the sum. The dense
zero-fill of the word-table gradient (30522 × 768) is left out of both.
"""

from __future__ import annotations

from typing import Dict, List

import pytest
import torch
import torch.nn.functional as F

import fastbert
from fastbert import functional as fb

from .common import Measurement, bench_step, dtype_name, measure_op

BATCH, SEQ, HIDDEN = 32, 128, 768
VOCAB = (30522, 512, 2)
EPS = 1e-12


def setup(dtype: torch.dtype, device: str, batch: int = BATCH, seq: int = SEQ, hidden: int = HIDDEN):
    """Forward closures of each implementation over fresh random tables, the leaves, and dy."""
    ids = torch.randint(1, VOCAB[0], (batch, seq), device=device)
    types = torch.randint(0, VOCAB[2], (batch, seq), device=device)
    positions = torch.arange(seq, device=device).expand(batch, seq)

    def p(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype).requires_grad_()

    word, pos, tt = p(VOCAB[0], hidden, scale=0.02), p(VOCAB[1], hidden, scale=0.02), p(VOCAB[2], hidden, scale=0.02)
    lnw, lnb = p(hidden), p(hidden)
    leaves = [word, pos, tt, lnw, lnb]

    def fastbert_fn():
        with fastbert.use_backend("auto"):
            return fb.embedding(ids, types, positions, word, pos, tt, lnw, lnb, EPS, 0.0, 0)

    def eager_fn():
        x = F.embedding(ids, word, padding_idx=0) + F.embedding(positions, pos) + F.embedding(types, tt)
        return F.layer_norm(x, (hidden,), lnw, lnb, EPS)

    def eager_checked_fn():
        for t, n in ((ids, VOCAB[0]), (positions, VOCAB[1]), (types, VOCAB[2])):
            lo, hi = torch.aminmax(t)
            if int(lo) < 0 or int(hi) >= n:
                raise ValueError("id out of range")
        return eager_fn()

    def unchecked_fn():
        with fastbert.assume_valid_ids():
            return fastbert_fn()

    impls = {"fastbert": fastbert_fn, "eager": eager_fn}
    if str(device).startswith("cuda"):
        impls["fastbert-unchecked"] = unchecked_fn
    else:
        impls["eager+check"] = eager_checked_fn
    dy = torch.randn(batch, seq, hidden, device=device).to(dtype)
    return impls, leaves, dy


def min_bytes(tokens: int, hidden: int, el: int, id_el: int = 8) -> Dict[str, int]:
    ids = 3 * tokens * id_el
    rows = 3 * tokens * hidden * el
    act = tokens * hidden * el
    fwd = ids + rows + act
    bwd = act + ids + rows + rows
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def run(quick: bool, dtype: torch.dtype, device: str) -> List[Measurement]:
    on_gpu = str(device).startswith("cuda")
    if not on_gpu:
        dtype = torch.float32
    impls, leaves, dy = setup(dtype, device)
    tokens = BATCH * SEQ
    nbytes = min_bytes(tokens, HIDDEN, torch.empty((), dtype=dtype).element_size())
    case = f"{tokens}x{HIDDEN} {dtype_name(dtype)}" + ("" if on_gpu else " (CPU)")
    return measure_op("embedding", case, impls, leaves, dy, nbytes, device, quick,
                      fwd_only=("eager+check", "fastbert-unchecked"))


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastbert", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_embedding(benchmark, impl, mode):
    impls, leaves, dy = setup(torch.float16, "cuda")
    bench_step(benchmark, impls[impl], leaves, dy, mode, "cuda")


@pytest.mark.parametrize("impl", ["fastbert", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_embedding_cpu(benchmark, impl, mode):
    """The C++ kernel against eager on the CPU, fp32, at 1024 tokens."""
    impls, leaves, dy = setup(torch.float32, "cpu", batch=8)
    bench_step(benchmark, impls[impl], leaves, dy, mode, "cpu")
