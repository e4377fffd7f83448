"""What the Triton kernels compile to on Hopper, without a GPU: each forward kernel, and the
attention's backward, at its BERT launch config is compiled for sm_90 (Triton's own ptxas)
and disassembled (Triton's cuobjdump), and the machine code is summarised: instructions per
thread and per element, registers per thread and the stack frame (bytes of registers spilled
to local memory, STL/LDL), the width of every global load and store, and the matrix and
special-function instructions. Arguments carry the specialisations a launch at these shapes gets (16-byte
aligned pointers, sizes and strides divisible by 16, unit strides as constants), so loads
vectorise as they will on the GPU.

    python -m fastbert.benchmarks.sass

A memory-bound kernel needs 16-byte accesses (LDG.E.128/STG.E.128) and few enough
instructions per element that issuing them takes less time than moving the bytes: at
132 SMs × 128 lanes × 1.98 GHz an H100/H200 issues about 33 G lane-instructions per µs,
so 12.6 M elements at 40 instructions each need 15 µs. A matrix kernel should show HGMMA
(warpgroup MMA), not only HMMA.
"""

from __future__ import annotations

import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

import torch

ISSUE_PER_US = 132 * 128 * 1.98e3  # lane-instructions per µs on an H100/H200


def _bin(tool: str) -> str:
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def compile_sass(fn, signature: Dict[str, str], constexprs: Dict[str, object], divisible: Sequence[str],
                 num_warps: int, num_stages: int = 3, capability: int = 90) -> Tuple[List[str], Dict[str, int]]:
    """The SASS instruction lines of ``fn`` compiled for sm_<capability> (90: Hopper), and its
    resources: registers per thread, the stack frame in bytes (nonzero when registers spill to
    local memory) and the shared memory a program needs."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = fn.arg_names
    sig = {n: ("constexpr" if n in constexprs else signature[n]) for n in names}
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in divisible}
    kernel = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([_bin("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([_bin("cuobjdump"), "--dump-resource-usage", path], capture_output=True, text=True,
                               check=True).stdout
    found = re.search(r"REG:(\d+).*?STACK:(\d+)", usage, re.S)
    if found is None:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {usage[-300:]!r}")
    lines = [line for line in out.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    return lines, {"registers": int(found.group(1)), "stack": int(found.group(2)), "shared": int(kernel.metadata.shared)}


def summarise(lines: List[str]) -> Tuple[int, Dict[str, int], Dict[str, int]]:
    """(instructions, memory instructions by width, matrix/special-function counts, with the
    asynchronous copies: LDGSTS (cp.async) and UTMALDG (TMA))."""
    ops = collections.Counter()
    for line in lines:
        m = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1)] += 1
    memory = {k: v for k, v in ops.items() if k.startswith(("LDG", "STG"))}
    special = collections.Counter()
    for k, v in ops.items():
        base = k.split(".")[0]
        if "MMA" in base or base in ("MUFU", "LDGSTS", "UTMALDG", "LDSM", "STL", "LDL"):
            special[base] += v
    return len(lines), memory, dict(special)


def specs() -> List[Tuple[str, object, Dict[str, str], Dict[str, object], List[str], int, int, int]]:
    """(name, kernel, signature, constexprs, divisible args, warps, elements per program,
    elements in the BERT-base tensor; 0 where there is no such figure) for each forward kernel
    and the row kernels' and the attention's backwards, at their shipped Hopper configs."""
    ln = importlib.import_module("fastbert.kernels.layernorm")
    gelu = importlib.import_module("fastbert.kernels.gelu")
    sm = importlib.import_module("fastbert.kernels.softmax")
    at = importlib.import_module("fastbert.kernels.attention")
    f16, f32 = "*fp16", "*fp32"
    out = []
    sig = {"X": f16, "XB": f16, "R": f16, "W": f16, "B": f16, "Y": f16, "MEAN": f32, "RSTD": f32, "SEED": "*i64",
           "M": "i32", "N": "i32", "eps": "fp32", "p": "fp32", "drop_scale": "fp32"}
    out.append(("add_layernorm fwd 4096x768", ln._add_layernorm_fwd, sig,
                {"BLOCK_M": 2, "BLOCK_N": 1024, "HAS_XBIAS": True, "DROPOUT": False, "STATS": True},
                ["X", "XB", "R", "W", "B", "Y", "MEAN", "RSTD", "N"], 2, 2 * 768, 4096 * 768))
    out.append(("bias_gelu fwd 4096x3072", gelu._bias_gelu_fwd, {"X": f16, "B": f16, "Y": f16, "M": "i32", "N": "i32"},
                {"BLOCK_M": 2, "BLOCK_N": 1024, "TANH": False}, ["X", "B", "Y", "N"], 4, 2 * 1024, 4096 * 3072))
    # The backwards walk runs of rows (no per-element figure); their tiles from the modules' constants.
    sig = {"DY": f16, "X": f16, "XB": f16, "R": f16, "W": f16, "MEAN": f32, "RSTD": f32, "SEED": "*i64", "DH": f16,
           "DX": f16, "PART": f32, "M": "i32", "N": "i32", "rows_per_prog": "i32", "p": "fp32", "drop_scale": "fp32"}
    block_m = ln.BWD_TILE // 1024  # with dropout, as in training (the most registers)
    out.append((f"add_layernorm bwd 4096x768 ({block_m}x1024, dropout)", ln._add_layernorm_bwd, sig,
                {"BLOCK_M": block_m, "BLOCK_N": 1024, "HAS_XBIAS": True, "DROPOUT": True, "STORE_DX": True},
                ["DY", "X", "XB", "R", "W", "DH", "DX", "PART", "N"], min(ln.BWD_TILE // ln.BWD_PER_WARP, 16), 0, 0))
    block_m = gelu.BWD_ELEMS // 1024
    out.append((f"bias_gelu bwd 4096x3072 ({block_m}x1024)", gelu._bias_gelu_bwd,
                {"DY": f16, "X": f16, "B": f16, "DX": f16, "PART": f32, "M": "i32", "N": "i32", "rows_per_prog": "i32"},
                {"BLOCK_M": block_m, "BLOCK_N": 1024, "TANH": False}, ["DY", "X", "B", "DX", "PART", "N"],
                min(gelu.BWD_ELEMS // 512, 16), 0, 0))
    sig = {"S": f16, "MASK": f16, "Y": f16, "LSE": f32, "SEED": "*i64", "M": "i32", "N": "i32", "D1": "i32", "D2": "i32",
           "ms0": "i32", "ms1": "i32", "ms2": "i32", "scale": "fp32", "mask_min": "fp32", "p": "fp32", "drop_scale": "fp32"}
    out.append(("softmax_mask fwd 32x12x128x128", sm._softmax_mask_fwd, sig,
                {"msn": 1, "BLOCK_M": 16, "BLOCK_N": 128, "HAS_MASK": True, "DROPOUT": False},
                ["S", "MASK", "Y", "LSE", "N", "ms0", "ms1", "ms2"], 2, 16 * 128, 32 * 12 * 128 * 128))
    ints = [n for n in at._attn_fwd.arg_names if n.startswith("stride_") or n in ("num_heads", "seqlen_q", "seqlen_k",
                                                                                    "drop_stride")]
    sig = dict({n: "i32" for n in ints}, Q=f16, K=f16, V=f16, O=f16, LSE=f32, KeyMask="*i64", CuSeqlens="*i32",
               Seed="*i64", sm_scale="fp32", dropout_p="fp32")
    const = {"HEAD_DIM": 64, "HEAD_DIM_V": 64, "BLOCK_D": 64, "BLOCK_DV": 64, "BLOCK_M": 64, "BLOCK_N": 64,
             "PACKED": False, "HAS_MASK": True, "DROPOUT": False, "IEEE": False, "STORE_LSE": True, "POS_SCALE": True,
             "stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_mn": 1}
    unspecialised = {"stride_lh", "stride_lb"}  # do_not_specialize, as seqlen_q and seqlen_k
    divisible = ["Q", "K", "V", "O", "LSE", "KeyMask"] + [
        n for n in ints if n.startswith("stride_") and n not in const and n not in unspecialised]
    out.append(("attention fwd D=64 (BM=64 BN=64)", at._attn_fwd, sig, const, divisible, 4, 0, 0))
    lg = importlib.import_module("fastbert.kernels.linear_gelu")
    cfg = lg.GemmConfig(128, 128, 64, 8, 8, 3)  # gemm_config on Hopper, fp16
    sig = {"X": f16, "W": f16, "B": f16, "Y": f16, "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32",
           "stride_wn": "i32"}
    const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
             "TANH": False, "EVEN_K": True, "IEEE": False, "GELU": True}
    out.append(("linear_gelu fwd 4096x768->3072 (128x128x64)", lg._linear_gelu_fwd, sig, const,
                ["X", "W", "B", "Y", "N", "K", "stride_xm", "stride_wn"], cfg.num_warps, 0, 0))
    for persistent in (False, True):  # the TMA variant, a program per tile or per SM (tune.py's candidates)
        sig = {"X": f"tensordesc<fp16[{cfg.block_m}, {cfg.block_k}]>", "W": f"tensordesc<fp16[{cfg.block_n}, {cfg.block_k}]>",
               "B": f16, "Y": f16, "M": "i32", "N": "i32", "K": "i32"}
        const = {"BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m,
                 "TANH": False, "PERSISTENT": persistent, "GELU": True}
        out.append((f"linear_gelu fwd TMA{', persistent' if persistent else ''} (128x128x64)", lg._linear_gelu_tma,
                    sig, const, ["B", "Y", "N", "K"], cfg.num_warps, 0, 0))
    ab = importlib.import_module("fastbert.kernels.attention_bwd")
    bwd = ab.gpu_bwd_config(torch.float16, 64, 64)
    ptrs = dict(Q=f16, K=f16, V=f16, DO=f16, DQ=f16, DK=f16, DV=f16, LSE=f32, Delta=f32,
                KeyMask="*i64", CuSeqlens="*i32", Seed="*i64")
    sig = dict({n: "i32" for n in ab._attn_bwd.arg_names}, **ptrs, sm_scale="fp32", dropout_p="fp32")
    const = {"HEAD_DIM": 64, "HEAD_DIM_V": 64, "BLOCK_D": 64, "BLOCK_DV": 64, "BLOCK_M1": bwd.block_m1,
             "BLOCK_N1": bwd.block_n1, "BLOCK_M2": bwd.block_m2, "BLOCK_N2": bwd.block_n2, "PACKED": False,
             "HAS_MASK": True, "DROPOUT": False, "IEEE": False, "ONE_GRAD": True,
             "stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_gd": 1, "stride_mn": 1}
    unspecialised = {"stride_lh", "stride_lb", "seqlen_q", "seqlen_k", "drop_stride"}
    divisible = list(ptrs) + [n for n in ab._attn_bwd.arg_names
                              if n.startswith("stride_") and n not in const and n not in unspecialised]
    blocks = f"{bwd.block_m1}/{bwd.block_n1}/{bwd.block_m2}/{bwd.block_n2}"
    out.append((f"attention bwd D=64 ({blocks})", ab._attn_bwd, sig, const, divisible, bwd.num_warps, 0, 0))
    return out


def main(argv: Sequence[str] = ()) -> int:
    try:
        rows = []
        for name, fn, sig, const, div, warps, per_program, total in specs():
            lines, resources = compile_sass(fn, sig, const, div, warps)
            count, memory, special = summarise(lines)
            line = f"{name:36s} {count:5d} instr/thread, {resources['registers']} registers, stack {resources['stack']} B"
            if per_program:  # an elementwise or row kernel: instructions per element and their issue time
                per_thread = per_program / (warps * 32)
                line += (f", {count / per_thread:5.1f} per element, issue >= "
                         f"{total * count / per_thread / ISSUE_PER_US:5.1f} us")
            rows.append(line + f"; memory {memory}; {special}")
    except (ImportError, OSError, subprocess.CalledProcessError, RuntimeError) as exc:
        print(f"sass: cannot compile for sm_90 here ({type(exc).__name__}: {exc})", file=sys.stderr)
        return 2
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
