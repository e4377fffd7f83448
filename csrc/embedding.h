// Host-side pieces shared by the CPU (embedding_cpu.cpp) and CUDA (embedding_cuda.cu) ops:
// argument checks, id views and the out-of-range error.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <vector>

#include "embedding_kernels.cuh"

namespace fastbert {

struct Ids {
  at::Tensor tensor;  // keeps a contiguous copy alive when the ids needed one
  IdView view;
};

struct EmbeddingArgs {
  Ids word_ids, pos_ids, type_ids;
  at::Tensor word, pos, type, gamma;  // contiguous
  int64_t tokens = 0;
  int64_t hidden = 0;
  bool param_is_float = false;  // LayerNorm parameters in fp32 rather than the table dtype
  int64_t padding_idx = -1;     // word row without gradient, or -1
  double dropout_p = 0.0;
  uint32_t keep_threshold = 0;      // 0: no dropout
  float drop_scale = 1.f;
};

// Checks shapes, dtypes and devices; ids out of range are found by the kernels themselves.
EmbeddingArgs check_args(const at::Tensor& input_ids, const at::Tensor& token_type_ids, const at::Tensor& position_ids,
                         const at::Tensor& word_weight, const at::Tensor& position_weight,
                         const at::Tensor& token_type_weight, const at::Tensor& ln_weight,
                         const std::optional<at::Tensor>& ln_bias, double dropout_p,
                         const std::optional<at::Tensor>& seed, std::optional<int64_t> padding_idx);

// The backward's arguments: check_args, plus grad_out (the output's shape and the tables'
// dtype) and the forward's statistics (the ids' shape, in stat_dtype).
EmbeddingArgs check_bwd_args(const at::Tensor& grad_out, const at::Tensor& input_ids,
                             const at::Tensor& token_type_ids, const at::Tensor& position_ids,
                             const at::Tensor& word_weight, const at::Tensor& position_weight,
                             const at::Tensor& token_type_weight, const at::Tensor& ln_weight,
                             const at::Tensor& mean, const at::Tensor& rstd, double dropout_p,
                             const std::optional<at::Tensor>& seed, std::optional<int64_t> padding_idx);

// The output shape: the ids' shape plus the hidden dim.
std::vector<int64_t> out_shape(const at::Tensor& ids, int64_t hidden);

// The dtype of the per-token mean and rstd: fp32, fp64 for fp64 tables (CPU only).
inline at::ScalarType stat_dtype(at::ScalarType table) { return table == at::kDouble ? at::kDouble : at::kFloat; }

// Raises the ValueError for the bad id of `kind` at flat token `token`, naming the value. A
// record that does not match these ids (left by a call that did not check: a kernel replayed
// from a CUDA graph, where the host cannot sync, or one under fastbert.assume_valid_ids) gets
// a message saying so.
[[noreturn]] void raise_bad_id(const EmbeddingArgs& a, int64_t token, int kind);

// This thread's switch for the CUDA forward's id check (one device-to-host copy and a stream
// sync per call); on by default, off under fastbert.assume_valid_ids(), whose caller checked
// the ids on the host. The kernels never read a bad row either way and still record it.
bool& sync_id_check();

// Whether the CUDA kernels were compiled in.
bool cuda_built();

}  // namespace fastbert
