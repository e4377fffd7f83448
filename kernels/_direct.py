"""Eager calls of fastbert's ops without the custom-op layer, and eager launches without
the tracing layer.

Every kernel is a ``torch.library`` custom op (``triton_op`` on the GPU), so that torch.compile
traces into it, opcheck checks it and fake tensors propagate shapes. An eager call of such an
op goes through the dispatcher and torch's Python autograd wrapper for custom ops (argument
normalisation, a redispatch below autograd, a Dynamo-disable wrapper). Measured on a 2-core
CPU host with the Triton launch stubbed out: ``fb.add_layernorm`` with autograd 138 µs through
the op, 46 µs through this module; the C++ embedding op 135 µs -> 56 µs.

:func:`register_autograd` registers the backward on the op and returns ``call``: the op while
torch.compile traces or a dispatch mode is active, otherwise an ``autograd.Function`` that
runs the op's own body with the same ``setup_context`` and ``backward``, or, when no input
needs a gradient (inference), the body alone. The backward picks the backward op's body the
same way (:func:`backward_impl`). Every path runs the same launches. Host time of one
inference call (no grad, 4096×768, same host, Triton's launch stubbed out): add_layernorm
50 µs through the autograd.Function, 20 µs through the body alone; bias_gelu 26 -> 14 µs;
attention 39 -> 22 µs.

:func:`launch` starts a Triton kernel from an op's body: through ``wrap_triton`` while
torch.compile traces or a dispatch mode is active, so that they record the launch, and
directly otherwise. In eager mode ``wrap_triton(kernel)[grid](...)`` still turns the launch
into a higher-order op, binds its arguments and files them in a side table that grows by one
entry per launch: ~280 µs per launch on a 2-core CPU host (torch 2.11, Triton's own launch
stubbed out) against 2.3 µs for ``kernel[grid](...)``, the same launch. Eager launches skip
``JITFunction.run`` too, once it has compiled the kernel for the arguments' kind
(:mod:`._launcher`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ._launcher import fast_launch

try:
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # no Triton: only the C++ ops use this module
    InterpretedFunction = ()


def register_autograd(op, backward: Callable, setup_context: Callable, body: Optional[Callable] = None,
                      infer: Optional[Callable] = None) -> Callable:
    """Register ``backward``/``setup_context`` on the custom op ``op`` and return the function
    to call it with. ``op`` is one of fastbert's Python custom ops (its implementation is
    ``op.body``), or the qualified name of an op defined in C++ ("fastbert::embedding_fwd"),
    whose ``body`` is then given (:func:`below_autograd`). ``infer``, when given, stands in for
    the body where nothing needs a gradient: it may skip what only a backward reads (and
    return None in its place)."""
    if isinstance(op, str):
        torch.library.register_autograd(op, backward, setup_context=setup_context)
        namespace, name = op.split("::")
        op = getattr(getattr(torch.ops, namespace), name)
    else:
        op.register_autograd(backward, setup_context=setup_context)
        body = op.body

    # forward(ctx, ...) rather than a separate setup_context: with one, Function.apply binds
    # the arguments through inspect.signature on every call (~15 µs).
    def forward(ctx, *args):
        output = body(*args)
        ctx.direct = True
        setup_context(ctx, args, output)
        return output

    name = (getattr(op, "_qualname", None) or str(op)).replace("::", "_").replace(".", "_")
    Direct = type(f"{name}_direct", (torch.autograd.Function,),  # grad_fn: <op>_directBackward
                  {"forward": staticmethod(forward), "backward": staticmethod(backward)})

    inference = infer or body

    def call(*args):
        # The op while torch.compile traces, and under any dispatch mode (fake tensors, flop
        # counters, debug modes), which expect to see the op.
        if _traced():
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            return Direct.apply(*args)
        return inference(*args)  # nothing to differentiate: no autograd node to build

    return call


def _traced() -> bool:
    """torch.compile or torch.jit.trace is tracing, or a dispatch mode (fake tensors,
    functionalization, flop counters) is active: they must see the op, and the launch as
    ``wrap_triton``."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or bool(torch._C._len_torch_dispatch_stack())


def launch(kernel, grid, *args, **meta) -> None:
    """``kernel[grid](*args, **meta)`` from an op's body; traced, through ``wrap_triton``.
    Under TRITON_INTERPRET the kernel is a plain Python function that cannot run on fake
    tensors; there (shape propagation for torch.compile and opcheck) only the outputs'
    shapes matter, so the launch is skipped."""
    if not _traced():
        if interpreted(kernel):
            kernel[grid](*args, **meta)
        else:
            fast_launch(kernel, grid, args, meta)
        return
    if interpreted(kernel) and any(isinstance(a, torch.Tensor) and is_fake(a) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def interpreted(kernel) -> bool:
    """The kernel runs under TRITON_INTERPRET (a Python function, not a compiled one)."""
    return isinstance(kernel, InterpretedFunction)


def below_autograd(op) -> Callable:
    """The body of an op defined in C++: the op called below the autograd key."""
    def body(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return body


def backward_impl(ctx, op) -> Callable:
    """In a backward: the backward op's implementation (``op.body``) when the forward ran
    directly, else the op itself (the graph torch.compile traced)."""
    return op.body if getattr(ctx, "direct", False) else op


# Host-side integer helpers: triton.cdiv and triton.next_power_of_2 are constexpr functions
# whose __call__ unwraps every argument (a few µs each, several per launch).

def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b  # this form, not -(-a // b): symbolic sizes simplify it cheaply


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), a plain int. Block sizes are compile-time
    constants of a kernel, so a symbolic size (torch.compile's dynamic shapes, opcheck's
    dynamic-shape check) is specialized here: a SymInt block size cannot be a constexpr."""
    return 1 << max(int(n) - 1, 0).bit_length()
