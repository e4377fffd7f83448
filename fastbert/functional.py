"""fastbert's public functional API: the fused ops.

Each function checks its arguments, asks ``fastbert.ops`` for the implementation that fits
the device and the backend, and calls it. The names and signatures are stable.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import reference
from .ops import implementation

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The last cu_seqlens whose values were checked (or that fastbert built), its version, its
# longest sequence and the token count it was checked against (None: built by fastbert).
_checked_cu_seqlens: list = [None, -1, 0, None]


def _fail(op: str, msg: str):
    raise ValueError(f"fastbert.{op}: {msg}")


def _check_float(op: str, **tensors):
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in _FLOATS:
            _fail(op, f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _check_device(op: str, ref: torch.Tensor, **tensors):
    for name, t in tensors.items():
        if t is not None and t.device != ref.device:
            _fail(op, f"{name} is on {t.device} but the input is on {ref.device}")


def _check_vector(op: str, name: str, t: Optional[torch.Tensor], n: int):
    if t is not None and tuple(t.shape) != (n,):
        _fail(op, f"{name} must have shape ({n},) to match the last dim, got {tuple(t.shape)}")


def _check_dropout(op: str, p: float):
    if not 0.0 <= p < 1.0:
        _fail(op, f"dropout_p must be in [0, 1), got {p}")


def _cannot_sync(t: torch.Tensor) -> bool:
    """True while tracing (torch.compile, torch.export, torch.jit.trace) or capturing a CUDA
    graph: reading values from the device would break the graph, bake them into a trace, or
    invalidate the capture."""
    return (torch.compiler.is_compiling() or torch.jit.is_tracing()
            or (t.is_cuda and torch.cuda.is_current_stream_capturing()))


def check_index_range(op: str, name: str, ids: torch.Tensor, upper: int):
    """Raise a clear error if any id is outside [0, upper). Reads the ids (a device sync),
    so it is skipped under torch.compile and CUDA-graph capture."""
    if ids.numel() == 0 or _cannot_sync(ids):
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= upper:
        bad = lo if lo < 0 else hi
        _fail(op, f"{name} contains {bad}, outside the valid range [0, {upper})")


def embedding(input_ids, token_type_ids, position_ids, word_weight, position_weight,
              token_type_weight, ln_weight, ln_bias, eps, dropout_p=0.0, padding_idx=None):
    """LayerNorm(word[input_ids] + position[position_ids] + token_type[token_type_ids]), then
    dropout. The ids share one shape (any); the output adds the hidden dim. Ids out of range
    raise a ValueError that names the bad value."""
    op = "embedding"
    _check_float(op, word_weight=word_weight, position_weight=position_weight,
                 token_type_weight=token_type_weight, ln_weight=ln_weight, ln_bias=ln_bias)
    ids = {"input_ids": input_ids, "token_type_ids": token_type_ids, "position_ids": position_ids}
    for name, t in ids.items():
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64):
            _fail(op, f"{name} must be an int32 or int64 tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.shape != input_ids.shape:
            _fail(op, f"{name} has shape {tuple(t.shape)} but input_ids has {tuple(input_ids.shape)}")
    tables = {"word_weight": word_weight, "position_weight": position_weight, "token_type_weight": token_type_weight}
    hidden = word_weight.shape[-1]
    for name, t in tables.items():
        if t.dim() != 2 or t.shape[1] != hidden:
            _fail(op, f"{name} must be 2-D with {hidden} columns, got {tuple(t.shape)}")
        if t.dtype != word_weight.dtype:
            _fail(op, f"{name} is {t.dtype} but word_weight is {word_weight.dtype}")
    _check_vector(op, "ln_weight", ln_weight, hidden)
    _check_vector(op, "ln_bias", ln_bias, hidden)
    _check_device(op, word_weight, **ids, position_weight=position_weight,
                  token_type_weight=token_type_weight, ln_weight=ln_weight, ln_bias=ln_bias)
    _check_dropout(op, dropout_p)
    fn = implementation(op, word_weight.device, word_weight.dtype)
    if fn is reference.embedding:  # the kernels check ids themselves, without a separate pass
        check_index_range(op, "input_ids", input_ids, word_weight.shape[0])
        check_index_range(op, "position_ids", position_ids, position_weight.shape[0])
        check_index_range(op, "token_type_ids", token_type_ids, token_type_weight.shape[0])
    return fn(input_ids, token_type_ids, position_ids, word_weight, position_weight,
              token_type_weight, ln_weight, ln_bias, eps, dropout_p, padding_idx)


def add_layernorm(x, residual, weight, bias, eps, x_bias=None, dropout_p=0.0):
    """LayerNorm(dropout(x + x_bias) + residual) over the last dim, statistics in fp32; the
    result in the wider of x's and residual's dtypes (an fp32 residual stream stays fp32
    under autocast, as in HF)."""
    op = "add_layernorm"
    _check_float(op, x=x, residual=residual, weight=weight, bias=bias, x_bias=x_bias)
    if residual.shape != x.shape:
        _fail(op, f"residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
    if x.dim() == 0:
        _fail(op, "x must have at least one dim")
    n = x.shape[-1]
    _check_vector(op, "weight", weight, n)
    _check_vector(op, "bias", bias, n)
    _check_vector(op, "x_bias", x_bias, n)
    _check_device(op, x, residual=residual, weight=weight, bias=bias, x_bias=x_bias)
    _check_dropout(op, dropout_p)
    return implementation(op, x.device, x.dtype)(x, residual, weight, bias, eps, x_bias, dropout_p)


def bias_gelu(x, bias, approximate="none"):
    """gelu(x + bias): ``approximate="none"`` is the exact (erf) GELU, ``"tanh"`` the tanh form."""
    op = "bias_gelu"
    _check_float(op, x=x, bias=bias)
    if approximate not in ("none", "tanh"):
        _fail(op, f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if x.dim() == 0:
        _fail(op, "x must have at least one dim")
    _check_vector(op, "bias", bias, x.shape[-1])
    _check_device(op, x, bias=bias)
    return implementation(op, x.device, x.dtype)(x, bias, approximate)


def linear_gelu(x, weight, bias, approximate="none"):
    """gelu(x @ weight.T + bias), ``weight`` in nn.Linear's (out_features, in_features) layout.

    One kernel (the GEMM with the bias and the GELU in its epilogue) where the backend selects
    it, autocast is off and nothing needs a gradient; otherwise the
    GEMM through ``F.linear`` (cuBLAS, autocast honoured), then :func:`bias_gelu`, whose
    backward has the pre-activation it needs."""
    op = "linear_gelu"
    _check_float(op, x=x, weight=weight, bias=bias)
    if approximate not in ("none", "tanh"):
        _fail(op, f"approximate must be 'none' or 'tanh', got {approximate!r}")
    if x.dim() == 0:
        _fail(op, "x must have at least one dim")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        _fail(op, f"weight must have shape (out_features, {x.shape[-1]}) to match the last dim of x, "
                  f"got {tuple(weight.shape)}")
    _check_vector(op, "bias", bias, weight.shape[0])
    _check_device(op, x, weight=weight, bias=bias)
    autocast = torch.is_autocast_enabled(x.device.type)
    if weight.dtype != x.dtype and not autocast:
        _fail(op, f"weight is {weight.dtype} but x is {x.dtype} (outside autocast they must match, as in F.linear)")
    fn = implementation(op, x.device, x.dtype)
    if (fn is reference.linear_gelu or autocast or torch.jit.is_tracing()  # a trace must serve both grad modes
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad))):
        h = F.linear(x, weight)  # bias_gelu's checks hold: bias is (N,) and on x's device
        return implementation("bias_gelu", h.device, h.dtype)(h, bias, approximate)
    return fn(x, weight, bias, approximate)


def softmax_mask(scores, mask=None, scale=1.0, dropout_p=0.0):
    """softmax(scale * scores + mask) over the last dim, then dropout.

    ``mask`` is additive and broadcasts against ``scores``, as Hugging Face builds it:
    (B, 1, 1, S) or (B, 1, S, S). Entries of -inf or the dtype's most negative value are
    masked; a row with every entry masked gives zeros.
    """
    op = "softmax_mask"
    _check_float(op, scores=scores, mask=mask)
    if scores.dim() == 0:
        _fail(op, "scores must have at least one dim")
    if mask is not None:
        try:
            shape = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            _fail(op, f"mask of shape {tuple(mask.shape)} does not broadcast to scores {tuple(scores.shape)}")
    _check_device(op, scores, mask=mask)
    _check_dropout(op, dropout_p)
    return implementation(op, scores.device, scores.dtype)(scores, mask, scale, dropout_p)


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, op: str = "attention") -> Optional[int]:
    """Raise a clear error unless ``cu_seqlens`` starts at 0, never decreases and ends at
    ``total``; return the longest sequence. Reads the values (a device sync), once per tensor
    version and token count: again on every call for an inference tensor (no version counter
    tells whether it was written since), unless fastbert built it. Returns None without
    reading them under torch.compile or CUDA-graph capture."""
    if cu_seqlens.dtype != torch.int32:
        _fail(op, f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        _fail(op, f"cu_seqlens must be 1-D with batch+1 entries, got shape {tuple(cu_seqlens.shape)}")
    if _cannot_sync(cu_seqlens):
        return None
    # Inference tensors (torch.inference_mode) have no version counter: they are known by identity.
    version = None if cu_seqlens.is_inference() else cu_seqlens._version
    last, last_version, longest, last_total = _checked_cu_seqlens
    if last is cu_seqlens and last_version == version and (
            last_total is None or (last_total == total and version is not None)):
        return longest
    values = cu_seqlens.tolist()
    if values[0] != 0:
        _fail(op, f"cu_seqlens must start at 0, got {values[0]}")
    if any(b < a for a, b in zip(values, values[1:])):
        _fail(op, f"cu_seqlens must not decrease, got {values}")
    if values[-1] != total:
        _fail(op, f"cu_seqlens ends at {values[-1]} but there are {total} tokens")
    longest = max((b - a for a, b in zip(values, values[1:])), default=0)
    _checked_cu_seqlens[:] = [cu_seqlens, version, longest, total]
    return longest


def mark_cu_seqlens_checked(cu_seqlens: torch.Tensor, longest: int) -> None:
    """Record ``cu_seqlens`` (whose longest sequence is ``longest``) as valid without reading
    it: for code that built it itself (the model's unpadding), so that no layer pays a device
    sync to check it."""
    _checked_cu_seqlens[:] = [cu_seqlens, None if cu_seqlens.is_inference() else cu_seqlens._version, longest, None]


def attention(q, k, v, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0):
    """softmax(q kᵀ · scale + key-padding mask) v, never forming the S×S matrix in the kernels.

    Padded: q, k, v (B, S, H, D); ``attention_mask`` (B, S_k), 1/True for real keys.
    Packed: q, k, v (T, H, D); ``cu_seqlens`` (B+1,) int32 on the same device; ``max_seqlen``
    the longest sequence or more (computed if None; a shorter one raises, except under
    torch.compile or CUDA-graph capture, where cu_seqlens cannot be read). ``scale``
    defaults to D**-0.5. A query with no
    real key gets zeros.
    """
    op = "attention"
    _check_float(op, q=q, k=k, v=v)
    cu_seqlens = _contiguous(cu_seqlens)
    max_seqlen = _check_attention(op, q, k, v, attention_mask, cu_seqlens, max_seqlen, dropout_p)
    return implementation(op, q.device, q.dtype)(q, k, v, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                                 scale=scale, dropout_p=dropout_p)


def attention_qkv(qkv, attention_mask=None, *, cu_seqlens=None, max_seqlen=None, scale=None, dropout_p=0.0):
    """:func:`attention` over q, k, v = qkv.unbind(-3), the layout of a fused QKV projection's
    output: qkv is (B, S, 3, H, D) padded or (T, 3, H, D) packed, and the other arguments are
    :func:`attention`'s. The same result; the gradient of qkv comes out of the kernel as one
    tensor rather than as three that autograd then stacks (one copy of qkv fewer per call)."""
    op = "attention_qkv"
    _check_float(op, qkv=qkv)
    cu_seqlens = _contiguous(cu_seqlens)
    want = 4 if cu_seqlens is not None else 5
    if qkv.dim() != want or qkv.shape[-3] != 3:
        layout = "(T, 3, H, D) when packed" if cu_seqlens is not None else "(B, S, 3, H, D) when padded"
        _fail(op, f"qkv must be {layout}, got {tuple(qkv.shape)}")
    if qkv.shape[-1] == 0:
        _fail(op, f"the head dim must be at least 1, got qkv {tuple(qkv.shape)}")
    # q, k and v are parts of one tensor, so their dtypes, devices and shapes agree.
    _check_device(op, qkv, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
    _check_dropout(op, dropout_p)
    if cu_seqlens is None:
        if attention_mask is not None and tuple(attention_mask.shape) != (qkv.shape[0], qkv.shape[1]):
            _fail(op, f"attention_mask must be (batch, key_len) = {(qkv.shape[0], qkv.shape[1])}, "
                      f"got {tuple(attention_mask.shape)}")
    else:
        max_seqlen = _check_packed(op, attention_mask, cu_seqlens, qkv.shape[0], max_seqlen)
    return implementation(op, qkv.device, qkv.dtype)(qkv, attention_mask, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                                     scale=scale, dropout_p=dropout_p)



def _contiguous(cu_seqlens: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The kernels read cu_seqlens with a unit stride (a strided view is copied)."""
    if isinstance(cu_seqlens, torch.Tensor) and not cu_seqlens.is_contiguous():
        return cu_seqlens.contiguous()
    return cu_seqlens


def _check_attention(op: str, q, k, v, attention_mask, cu_seqlens, max_seqlen, dropout_p) -> Optional[int]:
    """Raise a clear error for inputs :func:`attention` cannot take; return ``max_seqlen``
    (computed for the packed layout when None)."""
    if not (q.dtype == k.dtype == v.dtype):
        _fail(op, f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.dim() and (q.shape[-1] == 0 or v.shape[-1] == 0):
        _fail(op, f"head dims must be at least 1, got q {tuple(q.shape)}, v {tuple(v.shape)}")
    _check_device(op, q, k=k, v=v, attention_mask=attention_mask, cu_seqlens=cu_seqlens)
    _check_dropout(op, dropout_p)
    if cu_seqlens is None:
        if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
            _fail(op, f"padded q, k, v must be (B, S, H, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2] or q.shape[3] != k.shape[3]:
            _fail(op, f"q, k, v shapes do not agree: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != (k.shape[0], k.shape[1]):
            _fail(op, f"attention_mask must be (batch, key_len) = {(k.shape[0], k.shape[1])}, got {tuple(attention_mask.shape)}")
        return max_seqlen
    if q.dim() != 3 or q.shape != k.shape or k.shape[:2] != v.shape[:2]:
        _fail(op, f"packed q, k, v must be (T, H, D) with the same T and H, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    return _check_packed(op, attention_mask, cu_seqlens, q.shape[0], max_seqlen)


def _check_packed(op: str, attention_mask, cu_seqlens, total: int, max_seqlen) -> Optional[int]:
    """The packed layout's checks; ``max_seqlen``, computed when None."""
    if attention_mask is not None:
        _fail(op, "pass either attention_mask (padded layout) or cu_seqlens (packed layout), not both")
    longest = check_cu_seqlens(cu_seqlens, total, op)
    if max_seqlen is None:
        return longest if longest is not None else (
            int((cu_seqlens[1:] - cu_seqlens[:-1]).max()) if cu_seqlens.numel() > 1 else 0)
    if longest is not None and max_seqlen < longest:  # the kernels would skip the rest of the rows
        _fail(op, f"max_seqlen is {max_seqlen} but the longest sequence in cu_seqlens has {longest} tokens")
    return max_seqlen
