// The CPU implementation of fastbert::embedding_fwd / embedding_bwd (schemas and argument
// checks in embedding.cpp): at::parallel_for over tokens, sums and statistics in the op math
// type (fp32 for fp16/bf16 tables, fp64 for fp64), dropout from the same Philox bits as the
// CUDA kernels, and a deterministic table gradient from a stable counting sort of the ids.
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
#include <cstdint>
#include <type_traits>
#include <vector>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define FASTBERT_X86_F16C 1
#endif

#include "embedding.h"

namespace fastbert {

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

// Rows in the op math type. The extension is built for the baseline ISA, where c10::Half
// converts one value at a time in software and c10::BFloat16's rounding does not vectorise
// (measured at 4096x768: the fp16 forward took 3x the fp32 one, and a plain loop over bf16
// rows 2x). So the conversions of 16-bit rows are written with AVX2 and F16C intrinsics,
// used where the CPU has them (checked once at run time). Both round to nearest even, as c10::Half and c10::BFloat16 do (a NaN becomes bf16's
// quiet NaN 0x7FC0, as there).
#ifdef FASTBERT_X86_F16C
#define FASTBERT_AVX2 __attribute__((target("avx2,f16c")))

FASTBERT_AVX2 void convert_avx2(const at::Half* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j))));
  }
  for (; j < n; ++j) dst[j] = _cvtsh_ss(s[j]);
}

FASTBERT_AVX2 void convert_avx2(const float* src, at::Half* dst, int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j), _mm256_cvtps_ph(_mm256_loadu_ps(src + j), _MM_FROUND_TO_NEAREST_INT));
  }
  for (; j < n; ++j) d[j] = _cvtss_sh(src[j], _MM_FROUND_TO_NEAREST_INT);
}

FASTBERT_AVX2 void convert_avx2(const at::BFloat16* src, float* dst, int64_t n) {
  const auto* s = reinterpret_cast<const uint16_t*>(src);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(s + j)));
    _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
  }
  for (; j < n; ++j) dst[j] = static_cast<float>(src[j]);
}

FASTBERT_AVX2 void convert_avx2(const float* src, at::BFloat16* dst, int64_t n) {
  auto* d = reinterpret_cast<uint16_t*>(dst);
  const __m256i one = _mm256_set1_epi32(1), half = _mm256_set1_epi32(0x7FFF), nan = _mm256_set1_epi32(0x7FC0);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 v = _mm256_loadu_ps(src + j);
    const __m256i u = _mm256_castps_si256(v);
    const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), one), half);
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
    r = _mm256_blendv_epi8(r, nan, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(d + j),
                     _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  }
  for (; j < n; ++j) dst[j] = static_cast<at::BFloat16>(src[j]);
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
  return has;
}
#endif

template <typename scalar_t>
constexpr bool is_16_bit = std::is_same_v<scalar_t, at::Half> || std::is_same_v<scalar_t, at::BFloat16>;

// dst = src converted, element by element (a 16-bit type to or from fp32, or a plain cast).
template <typename src_t, typename dst_t>
void convert(const src_t* src, dst_t* dst, int64_t n) {
#ifdef FASTBERT_X86_F16C
  if constexpr (is_16_bit<src_t> || is_16_bit<dst_t>) {
    if (cpu_has_avx2()) return convert_avx2(src, dst, n);
  }
#endif
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<dst_t>(src[j]);
}

// row itself when it is already in the op math type, else its conversion into buf.
template <typename scalar_t, typename acc_t>
const acc_t* as_acc(const scalar_t* row, acc_t* buf, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return row;
  } else {
    convert(row, buf, n);
    return buf;
  }
}

// The sum of token t's three rows, in the op math type: (word + position) + token type.
template <typename scalar_t, typename acc_t>
void row_sum(const scalar_t* const r[3], acc_t* x, acc_t* buf, int64_t H) {
  const acc_t* w = as_acc(r[0], x, H);
  const acc_t* p = as_acc(r[1], buf, H);
  for (int64_t j = 0; j < H; ++j) x[j] = w[j] + p[j];
  const acc_t* k = as_acc(r[2], buf, H);
  for (int64_t j = 0; j < H; ++j) x[j] += k[j];
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
    std::vector<acc_t> x(H), buf(H);
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
      row_sum(r, x.data(), buf.data(), H);
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
      convert(x.data(), y, H);
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
      convert(acc, out, w);
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
    std::vector<acc_t> xh(H), d(H), p(H), buf(H);
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
        row_sum(r, xh.data(), buf.data(), H);
        for (int64_t j = 0; j < H; ++j) xh[j] = (xh[j] - mu) * rs;
        convert(dyp + t * H, d.data(), H);
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
  EmbeddingArgs a = check_bwd_args(grad_out, input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                   token_type_weight, ln_weight, mean, rstd, dropout_p, seed, padding_idx);
  const uint64_t s = dropout_p > 0.0 ? seed_value(seed) : 0;
  std::vector<at::Tensor> r;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, word_weight.scalar_type(), "fastbert_embedding_bwd_cpu", [&] {
    r = bwd_cpu<scalar_t>(a, grad_out.contiguous(), mean.contiguous(), rstd.contiguous(), s, ln_weight.scalar_type());
  });
  return {r[0], r[1], r[2], r[3], r[4]};
}

}  // namespace

}  // namespace fastbert

TORCH_LIBRARY_IMPL(fastbert, CPU, m) {
  m.impl("embedding_fwd", &fastbert::embedding_fwd_cpu);
  m.impl("embedding_bwd", &fastbert::embedding_bwd_cpu);
}
