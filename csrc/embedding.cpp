// fastbert._C: the op schemas of the fused embedding and their argument checks. The
// implementations: CPU in embedding_cpu.cpp, CUDA in embedding_cuda.cu; register_fake and
// register_autograd are in kernels/embedding.py; the Python module in module.cpp.
// Narrow ATen headers (not torch/extension.h) keep the C++ build to seconds.

#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "embedding.h"

namespace fastbert {

namespace {

const char* kIdNames[3] = {"input_ids", "position_ids", "token_type_ids"};

Ids make_ids(const at::Tensor& ids) {
  Ids r;
  r.tensor = (ids.dim() <= 2) ? ids : ids.contiguous();
  const at::Tensor& t = r.tensor;
  r.view.ptr = t.data_ptr();
  r.view.is64 = t.scalar_type() == at::kLong;
  if (t.is_contiguous() || t.dim() == 0) {
    r.view.cols = std::max<int64_t>(t.numel(), 1);
    r.view.stride0 = 0;
    r.view.stride1 = 1;
  } else if (t.dim() == 1) {
    r.view.cols = std::max<int64_t>(t.size(0), 1);
    r.view.stride0 = 0;
    r.view.stride1 = t.stride(0);
  } else {  // 2-D with any strides, e.g. position ids expanded over the batch
    r.view.cols = std::max<int64_t>(t.size(1), 1);
    r.view.stride0 = t.stride(0);
    r.view.stride1 = t.stride(1);
  }
  return r;
}

void check_table(const char* name, const at::Tensor& t, const at::Tensor& word) {
  TORCH_CHECK_VALUE(t.dim() == 2, "fastbert.embedding: ", name, " must be 2-D, got ", t.sizes());
  TORCH_CHECK_VALUE(t.size(1) == word.size(1), "fastbert.embedding: ", name, " has ", t.size(1),
                    " columns but word_weight has ", word.size(1));
  TORCH_CHECK_VALUE(t.scalar_type() == word.scalar_type(), "fastbert.embedding: ", name, " is ", t.scalar_type(),
                    " but word_weight is ", word.scalar_type());
  TORCH_CHECK_VALUE(t.device() == word.device(), "fastbert.embedding: ", name, " is on ", t.device(),
                    " but word_weight is on ", word.device());
}

void check_ids(const char* name, const at::Tensor& t, const at::Tensor& ref, const at::Tensor& word) {
  TORCH_CHECK_VALUE(t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, "fastbert.embedding: ", name,
                    " must be int32 or int64, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "fastbert.embedding: ", name, " has shape ", t.sizes(),
                    " but input_ids has ", ref.sizes());
  TORCH_CHECK_VALUE(t.device() == word.device(), "fastbert.embedding: ", name, " is on ", t.device(),
                    " but word_weight is on ", word.device());
}

void check_param(const char* name, const at::Tensor& t, const at::Tensor& word) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == word.size(1), "fastbert.embedding: ", name, " must have shape (",
                    word.size(1), ",), got ", t.sizes());
  TORCH_CHECK_VALUE(t.scalar_type() == word.scalar_type() || t.scalar_type() == at::kFloat, "fastbert.embedding: ",
                    name, " must be ", word.scalar_type(), " (the table dtype) or float32, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == word.device(), "fastbert.embedding: ", name, " is on ", t.device(),
                    " but word_weight is on ", word.device());
}

}  // namespace

EmbeddingArgs check_args(const at::Tensor& input_ids, const at::Tensor& token_type_ids, const at::Tensor& position_ids,
                         const at::Tensor& word_weight, const at::Tensor& position_weight,
                         const at::Tensor& token_type_weight, const at::Tensor& ln_weight,
                         const std::optional<at::Tensor>& ln_bias, double dropout_p,
                         const std::optional<at::Tensor>& seed, std::optional<int64_t> padding_idx) {
  const auto dt = word_weight.scalar_type();
  TORCH_CHECK_VALUE(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || (dt == at::kDouble && word_weight.is_cpu()),
                    "fastbert.embedding: tables must be float16, bfloat16 or float32 (float64 on the CPU), got ", dt);
  TORCH_CHECK_VALUE(word_weight.dim() == 2, "fastbert.embedding: word_weight must be 2-D, got ", word_weight.sizes());
  check_table("position_weight", position_weight, word_weight);
  check_table("token_type_weight", token_type_weight, word_weight);
  check_ids("input_ids", input_ids, input_ids, word_weight);
  check_ids("token_type_ids", token_type_ids, input_ids, word_weight);
  check_ids("position_ids", position_ids, input_ids, word_weight);
  check_param("ln_weight", ln_weight, word_weight);
  if (ln_bias) {
    check_param("ln_bias", *ln_bias, word_weight);
    TORCH_CHECK_VALUE(ln_bias->scalar_type() == ln_weight.scalar_type(), "fastbert.embedding: ln_bias is ",
                      ln_bias->scalar_type(), " but ln_weight is ", ln_weight.scalar_type());
  }
  TORCH_CHECK_VALUE(dropout_p >= 0.0 && dropout_p < 1.0, "fastbert.embedding: dropout_p must be in [0, 1), got ", dropout_p);
  if (dropout_p > 0.0) {
    TORCH_CHECK_VALUE(seed.has_value(), "fastbert.embedding: dropout_p > 0 needs a seed tensor");
  }
  if (seed) {
    TORCH_CHECK_VALUE(seed->scalar_type() == at::kLong && seed->numel() == 1, "fastbert.embedding: seed must be one int64, got ",
                      seed->scalar_type(), " of shape ", seed->sizes());
    TORCH_CHECK_VALUE(seed->device() == word_weight.device(), "fastbert.embedding: seed is on ", seed->device(),
                      " but word_weight is on ", word_weight.device());
  }
  EmbeddingArgs a;
  a.hidden = word_weight.size(1);
  a.tokens = input_ids.numel();
  TORCH_CHECK_VALUE(a.hidden > 0 && a.hidden <= (1 << 24), "fastbert.embedding: hidden size ", a.hidden, " is not supported");
  if (padding_idx) {
    const int64_t n = word_weight.size(0);
    TORCH_CHECK_VALUE(*padding_idx >= -n && *padding_idx < n, "fastbert.embedding: padding_idx ", *padding_idx,
                      " is outside [", -n, ", ", n, ")");
    a.padding_idx = *padding_idx < 0 ? *padding_idx + n : *padding_idx;
  }
  a.word_ids = make_ids(input_ids);
  a.pos_ids = make_ids(position_ids);
  a.type_ids = make_ids(token_type_ids);
  a.word = word_weight.contiguous();
  a.pos = position_weight.contiguous();
  a.type = token_type_weight.contiguous();
  a.gamma = ln_weight.contiguous();
  a.param_is_float = ln_weight.scalar_type() == at::kFloat && dt != at::kFloat;
  a.dropout_p = dropout_p;
  if (dropout_p > 0.0) {
    a.keep_threshold = keep_threshold(dropout_p);
    a.drop_scale = static_cast<float>(1.0 / (1.0 - dropout_p));
  }
  return a;
}

EmbeddingArgs check_bwd_args(const at::Tensor& grad_out, const at::Tensor& input_ids,
                             const at::Tensor& token_type_ids, const at::Tensor& position_ids,
                             const at::Tensor& word_weight, const at::Tensor& position_weight,
                             const at::Tensor& token_type_weight, const at::Tensor& ln_weight,
                             const at::Tensor& mean, const at::Tensor& rstd, double dropout_p,
                             const std::optional<at::Tensor>& seed, std::optional<int64_t> padding_idx) {
  EmbeddingArgs a = check_args(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
                               ln_weight, std::nullopt, dropout_p, seed, padding_idx);
  const auto shape = out_shape(input_ids, a.hidden);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(shape) && grad_out.scalar_type() == word_weight.scalar_type(),
                    "fastbert.embedding: grad_out must be ", word_weight.scalar_type(), " of shape ", at::IntArrayRef(shape),
                    ", got ", grad_out.scalar_type(), " ", grad_out.sizes());
  const auto sd = stat_dtype(word_weight.scalar_type());
  TORCH_CHECK_VALUE(mean.sizes() == input_ids.sizes() && rstd.sizes() == input_ids.sizes() && mean.scalar_type() == sd &&
                        rstd.scalar_type() == sd,
                    "fastbert.embedding: mean and rstd must be ", sd, " of the ids' shape");
  return a;
}

std::vector<int64_t> out_shape(const at::Tensor& ids, int64_t hidden) {
  std::vector<int64_t> s(ids.sizes().begin(), ids.sizes().end());
  s.push_back(hidden);
  return s;
}

void raise_bad_id(const EmbeddingArgs& a, int64_t token, int kind) {
  const Ids& ids = kind == kWordId ? a.word_ids : kind == kPositionId ? a.pos_ids : a.type_ids;
  const int64_t rows = kind == kWordId ? a.word.size(0) : kind == kPositionId ? a.pos.size(0) : a.type.size(0);
  if (token < a.tokens) {
    const int64_t value = ids.tensor.reshape(-1)[token].item<int64_t>();  // the error path only
    TORCH_CHECK_VALUE(value >= 0 && value < rows, "fastbert.embedding: ", kIdNames[kind], " contains ", value,
                      ", outside the valid range [0, ", rows, ")");
  }
  TORCH_CHECK_VALUE(false, "fastbert.embedding: an earlier call that did not check its ids (a replay of a CUDA graph, "
                    "or one inside fastbert.assume_valid_ids()) met an out-of-range ", kIdNames[kind], " (at token ", token,
                    "); its output was zeros at that token");
}

bool& sync_id_check() {
  thread_local bool on = true;
  return on;
}

bool cuda_built() {
#ifdef FASTBERT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace fastbert

TORCH_LIBRARY(fastbert, m) {
  m.set_python_module("fastbert.kernels.embedding");  // where register_fake / register_autograd live
  m.def(
      "embedding_fwd(Tensor input_ids, Tensor token_type_ids, Tensor position_ids, Tensor word_weight, "
      "Tensor position_weight, Tensor token_type_weight, Tensor ln_weight, Tensor ln_bias, float eps, "
      "float dropout_p, Tensor? seed, int? padding_idx) -> (Tensor, Tensor, Tensor)");
  m.def(
      "embedding_bwd(Tensor grad_out, Tensor input_ids, Tensor token_type_ids, Tensor position_ids, "
      "Tensor word_weight, Tensor position_weight, Tensor token_type_weight, Tensor ln_weight, Tensor mean, "
      "Tensor rstd, float dropout_p, Tensor? seed, int? padding_idx) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
