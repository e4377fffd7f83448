"""Triton launches under a stand-in CUDA driver, for tests/test_launcher.py: an sm_90 target
(Triton compiles for Hopper without a GPU) whose launcher records its arguments instead of
launching. Run as a script in a fresh interpreter without TRITON_INTERPRET: the interpreter
patches triton.language for good once it has run a kernel, after which nothing compiles.

    python tests/launcher_standin.py      # prints "ok" or fails with the first difference
"""

import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from fastbert.kernels._launcher import FastLaunch


def _scale_rows(X, Y, N, scale, FLIP: "tl.constexpr", BLOCK: "tl.constexpr", EXTRA: "tl.constexpr" = 3):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + offs, mask=offs < N)
    y = x * scale * EXTRA
    if FLIP:
        y = -y
    tl.store(Y + offs, y, mask=offs < N)


def _comparable(arg):
    """Launch metadata (a LazyDict made afresh for each launch when a launch hook is set) as
    its contents."""
    if type(arg).__name__ == "LazyDict":
        return ("LazyDict", dict(arg.data), [(fn, len(args)) for fn, args in getattr(arg, "extras", [])])
    return arg


class _Recorder:
    """A stand-in for the CUDA driver: compiles for sm_90, loads nothing, and each compiled
    kernel's launcher appends (its id, the launch arguments) to ``calls``."""

    def __init__(self):
        self.target = GPUTarget("cuda", 90, 32)
        self.calls = []
        recorder = self

        class Launcher:
            def __init__(self, src, metadata):
                pass

            def __call__(self, *args):
                recorder.calls.append((id(self), tuple(map(_comparable, args))))

        class Utils:
            def load_binary(self, name, kernel, shared, device):
                return 1, 1, 64, 0, 1024

            def get_device_properties(self, device):
                return {"max_shared_mem": 232448, "multiprocessor_count": 132}

            def unload_module(self, module):
                pass

        self.launcher_cls, self.utils = Launcher, Utils()

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 7

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")


def _fresh():
    """(a fresh JITFunction, its FastLaunch)."""
    kernel = JITFunction(_scale_rows)
    return kernel, FastLaunch(kernel)


def launches_match_triton(recorder):
    """A launch through FastLaunch hands the launcher exactly what Triton's own launch does,
    for aligned, misaligned, N == 1, defaulted-constexpr and other-warps launches, each with its
    own compiled kernel, also when revisited."""
    kernel, fast = _fresh()
    x = torch.zeros(300, dtype=torch.float16)
    y = torch.zeros_like(x)
    cases = [
        ((x, y, 300, 0.5), dict(FLIP=False, BLOCK=128, num_warps=4)),
        ((x, y, 300, 0.5), dict(FLIP=True, BLOCK=128, EXTRA=5, num_warps=4)),
        ((x[1:], y[1:], 299, 2.0), dict(FLIP=False, BLOCK=128, num_warps=4)),  # misaligned
        ((x, y, 1, 0.5), dict(FLIP=False, BLOCK=128, num_warps=4)),  # N == 1: Triton makes it a constant
        ((x, y, 256, 0.5), dict(FLIP=False, BLOCK=128, num_warps=2)),
    ]
    for args, meta in cases:
        grid = (3, 1, 1)
        kernel[grid](*args, **meta)
        fast(grid, args, meta)  # first sight: through Triton
        fast(grid, args, meta)  # then straight to the compiled kernel
        triton_call, first, direct = recorder.calls[-3:]
        assert first == triton_call, (meta, first, triton_call)
        assert direct == triton_call, (meta, direct, triton_call)  # same compiled kernel, same arguments
    launchers = [recorder.calls[3 * i][0] for i in range(len(cases))]
    assert len(set(launchers)) == len(cases), launchers  # each case its own compiled kernel
    for (args, meta), launcher in zip(cases, launchers):  # revisited after the others
        fast((3, 1, 1), args, meta)
        assert recorder.calls[-1][0] == launcher, meta
    assert len(fast.compiled) == len(cases), list(fast.compiled)


def other_arguments_go_through_triton(recorder):
    """Arguments it cannot key, and a missing constexpr, go through Triton (and its error)."""
    kernel, fast = _fresh()
    x = torch.zeros(64, dtype=torch.float16)
    before = len(recorder.calls)
    wrapped = triton.reinterpret(x, tl.float16)  # a pointer argument that is not a tensor
    for _ in range(2):
        fast((1, 1, 1), (wrapped, x, 64, 1.0), dict(FLIP=False, BLOCK=64))
    assert len(recorder.calls) == before + 2 and not fast.compiled
    try:
        fast((1, 1, 1), (x, x, 64, 1.0), dict(FLIP=False))
    except Exception as exc:  # Triton's own error for a missing constexpr
        assert "BLOCK" in str(exc), exc
    else:
        raise AssertionError("a launch without BLOCK did not raise")
    assert not fast.compiled and len(recorder.calls) == before + 2


CHECKS = {"launches_match_triton": launches_match_triton,
          "other_arguments_go_through_triton": other_arguments_go_through_triton}


def main(names) -> None:
    recorder = _Recorder()
    driver.set_active(recorder)
    for name in names or CHECKS:
        CHECKS[name](recorder)
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1:])
