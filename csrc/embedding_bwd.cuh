// The fused embedding backward: per-token LayerNorm backward, dgamma/dbeta, and the table
// gradients by sorted segments; kernels and launcher (see embedding_kernels.cuh).
#pragma once

#include "embedding_common.cuh"

#if defined(__CUDACC__)
namespace fastbert {
namespace cuda {

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
  // Each lane zeroes the columns it adds into below (j and H + j): zeroing the row with a stride
  // of 32 over 2 * H would hand column H + j to another lane whenever H % 32 != 0, a race
  // without a __syncwarp (found by the emulator, tests/cuda_emu/).
  for (int j = lane; j < H; j += 32) part[j] = part[H + j] = 0.f;
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
  // Constant indices: indexing the kernel argument's arrays by a run-time table would copy the
  // whole struct to a local-memory stack frame (120 bytes per thread, seen in ptxas -v).
  const int64_t rows = table == 0 ? s.rows[0] : table == 1 ? s.rows[1] : s.rows[2];
  return id >= 0 && id < rows && !(table == 0 && id == s.padding_idx);
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
  void* grad = table == 0 ? s.grad[0] : table == 1 ? s.grad[1] : s.grad[2];  // constant indices, as above
  T* r = static_cast<T*>(grad) + id * s.hidden + col;
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

// One warp per chunk whose last run goes on into the next chunks: it adds that run's partials
// in chunk order and writes the row. The chunks the run reaches are found first, 32 chunk
// starts per ballot (ids ascend, so they are the leading ones), and the partials are then
// loaded 8 at a time: a run over 64 chunks (a token type of a 4096-token batch) waits on ~10
// loads, not 64 one after another.
template <typename T>
__global__ void __launch_bounds__(kWarps * 32) embedding_segment_fixup_kernel(SegIO s) {
  const int lane = threadIdx.x & 31;
  const int64_t chunk = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  const int table = blockIdx.z;
  const int col = blockIdx.y * kColsPerWarp + lane * 4;
  const int64_t k0 = chunk * kChunk;
  const int64_t k1 = k0 + kChunk;
  if (k1 >= s.tokens) return;  // a run that goes on needs a next chunk (the tests below are the same for the whole warp)
  const int64_t* sorted = s.sorted + table * s.tokens;
  const int64_t id = sorted[k1 - 1];
  if (sorted[k1] != id || !seg_row_ok(s, table, id)) return;
  if (sorted[k0] == id && k0 > 0 && sorted[k0 - 1] == id) return;  // began in an earlier chunk
  int64_t last = chunk + 1;  // the last chunk that holds part of the run
  for (int64_t c0 = chunk + 2; c0 < s.nchunks; c0 += 32) {
    const int64_t c = c0 + lane;
    const unsigned in = __ballot_sync(0xffffffffu, c < s.nchunks && sorted[c * kChunk] == id);
    const int n = __ffs(~in) - 1;  // chunks from c0 on that start inside the run; -1: all 32
    if (n < 0) {
      last = c0 + 31;
      continue;
    }
    last = c0 + n - 1;
    break;
  }
  if (col >= s.hidden) return;
  float acc[4];
  const float* r = s.part_last + (table * s.nchunks + chunk) * s.hidden + col;
#pragma unroll
  for (int i = 0; i < 4; ++i) acc[i] = col + i < s.hidden ? r[i] : 0.f;
  for (int64_t c = chunk + 1; c <= last; c += 8) {
    float v[8][4];
#pragma unroll
    for (int u = 0; u < 8; ++u) {  // issue the loads before any add
      const float* q = s.part_first + (table * s.nchunks + c + u) * s.hidden + col;
#pragma unroll
      for (int i = 0; i < 4; ++i) v[u][i] = c + u <= last && col + i < s.hidden ? q[i] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u)
      if (c + u <= last) {
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[i] += v[u][i];
      }
  }
  store_row4<T>(s, table, id, col, acc);
}

// ---------------------------------------------------------------------------------------------
// Launcher (no torch).

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
