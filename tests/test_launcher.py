"""Eager launches that skip JITFunction.run (fastbert.kernels._launcher) hand the compiled
kernel's launcher exactly what Triton's own launch hands it, and never reuse a kernel
compiled for other kinds of arguments.

Without a GPU: a stand-in driver (an sm_90 target whose launcher records its arguments) lets
Triton compile for Hopper and "launch" on this CPU. With one: the ops give the same bits
through either path, aligned and misaligned."""

import os
import subprocess
import sys

import pytest
import torch

from fastbert.kernels import _launcher
from fastbert.kernels._launcher import launch_key

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fast_path = pytest.mark.skipif(not _launcher.SUPPORTED,
                                     reason="Triton older than 3.4 or fastbert._C not built: every launch goes through Triton")


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
@pytest.mark.parametrize("check", ["launches_match_triton", "other_arguments_go_through_triton"])
def test_launches_under_a_stand_in_driver(check):
    """tests/launcher_standin.py in a fresh interpreter (Triton's interpreter, which the rest
    of the suite runs, leaves triton.language patched so that nothing compiles after it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "launcher_standin.py"), check],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout[-2000:] + done.stderr[-4000:]


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
