"""softmax_mask against eager PyTorch at BERT-base's attention-score shape:
32 sequences × 12 heads × 128 × 128, fp16, with Hugging Face's (32, 1, 1, 128) padding mask.

fastbert: ``fastbert.functional.softmax_mask(scores, mask, scale)`` under the "triton"
backend. Eager: ``torch.softmax(scores * scale + mask, -1)`` in the input dtype. Modes,
timings (plain and CUDA graph) and the CPU policy (eager only) are those of
``bench_layernorm``.

GB/s counts the bytes the op must move at the minimum: fwd reads the scores and writes the
probabilities (2·MN elements); bwd reads dy and the scores (or the probabilities) and
writes d scores (3·MN); fwd+bwd the sum (5·MN). The mask (B·S elements) is left out.
"""

from __future__ import annotations

from typing import List

import pytest
import torch

from fastbert import functional as fb

from .common import Measurement, bench_step, default_device, dtype_name, measure_op, triton_backend

SHAPE = (32, 12, 128, 128)


def setup(dtype: torch.dtype, device: str, shape=SHAPE):
    b, h, q, k = shape
    scale = 64 ** -0.5
    scores = torch.randn(*shape, device=device).mul(4).to(dtype).requires_grad_()
    lengths = torch.randint(k // 4, k + 1, (b,), device=device)
    mask = torch.zeros(b, 1, 1, k, device=device, dtype=dtype)
    mask.masked_fill_(torch.arange(k, device=device)[None, None, None, :] >= lengths[:, None, None, None],
                      torch.finfo(dtype).min)
    impls = {
        "fastbert": triton_backend(lambda: fb.softmax_mask(scores, mask, scale)),
        "eager": lambda: torch.softmax(scores * scale + mask, dim=-1),
    }
    return impls, [scores], torch.randn(*shape, device=device).to(dtype)


def run(quick: bool, dtype: torch.dtype, device: str) -> List[Measurement]:
    impls, leaves, dy = setup(dtype, device)
    if not str(device).startswith("cuda"):
        impls = {"eager": impls["eager"]}
    el = torch.empty((), dtype=dtype).element_size()
    mn = SHAPE[0] * SHAPE[1] * SHAPE[2] * SHAPE[3]
    nbytes = {"fwd": 2 * mn * el, "bwd": 3 * mn * el, "fwd+bwd": 5 * mn * el}
    case = f"{'x'.join(map(str, SHAPE))} {dtype_name(dtype)} padding mask"
    return measure_op("softmax_mask", case, impls, leaves, dy, nbytes, device, quick)


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastbert", "eager"])
@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_softmax_mask(benchmark, impl, mode):
    impls, leaves, dy = setup(torch.float16, "cuda")
    bench_step(benchmark, impls[impl], leaves, dy, mode, "cuda")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
def test_softmax_mask_eager_cpu(benchmark, mode):
    """The eager reference on the CPU, at a smaller shape (the kernel needs a GPU)."""
    impls, leaves, dy = setup(torch.float32, "cpu", (4, 12, 128, 128))
    bench_step(benchmark, impls["eager"], leaves, dy, mode, "cpu")


if __name__ == "__main__":
    for m in run(quick=True, dtype=torch.float16 if torch.cuda.is_available() else torch.float32,
                 device=default_device()):
        print(m)
