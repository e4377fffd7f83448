// Fused BERT embedding: LayerNorm(word[ids] + position[pos] + token_type[tt]), then dropout.
//
// This header needs no torch headers: the CPU implementation (embedding_cpu.cpp) uses its
// host/device helpers (id views, the Philox dropout stream), and with nvcc it also defines
// the __global__ kernels and their launchers, which embedding_cuda.cu calls with raw
// pointers. tests/nvcc_check.sh compiles it on machines without a GPU or a CUDA torch, and
// tests/cuda_emulator.py runs its kernels on the CPU (it rewrites each launch for the
// emulator in tests/cuda_emu/: keep a launch on one line, its kernel's name ending in _kernel).
//
// Napkin math (BERT-base, 4096 tokens x 768, fp16): the forward must read 4096 word rows
// (6.3 MB; position and token-type rows are few and stay in L2) and write 6.3 MB, so about
// 12.6 MB of DRAM traffic: ~4 us at 3.3 TB/s. One warp per token keeps the row in
// registers, so each byte is read once.
#pragma once

// embedding_common.cuh: host/device helpers (also used by the CPU code) and CUDA helpers;
// embedding_fwd.cuh and embedding_bwd.cuh: the kernels and their launchers.
#include "embedding_common.cuh"
#include "embedding_fwd.cuh"
#include "embedding_bwd.cuh"
