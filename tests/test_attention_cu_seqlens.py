"""The packed layout's cu_seqlens as callers hand it over: reused for another token count,
strided, written in place, or invalid past every check. Each gets a clear error or the right
answer, and the kernels stay inside the tensors whatever the values."""

import os
import subprocess
import sys

import pytest
import torch

import fastbert
from fastbert import functional as fb

from utils import DEVICE, randn

H = 2
BACKENDS = ["triton", "eager"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_checked_again_for_another_token_count(backend):
    cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    t = randn(12, H, 16)
    with fastbert.use_backend(backend):
        fb.attention(t, t, t, cu_seqlens=cu)  # checked (and remembered) for 12 tokens
        short = randn(8, H, 16)
        with pytest.raises(ValueError, match="ends at 12 but there are 8 tokens"):
            fb.attention(short, short, short, cu_seqlens=cu)
        with pytest.raises(ValueError, match="ends at 12 but there are 8 tokens"):
            fb.attention_qkv(randn(8, 3, H, 16), cu_seqlens=cu)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_cu_seqlens(backend):
    """A strided view holds the same offsets as its contiguous copy; the kernels read a
    unit stride, so it is copied first."""
    t = randn(12, H, 16)
    strided = torch.tensor([0, 99, 5, 99, 12], dtype=torch.int32, device=DEVICE)[::2]
    with fastbert.use_backend(backend):
        expected = fb.attention(t, t, t, cu_seqlens=strided.contiguous())
        torch.testing.assert_close(fb.attention(t, t, t, cu_seqlens=strided), expected, rtol=0, atol=0)
        qkv = torch.stack([t, t, t], dim=1)
        torch.testing.assert_close(fb.attention_qkv(qkv, cu_seqlens=strided), expected, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_written_in_place_is_checked_again(backend):
    """A version counter tells a written tensor; an inference tensor has none, so it is read
    on every call."""
    t = randn(12, H, 16)
    with fastbert.use_backend(backend):
        for mode in (torch.no_grad, torch.inference_mode):
            with mode():
                cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
                fb.attention(t, t, t, cu_seqlens=cu)
                cu[1] = 13
                with pytest.raises(ValueError, match="must not decrease"):
                    fb.attention(t, t, t, cu_seqlens=cu)


_OUT_OF_RANGE = """
import torch
from fastbert.kernels import attention as kernel
t = torch.randn(12, 2, 16, requires_grad=True)
for cu in ([0, 100, 12], [0, -50, 12], [-7, 5, 9], [0, 5, 4000]):
    cu = torch.tensor(cu, dtype=torch.int32)
    out = kernel.attention(t, t, t, cu_seqlens=cu, max_seqlen=128)
    out.sum().backward()
    assert out.shape == t.shape and torch.isfinite(out).all() and torch.isfinite(t.grad).all(), cu
print("ok")
"""


def test_kernels_stay_in_bounds_whatever_cu_seqlens_holds():
    """Past the checks (the kernel called directly), offsets outside [0, T] are clamped to it:
    the forward and backward neither read nor write outside the tensors (under the
    interpreter an out-of-bounds access reads the process's memory or crashes it, so this
    runs in its own interpreter)."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter's run; on a GPU compute-sanitizer is the check")
    done = subprocess.run([sys.executable, "-c", _OUT_OF_RANGE], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
