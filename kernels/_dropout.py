"""Dropout inside the kernels (row-wise ops and attention), from Philox counters.

The keep mask is a pure function of (seed, element index), so the backward kernels
regenerate it instead of reading a stored mask: no extra tensor is written or read.

The seed is a one-element int64 tensor on the tensors' device, drawn from torch's default
generator for that device: ``torch.manual_seed`` makes runs reproducible, and under
``torch.compile`` or CUDA graphs a fresh seed is drawn on every call (a Python int would be
frozen into the graph).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Element indices are the Philox counters; they are int32 in the kernels.
MAX_DROPOUT_ELEMENTS = 2**31 - 1


def draw_seed(dropout_p: float, device: torch.device) -> Optional[torch.Tensor]:
    """A fresh seed for a launch with dropout, or None without dropout."""
    if dropout_p == 0.0:
        return None
    return torch.randint(0, 2**31 - 1, (1,), device=device, dtype=torch.int64)


def check_dropout(op: str, dropout_p: float, numel: int, seed: Optional[torch.Tensor]) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"fastbert.{op}: dropout_p must be in [0, 1), got {dropout_p}")
    if dropout_p > 0.0:
        if seed is None or seed.numel() != 1 or seed.dtype != torch.int64:
            raise ValueError(f"fastbert.{op}: dropout needs a one-element int64 seed tensor")
        if numel > MAX_DROPOUT_ELEMENTS:
            raise ValueError(f"fastbert.{op}: dropout supports at most {MAX_DROPOUT_ELEMENTS} elements "
                             f"per call, got {numel}")


@triton.jit
def keep_mask(seed, offsets, p):
    """True where the element survives dropout with drop probability ``p``."""
    return tl.rand(seed, offsets) >= p
