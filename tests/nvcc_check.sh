#!/usr/bin/env bash
# Compiles the CUDA kernels (csrc/embedding_kernels.cuh) with nvcc for sm_80 and sm_90, with
# no torch headers and no GPU, so a CUDA syntax or type error fails CI on a CPU machine.
# Every launcher (and so every kernel template) is instantiated for fp32, fp16 and bf16.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC="${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}"
if [ ! -x "$NVCC" ]; then
  echo "nvcc_check: nvcc not found (set NVCC)" >&2
  exit 1
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat > "$tmp/instantiate.cu" <<'CU'
#include "embedding_kernels.cuh"
namespace fastbert {
namespace cuda {
#define FASTBERT_INSTANTIATE(T)                                                                            \
  template cudaError_t launch_embedding_fwd<T>(const Tables<T>&, const FwdOut&, const Dropout&, bool,      \
                                               cudaStream_t);                                              \
  template cudaError_t launch_embedding_bwd<T>(const Tables<T>&, const BwdIO&, const Dropout&, bool, int,  \
                                               void*, void*, const SegIO&, cudaStream_t);
FASTBERT_INSTANTIATE(float)
FASTBERT_INSTANTIATE(__half)
FASTBERT_INSTANTIATE(__nv_bfloat16)
}  // namespace cuda
}  // namespace fastbert
CU
"$NVCC" -c -std=c++17 -O3 -I csrc \
  -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
  "$tmp/instantiate.cu" -o "$tmp/instantiate.o"
echo "nvcc_check: csrc/embedding_kernels.cuh compiles for sm_80 and sm_90 ($("$NVCC" --version | tail -1))"
