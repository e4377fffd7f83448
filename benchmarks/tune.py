"""Launch-configuration sweeps for the Triton kernels: one GPU call times every candidate
block shape of every kernel at its BERT shape, checks each result against the eager
reference, and prints one table per case with the shipped choice marked.

    python -m fastbert.benchmarks.tune                      # all kernels, on the GPU
    python -m fastbert.benchmarks.tune --ops attention --out DIR
    python -m fastbert.benchmarks.tune --cases "attention bwd,add_layernorm bwd"

Each candidate replaces the kernel module's config function for the duration of its
timing (``fwd_config``/``bwd_config`` of the attention, ``_tile`` of bias_gelu,
``row_config`` of softmax_mask and add_layernorm, ``gemm_config`` of linear_gelu), so the
timed path is the op's own. Times
are ``do_bench_cudagraph`` medians (kernel time, no host cost); a candidate that fails to
compile or run is listed with its error. Errors are ‖out − ref‖ / ‖ref‖ against the eager
reference in fp32. ``--tiny`` runs toy shapes and two candidates per case (a check of this
script on a CPU, under the Triton interpreter; its times mean nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import astuple
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from fastbert import functional as fb
from fastbert import ops as fastbert_ops
from fastbert import reference

from .common import default_device, time_ms, triton_backend

# (BLOCK_M, BLOCK_N, num_warps, num_stages)
ATTN_FWD = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 8, 4),
            (128, 128, 8, 2), (128, 128, 8, 3), (64, 128, 4, 3), (128, 32, 4, 3), (256, 64, 8, 3)]
# (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages), the shipped 32/64/64/32 of 2
# stages and its closest rivals first (B=8 S=512, µs: H100 sweeps, 3 stages against 64/64/64/64,
# 71.7 against 72.2, then 80.1 against 76.9; an H200's, 2 stages 75.5, 64-row 76.8, 3 stages 78.8,
# and at B=32 S=128 with padding 28.2, 30.8, 28.7), then the rest.
ATTN_BWD = [(32, 64, 64, 32, 4, 2), (64, 64, 64, 64, 4, 2), (32, 64, 64, 32, 4, 3), (16, 64, 64, 16, 4, 3),
            (32, 128, 128, 32, 4, 3), (32, 128, 128, 32, 4, 2), (32, 128, 128, 32, 8, 2), (64, 128, 128, 64, 8, 2)]
# linear_gelu: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, tma, programs per SM]);
# the shipped config first, then the TMA rows (pending), then the pointer kernel's others. The
# TMA rows: the tiles loaded by Hopper's tensor memory accelerator, a program per tile (two
# fit an SM at 3 stages) or persistent programs, one per SM, or two of 2 stages (sass at
# 128x128x64 of 8 warps: 103, 121 and 100 registers, no spills), then smaller (128x64, two per
# SM) and larger tiles (128x128x128, 256x128: 184 registers, one per SM); 128x256 tiles and
# 4-warp persistent 128x128 programs spill, so they are not here.
GEMM = [(128, 128, 64, 8, 8, 3),
        (128, 128, 64, 8, 8, 3, True, 0), (128, 128, 64, 8, 8, 4, True, 0), (128, 128, 64, 8, 4, 3, True, 0),
        (128, 128, 64, 8, 8, 3, True, 1), (128, 128, 64, 8, 8, 4, True, 1), (128, 128, 64, 8, 8, 2, True, 2),
        (128, 64, 64, 8, 4, 4, True, 0), (128, 128, 128, 8, 8, 2, True, 0), (256, 128, 64, 8, 8, 3, True, 0),
        (128, 128, 64, 8, 4, 3), (128, 128, 64, 8, 8, 4), (128, 256, 64, 8, 8, 3), (64, 256, 64, 8, 4, 3),
        (128, 64, 64, 8, 4, 4), (256, 128, 64, 8, 8, 3), (128, 128, 32, 8, 4, 4), (64, 128, 64, 8, 4, 4)]
# linear_gelu at one sequence's 128 rows (the same fields and order; the last is the many-rows config).
FEW_ROWS_GEMM = [(64, 64, 128, 1, 4, 3), (64, 64, 128, 1, 4, 3, True, 0), (64, 64, 128, 1, 4, 3, True, 1),
                 (64, 64, 64, 1, 4, 4), (64, 32, 128, 1, 4, 3), (64, 128, 128, 1, 4, 3), (128, 64, 128, 1, 8, 3),
                 (128, 128, 64, 8, 8, 3)]
# Row kernels: elements per program and warps; BLOCK_N is the row (bias_gelu: at most 1024 columns).
ROW_TILES = [1024, 2048, 4096, 8192, 16384]
ROW_WARPS = [2, 4, 8, 16]


@contextlib.contextmanager
def patched(module, name: str, value) -> Iterator[None]:
    saved = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, saved)


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ over a tensor or a tuple of them."""
    if isinstance(out, (tuple, list)):
        out, ref = torch.cat([t.flatten() for t in out]), torch.cat([t.flatten() for t in ref])
    out, ref = out.double(), ref.double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


class Case:
    """One kernel at one shape: ``run()`` under the current config, its reference output,
    the candidates as (label, module, attribute, replacement), and the shipped config's label."""

    def __init__(self, op: str, shape: str, run: Callable[[], object], ref,
                 candidates: List[Tuple[str, object, str, Callable]], shipped: str):
        if shipped not in [c[0] for c in candidates]:  # always time what ships: the module's own function
            module, name = candidates[0][1], candidates[0][2]
            candidates = [(shipped, module, name, getattr(module, name))] + candidates
        self.op, self.shape, self.run, self.ref, self.candidates, self.shipped = op, shape, run, ref, candidates, shipped


def _attention_inputs(device, dtype, tiny: bool):
    g = torch.Generator(device="cpu").manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    b, s, h, d = (2, 24, 2, 16) if tiny else (8, 512, 12, 64)
    q, k, v = t(b, s, h, d), t(b, s, h, d), t(b, s, h, d)
    b2, s2 = (3, 16) if tiny else (32, 128)
    q2 = t(b2, s2, q.shape[2], q.shape[3])
    lengths = torch.randint(1, s2 + 1, (b2,), generator=g)
    lengths[0] = s2
    mask = (torch.arange(s2)[None] < lengths[:, None]).to(device)
    lo, hi, n = (3, 24, 3) if tiny else (32, 512, 32)
    lens = torch.randint(lo, hi + 1, (n,), generator=g)
    cu = torch.nn.functional.pad(torch.cumsum(lens, 0), (1, 0)).to(device, torch.int32)
    qp = t(int(lens.sum()), q.shape[2], q.shape[3])
    return (q, k, v), (q2, mask), (qp, cu, int(lens.max()))


def _bwd_label(c: Sequence) -> str:
    """The attention backward's config as the tables print it."""
    return "m1={} n1={} m2={} n2={} w={} s={}".format(*c)


def attention_cases(device, dtype, tiny: bool) -> List[Case]:
    from fastbert.kernels import attention, attention_bwd
    (q, k, v), (q2, mask), (qp, cu, longest) = _attention_inputs(device, dtype, tiny)
    fwd = ATTN_FWD[:2] if tiny else ATTN_FWD
    bwd = ATTN_BWD[:2] if tiny else ATTN_BWD

    def fwd_candidates():
        return [("BM={} BN={} w={} s={}".format(*c), attention, "fwd_config",
                 lambda *a, c=c: attention.FwdConfig(*c)) for c in fwd]

    def shipped_fwd(t, short):
        d = max(16, 1 << (t.shape[-1] - 1).bit_length())
        return "BM={} BN={} w={} s={}".format(*astuple(attention.fwd_config(t.device, t.dtype, d, d, short)))

    cases = []
    with torch.no_grad():
        for shape, run, ref_fn, short in (
            (f"B={q.shape[0]} S={q.shape[1]} no mask", lambda: fb.attention(q, k, v),
             lambda: reference.attention(q.float(), k.float(), v.float()), q.shape[1] <= 64),
            (f"B={q2.shape[0]} S={q2.shape[1]} padding mask", lambda: fb.attention(q2, q2, q2, mask),
             lambda: reference.attention(q2.float(), q2.float(), q2.float(), mask), q2.shape[1] <= 64),
            (f"packed {cu.numel() - 1} sequences, T={qp.shape[0]}", lambda: fb.attention(qp, qp, qp, cu_seqlens=cu, max_seqlen=longest),
             lambda: reference.attention(qp.float(), qp.float(), qp.float(), cu_seqlens=cu), longest <= 64),
        ):
            cases.append(Case("attention fwd", shape, triton_backend(run), ref_fn(), fwd_candidates(),
                              shipped_fwd(q, short)))
    # The backward's two kernels alone (delta pre-pass and dQ/dK/dV), from a saved forward:
    # the long sequences without a mask, and the short ones with padding (the fine-tuning shape).
    d = max(16, 1 << (q.shape[-1] - 1).bit_length())
    shipped = _bwd_label(astuple(attention_bwd.bwd_config(q.device, q.dtype, d, d)))
    for (qq, kk, vv), key_mask, shape in (((q, k, v), None, f"B={q.shape[0]} S={q.shape[1]} no mask"),
                                          ((q2, q2, q2), mask, f"B={q2.shape[0]} S={q2.shape[1]} padding mask")):
        cases.append(Case("attention bwd", shape, *_backward_only(attention, attention_bwd, qq, kk, vv, key_mask),
                          [(_bwd_label(c), attention_bwd, "bwd_config", lambda *a, c=c: attention_bwd.BwdConfig(*c))
                           for c in bwd], shipped))
    return cases


def _backward_only(attention, attention_bwd, q, k, v, key_mask):
    """(run, reference) of the attention backward's launches alone, from a saved forward."""
    scale = q.shape[-1] ** -0.5
    grad_out = torch.randn_like(q)
    with torch.no_grad():
        out, lse = attention._launch_forward(q, k, v, key_mask, None, None, 0, scale, 0.0)
    ref_leaves = [t.detach().float().clone().requires_grad_() for t in (q, k, v)]  # distinct, even if q is k
    with torch.enable_grad():
        ref = torch.autograd.grad(reference.attention(*ref_leaves, key_mask), ref_leaves, grad_out.float())

    def run():
        grads = tuple(torch.empty_like(t) for t in (q, k, v))
        attention_bwd.launch_backward(grad_out, q, k, v, out, lse, key_mask, None, None, 0, scale, 0.0, grads)
        return grads
    return run, ref


def _row_candidates(n: int, module, name: str, tiny: bool, max_n: Optional[int] = None):
    block_n = 1 << max(n - 1, 0).bit_length()
    if max_n:
        block_n = min(block_n, max_n)
    out = []
    for tile in (ROW_TILES[1:3] if tiny else ROW_TILES):
        for warps in ((4,) if tiny else ROW_WARPS):
            block_m = max(1, tile // block_n)
            if block_m * block_n < warps * 32 * 4 and not tiny:  # fewer than 4 elements per thread
                continue
            out.append((f"BM={block_m} BN={block_n} w={warps}", module, name,
                        lambda *a, c=(block_m, block_n, warps), **k: c))
    return out


def _bwd_candidates(n: int, module, tiny: bool, tiles=(2048, 4096), warp_counts=(4, 8), max_n=None):
    """A row kernel's backward (add_layernorm's, bias_gelu's): tile, warps and programs per SM
    (each program walks a run of rows and leaves one partial sum per column). Columns are
    the whole row, or at most ``max_n`` of it."""
    block_n = 1 << max(n - 1, 0).bit_length()
    block_n = block_n if max_n is None else min(block_n, max_n)
    out = []
    for tile in ((2048,) if tiny else tiles):
        for warps in ((4,) if tiny else warp_counts):
            for per_sm in ((2, 4) if tiny else (2, 4, 8)):
                block_m = max(1, tile // block_n)
                out.append((f"BM={block_m} BN={block_n} w={warps} per_sm={per_sm}", module, "bwd_config",
                            lambda *a, c=(block_m, block_n, warps, per_sm), **k: c))
    return out


def row_cases(device, dtype, tiny: bool) -> List[Case]:
    from fastbert.kernels import gelu, layernorm, softmax
    g = torch.Generator(device="cpu").manual_seed(1)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)
    cases = []
    with torch.no_grad():
        m, n = (64, 96) if tiny else (4096, 3072)
        x, b = t(m, n), t(n)
        cases.append(Case("bias_gelu fwd", f"{m}x{n}", triton_backend(lambda x=x, b=b: fb.bias_gelu(x, b)),
                          reference.bias_gelu(x.float(), b.float()), _row_candidates(n, gelu, "_tile", tiny, 1024),
                          "BM={} BN={} w={}".format(*gelu._tile(n, x.device, gelu.FWD_ELEMS))))
        dy = t(m, n)
        leaves = [v.float().requires_grad_() for v in (x, b)]
        with torch.enable_grad():
            ref_bwd = torch.autograd.grad(reference.bias_gelu(*leaves), leaves, dy.float())
        cases.append(Case("bias_gelu bwd", f"{m}x{n}", lambda dy=dy, x=x, b=b: torch.ops.fastbert.bias_gelu_bwd(dy, x, b, False), ref_bwd,
                          _bwd_candidates(n, gelu, tiny, (4096, 8192), (8, 16), 1024),
                          "BM={} BN={} w={} per_sm={}".format(*gelu.bwd_config(n, x.device))))
        m, n = (64, 48) if tiny else (4096, 768)
        x, r, w, bb, xb = t(m, n), t(m, n), t(n), t(n), t(n)
        cases.append(Case("add_layernorm fwd", f"{m}x{n}",
                          triton_backend(lambda x=x, r=r, w=w, bb=bb, xb=xb: fb.add_layernorm(x, r, w, bb, 1e-12, x_bias=xb)),
                          reference.add_layernorm(x.float(), r.float(), w.float(), bb.float(), 1e-12, xb.float()),
                          _row_candidates(n, layernorm, "row_config", tiny),
                          "BM={} BN={} w={}".format(*layernorm.row_config(n, x.device, layernorm.FWD_TILE,
                                                                          layernorm.FWD_PER_WARP))))
        dy = t(m, n)
        _, mean, rstd = torch.ops.fastbert.add_layernorm_fwd(x, r, w, bb, 1e-12, xb, 0.0, None)
        leaves = [v.float().requires_grad_() for v in (x, r, w, bb, xb)]
        with torch.enable_grad():
            ref_grads = torch.autograd.grad(reference.add_layernorm(*leaves[:4], 1e-12, leaves[4]), leaves, dy.float())
        # (d residual, d x: empty, shared with d residual without dropout, d weight, d bias, d x_bias)
        ref_bwd = (ref_grads[1], torch.empty(0, device=device), *ref_grads[2:])
        cases.append(Case("add_layernorm bwd", f"{m}x{n}",
                          lambda: torch.ops.fastbert.add_layernorm_bwd(dy, x, r, w, bb, xb, mean, rstd, 0.0, None),
                          ref_bwd, _bwd_candidates(n, layernorm, tiny),
                          "BM={} BN={} w={} per_sm={}".format(*layernorm.bwd_config(n, x.device))))
        shape = (2, 2, 8, 16) if tiny else (32, 12, 128, 128)
        s = t(*shape)
        keep = torch.rand(shape[0], 1, 1, shape[-1], generator=g) < 0.8
        keep[..., 0] = True
        mask = torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(dtype).min).to(device, dtype)
        cases.append(Case("softmax_mask fwd", "x".join(map(str, shape)) + " padding mask",
                          triton_backend(lambda: fb.softmax_mask(s, mask, 0.125)),
                          reference.softmax_mask(s.float(), mask.float(), 0.125),
                          _row_candidates(shape[-1], softmax, "row_config", tiny),
                          "BM={} BN={} w={}".format(*softmax.row_config(shape[-1], s.device, softmax.FWD_TILE,
                                                                        softmax.FWD_PER_WARP))))
    return cases


def gemm_label(cfg) -> str:
    label = "BM={} BN={} BK={} G={} w={} s={}".format(*cfg[:6])
    return label + (f" TMA, {cfg.per_sm}/SM" if cfg.per_sm else " TMA") if cfg.tma else label


def gemm_cases(device, dtype, tiny: bool) -> List[Case]:
    """The fused GEMM + bias + GELU (inference) at BERT-base's expansion, at one sequence's
    rows of it, and at BERT-large's (in that order, so a time limit cuts the last), each
    against cuBLAS + bias_gelu."""
    from fastbert import functional
    from fastbert.kernels import linear_gelu
    g = torch.Generator(device="cpu").manual_seed(2)

    def composed(op, *args, **kwargs):  # what "auto" runs: F.linear (cuBLAS), then bias_gelu
        return reference.linear_gelu if op == "linear_gelu" else fastbert_ops.implementation(op, *args, **kwargs)

    def candidates(configs):  # the first config (the shipped one), cuBLAS + bias_gelu, the rest
        rows = [(gemm_label(linear_gelu.GemmConfig(*c)), linear_gelu, "gemm_config",
                 lambda *a, c=c: linear_gelu.GemmConfig(*c)) for c in configs]
        return rows[:1] + [("cuBLAS + bias_gelu", functional, "implementation", composed)] + rows[1:]
    many, few = ("linear_gelu fwd", GEMM[:3] if tiny else GEMM), ("linear_gelu few rows fwd",
                                                                  FEW_ROWS_GEMM[:2] if tiny else FEW_ROWS_GEMM)
    shapes = ([(many, 64, 48, 80), (few, 16, 48, 80)] if tiny else
              [(many, 4096, 768, 3072), (few, 128, 768, 3072), (many, 4096, 1024, 4096)])
    cases = []
    with torch.no_grad():
        for (name, configs), m, k, n in shapes:
            x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g) * k ** -0.5
            x, w, b = x.to(device, dtype), w.to(device, dtype), torch.randn(n, generator=g).to(device, dtype)
            cases.append(Case(name, f"{m}x{k}->{n}", triton_backend(lambda x=x, w=w, b=b: fb.linear_gelu(x, w, b)),
                              reference.linear_gelu(x.float(), w.float(), b.float()), candidates(configs),
                              gemm_label(linear_gelu.gemm_config(x.device, dtype, m, n, k))))
    return cases


def measure(case: Case, device: str, tiny: bool, deadline: Optional[float] = None) -> List[Dict[str, object]]:
    rows = []
    for label, module, name, value in case.candidates:
        row: Dict[str, object] = {"op": case.op, "shape": case.shape, "config": label, "shipped": label == case.shipped}
        if deadline is not None and time.monotonic() > deadline:
            row["error"] = "not run (time limit)"
            rows.append(row)
            continue
        try:
            with patched(module, name, value):
                with torch.no_grad():
                    out = case.run()
                    row["rel_err"] = rel_err(out, case.ref)
                    if str(device).startswith("cuda"):
                        import triton.testing
                        row["us"] = 1e3 * float(triton.testing.do_bench_cudagraph(case.run, rep=30 if tiny else 100,
                                                                                    return_mode="median"))
                    else:
                        row["us"] = 1e3 * time_ms(case.run, device, rep_ms=1)
        except Exception as exc:  # a config that does not compile or run is a result too
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            if str(device).startswith("cuda"):
                from .common import _end_failed_capture
                _end_failed_capture(device)
        rows.append(row)
    return rows


def table(rows: Sequence[Dict[str, object]]) -> str:
    lines = []
    for key in dict.fromkeys((r["op"], r["shape"]) for r in rows):
        group = [r for r in rows if (r["op"], r["shape"]) == key]
        group.sort(key=lambda r: r.get("us", float("inf")))
        lines.append(f"{key[0]}, {key[1]}:")
        for r in group:
            mark = "*" if r["shipped"] else " "
            if "error" in r:
                why = r["error"] if r["error"].startswith("not run") else "failed: " + r["error"]
                lines.append(f"  {mark} {r['config']:40s} {why}")
            else:
                lines.append(f"  {mark} {r['config']:40s} {r['us']:9.2f} us   rel err {r['rel_err']:.1e}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastbert.benchmarks.tune", description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", default="attention,rows,gemm", help="comma list of attention, rows, gemm (default all)")
    p.add_argument("--dtype", choices=("fp16", "bf16"), default="fp16")
    p.add_argument("--out", default=None, help="folder for tune-<date>.json")
    p.add_argument("--tiny", action="store_true", help="toy shapes, two candidates per case (checks the script)")
    p.add_argument("--cases", default=None, metavar="LIST",
                   help='only the cases whose name starts with one of these, e.g. "attention bwd,add_layernorm bwd"')
    p.add_argument("--max-seconds", type=float, default=None,
                   help="start no candidate after this long; the table lists the rest as not run")
    args = p.parse_args(argv)
    device = default_device()
    if not device.startswith("cuda") and not args.tiny:
        print("tune: needs a CUDA GPU (--tiny checks the script on a CPU)", file=sys.stderr)
        return 2
    # --tiny checks the script (fp32, to the reference's precision) on any device.
    dtype = torch.float32 if args.tiny or not device.startswith("cuda") else {"fp16": torch.float16,
                                                                              "bf16": torch.bfloat16}[args.dtype]
    dtype_name = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    builders = {"attention": attention_cases, "rows": row_cases, "gemm": gemm_cases}
    unknown = [o for o in ops if o not in builders]
    if unknown:
        print(f"tune: unknown --ops {', '.join(unknown)}; choose from {', '.join(builders)}", file=sys.stderr)
        return 2
    rows: List[Dict[str, object]] = []
    start = time.time()
    deadline = None if args.max_seconds is None else time.monotonic() + args.max_seconds
    wanted = None if args.cases is None else [c.strip() for c in args.cases.split(",") if c.strip()]
    for op in ops:
        for case in builders[op](device, dtype, args.tiny):
            if wanted is None or any(case.op.startswith(w) for w in wanted):
                rows += measure(case, device, args.tiny, deadline)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "CPU (interpreter)"
    print(f"# {name}, {dtype_name}, {time.time() - start:.0f} s; "
          "* = the shipped config\n" + table(rows))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"tune-{time.strftime('%Y-%m-%d')}.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump({"device": name, "dtype": dtype_name, "torch": torch.__version__, "rows": rows}, f, indent=1)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
