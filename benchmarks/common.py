"""What every benchmark shares: timing, bandwidth arithmetic, and the record of one measurement.

Contract for ``bench_<stem>.py``: it defines ``run(quick: bool, dtype: torch.dtype,
device: str) -> list[Measurement]`` for the CLI, and pytest-benchmark tests
(``test_*(benchmark)``) for ``pytest benchmarks/ --benchmark-only``. Inputs are fresh random
tensors, never zeros. GPU times are medians from ``triton.testing.do_bench`` (warm-up
first); CPU times are medians of synchronous wall-clock repeats.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Optional

import torch


@dataclass
class Measurement:
    suite: str            # "op" or "model"
    name: str             # op stem or workload name, e.g. "add_layernorm" or "base B=32 S=128"
    case: str             # shape / configuration, e.g. "4096x768 fp16"
    impl: str             # "fastbert", "eager", "sdpa", "hf-eager", "torch.compile", ...
    mode: str             # "fwd", "bwd", "fwd+bwd", "train"
    ms: float             # median time in milliseconds
    gbps: Optional[float] = None
    tflops: Optional[float] = None
    extra: Dict[str, object] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, object]:
        return asdict(self)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_ms(fn: Callable[[], object], device: str = None, warmup_ms: float = 25, rep_ms: float = 100,
            grad_to_none=None) -> float:
    """Median milliseconds of one call of ``fn``."""
    device = device or default_device()
    if str(device).startswith("cuda"):
        import triton.testing
        return float(triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                             return_mode="median"))
    fn()  # warm-up
    times, deadline = [], time.perf_counter() + rep_ms / 1e3
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 1000):
        if grad_to_none is not None:
            for t in grad_to_none:
                t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gbps(nbytes: float, ms: float) -> float:
    """Achieved bandwidth in GB/s for ``nbytes`` read + written in ``ms``."""
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}[dtype]


def matmul_ceiling(dtype: torch.dtype, device: str, n: int = 8192) -> float:
    """TFLOP/s of one n×n×n matmul in ``dtype`` on ``device``, measured now: the ceiling
    that a model's useful TFLOP/s is a fraction of (same run, same clocks)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    ms = time_ms(lambda: torch.matmul(a, b), device)
    return tflops(2.0 * n ** 3, ms)
