// The CUDA embedding kernels (csrc/embedding_*.cuh) built against the emulator, behind a C
// ABI that tests/cuda_emulator.py calls with ctypes. The glue mirrors csrc/embedding_cuda.cu:
// the same structs, filled the same way, and the same launchers.
#include "cuda_emu.h"
#include "embedding_kernels.cuh"  // the copy rewritten for the emulator (cuda_emulator.py)

namespace {

using namespace fastbert;
using namespace fastbert::cuda;

IdView id_view(const void* ptr, const int64_t* meta) {  // meta: cols, stride0, stride1, is64
  return IdView{ptr, meta[0], meta[1], meta[2], static_cast<int>(meta[3])};
}

template <typename T>
Tables<T> tables(const void* const* ids, const int64_t* meta, const void* const* tabs, const int64_t* rows, int64_t tokens,
                 int hidden) {
  Tables<T> tb;
  tb.word_ids = id_view(ids[0], meta);
  tb.pos_ids = id_view(ids[1], meta + 4);
  tb.type_ids = id_view(ids[2], meta + 8);
  tb.word = static_cast<const T*>(tabs[0]);
  tb.pos = static_cast<const T*>(tabs[1]);
  tb.type = static_cast<const T*>(tabs[2]);
  tb.n_word = rows[0];
  tb.n_pos = rows[1];
  tb.n_type = rows[2];
  tb.tokens = tokens;
  tb.hidden = hidden;
  return tb;
}

template <typename F>
int dispatch(int dtype, F&& f) {
  switch (dtype) {
    case 0: return f(float{});
    case 1: return f(__half{});
    case 2: return f(__nv_bfloat16{});
    default: return -1;
  }
}

// Two faults the emulator must report (tests/test_embedding_cuda_emu.py checks that it does).
void exits_before_shuffle() {
  float v = static_cast<float>(threadIdx.x);
  if ((threadIdx.x & 31) >= 16) return;  // half the warp leaves
  v = __shfl_xor_sync(0xffffffffu, v, 1);
}

void diverges() {
  const int lane = threadIdx.x & 31;
  if (lane < 8) (void)__ballot_sync(0xffffffffu, 1);
  else (void)__shfl_sync(0xffffffffu, lane, 0);
}

}  // namespace

extern "C" {

const char* fb_emu_message() { return emu::g_message.c_str(); }
unsigned long long fb_emu_collectives() { return emu::g_collectives; }
int fb_emu_chunk() { return kChunk; }
void fb_emu_set_reverse(int reverse) { emu::g_reverse = reverse != 0; }
uint32_t fb_emu_keep_threshold(double p) { return keep_threshold(p); }

int64_t fb_emu_bwd_nparts(int dtype, int64_t tokens, int hidden, int aligned, int num_sms) {
  return dispatch(dtype, [&](auto z) -> int64_t {
    using T = decltype(z);
    return bwd_nparts<T>(tokens, hidden, aligned != 0, num_sms);
  });
}

int fb_emu_embedding_fwd(int dtype, const void* const* ids, const int64_t* meta, const void* const* tabs, const int64_t* rows,
                         int64_t tokens, int hidden, void* out, float* mean, float* rstd, const void* gamma, const void* beta,
                         int param_is_float, float eps, unsigned long long* err, const int64_t* seed, uint32_t threshold,
                         float scale, int aligned) {
  FwdOut o;
  o.out = out;
  o.mean = mean;
  o.rstd = rstd;
  o.gamma = gamma;
  o.beta = beta;
  o.param_is_float = param_is_float;
  o.eps = eps;
  o.err = err;
  const Dropout d{seed, threshold, scale};
  return dispatch(dtype, [&](auto z) {
    using T = decltype(z);
    return static_cast<int>(launch_embedding_fwd<T>(tables<T>(ids, meta, tabs, rows, tokens, hidden), o, d, aligned != 0, nullptr));
  });
}

int fb_emu_embedding_bwd(int dtype, const void* const* ids, const int64_t* meta, const void* const* tabs, const int64_t* rows,
                         int64_t tokens, int hidden, const void* dy, const float* mean, const float* rstd, const void* gamma,
                         int param_is_float, float* dx, float* part, const int64_t* seed, uint32_t threshold, float scale,
                         int aligned, int num_sms, void* dgamma, void* dbeta, const int64_t* sorted, const int64_t* perm,
                         float* part_first, float* part_last, void* const* grads, int64_t padding_idx, int64_t nchunks) {
  BwdIO io;
  io.dy = dy;
  io.mean = mean;
  io.rstd = rstd;
  io.gamma = gamma;
  io.param_is_float = param_is_float;
  io.dx = dx;
  io.part = part;
  SegIO seg;
  seg.sorted = sorted;
  seg.perm = perm;
  seg.dx = dx;
  seg.part_first = part_first;
  seg.part_last = part_last;
  for (int i = 0; i < 3; ++i) {
    seg.grad[i] = grads[i];
    seg.rows[i] = rows[i];
  }
  seg.padding_idx = padding_idx;
  seg.tokens = tokens;
  seg.nchunks = nchunks;
  seg.hidden = hidden;
  const Dropout d{seed, threshold, scale};
  return dispatch(dtype, [&](auto z) {
    using T = decltype(z);
    return static_cast<int>(launch_embedding_bwd<T>(tables<T>(ids, meta, tabs, rows, tokens, hidden), io, d, aligned != 0,
                                                    num_sms, dgamma, dbeta, seg, nullptr));
  });
}

// Runs one of the faulty kernels above in one 64-thread block; returns cudaGetLastError().
int fb_emu_selftest(int which) {
  if (which == 0) emu::launch(1, 64, 0, nullptr, exits_before_shuffle);
  else emu::launch(1, 64, 0, nullptr, diverges);
  return static_cast<int>(cudaGetLastError());
}

}  // extern "C"
