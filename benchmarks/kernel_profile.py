"""Where a forward's (or a training step's) time goes: every kernel's time and count per call
of a fastbert model, from torch.profiler, beside the call's wall time. The difference between
the wall time and the kernels' sum is what the GPU spent waiting (launch gaps, host work, syncs).

    python -m fastbert.benchmarks.kernel_profile                        # BERT-base B=32 S=128, eager
    python -m fastbert.benchmarks.kernel_profile --graph --backend triton --workloads base-b8-s512
    python -m fastbert.benchmarks.kernel_profile --graph --workloads train-base-b32-s128

``--graph`` replays a CUDA graph (``fastbert.CUDAGraphRunner``), so the gaps left are the
graph's own; for the training step (bf16 autocast, forward and backward of
BertForPreTraining's loss, as ``fastbert bench`` times it) it compiles the model with
``mode="reduce-overhead"``, whose CUDA graph trees capture forward and backward; ``--backend triton`` selects every fastbert kernel, including the fused GEMM +
bias + GELU that "auto" leaves to cuBLAS + ``bias_gelu`` until it is measured ahead. Kernels
are grouped: cuBLAS/CUTLASS GEMMs (``--gemms``: one row per GEMM kernel, whose name carries
the tile cuBLAS chose, which is what to read where small batches leave SMs idle), each
fastbert kernel by name, the rest by name. On a CPU
(``--tiny``) the same tables list CPU operators, which checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import fastbert

from . import competitors as C
from .common import default_device, synchronize
from .workloads import CONFIGS, WORKLOADS, random_inputs, tiny

_GEMM = re.compile(r"gemm|xmma|cutlass|cublas|nvjet|sm\d+_.*mma", re.IGNORECASE)
_TILED = re.compile(r"[A-Za-z_]\w*?\d+x\d+\w*")


def kernel_group(name: str, gemms: bool = False) -> str:
    """A kernel's row in the summary: "GEMM (cuBLAS)" for library matrix products (with
    ``gemms``, "GEMM " and the kernel's own name), a Triton kernel's own name (``_attn_fwd``),
    else the name up to its template arguments."""
    short = re.split(r"[<(]", name, maxsplit=1)[0].strip()
    if _GEMM.search(name) and not name.startswith("_"):
        if not gemms:
            return "GEMM (cuBLAS)"
        tiled = _TILED.search(name)  # the identifier that names the tile, template argument or not
        return f"GEMM {(tiled.group(0) if tiled else short.removeprefix('void '))[:57]}"
    return short[:60]


def event_us(evt, on_gpu: bool) -> float:
    """An averaged profiler event's own time in µs, summed over its calls: on a GPU only the
    device's events (kernels, copies, fills) count, since an operator's "self device time" is
    the time of the kernels it launched, which are events of their own; on a CPU, operators'
    self time."""
    if not on_gpu:
        return float(evt.self_cpu_time_total)
    if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
        return 0.0
    return float(getattr(evt, "self_device_time_total", getattr(evt, "self_cuda_time_total", 0.0)))


def profile_calls(call: Callable[[], object], iters: int, device: str,
                  gemms: bool = False) -> Tuple[Dict[str, Tuple[float, float]], float]:
    """({group: (µs per call, launches per call)}, wall ms per call) over ``iters`` calls."""
    for _ in range(3):
        call()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        call()
    synchronize(device)
    wall_ms = (time.perf_counter() - start) * 1e3 / iters

    on_gpu = device.startswith("cuda")
    acts = [torch.profiler.ProfilerActivity.CUDA] if on_gpu else [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(iters):
            call()
        synchronize(device)
    groups: Dict[str, List[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for evt in prof.key_averages():
        us = event_us(evt, on_gpu)
        if us <= 0:
            continue
        g = groups[kernel_group(evt.key, gemms)]
        g[0] += us / iters
        g[1] += evt.count / iters
    return {k: (v[0], v[1]) for k, v in groups.items()}, wall_ms


def forward_call(workload: str, backend: str, graph: bool, device: str, dtype: torch.dtype,
                 small: bool) -> Tuple[Callable[[], object], int]:
    """A forward of the workload's model under ``backend`` (eager or a captured graph), and
    its number of layers."""
    w = WORKLOADS[workload]
    if small:
        w = tiny(w)
    config = fastbert.BertConfig(**CONFIGS[w.model])
    model = fastbert.BertModel(config).to(device, dtype).eval()
    inputs = random_inputs(w, config.vocab_size, device)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if graph:
        with fastbert.use_backend(backend):
            runner = fastbert.CUDAGraphRunner(model, batch_sizes=(w.batch,), seq_lens=(w.seqlen,), fallback=False,
                                              check_inputs=False, unpad=mask is not None)

        def call():
            with fastbert.use_backend(backend):
                return runner(ids, attention_mask=mask).last_hidden_state
    else:
        def call():
            with torch.no_grad(), fastbert.use_backend(backend):
                return model(input_ids=ids, attention_mask=mask).last_hidden_state
    return call, config.num_hidden_layers


def train_call(workload: str, backend: str, graph: bool, device: str, small: bool) -> Tuple[Callable[[], object], int]:
    """A bf16-autocast training step of the workload's BertForPreTraining under ``backend``
    (compiled with reduce-overhead with ``graph``), and its number of layers."""
    w = WORKLOADS[workload]
    if small:
        w = tiny(w)
    config = fastbert.BertConfig(**CONFIGS[w.model])
    model = fastbert.BertForPreTraining(config).to(device)
    inputs = random_inputs(w, config.vocab_size, device)
    step = C.train_call(C.compiled(model, "reduce-overhead") if graph else model, inputs, torch.device(device).type)

    def call():
        if graph:
            torch.compiler.cudagraph_mark_step_begin()
        with fastbert.use_backend(backend):
            return step()
    return call, config.num_hidden_layers


def table(groups: Dict[str, Tuple[float, float]], wall_ms: float, layers: int, unit: str, per: str = "fwd") -> str:
    total = sum(us for us, _ in groups.values())
    lines = [f"{'kernel' if unit == 'µs GPU' else 'operator':<62} {unit + ' per ' + per:>12} {'per layer':>10} "
             f"{'calls':>9} {'share':>6}"]
    for name, (us, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"{name:<62} {us:12.1f} {us / layers:10.1f} {n:9.1f} {us / total:6.1%}")
    lines.append(f"{'sum of ' + ('kernels' if unit == 'µs GPU' else 'operators'):<62} {total:12.1f} "
                 f"{total / layers:10.1f} {sum(n for _, n in groups.values()):9.1f}")
    lines.append(f"{'wall time per ' + ('forward' if per == 'fwd' else per):<62} {wall_ms * 1e3:12.1f}")
    if unit == "µs GPU":
        lines.append(f"{'GPU idle (wall - kernels)':<62} {wall_ms * 1e3 - total:12.1f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastbert.benchmarks.kernel_profile",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="base-b32-s128",
                   help="comma list of fastbert bench's inference workloads and its training step (train-base-b32-s128)")
    p.add_argument("--backend", default="auto", choices=("auto", "triton"))
    p.add_argument("--graph", action="store_true",
                   help="replay a CUDA graph (GPU only; the training step compiled with reduce-overhead)")
    p.add_argument("--gemms", action="store_true",
                   help="one row per GEMM kernel (its name shows the tile cuBLAS chose) instead of one for all")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--tiny", action="store_true", help="toy model and shapes (checks the script on a CPU)")
    args = p.parse_args(argv)
    device = default_device()
    on_gpu = device.startswith("cuda")
    if not on_gpu and not args.tiny:
        print("kernel_profile: needs a CUDA GPU (--tiny checks the script on a CPU)", file=sys.stderr)
        return 2
    if args.graph and not on_gpu:
        print("kernel_profile: --graph needs a CUDA GPU", file=sys.stderr)
        return 2
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    bad = [n for n in names if n not in WORKLOADS or WORKLOADS[n].pretrain or not WORKLOADS[n].gpu]
    if bad:
        print(f"kernel_profile: not a BERT-size inference workload or training step: {', '.join(bad)}", file=sys.stderr)
        return 2
    fastbert.ops.load_kernels()
    dtype = torch.float16 if on_gpu else torch.float32
    gpu = torch.cuda.get_device_name() if on_gpu else "CPU"
    for name in names:
        train = WORKLOADS[name].train
        if train:
            call, layers = train_call(name, args.backend, args.graph, device, args.tiny)
        else:
            call, layers = forward_call(name, args.backend, args.graph, device, dtype, args.tiny)
        groups, wall_ms = profile_calls(call, args.iters, device, args.gemms)
        if train:
            how, precision, calls = ("compiled, reduce-overhead" if args.graph else "eager"), "bf16 autocast", "steps"
        else:
            how, precision, calls = ("CUDA graph" if args.graph else "eager"), str(dtype).split(".")[-1], "forwards"
        print(f"\n# {WORKLOADS[name].title}{' [tiny]' if args.tiny else ''}, {how}, backend {args.backend}, "
              f"{precision}, {gpu}, {args.iters} {calls}")
        print(table(groups, wall_ms, layers, "µs GPU" if on_gpu else "µs CPU", "step" if train else "fwd"), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
