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
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

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


# -- the op suites' shared machinery -----------------------------------------------------

def timers(device: str, quick: bool):
    """(case suffix, timer) pairs: plain ``do_bench`` everywhere, plus ``do_bench_cudagraph``
    on a GPU (the kernels' own time, host launch cost removed)."""
    warmup, rep = (10, 40) if quick else (25, 100)

    def plain(fn):
        return time_ms(fn, device, warmup_ms=warmup, rep_ms=rep)

    def graphed(fn):
        import triton.testing
        try:
            return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))
        except Exception:
            _end_failed_capture(device)
            raise

    return [("", plain)] + ([(", CUDA graph", graphed)] if str(device).startswith("cuda") else [])


def graph_backward_ms(fwd: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], dy: torch.Tensor,
                      reps: int = 20, replays: int = 10) -> float:
    """Kernel time of one backward of ``fwd`` (``torch.autograd.grad`` over ``leaves``): the
    forward runs once on a side stream, so that autograd queues its backward there too; the
    backward is warmed up and then captured ``reps`` times into one CUDA graph on that stream,
    and the graph's replays are timed with events. (A forward run on the default stream and a
    backward captured on do_bench_cudagraph's stream fail: autograd runs each backward op on
    its forward op's stream, which is not the capturing one. No autograd graph made on the
    default stream may still hold the leaves: their gradient accumulators would be that
    stream's, and syncing with it invalidates the capture.)"""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.stream(side):
            out = fwd()
            for _ in range(3):
                torch.autograd.grad(out, leaves, dy, retain_graph=True)
            side.synchronize()
            with torch.cuda.graph(graph, stream=side):
                for _ in range(reps):
                    torch.autograd.grad(out, leaves, dy, retain_graph=True)
    except Exception:
        _end_failed_capture(str(dy.device))
        raise
    torch.cuda.current_stream().wait_stream(side)
    graph.replay()  # warm
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(replays):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    del graph, out
    return statistics.median(times)


def _end_failed_capture(device: str) -> None:
    """A capture that fails leaves torch's CUDA generator marked as capturing, so that every
    later random draw raises ("Offset increment outside graph capture"); one small capture
    that succeeds closes that state again, and the measurements after it can go on."""
    try:
        torch.cuda.synchronize(device)
    except Exception:
        pass
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(torch.cuda.Stream(device)):
        scratch = torch.zeros(1, device=device)
        with torch.cuda.graph(graph):
            scratch.add_(1)
    del graph


def measure_op(name: str, case: str, impls: Dict[str, Callable[[], torch.Tensor]], leaves: Sequence[torch.Tensor],
               dy: torch.Tensor, nbytes: Dict[str, int], device: str, quick: bool,
               fwd_only: Sequence[str] = ()) -> List[Measurement]:
    """fwd, bwd and fwd+bwd of each forward closure in ``impls`` (over ``leaves``, the
    tensors that need gradients) with each timer; a timing that fails is left out, with a
    warning. Implementations named in ``fwd_only`` are timed forward only."""
    out = []
    for impl, fwd in impls.items():
        def f_fwd():
            with torch.no_grad():
                return fwd()

        def f_both():
            return torch.autograd.grad(fwd(), leaves, dy)

        for suffix, timer in timers(device, quick):
            if suffix:  # in a graph: the forward with the timer, the backward with its own capture
                modes = [("fwd", f_fwd, timer), ("bwd", fwd, lambda f: graph_backward_ms(f, leaves, dy))]
            else:  # the backward alone, again and again over one kept forward
                kept = fwd()
                modes = [("fwd", f_fwd, timer),
                         ("bwd", lambda: torch.autograd.grad(kept, leaves, dy, retain_graph=True), timer),
                         ("fwd+bwd", f_both, timer)]
            if impl in fwd_only:
                modes = [m for m in modes if m[0] == "fwd"]
            for mode, fn, time_fn in modes:
                try:
                    ms = time_fn(fn)
                except Exception as exc:  # keep the other measurements
                    warnings.warn(f"{name} {impl} {mode}{suffix} not timed: {type(exc).__name__}: {exc}")
                    continue
                out.append(Measurement("op", name, case + suffix, impl, mode, ms, gbps(nbytes[mode], ms),
                                       extra={"bytes": nbytes[mode]}))
            # The kept forward's graph holds the leaves' gradient accumulators, made on the
            # default stream: alive during a capture on another stream, they invalidate it.
            modes = kept = None
        synchronize(device)
    return out


def triton_backend(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``fn`` run under fastbert's own kernels."""
    import fastbert

    def call():
        with fastbert.use_backend("triton"):
            return fn()
    return call


def bench_step(benchmark, fwd, leaves, dy, mode: str, device: str) -> None:
    """pytest-benchmark one call of ``fwd`` (mode "fwd") or forward and backward."""
    def step():
        if mode == "fwd":
            with torch.no_grad():
                fwd()
        else:
            torch.autograd.grad(fwd(), leaves, dy)
        synchronize(device)

    step()
    benchmark(step)
