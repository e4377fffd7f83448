// Shared pieces of the fused embedding kernels (see embedding_kernels.cuh): the host/device
// helpers that the CPU implementation uses too (id views, the Philox dropout stream) and, with
// nvcc, the CUDA helpers, argument structs and launch helpers of the forward and backward.
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

// ---------------------------------------------------------------------------------------------
// Launch helpers (no torch).

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

}  // namespace cuda
}  // namespace fastbert
#endif  // __CUDACC__
