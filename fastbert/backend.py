"""The backend switch: which implementation of each op runs.

``"auto"``   the fastest implementation for the tensor's device (the default);
``"triton"`` always fastbert's own kernels (Triton, and the C++/CUDA extension for the
             embedding); Triton runs on the CPU only under ``TRITON_INTERPRET=1``;
``"eager"``  always the eager PyTorch reference.

Set it with :func:`set_backend` (every thread), the context manager :func:`use_backend`
(the calling thread, for the block), or the environment variable ``FASTBERT_BACKEND`` (read
once, at import).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Iterator

BACKENDS = ("auto", "triton", "eager")


def _checked(name: str) -> str:
    name = str(name).lower()
    if name not in BACKENDS:
        raise ValueError(f"unknown fastbert backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name


_default = _checked(os.environ.get("FASTBERT_BACKEND", "auto"))
# use_backend's choice, per thread: one thread's block never changes another's ops. (A
# threading.local, which torch.compile reads and guards on; it cannot trace a ContextVar.)
_local = threading.local()


def get_backend() -> str:
    """The backend in force now: this thread's innermost :func:`use_backend`, else the default."""
    return getattr(_local, "name", None) or _default


def set_backend(name: str) -> None:
    """Choose the default backend, for every thread, from now on (a :func:`use_backend` block
    still overrides it in its thread)."""
    global _default
    _default = _checked(name)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ``with`` block under another backend, in the calling thread only, then restore
    the previous one."""
    previous = getattr(_local, "name", None)
    _local.name = _checked(name)
    try:
        yield
    finally:
        _local.name = previous


def in_this_backend(fn):
    """``fn``, run under the backend in force now wherever it is called later: a checkpointed
    layer is recomputed during the backward, on autograd's device thread for CUDA tensors,
    which does not see this thread's :func:`use_backend`."""
    name = get_backend()

    def run(*args, **kwargs):
        with use_backend(name):
            return fn(*args, **kwargs)
    return run


@contextlib.contextmanager
def assume_valid_ids() -> Iterator[None]:
    """Inside the block, the fused CUDA embedding does not synchronize to check its ids.

    By default every forward of the CUDA embedding copies one word back from the GPU and
    waits for it, so that an id out of range raises a ValueError at once; the wait keeps the
    host from queueing work ahead of the GPU. Use this block where the ids were checked on
    the host (``fastbert.training.Trainer`` checks every batch before moving it). An id out of
    range is still never read: its token's output is zeros, and the next checked call on that
    device raises. Applies to the calling thread; the eager reference (no CUDA extension)
    checks its ids either way.
    """
    try:
        from fastbert import _C
        setter = _C.set_sync_id_check
    except (ImportError, AttributeError):  # no extension: the reference runs, and checks
        yield
        return
    previous = setter(False)
    try:
        yield
    finally:
        setter(previous)


def triton_interpreted() -> bool:
    """True when Triton kernels run on the CPU through the interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
