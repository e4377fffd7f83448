"""Test setup. Without a GPU, Triton kernels run on the CPU through the interpreter, which
must be switched on before any kernel module is imported (it is read at decoration time)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastbert  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend_and_seed():
    """Every test starts from the default backend and a fixed seed."""
    previous = fastbert.get_backend()
    torch.manual_seed(0)
    yield
    fastbert.set_backend(previous)


def pytest_runtest_logreport(report):
    """With FASTBERT_FAILURE_LOG set, each failure is appended to that file as it happens, with
    the line that says why (benchmarks/gpu_check.sh: a suite cut by its time limit still says
    what failed and how)."""
    path = os.environ.get("FASTBERT_FAILURE_LOG")
    if not path or not report.failed:
        return
    crash = getattr(report.longrepr, "reprcrash", None)
    why = crash.message if crash is not None else str(report.longrepr).strip().splitlines()[-1:]
    why = " ".join(str(why).split())[:400]
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{report.nodeid} ({report.when}): {why}\n")
