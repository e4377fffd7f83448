"""Q, K and V as one GEMM, without copying their weights.

``BertSelfAttention`` keeps Hugging Face's three ``nn.Linear`` projections (their parameter
names, and every tool that wraps, hooks or replaces one of them). Their weights, and their
biases, are laid end to end in one tensor each (:func:`place_side_by_side`): when the module
is built, after every conversion that makes new tensors (``.to()``, ``.half()``…), after
``load_state_dict``, a deep copy and unpickling. The (3H, H) weight and (3H,) bias of the
fused GEMM are then views of the parameters themselves (:func:`fused_qkv`, which remembers
the last layout it found and checks it with a few comparisons per call): free to take,
never stale, whatever writes the parameters (an optimizer, ``p.data`` written in place by
peft's merge or EMA code), and a CUDA graph that reads them reads the live weights. Where
the parameters are not laid out so (parameters replaced from outside,
``torch.func.functional_call``, FSDP's flat parameters, tensor subclasses), the fused weight
is concatenated on every call, as it must be to stay current.
"""

from __future__ import annotations

import weakref
from typing import Optional, Sequence, Tuple

import torch
from torch import nn


_PLAIN = (torch.Tensor, nn.Parameter)  # tensor subclasses are left alone


def side_by_side(tensors: Sequence[torch.Tensor]) -> Optional[torch.Tensor]:
    """One tensor viewing ``tensors`` concatenated along dim 0, if they already lie end to
    end in one storage (contiguous, same dtype and trailing shape); else None."""
    first = tensors[0]
    if not first.is_contiguous() or type(first) not in _PLAIN:
        return None
    storage = first.untyped_storage().data_ptr()
    end = first.data_ptr() + first.numel() * first.element_size()
    rows = first.shape[0]
    for t in tensors[1:]:
        if (t.data_ptr() != end or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]
                or not t.is_contiguous() or type(t) not in _PLAIN
                or t.untyped_storage().data_ptr() != storage):
            return None
        end += t.numel() * t.element_size()
        rows += t.shape[0]
    return first.as_strided((rows, *first.shape[1:]), first.stride())


class _SideBySide(torch.autograd.Function):
    """The parameters' joint view, differentiable: the gradient of the whole is split back
    into the parameters' own (views of it, no copy)."""

    @staticmethod
    def forward(ctx, whole, *parts):
        ctx.rows = [p.shape[0] for p in parts]
        return whole

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.split(ctx.rows))


def joint(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)``, as a view where they lie side by side (gradients flow to each)."""
    return _differentiable(side_by_side(tensors), tensors)


def _differentiable(whole: Optional[torch.Tensor], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``whole``, the view of ``tensors`` side by side, as a differentiable function of them
    when autograd records; their concatenation where they do not lie so (``whole`` None)."""
    if whole is None:
        return torch.cat(tuple(tensors))
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _SideBySide.apply(whole.detach(), *tensors)
    return whole


# The last layout found, per query projection (see fused_qkv).
_layouts: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def fused_qkv(linears: Sequence[nn.Linear], traced: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The (3H, H) weight and (3H,) bias of the projections ``linears`` (query, key, value).
    ``traced``: torch.compile or a trace is recording, which sees a concatenation (its graph
    must not depend on where the parameters happen to lie). A projection without a bias adds
    zeros to the fused one (None when none of them has one)."""
    weights = [m.weight for m in linears]
    biases = [m.bias for m in linears]
    if any(b is None for b in biases):
        if all(b is None for b in biases):
            return (torch.cat(weights) if traced else joint(weights)), None
        biases = [b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(biases, weights)]
        traced = True  # new zeros on every call: nothing lies side by side
    if traced:
        return torch.cat(weights), torch.cat(biases)
    tensors = (*weights, *biases)
    if any(type(t) not in _PLAIN for t in tensors):
        return torch.cat(weights), torch.cat(biases)
    # side_by_side's checks cost ~7 µs per group on a 2-core CPU host; comparing each
    # tensor's identity, address, dtype, shape and contiguity with the last call's ~0.6.
    # A view the cache holds keeps its parameters' storage alive, so their addresses cannot
    # come back in other memory while the entry stands (place_side_by_side drops it).
    layout = tuple((id(t), t.data_ptr(), t.dtype, t.shape, t.is_contiguous()) for t in tensors)
    cached = _layouts.get(linears[0])
    if cached is None or cached[0] != layout:
        cached = _layouts[linears[0]] = (layout, side_by_side(weights), side_by_side(biases))
    return _differentiable(cached[1], weights), _differentiable(cached[2], biases)


def place_side_by_side(linears: Sequence[nn.Linear]) -> bool:
    """Lay the weights, and the biases, of ``linears`` end to end in one new tensor each (one
    copy), unless they already are; the parameters stay the same objects. Skipped (False) for
    anything but plain parameters on one real device in one dtype (meta tensors, tensor
    subclasses, a projection without a bias, a wrapped projection)."""
    _layouts.pop(linears[0], None)  # let go of a layout the parameters may have left
    if not all(type(m) is nn.Linear and m.bias is not None for m in linears):
        return False
    for group in ([m.weight for m in linears], [m.bias for m in linears]):
        if any(type(p) is not nn.Parameter or p.is_meta or p.device != group[0].device or p.dtype != group[0].dtype
               for p in group):
            return False
    for group in ([m.weight for m in linears], [m.bias for m in linears]):
        if side_by_side(group) is None:
            with torch.no_grad():
                whole = torch.cat([p.detach() for p in group])
            start = 0
            for p in group:
                p.data = whole[start:start + p.shape[0]]
                start += p.shape[0]
    return True
