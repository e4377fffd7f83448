"""Every Triton kernel at the launch config fastbert picks on a GPU it has never run on,
compiled without that GPU.

The config functions read the device (shared memory per block, SM count, Hopper or not);
here they read a stand-in's (``GPUS``). The ops' bodies run on fake CUDA tensors
(``FakeTensorMode``), each launch they make is captured instead of run, and the captured
kernel is compiled for that GPU's architecture by Triton (its own ptxas), with the argument
types and specialisations of the launch. A launch fails the check when it does not compile
or needs more shared memory than the GPU gives a block, which is how a config that "fails to
compile" shows on a real GPU (Triton's OutOfResources at the first launch).

    python -m fastbert.benchmarks.arch_check                  # every GPU below, every shape
    python -m fastbert.benchmarks.arch_check --gpus a10 --quick

Nothing is timed: a config that compiles may still be slow on a GPU it was not tuned on.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import types
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

import torch

from . import sass

# name: (compute capability major, minor, SMs, shared memory per block with opt-in, bytes)
GPUS: Dict[str, Tuple[int, int, int, int]] = {
    "a100": (8, 0, 108, 166912),   # A100: 163 KB
    "a10": (8, 6, 72, 101376),     # A10, RTX 3090 (sm_86): 99 KB
    "l4": (8, 9, 58, 101376),      # L4, RTX 4090 (sm_89): 99 KB
    "h100": (9, 0, 132, 232448),   # H100, H200: 227 KB
}
KERNEL_MODULES = ("attention", "attention_bwd", "layernorm", "gelu", "softmax", "linear_gelu")
_POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int64: "*i64",
            torch.int32: "*i32", torch.int8: "*i8", torch.uint8: "*u8", torch.bool: "*i1"}


class Launch(NamedTuple):
    kernel: object  # the JITFunction
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    divisible: Tuple[str, ...]
    num_warps: int
    num_stages: int

    def key(self):
        return (self.kernel.__name__, tuple(sorted(self.signature.items())),
                tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())), self.divisible, self.num_warps,
                self.num_stages)

    def dtype(self) -> str:
        """The element type of the first tensor argument (the op's input)."""
        return next((t[1:] for t in self.signature.values() if t.startswith("*")), "-")

    def config(self) -> str:
        blocks = " ".join(f"{k}={v}" for k, v in self.constexprs.items() if k.startswith("BLOCK"))
        return f"{blocks} w={self.num_warps} s={self.num_stages}"


def _launch_spec(kernel, args, meta) -> Launch:
    """The compile-time view of ``kernel[grid](*args, **meta)``: types of the runtime
    arguments, the constexprs (None arguments are constexprs too), and the arguments Triton
    specialises as divisible by 16 (every pointer, as a fresh allocation is aligned; every
    integer that is a multiple of 16 and not marked do_not_specialize)."""
    meta = dict(meta)
    num_warps, num_stages = meta.pop("num_warps", 4), meta.pop("num_stages", 3)
    values = dict(zip(kernel.arg_names, args), **meta)
    signature, constexprs, divisible = {}, {}, []
    for p in kernel.params:
        v = values[p.name]
        if p.is_constexpr or v is None:
            constexprs[p.name] = v
        elif isinstance(v, torch.Tensor):
            signature[p.name] = _POINTER[v.dtype]
            divisible.append(p.name)
        elif isinstance(v, bool):
            signature[p.name] = "i1"
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"
            if v % 16 == 0 and not p.do_not_specialize:
                divisible.append(p.name)
        elif isinstance(v, float):
            signature[p.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {p.name} of type {type(v).__name__}")
    return Launch(kernel, signature, constexprs, tuple(divisible), num_warps, num_stages)


@contextlib.contextmanager
def _stand_in(gpu: str) -> Iterator[Dict[str, object]]:
    """Config functions see ``gpu``'s properties; launches are captured (the kernel modules,
    by name) instead of run. Yields the kernel modules."""
    major, minor, sms, smem = GPUS[gpu]
    props = types.SimpleNamespace(name=f"stand-in {gpu}", major=major, minor=minor, multi_processor_count=sms,
                                  shared_memory_per_block_optin=smem)
    modules = {m: importlib.import_module(f"fastbert.kernels.{m}") for m in KERNEL_MODULES}

    def clear_caches():  # lru_cache'd config functions keyed by the device
        for module in modules.values():
            for obj in list(vars(module).values()):
                if callable(getattr(obj, "cache_clear", None)):
                    obj.cache_clear()

    saved = {name: m.launch for name, m in modules.items() if hasattr(m, "launch")}
    properties = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda *a, **k: props
    clear_caches()
    try:
        yield modules
    finally:
        torch.cuda.get_device_properties = properties
        for name, launch in saved.items():
            modules[name].launch = launch
        clear_caches()


def captured_launches(gpu: str, quick: bool) -> List[Launch]:
    """The distinct launches of every op, forward and backward, on ``gpu``: attention at head
    dims 32..256 (padded and packed, training and inference), the row kernels at hidden sizes
    384..1024, the fused GEMM, in fp16, bf16 and fp32. ``quick``: head dims 32..128 in fp16
    and 64 in fp32, hidden 768, no bf16 (its kernels use the fp16 ones' memory)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    launches: Dict[tuple, Launch] = {}

    def capture(kernel, grid, *args, **meta):
        spec = _launch_spec(kernel, args, meta)
        launches.setdefault(spec.key(), spec)

    f16, f32 = torch.float16, torch.float32
    heads = ([(f16, 32, 128), (f16, 64, 128), (f16, 128, 128), (f16, 128, 64), (f32, 64, 128)] if quick else
             [(t, d, s) for t in (f16, torch.bfloat16, f32) for d, s in
              ((32, 128), (64, 128), (64, 512), (128, 128), (128, 64), (256, 128))])
    rows = ([(t, 768) for t in (f16, f32)] if quick else
            [(t, n) for t in (f16, torch.bfloat16, f32) for n in (384, 768, 1024)])
    with _stand_in(gpu) as k, FakeTensorMode(allow_non_fake_inputs=True):
        for module in k.values():
            if hasattr(module, "launch"):
                module.launch = capture
        at, ln, ge, sm, lg = k["attention"], k["layernorm"], k["gelu"], k["softmax"], k["linear_gelu"]
        seed = torch.zeros(1, device="cuda", dtype=torch.int64)
        for dtype, d, s in heads:  # the model's path: one qkv tensor, a padding mask, dropout
            qkv = torch.empty(2, s, 3, 4, d, device="cuda", dtype=dtype)
            mask = torch.ones(2, s, device="cuda", dtype=torch.int64)
            out, lse = at.attention_qkv_fwd.body(qkv, mask, None, seed, s, d ** -0.5, 0.1)
            at.attention_qkv_bwd.body(out, qkv, out, lse, mask, None, seed, s, d ** -0.5, 0.1)
        for dtype in {t for t, _, _ in heads}:  # packed (2 sequences in 300 tokens), separate q, k, v
            q = torch.empty(300, 4, 64, device="cuda", dtype=dtype)
            cu = torch.zeros(3, device="cuda", dtype=torch.int32)
            out, lse = at.attention_fwd.body(q, q, q, None, cu, None, 200, 0.125, 0.0)
            at.attention_bwd.body(out, q, q, q, out, lse, None, cu, None, 200, 0.125, 0.0)
            at._infer(q, q, q, None, cu, None, 200, 0.125, 0.0)
        for dtype, n in rows:
            c = dict(device="cuda", dtype=dtype)
            x, w = torch.empty(256, n, **c), torch.empty(n, **c)
            y, mean, rstd = ln._fwd.body(x, x, w, w, 1e-12, w, 0.1, seed)
            ln._bwd.body(y, x, x, w, w, w, mean, rstd, 0.1, seed)
            h, b = torch.empty(256, 4 * n, **c), torch.empty(4 * n, **c)
            for tanh in ((False,) if quick else (False, True)):
                ge._fwd.body(h, b, tanh)
                ge._bwd.body(h, h, b, tanh)
            for m in (128, 4096):  # the few-rows config (one sequence) and the many-rows one
                lg._fwd.body(torch.empty(m, n, **c), torch.empty(4 * n, n, **c), b, False)
            for s in ((128,) if quick else (128, 512)):
                scores, key_mask = torch.empty(2, 4, s, s, **c), torch.zeros(2, 1, 1, s, **c)
                p, lse = sm._fwd.body(scores, key_mask, 0.125, 0.1, seed)
                sm._bwd.body(p, scores, key_mask, lse, 0.125, 0.1, seed)
    return list(launches.values())


class Result(NamedTuple):
    gpu: str
    kernel: str
    dtype: str
    config: str
    shared: int
    limit: int
    registers: int
    stack: int
    error: str

    @property
    def ok(self) -> bool:
        return not self.error and self.shared <= self.limit


def check(gpu: str, quick: bool = False) -> List[Result]:
    major, minor, _, limit = GPUS[gpu]
    results = []
    for launch in captured_launches(gpu, quick):
        try:
            _, res = sass.compile_sass(launch.kernel, launch.signature, launch.constexprs, launch.divisible,
                                       launch.num_warps, launch.num_stages, capability=10 * major + minor)
            results.append(Result(gpu, launch.kernel.__name__, launch.dtype(), launch.config(), res["shared"], limit,
                                  res["registers"], res["stack"], ""))
        except Exception as exc:  # a config that does not build is the finding, not a crash of the check
            results.append(Result(gpu, launch.kernel.__name__, launch.dtype(), launch.config(), 0, limit, 0, 0,
                                  f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"))
    return results


def main(argv: Sequence[str] = ()) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", default=",".join(GPUS), help=f"comma-separated, of {', '.join(GPUS)}")
    p.add_argument("--quick", action="store_true", help="fewer shapes and dtypes")
    args = p.parse_args(argv)
    failed = 0
    print("gpu   kernel               dtype config                                    shared / limit (B)  regs  stack  "
          "status")
    for gpu in args.gpus.split(","):
        try:
            results = check(gpu.strip(), args.quick)
        except (ImportError, OSError, RuntimeError) as exc:
            print(f"arch_check: cannot compile here ({type(exc).__name__}: {exc})", file=sys.stderr)
            return 2
        for r in results:
            status = "ok" if r.ok else (r.error or "shared memory over the limit")
            failed += not r.ok
            print(f"{r.gpu:5s} {r.kernel:20s} {r.dtype:5s} {r.config:41s} {r.shared:7d} / {r.limit:6d}  {r.registers:4d}  "
                  f"{r.stack:5d}  {status}")
    print(f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
