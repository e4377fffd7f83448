"""The op registry and the one place that picks an implementation.

Every op has an eager reference (``fastbert.reference``) and a kernel (``fastbert.kernels``,
Triton, or the C++/CUDA extension for the embedding); an op may also have a faster CPU
composition of PyTorch ops (``fastbert.cpu``) that the "auto" backend runs on CPU tensors.
:func:`implementation` returns the one to run for a device under the current backend
(``fastbert.backend``); while ``torch.onnx.export`` runs, the reference. Nothing else in
fastbert imports a kernel module.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from . import cpu, reference
from .backend import get_backend, triton_interpreted


@dataclass(frozen=True)
class Op:
    name: str
    reference: Callable
    kernel: str  # "module:function" of fastbert's own implementation
    native_cpu: bool = False  # the kernel has a compiled CPU implementation (not the interpreter)
    cpu: Optional[Callable] = None  # what "auto" runs on CPU tensors instead of the reference (fastbert.cpu)
    # "auto" runs the kernel on the GPU; False for a kernel that has yet to show it is faster
    # than what the caller composes without it (the "triton" backend still selects it).
    auto: bool = True
    # Where fastbert.functional runs a composition of other ops instead of the reference (for
    # reports): linear_gelu's F.linear, then bias_gelu.
    composed: Optional[str] = None


OPS: Dict[str, Op] = {
    op.name: op
    for op in (
        Op("embedding", reference.embedding, "fastbert.kernels.embedding:embedding", native_cpu=True),
        Op("add_layernorm", reference.add_layernorm, "fastbert.kernels.layernorm:add_layernorm"),
        Op("bias_gelu", reference.bias_gelu, "fastbert.kernels.gelu:bias_gelu"),
        Op("linear_gelu", reference.linear_gelu, "fastbert.kernels.linear_gelu:linear_gelu", auto=False,
           composed="F.linear, then bias_gelu"),
        Op("softmax_mask", reference.softmax_mask, "fastbert.kernels.softmax:softmax_mask"),
        Op("attention", reference.attention, "fastbert.kernels.attention:attention", cpu=cpu.attention),
        Op("attention_qkv", reference.attention_qkv, "fastbert.kernels.attention:attention_qkv", cpu=cpu.attention_qkv),
    )
}

_kernels: Dict[str, Tuple[Optional[Callable], Optional[str]]] = {}
_chosen: Dict[Tuple[str, str, str, bool], Callable] = {}


def load_kernel(name: str) -> Tuple[Optional[Callable], Optional[str]]:
    """(kernel, None) if the op's kernel imports here, else (None, why not)."""
    if name not in _kernels:
        module, _, attr = OPS[name].kernel.partition(":")
        try:
            _kernels[name] = (getattr(importlib.import_module(module), attr), None)
        except (ImportError, AttributeError, OSError) as exc:
            _kernels[name] = (None, f"{type(exc).__name__}: {exc}")
    return _kernels[name]


def kernel_available(name: str) -> bool:
    return load_kernel(name)[0] is not None


def load_kernels() -> None:
    """Import every op's kernel now. torch.compile cannot trace an import, so a model that
    is compiled before its first eager call needs its kernels loaded beforehand."""
    for name in OPS:
        load_kernel(name)


def implementation(name: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Callable:
    """The function that runs op ``name`` on ``device`` (for ``dtype``) under the current backend."""
    if exporting_onnx():
        return OPS[name].reference
    key = (name, get_backend(), device.type, dtype == torch.float64)
    if torch.compiler.is_compiling():
        # Traced, the choice is made afresh: a graph that fills the cache would guard on the
        # cache not holding the key, fail that guard on its next call and compile again.
        return _choose(OPS[name], key[1], device, key[3])
    fn = _chosen.get(key)
    if fn is None:
        fn = _chosen[key] = _choose(OPS[name], key[1], device, key[3])
    return fn


def exporting_onnx() -> bool:
    """``torch.onnx.export`` is running. ONNX has no fastbert ops, so under every backend each
    op then takes its eager reference: PyTorch ops that export to standard ONNX ones, which
    ONNX Runtime fuses with its own kernels. (torch.onnx is imported by then; until it is,
    nothing can be exporting and the check costs a dict lookup; both exporters trace, with
    torch.export or torch.jit, so outside a trace the check is two flags, not torch.onnx's
    ~2.5 µs.)"""
    if not (torch.compiler.is_compiling() or torch.jit.is_tracing()):
        return False
    onnx = sys.modules.get("torch.onnx")
    return onnx is not None and onnx.is_in_onnx_export()


def _choose(op: Op, backend: str, device: torch.device, fp64: bool = False) -> Callable:
    if backend == "eager":
        return op.reference
    kernel, why = load_kernel(op.name)
    runs_here = device.type == "cuda" or op.native_cpu
    if backend == "auto":
        # The kernels compute in fp32: float64 keeps its precision through the reference.
        if kernel is not None and runs_here and not fp64 and op.auto:
            return kernel
        if device.type == "cpu" and op.cpu is not None:
            return op.cpu
        return op.reference
    # backend == "triton": fastbert's own kernel or a clear error.
    if kernel is None:
        raise RuntimeError(f"fastbert: the {op.name} kernel is unavailable ({why}); use the 'auto' or 'eager' backend")
    if not runs_here and not (device.type == "cpu" and triton_interpreted()):
        raise RuntimeError(
            f"fastbert: the Triton {op.name} kernel needs a CUDA tensor, got one on {device.type} "
            "(set TRITON_INTERPRET=1 before importing fastbert to run Triton on the CPU, "
            "or use the 'auto' or 'eager' backend)"
        )
    return kernel


def describe() -> Dict[str, str]:
    """For reports: which implementation each op has here."""
    return {name: ("kernel" if kernel_available(name) else f"reference only ({load_kernel(name)[1]})") for name in OPS}
