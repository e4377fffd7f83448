"""Host cost per call of fastbert's Triton ops and of eager PyTorch, at shapes so small that
the GPU never waits: the wall time per call is then the Python, dispatcher, autograd and
launch work on the CPU, the part a CUDA graph or torch.compile's reduce-overhead removes.

    python -m fastbert.benchmarks.host                 # on a GPU
    python -m fastbert.benchmarks.host --profile       # and cProfile's top entries of each forward and backward

For each op: forward without autograd, forward with autograd, and the backward alone
(``torch.autograd.grad`` on a retained graph), each as the median of several loops of
``--calls`` calls ended by one synchronize. The backward runs twice: on autograd's device
thread (torch's default for CUDA) and with autograd multithreading off (on the calling
thread), which shows what the thread hand-off costs. ``identity`` is an
``autograd.Function`` that returns its input: the floor of any Python-defined backward.
On a GPU, ``fastbert-triton-launch`` rows launch every kernel through Triton's
``JITFunction.run`` instead of fastbert's direct path (``fastbert.kernels._launcher``).

``--model`` adds whole models: a 12-layer BERT of hidden size 64 on 16 tokens, forward
without grad and forward+backward, fastbert against Hugging Face's sdpa model. On a CPU under
TRITON_INTERPRET, fastbert runs its Triton path with every launch stubbed out, which leaves
exactly its own host cost (Python, checks, allocations, autograd) to compare with HF's.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import pstats
import statistics
import time
from typing import Callable, Dict, Iterator, List, Tuple

import torch

import fastbert
from fastbert import functional as fb
from fastbert import reference
from fastbert.backend import triton_interpreted
from fastbert.kernels import _launcher

from .common import default_device


class _Identity(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def _cases(device: str, dtype: torch.dtype) -> Dict[str, Tuple[Callable, Callable, List[torch.Tensor]]]:
    """name: (fastbert forward, eager forward, leaves) at tiny BERT-like shapes."""
    def leaf(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    x, res, w, b = leaf(64, 768), leaf(64, 768), leaf(768), leaf(768)
    h, hb = leaf(64, 3072), leaf(3072)
    s = leaf(1, 2, 16, 16)
    mask = torch.ones(1, 16, device=device, dtype=torch.long)
    additive = torch.zeros(1, 1, 1, 16, device=device, dtype=dtype)
    q, k, v = leaf(1, 16, 2, 64), leaf(1, 16, 2, 64), leaf(1, 16, 2, 64)  # (B, S, H, D)
    return {
        "identity": (lambda: _Identity.apply(x), lambda: x.view_as(x), [x]),
        "add_layernorm": (lambda: fb.add_layernorm(x, res, w, b, 1e-12)[0],
                          lambda: reference.add_layernorm(x, res, w, b, 1e-12)[0], [x, res, w, b]),
        "bias_gelu": (lambda: fb.bias_gelu(h, hb), lambda: reference.bias_gelu(h, hb), [h, hb]),
        "softmax_mask": (lambda: fb.softmax_mask(s, additive), lambda: reference.softmax_mask(s, additive), [s]),
        "attention": (lambda: fb.attention(q, k, v, mask), lambda: reference.attention(q, k, v, mask), [q, k, v]),
    }


def _per_call_us(fn: Callable, calls: int, repeats: int = 5) -> float:
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def _backward(fwd: Callable, leaves: List[torch.Tensor]) -> Callable:
    out = fwd()
    dy = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, leaves, dy, retain_graph=True)


@contextlib.contextmanager
def _triton_launches(on: bool) -> Iterator[None]:
    """Every Triton launch through ``JITFunction.run`` (``on``), not fastbert's direct path
    (``fastbert.kernels._launcher``)."""
    enabled = _launcher.ENABLED
    _launcher.ENABLED = enabled and not on
    try:
        yield
    finally:
        _launcher.ENABLED = enabled


@contextlib.contextmanager
def _launches_stubbed() -> Iterator[None]:
    """Interpreted Triton launches do nothing (host-cost measurements on a CPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    real = InterpretedFunction.__getitem__
    InterpretedFunction.__getitem__ = lambda self, grid: (lambda *args, **kwargs: None)
    try:
        yield
    finally:
        InterpretedFunction.__getitem__ = real


def _model_rows(device: str, dtype: torch.dtype, calls: int) -> None:
    config = dict(vocab_size=100, hidden_size=64, num_hidden_layers=12, num_attention_heads=2, intermediate_size=128,
                  max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    ids = torch.randint(1, 100, (1, 16), device=device)
    mask = torch.ones_like(ids)
    on_gpu = device == "cuda"
    stub = not on_gpu and triton_interpreted()
    ours = fastbert.BertModel(fastbert.BertConfig(**config))
    models = {"fastbert" + (" (launches stubbed)" if stub else ""): ours}
    if on_gpu and _launcher.ENABLED:
        models["fastbert-triton-launch"] = ours  # every launch through JITFunction.run
    try:
        import transformers
        models["hf-sdpa"] = transformers.BertModel(transformers.BertConfig(**config, attn_implementation="sdpa"))
    except ImportError:
        pass
    print(f"\n# host ms per call, 12-layer BERT, hidden 64, 16 tokens, {calls} calls per loop")
    print(f"{'model':<30} {'fwd nograd':>10} {'fwd+bwd':>9}")
    for name, model in models.items():
        model.to(device, dtype).eval()
        triton = name.startswith("fastbert") and (on_gpu or stub)
        with fastbert.use_backend("triton") if triton else contextlib.nullcontext(), \
                _launches_stubbed() if stub and triton else contextlib.nullcontext(), \
                _triton_launches(name.endswith("triton-launch")):
            def forward():
                return model(input_ids=ids, attention_mask=mask).last_hidden_state

            def step():
                forward().float().sum().backward()
            with torch.no_grad():
                infer = _per_call_us(forward, calls) / 1e3
            train = _per_call_us(step, calls) / 1e3
        print(f"{name:<30} {infer:>10.3f} {train:>9.3f}", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--profile", action="store_true", help="cProfile each fastbert forward and backward (on the calling thread)")
    ap.add_argument("--model", action="store_true", help="also whole 12-layer models, fastbert against HF sdpa")
    ap.add_argument("--model-calls", type=int, default=20)
    args = ap.parse_args(argv)
    device = default_device()
    dtype = torch.float16 if device == "cuda" else torch.float32
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# host µs per call, {name}, torch {torch.__version__}, {args.calls} calls per loop")
    print(f"{'op':<14} {'impl':<22} {'fwd nograd':>10} {'fwd grad':>9} {'bwd thread':>10} {'bwd inline':>10}")
    profiles = {}
    # Off the GPU the default backend (the Triton interpreter's host cost would mean nothing).
    with fastbert.use_backend("triton") if device == "cuda" else contextlib.nullcontext():
        for op, (fast, eager, leaves) in _cases(device, dtype).items():
            impls = [("fastbert", fast)]
            if device == "cuda" and _launcher.ENABLED and op != "identity":
                impls.append(("fastbert-triton-launch", fast))  # every launch through JITFunction.run
            impls += [("eager", eager)] if op != "identity" else []
            for impl, fwd in impls:
                with _triton_launches(impl.endswith("triton-launch")):
                    with torch.no_grad():
                        nograd = _per_call_us(fwd, args.calls)
                    grad = _per_call_us(fwd, args.calls)
                    bwd = _backward(fwd, leaves)
                    threaded = _per_call_us(bwd, args.calls)
                    with torch.autograd.set_multithreading_enabled(False):
                        inline = _per_call_us(bwd, args.calls)
                        if args.profile and impl == "fastbert":
                            prof = cProfile.Profile()
                            prof.runcall(lambda: [fwd() for _ in range(args.calls)])
                            profiles[f"{op} forward"] = prof
                            prof = cProfile.Profile()
                            prof.runcall(lambda: [bwd() for _ in range(args.calls)])
                            profiles[f"{op} backward"] = prof
                print(f"{op:<14} {impl:<22} {nograd:>10.1f} {grad:>9.1f} {threaded:>10.1f} {inline:>10.1f}", flush=True)
    if args.model:
        _model_rows(device, dtype, args.model_calls)
    for op, prof in profiles.items():
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(12)
        print(f"\n## cProfile, {op} x{args.calls} (backward inline), by own time")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[:3000])


if __name__ == "__main__":
    main()
