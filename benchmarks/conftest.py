"""``pytest benchmarks/ --benchmark-only``: the pytest-benchmark suites of every op and of
the model. Without CUDA the GPU benchmarks (``@pytest.mark.gpu``) skip with a reason: a
Triton kernel timed under the CPU interpreter would measure the interpreter."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="GPU benchmark: needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and item.path.is_relative_to(config.rootpath / "benchmarks"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
