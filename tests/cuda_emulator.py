"""The CUDA embedding kernels of csrc/ run on the CPU, through the emulator in tests/cuda_emu/.

``load()`` rewrites csrc/embedding_*.cuh for the emulator (a kernel launch ``k<<<g, b, s,
st>>>(args)`` becomes ``::emu::launch(g, b, s, st, k, args)``, and ``extern __shared__``
arrays become the launch's buffer), compiles them with tests/cuda_emu/embedding_emu.cpp into
a shared library and loads it with ctypes. ``embedding_fwd`` and ``embedding_bwd`` then do what
csrc/embedding_cuda.cu does around the same launchers, on CPU tensors: the kernels' logic
(vector and any-size paths, warp shuffles and ballots, the sorted-segment table gradients,
dropout, the bad-id record) is tested on machines without a GPU. Buffers that the kernels
must write are filled with NaN first, so a value never written shows.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "cuda_emu"
HEADERS = ("embedding_common.cuh", "embedding_fwd.cuh", "embedding_bwd.cuh", "embedding_kernels.cuh")
DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NO_ERROR = (1 << 64) - 1

_LAUNCH = re.compile(r"(\w+_kernel(?:<[^;]*?>)?)<<<(.*?)>>>\(([^;]*?)\);")
_EXTERN_SHARED = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")


def rewrite(source: str) -> str:
    """A header's text for the emulator: launches and dynamic shared memory rewritten."""
    def launch(m):
        return "::emu::launch(" + ", ".join(p for p in (m.group(2), m.group(1), m.group(3)) if p.strip()) + ");"
    out = _EXTERN_SHARED.sub(r"\1* \2 = ::emu::dynamic_shared<\1>();", _LAUNCH.sub(launch, source))
    if "<<<" in out or "extern __shared__" in out:
        raise RuntimeError("cuda_emulator: a kernel launch or shared array was left unrewritten")
    return out


_lib = None


def load() -> ctypes.CDLL:
    """The emulated kernels, compiled once per source version (cached under the temp dir)."""
    global _lib
    if _lib is not None:
        return _lib
    sources = {name: rewrite((CSRC / name).read_text()) for name in HEADERS}
    launches = sum(s.count("::emu::launch(") for s in sources.values())
    if launches < 6:  # fwd (vector, any), bwd (vector, any), param grads, segments, fixup
        raise RuntimeError(f"cuda_emulator: found {launches} kernel launches in csrc/, expected at least 6")
    # -fno-strict-aliasing: the kernels read 16-byte vectors through pointers of the element
    # type, which nvcc compiles as meant and g++ at -O2 need not.
    flags = ["-std=c++17", "-O2", "-fno-strict-aliasing", "-shared", "-fPIC"]
    digest = hashlib.sha256(" ".join(flags).encode())
    for path in sorted(EMU.iterdir()):
        digest.update(path.read_bytes())
    for name in HEADERS:
        digest.update(sources[name].encode())
    build = Path(tempfile.gettempdir()) / f"fastbert-cuda-emu-{digest.hexdigest()[:16]}"
    lib = build / "embedding_emu.so"
    if not lib.exists():
        tmp = Path(tempfile.mkdtemp(prefix="fastbert-cuda-emu-"))
        for name, text in sources.items():
            (tmp / name).write_text(text)
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
        if cxx is None:
            raise RuntimeError("cuda_emulator: no C++ compiler (c++ or g++, or set CXX)")
        cmd = [cxx, *flags, f"-I{tmp}", f"-I{EMU}", str(EMU / "embedding_emu.cpp"),
               "-o", str(tmp / "embedding_emu.so")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"cuda_emulator: the build failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
        build.mkdir(exist_ok=True)
        os.replace(tmp / "embedding_emu.so", lib)
        shutil.rmtree(tmp, ignore_errors=True)
    _lib = ctypes.CDLL(str(lib))
    _lib.fb_emu_message.restype = ctypes.c_char_p
    _lib.fb_emu_collectives.restype = ctypes.c_ulonglong
    _lib.fb_emu_keep_threshold.restype = ctypes.c_uint32
    _lib.fb_emu_keep_threshold.argtypes = [ctypes.c_double]
    _lib.fb_emu_bwd_nparts.restype = ctypes.c_int64
    _lib.fb_emu_bwd_nparts.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return _lib


def _check(rc: int) -> None:
    if rc != 0:
        raise RuntimeError(f"emulated CUDA kernel failed ({rc}): {load().fb_emu_message().decode()}")


def selftest(which: int) -> tuple:
    """Runs a kernel that breaks the warp rules (0: lanes exit before a shuffle, 1: lanes of a
    warp at different collectives); returns (error code, message)."""
    lib = load()
    rc = lib.fb_emu_selftest(which)
    return rc, lib.fb_emu_message().decode()


@contextlib.contextmanager
def reversed_order():
    """Threads and blocks run last first inside this block (a race shows as different bits)."""
    lib = load()
    lib.fb_emu_set_reverse(1)
    try:
        yield
    finally:
        lib.fb_emu_set_reverse(0)


def collectives() -> int:
    """Warp collectives completed so far (all emulated launches)."""
    return int(load().fb_emu_collectives())


def _p(t):
    return ctypes.c_void_p(t.data_ptr() if t is not None else 0)


def _ids(ids):
    """(pointers, meta) of the three id tensors, as csrc/embedding.cpp's make_ids views them."""
    keep, ptrs, meta = [], [], []
    for t in ids:
        t = t if t.dim() <= 2 else t.contiguous()
        if t.is_contiguous() or t.dim() == 0:
            view = (max(t.numel(), 1), 0, 1)
        elif t.dim() == 1:
            view = (max(t.size(0), 1), 0, t.stride(0))
        else:
            view = (max(t.size(1), 1), t.stride(0), t.stride(1))
        keep.append(t)
        ptrs.append(t.data_ptr())
        meta.extend(view + (int(t.dtype == torch.int64),))
    return keep, (ctypes.c_void_p * 3)(*ptrs), (ctypes.c_int64 * 12)(*meta)


def _tables(word, pos, typ):
    tabs = [t.contiguous() for t in (word, pos, typ)]
    return tabs, (ctypes.c_void_p * 3)(*[t.data_ptr() for t in tabs]), (ctypes.c_int64 * 3)(*[t.size(0) for t in tabs])


def _aligned(*ts) -> int:
    return int(all(t.data_ptr() % 16 == 0 for t in ts))


def _dropout(p: float):
    lib = load()
    return (lib.fb_emu_keep_threshold(p), ctypes.c_float(1.0 / (1.0 - p))) if p > 0 else (0, ctypes.c_float(1.0))


def embedding_fwd(input_ids, token_type_ids, position_ids, word, pos, typ, ln_weight, ln_bias, eps,
                  dropout_p=0.0, seed=None):
    """(out, mean, rstd, bad): csrc/embedding_cuda.cu's forward; ``bad`` is the kernels' record
    of the first bad token ((token << 2) | kind: 0 word, 1 position, 2 token type) or None."""
    lib = load()
    keep, ids, meta = _ids((input_ids, position_ids, token_type_ids))
    tabs, tab_ptrs, rows = _tables(word, pos, typ)
    hidden = word.size(1)
    gamma, beta = ln_weight.contiguous(), ln_bias.contiguous()
    out = torch.full((*input_ids.shape, hidden), float("nan"), dtype=word.dtype)
    mean = torch.full(input_ids.shape, float("nan"))
    rstd = torch.full(input_ids.shape, float("nan"))
    err = ctypes.c_ulonglong(NO_ERROR)
    threshold, scale = _dropout(dropout_p)
    _check(lib.fb_emu_embedding_fwd(
        DTYPES[word.dtype], ids, meta, tab_ptrs, rows, ctypes.c_int64(input_ids.numel()), hidden, _p(out), _p(mean), _p(rstd),
        _p(gamma), _p(beta), int(gamma.dtype == torch.float32 and word.dtype != torch.float32), ctypes.c_float(eps),
        ctypes.byref(err), _p(seed if dropout_p > 0 else None), ctypes.c_uint32(threshold), scale,
        _aligned(*tabs, out, gamma, beta)))
    return out, mean, rstd, (None if err.value == NO_ERROR else err.value)


def embedding_bwd(grad_out, input_ids, token_type_ids, position_ids, word, pos, typ, ln_weight, mean, rstd,
                  dropout_p=0.0, seed=None, padding_idx=None, num_sms=132):
    """(d_word, d_position, d_token_type, d_ln_weight, d_ln_bias): csrc/embedding_cuda.cu's
    backward, with ``num_sms`` standing for the device's multiprocessor count."""
    lib = load()
    keep, ids, meta = _ids((input_ids, position_ids, token_type_ids))
    tabs, tab_ptrs, rows = _tables(word, pos, typ)
    tokens, hidden = input_ids.numel(), word.size(1)
    dy, gamma = grad_out.contiguous(), ln_weight.contiguous()
    grads = [torch.zeros_like(t) for t in tabs]
    dgamma = torch.full((hidden,), float("nan"), dtype=ln_weight.dtype)
    dbeta = torch.full((hidden,), float("nan"), dtype=ln_weight.dtype)
    aligned = _aligned(*tabs, dy, gamma)
    code = DTYPES[word.dtype]
    nparts = lib.fb_emu_bwd_nparts(code, tokens, hidden, aligned, num_sms) if tokens else 0
    dx = torch.full((tokens, hidden), float("nan"))
    part = torch.full((nparts, 2, hidden), float("nan"))
    keys = torch.stack([t.reshape(-1).long() for t in (input_ids, position_ids, token_type_ids)])
    skeys, perm = torch.sort(keys, dim=1, stable=True)
    skeys, perm = skeys.contiguous(), perm.contiguous()
    nchunks = -(-tokens // lib.fb_emu_chunk())
    part_first = torch.full((3, nchunks, hidden), float("nan"))
    part_last = torch.full((3, nchunks, hidden), float("nan"))
    if padding_idx is not None and padding_idx < 0:
        padding_idx += word.size(0)
    threshold, scale = _dropout(dropout_p)
    _check(lib.fb_emu_embedding_bwd(
        code, ids, meta, tab_ptrs, rows, ctypes.c_int64(tokens), hidden, _p(dy), _p(mean.contiguous()), _p(rstd.contiguous()),
        _p(gamma), int(gamma.dtype == torch.float32 and word.dtype != torch.float32), _p(dx), _p(part),
        _p(seed if dropout_p > 0 else None), ctypes.c_uint32(threshold), scale, aligned, num_sms, _p(dgamma), _p(dbeta),
        _p(skeys), _p(perm), _p(part_first), _p(part_last), (ctypes.c_void_p * 3)(*[g.data_ptr() for g in grads]),
        ctypes.c_int64(-1 if padding_idx is None else padding_idx), ctypes.c_int64(nchunks)))
    return (*grads, dgamma, dbeta)
