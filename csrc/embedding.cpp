// fastbert._C: the op schemas of the fused embedding, their argument checks, and the CPU
// implementation. The CUDA implementation is in embedding_cuda.cu; register_fake and
// register_autograd are in kernels/embedding.py.
// Narrow ATen headers (not torch/extension.h) keep the C++ build to seconds.
#include <Python.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <atomic>
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

// ---------------------------------------------------------------------------------------------
// CPU

namespace {

// sum_j f(x[j]) over kLanes independent partial sums, so the compiler can vectorise the
// loop (a single running sum pins the order of fp additions and keeps it scalar).
constexpr int64_t kLanes = 8;

template <typename acc_t, typename F>
inline acc_t lane_sum(const acc_t* x, int64_t n, F f) {
  acc_t part[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) part[l] += f(x[j + l]);
  }
  for (; j < n; ++j) part[0] += f(x[j]);
  acc_t s = 0;
  for (int64_t l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

template <typename scalar_t>
struct CpuTables {
  const scalar_t* rows[3];
  int64_t n[3];
  const IdView* ids[3];

  // Row pointers of token t, or the kind of the first bad id.
  int gather(int64_t t, int64_t H, const scalar_t** r) const {
    for (int k = 0; k < 3; ++k) {
      const int64_t id = load_id(*ids[k], t);
      if (id < 0 || id >= n[k]) return k;
      r[k] = rows[k] + id * H;
    }
    return -1;
  }
};

template <typename scalar_t>
CpuTables<scalar_t> cpu_tables(const EmbeddingArgs& a) {
  CpuTables<scalar_t> tb;
  const at::Tensor* w[3] = {&a.word, &a.pos, &a.type};
  const Ids* ids[3] = {&a.word_ids, &a.pos_ids, &a.type_ids};
  for (int k = 0; k < 3; ++k) {
    tb.rows[k] = w[k]->data_ptr<scalar_t>();
    tb.n[k] = w[k]->size(0);
    tb.ids[k] = &ids[k]->view;
  }
  return tb;
}

template <typename acc_t>
void load_params(const at::Tensor& t, std::vector<acc_t>& out) {
  at::Tensor c = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  out.assign(c.data_ptr<acc_t>(), c.data_ptr<acc_t>() + c.numel());
}

constexpr int64_t kCpuGrain = 16;

template <typename scalar_t>
void fwd_cpu(const EmbeddingArgs& a, const at::Tensor& beta, uint64_t seed, at::Tensor& out, at::Tensor& mean,
             at::Tensor& rstd, double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden;
  const CpuTables<scalar_t> tb = cpu_tables<scalar_t>(a);
  std::vector<acc_t> g, b;
  load_params(a.gamma, g);
  load_params(beta, b);
  scalar_t* o = out.data_ptr<scalar_t>();
  acc_t* mo = mean.data_ptr<acc_t>();
  acc_t* ro = rstd.data_ptr<acc_t>();
  const bool drop = a.dropout_p > 0.0;
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - a.dropout_p));
  std::atomic<int64_t> first_bad{a.tokens};
  at::parallel_for(0, a.tokens, kCpuGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> x(H);
    for (int64_t t = begin; t < end; ++t) {
      const scalar_t* r[3];
      scalar_t* y = o + t * H;
      if (tb.gather(t, H, r) >= 0) {  // checked during the pass; never read out of range
        int64_t prev = first_bad.load();
        while (t < prev && !first_bad.compare_exchange_weak(prev, t)) {
        }
        std::fill(y, y + H, scalar_t(0));
        continue;
      }
      for (int64_t j = 0; j < H; ++j) {
        x[j] = (static_cast<acc_t>(r[0][j]) + static_cast<acc_t>(r[1][j])) + static_cast<acc_t>(r[2][j]);
      }
      const acc_t mu = lane_sum(x.data(), H, [](acc_t xj) { return xj; }) / H;
      const acc_t v = lane_sum(x.data(), H, [mu](acc_t xj) { return (xj - mu) * (xj - mu); });
      const acc_t rs = acc_t(1) / std::sqrt(v / H + static_cast<acc_t>(eps));
      for (int64_t j = 0; j < H; ++j) x[j] = (x[j] - mu) * rs * g[j] + b[j];
      if (drop) {
        for (int64_t j = 0; j < H; j += 4) {
          const U4 bits = dropout_bits(seed, t, j >> 2);
          for (int i = 0; i < 4 && j + i < H; ++i) x[j + i] *= u4_get(bits, i) < a.keep_threshold ? scale : acc_t(0);
        }
      }
      for (int64_t j = 0; j < H; ++j) y[j] = static_cast<scalar_t>(x[j]);
      mo[t] = mu;
      ro[t] = rs;
    }
  });
  const int64_t bad = first_bad.load();
  if (bad < a.tokens) {
    const scalar_t* r[3];
    raise_bad_id(a, bad, tb.gather(bad, H, r));
  }
}

constexpr int64_t kColSlice = 256;  // columns per work item of the table gradient

// Table gradient: a stable counting sort of the ids, then each row's tokens summed in token
// order (the same bits for any thread count). The gradient starts as zeros and only rows with
// tokens are written: a batch touches a few thousand of BERT's 30522 word rows, and writing
// every row ourselves measured slower than zeros + those rows (4096x768 fp32, 2 threads:
// backward 88 -> 68 ms).
template <typename scalar_t, typename acc_t>
at::Tensor table_grad_cpu(const IdView& ids, int64_t tokens, const acc_t* dx, int64_t H, int64_t skip_row,
                          const at::Tensor& table) {
  const int64_t n = table.size(0);
  std::vector<int64_t> start(n + 1, 0), order(tokens);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t id = load_id(ids, t);
    if (id >= 0 && id < n) ++start[id + 1];
  }
  for (int64_t i = 0; i < n; ++i) start[i + 1] += start[i];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t id = load_id(ids, t);
    if (id >= 0 && id < n) order[fill[id]++] = t;
  }
  at::Tensor grad = at::zeros({n, H}, table.options());
  scalar_t* gp = grad.data_ptr<scalar_t>();
  // Work items are (row, column slice), so that a small table (token types: 2 rows, each the
  // sum of half the batch) is spread over the threads as well as the 30522-row word table.
  const int64_t slices = (H + kColSlice - 1) / kColSlice;
  at::parallel_for(0, n * slices, 16, [&](int64_t begin, int64_t end) {
    acc_t acc[kColSlice];
    for (int64_t item = begin; item < end; ++item) {
      const int64_t id = item / slices, c0 = (item % slices) * kColSlice, w = std::min(kColSlice, H - c0);
      scalar_t* out = gp + id * H + c0;
      if (start[id + 1] == start[id] || id == skip_row) continue;
      std::fill(acc, acc + w, acc_t(0));
      for (int64_t k = start[id]; k < start[id + 1]; ++k) {
        const acc_t* row = dx + order[k] * H + c0;
        for (int64_t j = 0; j < w; ++j) acc[j] += row[j];
      }
      for (int64_t j = 0; j < w; ++j) out[j] = static_cast<scalar_t>(acc[j]);
    }
  });
  return grad;
}

constexpr int64_t kCpuBlock = 64;  // tokens per dgamma/dbeta partial: fixed, so the sums never depend on threads

template <typename scalar_t>
std::vector<at::Tensor> bwd_cpu(const EmbeddingArgs& a, const at::Tensor& dy, const at::Tensor& mean,
                                const at::Tensor& rstd, uint64_t seed, at::ScalarType param_dtype) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = a.hidden, T = a.tokens;
  const auto acc_dtype = c10::CppTypeToScalarType<acc_t>::value;
  const CpuTables<scalar_t> tb = cpu_tables<scalar_t>(a);
  std::vector<acc_t> g;
  load_params(a.gamma, g);
  at::Tensor dx = at::empty({T, H}, dy.options().dtype(acc_dtype));
  const int64_t nblk = (T + kCpuBlock - 1) / kCpuBlock;
  at::Tensor part = at::zeros({nblk, 2, H}, dy.options().dtype(acc_dtype));
  const scalar_t* dyp = dy.data_ptr<scalar_t>();
  const acc_t* mp = mean.data_ptr<acc_t>();
  const acc_t* rp = rstd.data_ptr<acc_t>();
  acc_t* dxp = dx.data_ptr<acc_t>();
  acc_t* pp = part.data_ptr<acc_t>();
  const bool drop = a.dropout_p > 0.0;
  const acc_t scale = static_cast<acc_t>(1.0 / (1.0 - a.dropout_p));
  at::parallel_for(0, nblk, 1, [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> xh(H), d(H), p(H);
    for (int64_t blk = b0; blk < b1; ++blk) {
      acc_t* dg = pp + blk * 2 * H;
      acc_t* db = dg + H;
      for (int64_t t = blk * kCpuBlock; t < std::min(T, (blk + 1) * kCpuBlock); ++t) {
        const scalar_t* r[3];
        acc_t* o = dxp + t * H;
        if (tb.gather(t, H, r) >= 0) {  // the forward raised for these; contribute nothing
          std::fill(o, o + H, acc_t(0));
          continue;
        }
        const acc_t mu = mp[t], rs = rp[t];
        for (int64_t j = 0; j < H; ++j) {
          xh[j] = (((static_cast<acc_t>(r[0][j]) + static_cast<acc_t>(r[1][j])) + static_cast<acc_t>(r[2][j])) - mu) * rs;
          d[j] = static_cast<acc_t>(dyp[t * H + j]);
        }
        if (drop) {
          for (int64_t j = 0; j < H; j += 4) {
            const U4 bits = dropout_bits(seed, t, j >> 2);
            for (int i = 0; i < 4 && j + i < H; ++i) d[j + i] *= u4_get(bits, i) < a.keep_threshold ? scale : acc_t(0);
          }
        }
        for (int64_t j = 0; j < H; ++j) {  // element-wise, so it vectorises; the row sums follow
          dg[j] += d[j] * xh[j];
          db[j] += d[j];
          d[j] *= g[j];
          p[j] = d[j] * xh[j];
        }
        const acc_t m1 = lane_sum(d.data(), H, [](acc_t v) { return v; }) / H;
        const acc_t m2 = lane_sum(p.data(), H, [](acc_t v) { return v; }) / H;
        for (int64_t j = 0; j < H; ++j) o[j] = rs * (d[j] - m1 - xh[j] * m2);
      }
    }
  });
  at::Tensor params = at::zeros({2, H}, dy.options().dtype(acc_dtype));
  acc_t* sp = params.data_ptr<acc_t>();
  at::parallel_for(0, 2 * H, 256, [&](int64_t j0, int64_t j1) {  // blocks summed in order, columns in parallel
    for (int64_t blk = 0; blk < nblk; ++blk)
      for (int64_t j = j0; j < j1; ++j) sp[j] += pp[blk * 2 * H + j];
  });
  at::Tensor dgamma = params[0].to(param_dtype, false, /*copy=*/true), dbeta = params[1].to(param_dtype, false, true);
  return {table_grad_cpu<scalar_t, acc_t>(a.word_ids.view, T, dxp, H, a.padding_idx, a.word),
          table_grad_cpu<scalar_t, acc_t>(a.pos_ids.view, T, dxp, H, -1, a.pos),
          table_grad_cpu<scalar_t, acc_t>(a.type_ids.view, T, dxp, H, -1, a.type), dgamma, dbeta};
}

uint64_t seed_value(const std::optional<at::Tensor>& seed) {
  return seed ? static_cast<uint64_t>(seed->item<int64_t>()) : 0;
}

at::ScalarType stat_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_fwd_cpu(
    const at::Tensor& input_ids, const at::Tensor& token_type_ids, const at::Tensor& position_ids,
    const at::Tensor& word_weight, const at::Tensor& position_weight, const at::Tensor& token_type_weight,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed, std::optional<int64_t> padding_idx) {
  EmbeddingArgs a = check_args(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
                               ln_weight, ln_bias, dropout_p, seed, padding_idx);
  at::Tensor out = at::empty(out_shape(input_ids, a.hidden), word_weight.options());
  at::Tensor mean = at::empty(input_ids.sizes(), word_weight.options().dtype(stat_dtype(word_weight.scalar_type())));
  at::Tensor rstd = at::empty_like(mean);
  const uint64_t s = dropout_p > 0.0 ? seed_value(seed) : 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word_weight.scalar_type(), "fastbert_embedding_fwd_cpu",
                                  [&] { fwd_cpu<scalar_t>(a, ln_bias.contiguous(), s, out, mean, rstd, eps); });
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& input_ids, const at::Tensor& token_type_ids,
    const at::Tensor& position_ids, const at::Tensor& word_weight, const at::Tensor& position_weight,
    const at::Tensor& token_type_weight, const at::Tensor& ln_weight, const at::Tensor& mean, const at::Tensor& rstd,
    double dropout_p, const std::optional<at::Tensor>& seed, std::optional<int64_t> padding_idx) {
  EmbeddingArgs a = check_args(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
                               ln_weight, std::nullopt, dropout_p, seed, padding_idx);
  TORCH_CHECK_VALUE(grad_out.sizes() == at::IntArrayRef(out_shape(input_ids, a.hidden)) &&
                        grad_out.scalar_type() == word_weight.scalar_type(),
                    "fastbert.embedding: grad_out must be ", word_weight.scalar_type(), " of shape ",
                    at::IntArrayRef(out_shape(input_ids, a.hidden)), ", got ", grad_out.scalar_type(), " ", grad_out.sizes());
  const auto sd = stat_dtype(word_weight.scalar_type());
  TORCH_CHECK_VALUE(mean.sizes() == input_ids.sizes() && rstd.sizes() == input_ids.sizes() && mean.scalar_type() == sd &&
                        rstd.scalar_type() == sd,
                    "fastbert.embedding: mean and rstd must be ", sd, " of the ids' shape");
  const uint64_t s = dropout_p > 0.0 ? seed_value(seed) : 0;
  std::vector<at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word_weight.scalar_type(), "fastbert_embedding_bwd_cpu", [&] {
    r = bwd_cpu<scalar_t>(a, grad_out.contiguous(), mean.contiguous(), rstd.contiguous(), s, ln_weight.scalar_type());
  });
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace

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

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("embedding_fwd", &fastbert::embedding_fwd_cpu);
  m.impl("embedding_bwd", &fastbert::embedding_bwd_cpu);
}

#define FASTBERT_STR2(x) #x
#define FASTBERT_STR(x) FASTBERT_STR2(x)
#ifdef FASTBERT_CUDA_ARCHS
#define FASTBERT_ARCHS_STRING FASTBERT_STR(FASTBERT_CUDA_ARCHS)  // e.g. "80_90"
#else
#define FASTBERT_ARCHS_STRING ""
#endif

// A plain CPython module (no pybind11): importing fastbert._C loads the library, which
// registers the ops; three functions describe the build and switch the CUDA id check.
static PyObject* py_cuda_built(PyObject*, PyObject*) { return PyBool_FromLong(fastbert::cuda_built()); }
static PyObject* py_cuda_archs(PyObject*, PyObject*) { return PyUnicode_FromString(FASTBERT_ARCHS_STRING); }
static PyObject* py_set_sync_id_check(PyObject*, PyObject* on) {
  const int value = PyObject_IsTrue(on);
  if (value < 0) return nullptr;
  const bool previous = fastbert::sync_id_check();
  fastbert::sync_id_check() = value != 0;
  return PyBool_FromLong(previous);
}

static PyMethodDef fastbert_methods[] = {
    {"cuda_built", py_cuda_built, METH_NOARGS, "Whether the CUDA kernels were compiled in."},
    {"cuda_archs", py_cuda_archs, METH_NOARGS, "Compute capabilities compiled, e.g. '80_90' (empty without CUDA)."},
    {"set_sync_id_check", py_set_sync_id_check, METH_O,
     "This thread's CUDA id check on (True) or off (False); returns the previous setting."},
    {nullptr, nullptr, 0, nullptr}};

static PyModuleDef fastbert_module = {PyModuleDef_HEAD_INIT, "_C",
                                      "fastbert's C++/CUDA extension: the fused embedding ops live in torch.ops.fastbert",
                                      -1, fastbert_methods};

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&fastbert_module); }
