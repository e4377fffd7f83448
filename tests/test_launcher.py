"""Eager launches that skip JITFunction.run (fastbert.kernels._launcher) hand the compiled
kernel's launcher exactly what Triton's own launch hands it, and never reuse a kernel
compiled for other kinds of arguments.

Without a GPU: a stand-in driver (an sm_90 target whose launcher records its arguments) lets
Triton compile for Hopper and "launch" on this CPU. With one: the ops give the same bits
through either path, aligned and misaligned."""

import contextlib
import gc

import pytest
import torch

from fastbert.kernels import _launcher
from fastbert.kernels._launcher import FastLaunch, launch_key

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
needs_fast_path = pytest.mark.skipif(not _launcher.SUPPORTED,
                                     reason="Triton older than 3.4 or fastbert._C not built: every launch goes through Triton")


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
        from triton.backends.compiler import GPUTarget
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


@contextlib.contextmanager
def _recording():
    """(recorder, a fresh JITFunction, its FastLaunch) with the stand-in driver active; the
    compiled kernels are dropped before the real driver is back (their destructor unloads
    them through the active driver)."""
    from triton.runtime import driver
    from triton.runtime.jit import JITFunction
    recorder = _Recorder()
    previous = getattr(driver, "_active", None)  # None until a real driver was asked for (none on a CPU host)
    driver.set_active(recorder)
    kernel = JITFunction(_scale_rows)  # fresh: it holds no kernel compiled for a real device
    fast = FastLaunch(kernel)
    try:
        yield recorder, kernel, fast
    finally:
        fast.compiled.clear()
        kernel.device_caches.clear()
        gc.collect()
        if previous is not None:
            driver.set_active(previous)
        elif torch.cuda.is_available():
            driver.reset_active()
        else:
            driver._active = None


@pytest.mark.skipif(launch_key is None, reason="fastbert._C is not built")
def test_launch_key_is_as_fine_as_tritons_specialization():
    def kind(a):
        return launch_key((a,))

    buf = torch.zeros(64, dtype=torch.float16)
    assert kind(buf) != kind(buf[1:])  # 16-byte aligned or not
    assert kind(buf) == kind(buf[8:])  # 16 bytes further: still aligned
    assert kind(buf) != kind(buf.float()) and kind(buf) == kind(torch.nn.Parameter(buf))
    keys = {n: kind(n) for n in (1, 2, 16, 17, 32, -16, 2 ** 31 - 16, 2 ** 31, -2 ** 31, -2 ** 31 - 16,
                                 2 ** 63, 2 ** 64 - 16, 2 ** 64)}
    assert keys[1] != keys[17] != keys[16] == keys[32] == keys[-16] == keys[2 ** 31 - 16]
    assert keys[2] == keys[17]
    assert keys[2 ** 31] != keys[2 ** 31 - 16] and keys[-2 ** 31] == keys[16] and keys[-2 ** 31 - 16] == keys[2 ** 31]
    assert len({keys[2 ** 31 - 16], keys[2 ** 31], keys[2 ** 63], keys[2 ** 64]}) == 4  # i32, i64, u64, beyond
    assert keys[2 ** 63] == keys[2 ** 64 - 16]
    assert len({kind(True), kind(1), kind(1.0), kind(None), kind(0)}) == 5
    assert launch_key((buf, 16, 0.5, None)) == kind(buf) + keys[16] + kind(0.5) + kind(None)
    for other in ((1, 2), "s", torch.float16, object()):
        assert launch_key((buf, other)) is None


@needs_fast_path
def test_fast_launch_hands_the_launcher_what_triton_does():
    x = torch.zeros(300, dtype=torch.float16)
    y = torch.zeros_like(x)
    with _recording() as (recorder, kernel, fast):
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
            assert len(recorder.calls) % 3 == 0
            triton_call, first, direct = recorder.calls[-3:]
            assert first == triton_call, meta
            assert direct == triton_call, meta  # same compiled kernel, same arguments
        launchers = [recorder.calls[3 * i][0] for i in range(len(cases))]
        assert len(set(launchers)) == len(cases)  # each case its own compiled kernel
        # Seen again after the others: each case still gets its own compiled kernel.
        for (args, meta), launcher in zip(cases, launchers):
            fast((3, 1, 1), args, meta)
            assert recorder.calls[-1][0] == launcher
        assert len(fast.compiled) == len(cases)


@needs_fast_path
def test_other_arguments_go_through_triton():
    x = torch.zeros(64, dtype=torch.float16)
    with _recording() as (recorder, kernel, fast):
        wrapped = triton.reinterpret(x, tl.float16)  # a pointer argument that is not a tensor
        for _ in range(2):
            fast((1, 1, 1), (wrapped, x, 64, 1.0), dict(FLIP=False, BLOCK=64))
        assert len(recorder.calls) == 2 and not fast.compiled
        with pytest.raises(Exception, match="BLOCK"):  # Triton's own error for a missing constexpr
            fast((1, 1, 1), (x, x, 64, 1.0), dict(FLIP=False))
        assert not fast.compiled and len(recorder.calls) == 2


@pytest.mark.gpu
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "misaligned"])
def test_ops_give_the_same_bits_through_either_launch(monkeypatch, offset):
    from fastbert import functional as fb
    g = torch.Generator(device="cuda").manual_seed(0)
    buf = torch.randn(2, 37 * 96 + 8, device="cuda", dtype=torch.float16, generator=g)
    x, res = (b[offset:offset + 37 * 96].view(37, 96) for b in buf)
    w, b = torch.randn(2, 96, device="cuda", dtype=torch.float16, generator=g)
    h = torch.randn(37, 200, device="cuda", dtype=torch.float16, generator=g)
    hb = torch.randn(200, device="cuda", dtype=torch.float16, generator=g)

    def run():
        return (fb.add_layernorm(x, res, w, b, 1e-12)[0], fb.bias_gelu(h, hb))

    monkeypatch.setattr(_launcher, "ENABLED", False)
    expected = run()
    monkeypatch.setattr(_launcher, "ENABLED", True)
    for _ in range(3):  # first through Triton, then direct
        for got, want in zip(run(), expected):
            assert torch.equal(got, want)
