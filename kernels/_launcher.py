"""Eager Triton launches without ``JITFunction.run``'s per-call work.

``kernel[grid](*args, **meta)`` binds every argument, asks Triton's specializer about each
one, builds a string key, looks it up, reads several knobs and checks the kernel's globals,
then calls the compiled kernel's launcher: ~22 µs per launch on a 2-core CPU host (Triton
3.9, measured with the launcher itself a no-op), several times what the launcher costs, and
paid ~50 times per eager BERT-base forward. :class:`FastLaunch` keeps, per kernel, the compiled
kernels Triton returned, keyed on a tuple that is at least as fine as Triton's own
specialization of the arguments; a launch whose key it has seen calls the compiled kernel's
launcher directly (``CompiledKernel[grid](*args)``: ~4 µs there, ~9 with the key); any
other goes through Triton, and its compiled kernel is kept.

The key: per positional argument, a tensor's dtype and its address modulo 16 (Triton
specializes on 16-byte alignment), an int's equality to 1, divisibility by 16 and width
(Triton's i32/i64/u64), floats, bools and None by type (``fastbert._C.launch_key``, in C++:
~1 µs for a launch's ~15 arguments, where Python took ~9); the keyword arguments (constexprs
and launch options) by value; the current device. An argument of any other kind (a tensor
descriptor, a tuple) makes the launch go through Triton. ``do_not_specialize`` only makes
Triton's key coarser, so one compiled kernel may sit under several of these keys. Without
``fastbert._C`` every launch goes through Triton.

Used from Triton 3.4 on, whose launchers take every bound argument, constexprs included, in
the kernel's parameter order (``JITFunction.run`` calls them so; ``tests/launcher_standin.py``
compares the two paths' launcher arguments, and passed on Triton 3.4.0, 3.5.1, 3.6.0 and
3.9.0); older versions launch through Triton every time. ``FASTBERT_TRITON_LAUNCH=1`` does
the same (for comparisons).
"""

from __future__ import annotations

import inspect
import os
from typing import Any, Dict, Optional, Tuple

try:
    import triton
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
except ImportError:  # no Triton: only the C++ ops are used
    triton = driver = None
    JITFunction = ()
try:
    from fastbert._C import launch_key
except ImportError:  # fastbert._C not built: every launch goes through Triton
    launch_key = None


def _launchers_take_every_argument() -> bool:
    """Triton 3.4 or later."""
    try:
        major, minor = (int(p) for p in triton.__version__.split(".")[:2])
    except (AttributeError, ValueError):
        return False
    return (major, minor) >= (3, 4)


SUPPORTED = triton is not None and launch_key is not None and _launchers_take_every_argument()
ENABLED = SUPPORTED and os.environ.get("FASTBERT_TRITON_LAUNCH") != "1"


class FastLaunch:
    """Launches of one Triton kernel (a ``JITFunction``) through the compiled kernels it
    has already returned."""

    def __init__(self, kernel):
        self.kernel = kernel
        self.params = list(inspect.signature(kernel.fn).parameters.values())
        self.compiled: Dict[tuple, Tuple[Any, tuple]] = {}

    def _tail(self, count: int, meta: Dict[str, Any]) -> Optional[tuple]:
        """The values of the parameters after the ``count`` positional ones, in order: from
        ``meta`` or their defaults (None when one has neither: let Triton report it)."""
        values = []
        for p in self.params[count:]:
            if p.name in meta:
                values.append(meta[p.name])
            elif p.default is not inspect.Parameter.empty:
                values.append(p.default)
            else:
                return None
        return tuple(values)

    def __call__(self, grid, args: tuple, meta: Dict[str, Any]) -> None:
        key = hit = None
        kinds = launch_key(args)  # None for an argument it cannot key
        if kinds is not None:
            try:
                key = (driver.active.get_current_device(), kinds, tuple(meta.items()))
                hit = self.compiled.get(key)
            except TypeError:  # an unhashable constexpr
                key = None
        if hit is not None:
            compiled, tail = hit
            compiled[grid](*args, *tail)
            return
        compiled = self.kernel[grid](*args, **meta)
        tail = self._tail(len(args), meta)
        if key is not None and tail is not None and hasattr(compiled, "packed_metadata"):
            self.compiled[key] = (compiled, tail)


_launchers: Dict[Any, FastLaunch] = {}


def fast_launch(kernel, grid, args: tuple, meta: Dict[str, Any]) -> None:
    """``kernel[grid](*args, **meta)`` for an eager call (see the module's docstring); the
    grid is a tuple of up to three ints."""
    if not ENABLED or callable(grid) or not isinstance(kernel, JITFunction):
        kernel[grid](*args, **meta)
        return
    launcher = _launchers.get(kernel)
    if launcher is None:
        launcher = _launchers[kernel] = FastLaunch(kernel)
    launcher(grid if len(grid) == 3 else (*grid, 1, 1)[:3], args, meta)
