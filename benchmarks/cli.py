"""``fastbert bench``: every op against eager PyTorch and the model against what users run
instead, in one run on this machine, with a JSON + Markdown + PNG report.

Op suites are discovered by stem (``fastbert.benchmarks.bench_<stem>``, the stem being the
kernel module's name in ``fastbert.ops``); one that is missing or fails is named in the
report and the rest still run. On a CPU only what means something there runs: the C++
embedding op, and the model on the real all-MiniLM-L6-v2 checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import os
import signal
import sys
import threading
import time
from typing import Dict, List, Optional

import torch

from . import bench_model, report
from .common import DTYPES, Measurement, default_device


def op_stems() -> Dict[str, str]:
    """bench stem -> op name, e.g. "layernorm" -> "add_layernorm"; a kernel module with two
    ops (attention, attention_qkv) has one suite, named by its first op."""
    from fastbert.ops import OPS
    stems: Dict[str, str] = {}
    for name, op in OPS.items():
        stems.setdefault(op.kernel.split(":")[0].rsplit(".", 1)[-1], name)
    return stems


def add_arguments(p: argparse.ArgumentParser) -> None:
    stems = ", ".join(op_stems())
    p.add_argument("--quick", action="store_true", help="fewer repeats, a 4096³ matmul ceiling, and torch.compile "
                   "competitors on BERT-base B=32 and B=1 and the training step only (a few minutes on a GPU)")
    p.add_argument("--ops", default=None, metavar="LIST",
                   help=f"op suites to run: comma list of {stems}, or 'none' (default: all; on a CPU, those with a CPU kernel)")
    p.add_argument("--workloads", default=None, metavar="LIST",
                   help="model workloads: comma list of " + ", ".join(bench_model.WORKLOADS) +
                   ", or 'none' (default: the base/large/training ones on a GPU, the MiniLM ones on a CPU)")
    p.add_argument("--dtype", choices=list(DTYPES), default=None,
                   help="inference dtype (default fp16 on a GPU, fp32 on a CPU); training always uses bf16 autocast")
    p.add_argument("--impls", default=None, metavar="LIST",
                   help="model competitors to run (default all that apply): " + ", ".join(bench_model.C.IMPLS))
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile competitors (they take minutes to compile)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="start no new measurement after this long; the report says what was left out")
    p.add_argument("--out", default="bench-out", help="output folder for the JSON, Markdown and PNG (default bench-out/)")
    p.add_argument("--no-chart", action="store_true", help="write no PNG chart")
    p.add_argument("--device", default=None, help=argparse.SUPPRESS)  # e.g. cpu on a GPU machine
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy sizes, for tests


def _names(value: Optional[str]) -> Optional[List[str]]:
    if value is None:
        return None
    if value.strip().lower() == "none":
        return []
    return [v.strip() for v in value.split(",") if v.strip()]


def run_ops(stems: List[str], quick: bool, dtype: torch.dtype, device: str, notes: List[str], done,
            deadline: Optional[float] = None) -> List[Measurement]:
    from fastbert.ops import OPS
    out = []
    for stem in stems:
        op = OPS[op_stems()[stem]]
        if deadline is not None and time.monotonic() > deadline:
            notes.append(f"op {stem}: not run (time limit reached)")
            done(f"op {stem}")
            continue
        if not device.startswith("cuda") and not op.native_cpu:
            notes.append(f"op {stem}: not run, its Triton kernel needs a CUDA GPU (the CPU has only the eager reference)")
            done(f"op {stem}")
            continue
        module = f"{__package__}.bench_{stem}"
        try:
            bench = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            why = "not written yet" if exc.name == module else f"{type(exc).__name__}: {exc}"
            notes.append(f"op {stem}: skipped, {module} is unavailable ({why})")
            done(f"op {stem}")
            continue
        except Exception as exc:
            notes.append(f"op {stem}: skipped, {module} failed to import ({type(exc).__name__}: {exc})")
            done(f"op {stem}")
            continue
        try:
            got = list(bench.run(quick, dtype, device))
            bad = [m for m in got if not hasattr(m, "as_dict")]
            if bad:
                raise TypeError(f"run() returned {type(bad[0]).__name__}, not Measurement")
            out += got
        except Exception as exc:
            notes.append(f"op {stem}: failed ({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''})")
        done(f"op {stem}")
    return out


def command_line(args) -> List[str]:
    """The options as given, rebuilt from ``args`` (the same whether run from a shell or in-process)."""
    argv = ["bench"]
    for name, value in sorted(vars(args).items()):
        if name.startswith("_") or name == "command" or value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


class _Terminated(BaseException):
    """SIGTERM (e.g. from `timeout`): like Ctrl-C, not a competitor's failure."""


def run(args) -> int:
    device = args.device or default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("fastbert bench: --device cuda but torch sees no CUDA GPU", file=sys.stderr)
        return 2
    on_gpu = device.startswith("cuda")
    dtype_key = args.dtype or ("fp16" if on_gpu else "fp32")
    dtype = DTYPES[dtype_key]
    stems = _names(args.ops)
    known = op_stems()
    if stems is None:
        stems = list(known)
    unknown = [s for s in stems if s not in known]
    if unknown:
        print(f"fastbert bench: unknown op(s) {', '.join(unknown)}; choose from {', '.join(known)} or 'none'", file=sys.stderr)
        return 2
    workloads, impls = _names(args.workloads), _names(args.impls)
    kw = dict(tiny_sizes=args.tiny, compile_=not args.no_compile, impls=impls)
    try:
        total = len(stems) + bench_model.count_pairs(args.quick, device, workloads, **kw)
    except ValueError as exc:
        print(f"fastbert bench: {exc}", file=sys.stderr)
        return 2

    threads = torch.get_num_threads()
    if args.tiny and not on_gpu:
        torch.set_num_threads(1)  # toy sizes: thread start-up would dominate, and oversubscribed CI stalls
    data = {"meta": report.collect_meta(device, command_line(args), dtype_key, args.quick),
            "status": "running", "ceilings": {}, "measurements": [], "speedups": [], "notes": []}
    notes: List[str] = []
    if not on_gpu:
        notes.append("CPU run: fastbert's Triton kernels (attention, softmax, LayerNorm, GELU) need a CUDA GPU; "
                     "run `fastbert bench` on a GPU machine for their numbers")
    suite = bench_model.ModelSuite()

    def snapshot():
        data["notes"] = notes + suite.notes
        data["ceilings"] = suite.ceilings
    deadline = None if args.max_minutes is None else time.monotonic() + 60 * args.max_minutes
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if not on_gpu and load > (os.cpu_count() or 1):
        notes.append(f"the CPU was busy when the run started (load average {load:.1f} on {os.cpu_count()} CPUs): "
                     "CPU times are noisy")

    from tqdm import tqdm
    bar = tqdm(total=total, desc="fastbert bench", unit="case", file=sys.stderr, dynamic_ncols=True)

    def done(label, m=None):
        bar.set_postfix_str(label[:60])
        bar.update(1)
        if m is not None:
            data["measurements"].append(m.as_dict())
            snapshot()
            report.write(data, args.out, with_chart=False)  # partial results survive a kill

    previous = None
    if threading.current_thread() is threading.main_thread():
        def on_term(signum, frame):
            raise _Terminated()
        previous = signal.signal(signal.SIGTERM, on_term)
    try:
        for m in run_ops(stems, args.quick, dtype, device, notes, done, deadline):
            data["measurements"].append(m.as_dict())
        bench_model.run_suite(args.quick, dtype, device, workloads, deadline=deadline,
                              on_result=lambda m, label: done(label, m), suite=suite, **kw)
        data["status"] = "complete"
    except (KeyboardInterrupt, _Terminated):
        data["status"] = "interrupted"
        notes.append("interrupted before the end: the measurements above are all that ran")
    finally:
        snapshot()
        bar.close()
        torch.set_num_threads(threads)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    paths = report.write(data, args.out, with_chart=not args.no_chart)
    print(report.text_table(data))
    print("\nwrote " + ", ".join(paths.values()))
    if data["status"] != "complete":
        return 130
    bad = [m for m in data["measurements"] if m["impl"].startswith("fastbert") and m["extra"].get("parity_ok") is False]
    if bad:
        print("PARITY FAILED: " + "; ".join(f"{m['name']} / {m['impl']}" for m in bad), file=sys.stderr)
        return 3
    return 0
