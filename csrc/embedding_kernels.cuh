// Fused BERT embedding: LayerNorm(word[ids] + position[pos] + token_type[tt]), then dropout.
//
// This header needs no torch headers: the CPU implementation (embedding.cpp) uses its
// host/device helpers (id views, the Philox dropout stream), and with nvcc it also defines
// the __global__ kernels and their launchers, which embedding_cuda.cu calls with raw
// pointers. tests/nvcc_check.sh compiles it on machines without a GPU or a CUDA torch.
//
// Napkin math (BERT-base, 4096 tokens x 768, fp16): the forward must read 4096 word rows
// (6.3 MB; position and token-type rows are few and stay in L2) and write 6.3 MB, so about
// 12.6 MB of DRAM traffic: ~4 us at 3.3 TB/s. One warp per token keeps the row in
// registers, so each byte is read once.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FB_HD __host__ __device__ __forceinline__
#else
#define FB_HD inline
#endif

namespace fastbert {

// Ids of any shape, seen as (rows, cols) with element strides: padded (B, S) ids, packed (T,)
// ids and the model's expanded position ids (batch stride 0) all fit without a copy.
struct IdView {
  const void* ptr;
  int64_t cols;
  int64_t stride0;
  int64_t stride1;
  int is64;
};

FB_HD int64_t load_id(const IdView& v, int64_t t) {
  const int64_t r = t / v.cols;
  const int64_t off = r * v.stride0 + (t - r * v.cols) * v.stride1;
  return v.is64 ? static_cast<const int64_t*>(v.ptr)[off] : static_cast<int64_t>(static_cast<const int32_t*>(v.ptr)[off]);
}

enum IdKind { kWordId = 0, kPositionId = 1, kTokenTypeId = 2 };

// Philox4x32-10. Dropout bits are a pure function of (seed, token, column), identical on the
// CPU and the GPU, so the backward regenerates the mask instead of storing it.
struct U4 {
  uint32_t x, y, z, w;
};

FB_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

FB_HD U4 philox4x32(U4 c, uint32_t k0, uint32_t k1) {
  for (int i = 0; i < 10; ++i) {
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(0xD2511F53u, c.x, &hi0);
    const uint32_t lo1 = mulhilo32(0xCD9E8D57u, c.z, &hi1);
    c = U4{hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0};
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

// Four dropout bits per Philox call: columns 4g..4g+3 of token t.
FB_HD U4 dropout_bits(uint64_t seed, int64_t t, int64_t group) {
  const U4 ctr{static_cast<uint32_t>(group), static_cast<uint32_t>(t), static_cast<uint32_t>(static_cast<uint64_t>(t) >> 32), 0x5EEDu};
  return philox4x32(ctr, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

FB_HD uint32_t u4_get(const U4& u, int i) { return i == 0 ? u.x : i == 1 ? u.y : i == 2 ? u.z : u.w; }

// A bit keeps its element when it is below the threshold: P(keep) = 1 - p.
inline uint32_t keep_threshold(double p) {
  const double t = (1.0 - p) * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace fastbert

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace fastbert {
namespace cuda {

constexpr int kWarps = 4;            // warps per block; one token per warp at a time
constexpr int kChunk = 32;           // sorted tokens per warp in the table-gradient reduction
constexpr int kColsPerWarp = 128;    // 32 lanes x 4 fp32 columns

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// 16-byte vectors: 8 halves or 4 floats per load.
template <typename T> struct Vec { static constexpr int N = 16 / sizeof(T); };

template <typename T>
__device__ __forceinline__ void load16(const T* p, float* out) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) out[i] = to_f(e[i]);
}

template <typename T>
__device__ __forceinline__ void store16(T* p, const float* in) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < Vec<T>::N; ++i) e[i] = from_f<T>(in[i]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// LayerNorm parameters come in the table dtype or in fp32 (a runtime flag, read once per warp).
template <typename T>
__device__ __forceinline__ float load_param(const void* p, int is_float, int64_t j) {
  return is_float ? static_cast<const float*>(p)[j] : to_f(static_cast<const T*>(p)[j]);
}

// VEC consecutive LayerNorm parameters from column col, in 16-byte loads (the launcher checks alignment).
template <typename T>
__device__ __forceinline__ void load_params16(const void* p, int is_float, int col, float* out) {
  if (is_float) {
#pragma unroll
    for (int i = 0; i < Vec<T>::N; i += 4) load16(static_cast<const float*>(p) + col + i, out + i);
  } else {
    load16(static_cast<const T*>(p) + col, out);
  }
}

// xor butterfly: every lane ends with the same bits (each step adds the same two operands).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
struct Tables {
  IdView word_ids, pos_ids, type_ids;
  const T* word;
  const T* pos;
  const T* type;
  int64_t n_word, n_pos, n_type;
  int64_t tokens;
  int hidden;
};

struct Dropout {
  const int64_t* seed;  // device scalar; null: no dropout
  uint32_t threshold;
  float scale;          // 1 / (1 - p)
};

// The three rows of token t, or false (and the first bad token recorded) if an id is out of range.
template <typename T>
__device__ __forceinline__ bool rows_of(const Tables<T>& tb, int64_t t, unsigned long long* err,
                                        const T*& w, const T*& p, const T*& y) {
  const int64_t a = load_id(tb.word_ids, t), b = load_id(tb.pos_ids, t), c = load_id(tb.type_ids, t);
  const int kind = (a < 0 || a >= tb.n_word) ? kWordId : (b < 0 || b >= tb.n_pos) ? kPositionId
                   : (c < 0 || c >= tb.n_type) ? kTokenTypeId : -1;
  if (kind >= 0) {
    if (err != nullptr && (threadIdx.x & 31) == 0) atomicMin(err, (static_cast<unsigned long long>(t) << 2) | kind);
    return false;
  }
  w = tb.word + a * tb.hidden;
  p = tb.pos + b * tb.hidden;
  y = tb.type + c * tb.hidden;
  return true;
}

__device__ __forceinline__ void dropout_vec(const Dropout& d, uint64_t seed, int64_t t, int64_t col, int n, float* v) {
#pragma unroll
  for (int g = 0; g < n; g += 4) {
    const U4 bits = dropout_bits(seed, t, (col + g) >> 2);
#pragma unroll
    for (int i = 0; i < 4 && g + i < n; ++i) v[g + i] *= u4_get(bits, i) < d.threshold ? d.scale : 0.f;
  }
}

__device__ __forceinline__ float dropout_one(const Dropout& d, uint64_t seed, int64_t t, int64_t col) {
  return u4_get(dropout_bits(seed, t, col >> 2), static_cast<int>(col & 3)) < d.threshold ? d.scale : 0.f;
}

struct FwdOut {
  void* out;            // (tokens, hidden), table dtype
  float* mean;          // (tokens,)
  float* rstd;          // (tokens,)
  const void* gamma;
  const void* beta;
  int param_is_float;
  float eps;
  unsigned long long* err;  // min over bad tokens of (token << 2 | kind)
};

// ---------------------------------------------------------------------------------------------
// Forward, register-resident: lane l holds NV 16-byte vectors of the row. Needs hidden % VEC == 0,
// hidden <= 32 * NV * VEC and 16-byte aligned tables, output and LayerNorm parameters.
template <typename T, int NV>
__global__ void __launch_bounds__(kWarps * 32) embedding_fwd_vec_kernel(Tables<T> tb, FwdOut o, Dropout d) {
  constexpr int VEC = Vec<T>::N;
  const int lane = threadIdx.x & 31;
  const int H = tb.hidden;
  const uint64_t seed = d.seed ? static_cast<uint64_t>(*d.seed) : 0;
  float g[NV][VEC], b[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (k * 32 + lane) * VEC;
    if (col < H) {
      load_params16<T>(o.gamma, o.param_is_float, col, g[k]);
      load_params16<T>(o.beta, o.param_is_float, col, b[k]);
    }
  }
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); t < tb.tokens;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    T* out = static_cast<T*>(o.out) + t * H;
    const T *w, *p, *y;
    if (!rows_of(tb, t, o.err, w, p, y)) {  // the host raises; leave zeros, never garbage
      for (int j = lane; j < H; j += 32) out[j] = from_f<T>(0.f);
      continue;
    }
    float x[NV][VEC];
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (k * 32 + lane) * VEC;
      if (col < H) {
        float a[VEC], c[VEC];
        load16(w + col, x[k]);
        load16(p + col, a);
        load16(y + col, c);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          x[k][i] = (x[k][i] + a[i]) + c[i];
          s += x[k][i];
        }
      }
    }
    const float mean = warp_sum(s) / H;
    float v = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      if ((k * 32 + lane) * VEC < H) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) v += (x[k][i] - mean) * (x[k][i] - mean);
      }
    }
    const float rstd = rsqrtf(warp_sum(v) / H + o.eps);
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (k * 32 + lane) * VEC;
      if (col < H) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[k][i] = (x[k][i] - mean) * rstd * g[k][i] + b[k][i];
        if (d.seed) dropout_vec(d, seed, t, col, VEC, x[k]);
        store16(out + col, x[k]);
      }
    }
    if (lane == 0) {
      o.mean[t] = mean;
      o.rstd[t] = rstd;
    }
  }
}

// Forward for any hidden size and alignment: the row is re-gathered per pass (from L1/L2).
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) embedding_fwd_any_kernel(Tables<T> tb, FwdOut o, Dropout d) {
  const int lane = threadIdx.x & 31;
  const int H = tb.hidden;
  const uint64_t seed = d.seed ? static_cast<uint64_t>(*d.seed) : 0;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5); t < tb.tokens;
       t += static_cast<int64_t>(gridDim.x) * kWarps) {
    T* out = static_cast<T*>(o.out) + t * H;
    const T *w, *p, *y;
    if (!rows_of(tb, t, o.err, w, p, y)) {
      for (int j = lane; j < H; j += 32) out[j] = from_f<T>(0.f);
      continue;
    }
    float s = 0.f;
    for (int j = lane; j < H; j += 32) s += (to_f(w[j]) + to_f(p[j])) + to_f(y[j]);
    const float mean = warp_sum(s) / H;
    float v = 0.f;
    for (int j = lane; j < H; j += 32) {
      const float c = (to_f(w[j]) + to_f(p[j])) + to_f(y[j]) - mean;
      v += c * c;
    }
    const float rstd = rsqrtf(warp_sum(v) / H + o.eps);
    for (int j = lane; j < H; j += 32) {
      const float x = (to_f(w[j]) + to_f(p[j])) + to_f(y[j]);
      float r = (x - mean) * rstd * load_param<T>(o.gamma, o.param_is_float, j) + load_param<T>(o.beta, o.param_is_float, j);
      if (d.seed) r *= dropout_one(d, seed, t, j);
      out[j] = from_f<T>(r);
    }
    if (lane == 0) {
      o.mean[t] = mean;
      o.rstd[t] = rstd;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward, per token: dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) with g = dy' * gamma,
// written in fp32 for the table reductions below; dgamma and dbeta partial sums per block
// (warps added in a fixed order, so no atomics and the same bits on every run).
struct BwdIO {
  const void* dy;       // (tokens, hidden), table dtype
  const float* mean;
  const float* rstd;
  const void* gamma;
  int param_is_float;
  float* dx;            // (tokens, hidden) fp32
  float* part;          // (nparts, 2, hidden): dgamma then dbeta partials
};

template <typename T, int NV>
__global__ void __launch_bounds__(kWarps * 32) embedding_bwd_vec_kernel(Tables<T> tb, BwdIO io, Dropout d) {
  constexpr int VEC = Vec<T>::N;
  extern __shared__ float smem[];  // 2 * hidden
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int H = tb.hidden;
  const uint64_t seed = d.seed ? static_cast<uint64_t>(*d.seed) : 0;
  float gm[NV][VEC], dg[NV][VEC], db[NV][VEC];
#pragma unroll
  for (int k = 0; k < NV; ++k) {
    const int col = (k * 32 + lane) * VEC;
    if (col < H) load_params16<T>(io.gamma, io.param_is_float, col, gm[k]);
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      dg[k][i] = 0.f;
      db[k][i] = 0.f;
    }
  }
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < tb.tokens; t += static_cast<int64_t>(gridDim.x) * kWarps) {
    float* dx = io.dx + t * H;
    const T *w, *p, *y;
    if (!rows_of(tb, t, nullptr, w, p, y)) {
      for (int j = lane; j < H; j += 32) dx[j] = 0.f;
      continue;
    }
    const float mu = io.mean[t], rs = io.rstd[t];
    const T* dyr = static_cast<const T*>(io.dy) + t * H;
    float xh[NV][VEC], gg[NV][VEC];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (k * 32 + lane) * VEC;
      if (col < H) {
        float a[VEC], c[VEC];
        load16(w + col, xh[k]);
        load16(p + col, a);
        load16(y + col, c);
        load16(dyr + col, gg[k]);
        if (d.seed) dropout_vec(d, seed, t, col, VEC, gg[k]);
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          xh[k][i] = (((xh[k][i] + a[i]) + c[i]) - mu) * rs;
          dg[k][i] += gg[k][i] * xh[k][i];
          db[k][i] += gg[k][i];
          gg[k][i] *= gm[k][i];
          s1 += gg[k][i];
          s2 += gg[k][i] * xh[k][i];
        }
      }
    }
    const float m1 = warp_sum(s1) / H, m2 = warp_sum(s2) / H;
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const int col = (k * 32 + lane) * VEC;
      if (col < H) {
#pragma unroll
        for (int i = 0; i < VEC; i += 4) {
          float4 r;
          r.x = rs * (gg[k][i] - m1 - xh[k][i] * m2);
          r.y = rs * (gg[k][i + 1] - m1 - xh[k][i + 1] * m2);
          r.z = rs * (gg[k][i + 2] - m1 - xh[k][i + 2] * m2);
          r.w = rs * (gg[k][i + 3] - m1 - xh[k][i + 3] * m2);
          *reinterpret_cast<float4*>(dx + col + i) = r;
        }
      }
    }
  }
  // Block partial: warp 0 writes, warps 1.. add in order.
  for (int wi = 0; wi < kWarps; ++wi) {
    if (warp == wi) {
#pragma unroll
      for (int k = 0; k < NV; ++k) {
        const int col = (k * 32 + lane) * VEC;
        if (col < H) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            smem[col + i] = wi == 0 ? dg[k][i] : smem[col + i] + dg[k][i];
            smem[H + col + i] = wi == 0 ? db[k][i] : smem[H + col + i] + db[k][i];
          }
        }
      }
    }
    __syncthreads();
  }
  for (int j = threadIdx.x; j < 2 * H; j += blockDim.x) io.part[static_cast<int64_t>(blockIdx.x) * 2 * H + j] = smem[j];
}

// Backward for any hidden size: two passes per token; each warp owns one partial row.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) embedding_bwd_any_kernel(Tables<T> tb, BwdIO io, Dropout d) {
  const int lane = threadIdx.x & 31;
  const int H = tb.hidden;
  const uint64_t seed = d.seed ? static_cast<uint64_t>(*d.seed) : 0;
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  float* part = io.part + gw * 2 * H;
  for (int j = lane; j < 2 * H; j += 32) part[j] = 0.f;
  for (int64_t t = gw; t < tb.tokens; t += static_cast<int64_t>(gridDim.x) * kWarps) {
    float* dx = io.dx + t * H;
    const T *w, *p, *y;
    if (!rows_of(tb, t, nullptr, w, p, y)) {
      for (int j = lane; j < H; j += 32) dx[j] = 0.f;
      continue;
    }
    const float mu = io.mean[t], rs = io.rstd[t];
    const T* dyr = static_cast<const T*>(io.dy) + t * H;
    float s1 = 0.f, s2 = 0.f;
    for (int j = lane; j < H; j += 32) {
      const float xh = (((to_f(w[j]) + to_f(p[j])) + to_f(y[j])) - mu) * rs;
      float dv = to_f(dyr[j]);
      if (d.seed) dv *= dropout_one(d, seed, t, j);
      part[j] += dv * xh;
      part[H + j] += dv;
      const float g = dv * load_param<T>(io.gamma, io.param_is_float, j);
      s1 += g;
      s2 += g * xh;
    }
    const float m1 = warp_sum(s1) / H, m2 = warp_sum(s2) / H;
    for (int j = lane; j < H; j += 32) {
      const float xh = (((to_f(w[j]) + to_f(p[j])) + to_f(y[j])) - mu) * rs;
      float dv = to_f(dyr[j]);
      if (d.seed) dv *= dropout_one(d, seed, t, j);
      dx[j] = rs * (dv * load_param<T>(io.gamma, io.param_is_float, j) - m1 - xh * m2);
    }
  }
}

// dgamma, dbeta = column sums of the partials, in a fixed order; written in the parameter dtype.
template <typename T>
__global__ void __launch_bounds__(256) embedding_param_grad_kernel(const float* part, int64_t nparts, int H, int is_float,
                                                                   void* dgamma, void* dbeta) {
  __shared__ float red[8][32];
  const int cx = threadIdx.x & 31, ry = threadIdx.x >> 5;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * 32 + cx;  // column of [dgamma | dbeta]
  float s = 0.f;
  if (j < 2 * H)
    for (int64_t r = ry; r < nparts; r += 8) s += part[r * 2 * H + j];
  red[ry][cx] = s;
  __syncthreads();
  if (ry == 0 && j < 2 * H) {
    for (int r = 1; r < 8; ++r) s += red[r][cx];
    void* dst = j < H ? dgamma : dbeta;
    const int64_t c = j < H ? j : j - H;
    if (is_float) static_cast<float*>(dst)[c] = s;
    else static_cast<T*>(dst)[c] = from_f<T>(s);
  }
}

// ---------------------------------------------------------------------------------------------
// Table gradients: grad[id] = sum of dx rows of the tokens with that id, summed in token order.
// The ids of each table are stably sorted; warps take fixed chunks of kChunk sorted tokens and
// a 128-column slice. A run of equal ids inside one chunk is written straight to its row; a run
// that crosses chunk boundaries leaves fp32 partials that embedding_segment_fixup_kernel adds up
// in chunk order. No atomics: the result has the same bits on every run.
struct SegIO {
  const int64_t* sorted;   // (3, tokens) ids, ascending per table
  const int64_t* perm;     // (3, tokens) token of each sorted id
  const float* dx;         // (tokens, hidden)
  float* part_first;       // (3, nchunks, hidden): a chunk's first run, when it began in an earlier chunk
  float* part_last;        // (3, nchunks, hidden): a chunk's last run, when it began here and goes on
  void* grad[3];           // word, position, token-type gradients (table dtype, zero-filled)
  int64_t rows[3];
  int64_t padding_idx;     // word row that gets no gradient, or -1
  int64_t tokens;
  int64_t nchunks;
  int hidden;
};

__device__ __forceinline__ bool seg_row_ok(const SegIO& s, int table, int64_t id) {
  return id >= 0 && id < s.rows[table] && !(table == 0 && id == s.padding_idx);
}

__device__ __forceinline__ void load_dx4(const SegIO& s, int64_t tok, int col, bool vec, float* v) {
  const float* r = s.dx + tok * s.hidden + col;
  if (vec && col + 4 <= s.hidden) {
    const float4 q = *reinterpret_cast<const float4*>(r);
    v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = col + i < s.hidden ? r[i] : 0.f;
  }
}

template <typename T>
__device__ __forceinline__ void store_row4(const SegIO& s, int table, int64_t id, int col, const float* v) {
  T* r = static_cast<T*>(s.grad[table]) + id * s.hidden + col;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (col + i < s.hidden) r[i] = from_f<T>(v[i]);
}

__device__ __forceinline__ void store_part4(const SegIO& s, float* buf, int table, int64_t chunk, int col, const float* v) {
  float* r = buf + (table * s.nchunks + chunk) * s.hidden + col;
#pragma unroll
  for (int i = 0; i < 4; ++i)
    if (col + i < s.hidden) r[i] = v[i];
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) embedding_segment_kernel(SegIO s) {
  const int lane = threadIdx.x & 31;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int table = blockIdx.z;
  const int col = blockIdx.y * kColsPerWarp + lane * 4;
  const int64_t k0 = chunk * kChunk;
  if (k0 >= s.tokens) return;
  const int64_t k1 = k0 + kChunk < s.tokens ? k0 + kChunk : s.tokens;
  const int64_t* sorted = s.sorted + table * s.tokens;
  const int64_t* perm = s.perm + table * s.tokens;
  // Each lane fetches one sorted entry; the warp shares them by shuffles.
  const int64_t my_id = k0 + lane < k1 ? sorted[k0 + lane] : -1;
  const int64_t my_tok = k0 + lane < k1 ? perm[k0 + lane] : 0;
  const int64_t before = k0 > 0 ? sorted[k0 - 1] : INT64_MIN;
  const int64_t after = k1 < s.tokens ? sorted[k1] : INT64_MIN;
  const bool vec = (s.hidden & 3) == 0;
  const int n = static_cast<int>(k1 - k0);
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  int64_t cur = __shfl_sync(0xffffffffu, my_id, 0);
  int start = 0;
  auto flush = [&](int end) {
    if (!seg_row_ok(s, table, cur) || col >= s.hidden) return;
    const bool began_here = !(start == 0 && before == cur);
    const bool goes_on = end == n && after == cur;
    if (!began_here) store_part4(s, s.part_first, table, chunk, col, acc);
    else if (goes_on) store_part4(s, s.part_last, table, chunk, col, acc);
    else store_row4<T>(s, table, cur, col, acc);
  };
  for (int base = 0; base < n; base += 8) {
    float v[8][4];
#pragma unroll
    for (int u = 0; u < 8; ++u) {  // issue up to 8 row loads before using any
      const int64_t tok = __shfl_sync(0xffffffffu, my_tok, (base + u) & 31);
      if (base + u < n && col < s.hidden) load_dx4(s, tok, col, vec, v[u]);
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int64_t id = __shfl_sync(0xffffffffu, my_id, (base + u) & 31);
      if (base + u < n) {
        if (id != cur) {
          flush(base + u);
          acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
          cur = id;
          start = base + u;
        }
        if (col < s.hidden) {
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[i] += v[u][i];
        }
      }
    }
  }
  flush(n);
}

template <typename T>
__global__ void __launch_bounds__(kWarps * 32) embedding_segment_fixup_kernel(SegIO s) {
  const int lane = threadIdx.x & 31;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int table = blockIdx.z;
  const int col = blockIdx.y * kColsPerWarp + lane * 4;
  const int64_t k0 = chunk * kChunk;
  const int64_t k1 = k0 + kChunk;
  if (k1 >= s.tokens || col >= s.hidden) return;  // a run that goes on needs a next chunk
  const int64_t* sorted = s.sorted + table * s.tokens;
  const int64_t id = sorted[k1 - 1];
  if (sorted[k1] != id || !seg_row_ok(s, table, id)) return;
  if (sorted[k0] == id && k0 > 0 && sorted[k0 - 1] == id) return;  // began in an earlier chunk
  float acc[4];
  const float* r = s.part_last + (table * s.nchunks + chunk) * s.hidden + col;
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] = col + i < s.hidden ? r[i] : 0.f;
  for (int64_t c = chunk + 1; c < s.nchunks; ++c) {
    const float* q = s.part_first + (table * s.nchunks + c) * s.hidden + col;
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[i] += col + i < s.hidden ? q[i] : 0.f;
    const int64_t end = (c + 1) * kChunk;
    if (end >= s.tokens || sorted[end] != id) break;
  }
  store_row4<T>(s, table, id, col, acc);
}

// ---------------------------------------------------------------------------------------------
// Launchers (no torch): pick the kernel from the hidden size and alignment.

inline int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Vectors per lane for the register-resident kernels, or 0 for the any-size kernel.
template <typename T>
inline int pick_nv(int hidden, bool aligned) {
  constexpr int VEC = Vec<T>::N;
  if (!aligned || hidden % VEC != 0) return 0;
  const int nv = ceil_div(hidden, 32 * VEC);
  if (nv * VEC > 32) return 0;  // more than 32 values per lane would spill
  for (int c : {1, 2, 3, 4, 6, 8})
    if (c >= nv && c * VEC <= 32) return c;
  return 0;
}

template <typename T>
cudaError_t launch_embedding_fwd(const Tables<T>& tb, const FwdOut& o, const Dropout& d, bool aligned, cudaStream_t stream) {
  if (tb.tokens == 0) return cudaSuccess;
  const int blocks = ceil_div(tb.tokens, kWarps) < 65535 * 16 ? ceil_div(tb.tokens, kWarps) : 65535 * 16;
  switch (pick_nv<T>(tb.hidden, aligned)) {
#define FB_FWD_CASE(NV) \
  case NV: if (NV * Vec<T>::N <= 32) embedding_fwd_vec_kernel<T, (NV * Vec<T>::N <= 32 ? NV : 1)><<<blocks, kWarps * 32, 0, stream>>>(tb, o, d); break;
    FB_FWD_CASE(1) FB_FWD_CASE(2) FB_FWD_CASE(3) FB_FWD_CASE(4) FB_FWD_CASE(6) FB_FWD_CASE(8)
#undef FB_FWD_CASE
    default: embedding_fwd_any_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(tb, o, d);
  }
  return cudaGetLastError();
}

// Blocks for the backward token kernel: fixed for a device and a token count, so the dgamma
// and dbeta partials are summed in the same order on every run.
inline int bwd_blocks(int64_t tokens, int num_sms) {
  const int want = ceil_div(tokens, kWarps);
  return want < 4 * num_sms ? (want > 0 ? want : 1) : 4 * num_sms;
}

// Rows of the (nparts, 2, hidden) partial buffer the backward writes.
template <typename T>
inline int64_t bwd_nparts(int64_t tokens, int hidden, bool aligned, int num_sms) {
  const int blocks = bwd_blocks(tokens, num_sms);
  return pick_nv<T>(hidden, aligned) ? blocks : static_cast<int64_t>(blocks) * kWarps;
}

template <typename T>
cudaError_t launch_embedding_bwd(const Tables<T>& tb, const BwdIO& io, const Dropout& d, bool aligned, int num_sms,
                                 void* dgamma, void* dbeta, const SegIO& seg, cudaStream_t stream) {
  if (tb.tokens > 0) {
    const int blocks = bwd_blocks(tb.tokens, num_sms);
    const size_t smem = 2 * static_cast<size_t>(tb.hidden) * sizeof(float);
    switch (pick_nv<T>(tb.hidden, aligned)) {
#define FB_BWD_CASE(NV) \
  case NV: if (NV * Vec<T>::N <= 32) embedding_bwd_vec_kernel<T, (NV * Vec<T>::N <= 32 ? NV : 1)><<<blocks, kWarps * 32, smem, stream>>>(tb, io, d); break;
      FB_BWD_CASE(1) FB_BWD_CASE(2) FB_BWD_CASE(3) FB_BWD_CASE(4) FB_BWD_CASE(6) FB_BWD_CASE(8)
#undef FB_BWD_CASE
      default: embedding_bwd_any_kernel<T><<<blocks, kWarps * 32, 0, stream>>>(tb, io, d);
    }
  }
  const int64_t nparts = tb.tokens > 0 ? bwd_nparts<T>(tb.tokens, tb.hidden, aligned, num_sms) : 0;
  embedding_param_grad_kernel<T><<<ceil_div(2 * tb.hidden, 32), 256, 0, stream>>>(io.part, nparts, tb.hidden, io.param_is_float,
                                                                                  dgamma, dbeta);
  if (tb.tokens > 0) {
    const dim3 grid(ceil_div(seg.nchunks, kWarps), ceil_div(tb.hidden, kColsPerWarp), 3);
    embedding_segment_kernel<T><<<grid, kWarps * 32, 0, stream>>>(seg);
    embedding_segment_fixup_kernel<T><<<grid, kWarps * 32, 0, stream>>>(seg);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace fastbert
#endif  // __CUDACC__
