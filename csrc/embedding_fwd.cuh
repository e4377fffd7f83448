// The fused embedding forward: kernels and launcher (see embedding_kernels.cuh).
#pragma once

#include "embedding_common.cuh"

#if defined(__CUDACC__)
namespace fastbert {
namespace cuda {

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
        float g[VEC], b[VEC];  // read here (L1 hits after the first warp), not held across the row loads
        load_params16<T>(o.gamma, o.param_is_float, col, g);
        load_params16<T>(o.beta, o.param_is_float, col, b);
#pragma unroll
        for (int i = 0; i < VEC; ++i) x[k][i] = (x[k][i] - mean) * rstd * g[i] + b[i];
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
// Launcher (no torch): picks the kernel from the hidden size and alignment.

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

}  // namespace cuda
}  // namespace fastbert
#endif  // __CUDACC__
