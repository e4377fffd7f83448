"""Fused BERT embedding: LayerNorm(word[ids] + position[pos] + token_type[tt]), then dropout.

The kernels are C++ (CPU) and CUDA, compiled into ``fastbert._C`` from ``csrc/``: one pass
per token gathers the three rows, sums them, normalises in fp32 and writes the table dtype.
This module gives their two ops, ``fastbert::embedding_fwd`` and ``fastbert::embedding_bwd``,
a fake implementation (for torch.compile) and an autograd formula, and exposes
:func:`embedding` with exactly the signature of ``fastbert.reference.embedding``.

Ids out of range are found inside the kernels, which never read outside a table; the op then
raises a ValueError naming the value. On CUDA this costs one 8-byte device-to-host copy and a
stream sync per forward.

Dropout: the forward takes a seed (an int64 tensor on the device, drawn here from torch's
generator, so CUDA-graph replays draw fresh ones) and the keep bits are Philox of (seed,
token, column). The backward regenerates the mask from the same seed rather than storing it:
nothing is written in the forward, and the op stays a pure function of its inputs.

The backward has no atomics (table gradients are sums over stably sorted ids, in token order;
LayerNorm parameter gradients are fixed-order partial sums), so it gives the same bits on
every run, with or without ``torch.use_deterministic_algorithms``.

Importing this module raises ImportError when ``fastbert._C`` is not built; ``fastbert.ops``
then runs the eager reference and reports why through ``fastbert.ops.load_kernel("embedding")``.
"""

from __future__ import annotations

import warnings

import torch

from fastbert import reference
from fastbert.backend import get_backend

from ._direct import below_autograd, register_autograd

try:
    from fastbert import _C
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "fastbert._C is not built, so the fused embedding kernel is unavailable and the eager reference "
        "runs instead. Build it from the repository root with `pip install --no-build-isolation -e .` "
        f"(torch must be installed first, and FASTBERT_SKIP_EXT unset). Import error: {exc}"
    ) from exc

__all__ = ["embedding", "build_info"]

# Read once: a constant to torch.compile, which cannot trace a call into the extension.
_CUDA_BUILT = bool(_C.cuda_built())


def build_info() -> dict:
    """What ``fastbert._C`` was compiled with: CUDA kernels or not, and for which archs."""
    archs = [a for a in _C.cuda_archs().split("_") if a]
    return {"cuda": _CUDA_BUILT, "archs": [f"sm_{a}" for a in archs]}


# ---------------------------------------------------------------------------------------------
# torch.compile: output shapes and dtypes without running the kernels.

def _stat_dtype(table: torch.Tensor) -> torch.dtype:
    return torch.float64 if table.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastbert::embedding_fwd")
def _embedding_fwd_fake(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
                        ln_weight, ln_bias, eps, dropout_p, seed, padding_idx):
    out = word_weight.new_empty((*input_ids.shape, word_weight.shape[1]))
    mean = word_weight.new_empty(input_ids.shape, dtype=_stat_dtype(word_weight))
    return out, mean, torch.empty_like(mean)


@torch.library.register_fake("fastbert::embedding_bwd")
def _embedding_bwd_fake(grad_out, input_ids, token_type_ids, position_ids, word_weight, position_weight,
                        token_type_weight, ln_weight, mean, rstd, dropout_p, seed, padding_idx):
    return (word_weight.new_empty(word_weight.shape), position_weight.new_empty(position_weight.shape),
            token_type_weight.new_empty(token_type_weight.shape), ln_weight.new_empty(ln_weight.shape),
            ln_weight.new_empty(ln_weight.shape))


# ---------------------------------------------------------------------------------------------
# Autograd: the backward op recomputes x-hat from the saved per-token mean and rstd and the
# three rows, so nothing of size tokens x hidden is saved.

def _setup_context(ctx, inputs, output):
    (input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
     ln_weight, _ln_bias, _eps, dropout_p, seed, padding_idx) = inputs
    _, mean, rstd = output
    ctx.save_for_backward(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
                          ln_weight, mean, rstd, seed)
    ctx.dropout_p = dropout_p
    ctx.padding_idx = padding_idx
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_out, _grad_mean, _grad_rstd):
    (input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
     ln_weight, mean, rstd, seed) = ctx.saved_tensors
    grads = torch.ops.fastbert.embedding_bwd(
        grad_out, input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
        ln_weight, mean, rstd, ctx.dropout_p, seed, ctx.padding_idx)
    need = ctx.needs_input_grad
    gw, gp, gt, glw, glb = (g if need[i] else None for i, g in zip(range(3, 8), grads))
    return None, None, None, gw, gp, gt, glw, glb, None, None, None, None


_call = register_autograd("fastbert::embedding_fwd", _backward, _setup_context,
                          body=below_autograd(torch.ops.fastbert.embedding_fwd.default))


# ---------------------------------------------------------------------------------------------

_warned_no_cuda = []


def _reference_with_checks(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
                           ln_weight, ln_bias, eps, dropout_p, padding_idx):
    from fastbert.functional import check_index_range  # late: fastbert.functional imports the registry

    check_index_range("embedding", "input_ids", input_ids, word_weight.shape[0])
    check_index_range("embedding", "position_ids", position_ids, position_weight.shape[0])
    check_index_range("embedding", "token_type_ids", token_type_ids, token_type_weight.shape[0])
    return reference.embedding(input_ids, token_type_ids, position_ids, word_weight, position_weight,
                               token_type_weight, ln_weight, ln_bias, eps, dropout_p, padding_idx)


def embedding(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
              ln_weight, ln_bias, eps, dropout_p=0.0, padding_idx=None):
    """LN(W_word[ids] + W_pos[pos] + W_type[tt]), then dropout; the output is ids.shape + (hidden,)
    in the table dtype. Ids are int32 or int64, of any one shape (padded (B, S) or packed (T,))."""
    args = (input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
            ln_weight, ln_bias, eps, dropout_p, padding_idx)
    if word_weight.is_cuda:
        if word_weight.dtype == torch.float64:  # the CUDA kernels cover fp16, bf16 and fp32
            return _reference_with_checks(*args)
        if not _CUDA_BUILT:
            msg = ("fastbert._C was built without its CUDA kernels (torch had no CUDA or nvcc was missing at "
                   "build time); rebuild with `pip install --no-build-isolation -e .` on a CUDA machine")
            if get_backend() == "triton":
                raise RuntimeError(f"fastbert: {msg}")
            if not _warned_no_cuda:
                _warned_no_cuda.append(True)
                warnings.warn(f"{msg}; the embedding runs the eager reference on CUDA", stacklevel=2)
            return _reference_with_checks(*args)
    if ln_weight.dtype not in (word_weight.dtype, torch.float32) or ln_bias.dtype != ln_weight.dtype:
        ln_weight, ln_bias = ln_weight.float(), ln_bias.float()  # the kernels take fp32 or the table dtype
    seed = None
    if dropout_p > 0.0:
        seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=word_weight.device)
    out, _, _ = _call(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
                      ln_weight, ln_bias, float(eps), float(dropout_p), seed, padding_idx)
    return out
