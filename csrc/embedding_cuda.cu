// CUDA implementation of fastbert::embedding_fwd / embedding_bwd: torch glue around the
// kernels in embedding_fwd.cuh and embedding_bwd.cuh (through embedding_kernels.cuh).
//
// Out-of-range ids: the forward kernel never reads a bad row; it records the first bad token
// in a small per-device buffer, and the host copies that word back (one 8-byte copy and a
// stream sync per forward) and raises a ValueError naming the value. Inside CUDA graph
// capture a sync is illegal, and under fastbert.assume_valid_ids() (sync_id_check() off) the
// caller has checked the ids on the host: the record stays in the buffer and the next checked
// call on the device raises instead.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/stack.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>

#include "embedding.h"

namespace fastbert {
namespace {

using cuda::Dropout;
using cuda::Tables;

constexpr unsigned long long kNoError = ~0ull;

// Per device: the device word the kernels atomicMin into, and a pinned host word to read it.
struct ErrorSlot {
  unsigned long long* dev = nullptr;
  unsigned long long* host = nullptr;
  std::mutex lock;
};

ErrorSlot& error_slot(int device, bool capturing) {
  static ErrorSlot slots[64];
  static std::once_flag once[64];
  TORCH_CHECK(device >= 0 && device < 64, "fastbert.embedding: device index ", device, " is not supported");
  ErrorSlot& s = slots[device];
  // Allocating syncs the device, which graph capture forbids: the warm-up call does it.
  TORCH_CHECK(!capturing || s.dev != nullptr, "fastbert.embedding: run the embedding once on this device before "
              "capturing it in a CUDA graph (its first call allocates a buffer, which capture forbids)");
  std::call_once(once[device], [&] {
    C10_CUDA_CHECK(cudaMalloc(&s.dev, sizeof(unsigned long long)));
    C10_CUDA_CHECK(cudaMemset(s.dev, 0xFF, sizeof(unsigned long long)));
    C10_CUDA_CHECK(cudaMallocHost(&s.host, sizeof(unsigned long long)));
    C10_CUDA_CHECK(cudaDeviceSynchronize());
  });
  return s;
}

template <typename T>
Tables<T> tables(const EmbeddingArgs& a) {
  Tables<T> tb;
  tb.word_ids = a.word_ids.view;
  tb.pos_ids = a.pos_ids.view;
  tb.type_ids = a.type_ids.view;
  tb.word = reinterpret_cast<const T*>(a.word.data_ptr());
  tb.pos = reinterpret_cast<const T*>(a.pos.data_ptr());
  tb.type = reinterpret_cast<const T*>(a.type.data_ptr());
  tb.n_word = a.word.size(0);
  tb.n_pos = a.pos.size(0);
  tb.n_type = a.type.size(0);
  tb.tokens = a.tokens;
  tb.hidden = static_cast<int>(a.hidden);
  return tb;
}

Dropout dropout(const EmbeddingArgs& a, const std::optional<at::Tensor>& seed) {
  Dropout d;
  d.seed = a.dropout_p > 0.0 ? seed->data_ptr<int64_t>() : nullptr;
  d.threshold = a.keep_threshold;
  d.scale = a.drop_scale;
  return d;
}

bool aligned16(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 != 0) return false;
  return true;
}

void check_cuda(cudaError_t e) { TORCH_CHECK(e == cudaSuccess, "fastbert.embedding: CUDA error: ", cudaGetErrorString(e)); }

template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  switch (t) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK_VALUE(false, "fastbert.embedding: CUDA tables must be float16, bfloat16 or float32, got ", t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> embedding_fwd_cuda(
    const at::Tensor& input_ids, const at::Tensor& token_type_ids, const at::Tensor& position_ids,
    const at::Tensor& word_weight, const at::Tensor& position_weight, const at::Tensor& token_type_weight,
    const at::Tensor& ln_weight, const at::Tensor& ln_bias, double eps, double dropout_p,
    const std::optional<at::Tensor>& seed, std::optional<int64_t> padding_idx) {
  const c10::cuda::CUDAGuard guard(word_weight.device());
  EmbeddingArgs a = check_args(input_ids, token_type_ids, position_ids, word_weight, position_weight, token_type_weight,
                               ln_weight, ln_bias, dropout_p, seed, padding_idx);
  at::Tensor beta = ln_bias.contiguous();
  at::Tensor out = at::empty(out_shape(input_ids, a.hidden), word_weight.options());
  at::Tensor mean = at::empty(input_ids.sizes(), word_weight.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  if (a.tokens == 0) return {out, mean, rstd};
  const int device = word_weight.get_device();
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  check_cuda(cudaStreamIsCapturing(stream, &capture));
  ErrorSlot& slot = error_slot(device, capture != cudaStreamCaptureStatusNone);
  cuda::FwdOut o;
  o.out = out.data_ptr();
  o.mean = mean.data_ptr<float>();
  o.rstd = rstd.data_ptr<float>();
  o.gamma = a.gamma.data_ptr();
  o.beta = beta.data_ptr();
  o.param_is_float = a.param_is_float;
  o.eps = static_cast<float>(eps);
  o.err = slot.dev;
  const bool aligned = aligned16({&a.word, &a.pos, &a.type, &out, &a.gamma, &beta});
  const Dropout d = dropout(a, seed);
  if (capture != cudaStreamCaptureStatusNone || !sync_id_check()) {
    dispatch(a.word.scalar_type(), [&](auto z) {
      using T = decltype(z);
      check_cuda(cuda::launch_embedding_fwd<T>(tables<T>(a), o, d, aligned, stream));
    });
    return {out, mean, rstd};
  }
  // One forward at a time per device reads and clears the error word.
  std::lock_guard<std::mutex> hold(slot.lock);
  dispatch(a.word.scalar_type(), [&](auto z) {
    using T = decltype(z);
    check_cuda(cuda::launch_embedding_fwd<T>(tables<T>(a), o, d, aligned, stream));
  });
  check_cuda(cudaMemcpyAsync(slot.host, slot.dev, sizeof(unsigned long long), cudaMemcpyDeviceToHost, stream));
  check_cuda(cudaStreamSynchronize(stream));
  const unsigned long long rec = *slot.host;
  if (rec != kNoError) {
    check_cuda(cudaMemsetAsync(slot.dev, 0xFF, sizeof(unsigned long long), stream));
    check_cuda(cudaStreamSynchronize(stream));
    raise_bad_id(a, static_cast<int64_t>(rec >> 2), static_cast<int>(rec & 3));
  }
  return {out, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> embedding_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& input_ids, const at::Tensor& token_type_ids,
    const at::Tensor& position_ids, const at::Tensor& word_weight, const at::Tensor& position_weight,
    const at::Tensor& token_type_weight, const at::Tensor& ln_weight, const at::Tensor& mean, const at::Tensor& rstd,
    double dropout_p, const std::optional<at::Tensor>& seed, std::optional<int64_t> padding_idx) {
  const c10::cuda::CUDAGuard guard(word_weight.device());
  EmbeddingArgs a = check_bwd_args(grad_out, input_ids, token_type_ids, position_ids, word_weight, position_weight,
                                   token_type_weight, ln_weight, mean, rstd, dropout_p, seed, padding_idx);
  const int64_t T = a.tokens, H = a.hidden;
  at::Tensor dy = grad_out.contiguous(), mu = mean.contiguous(), rs = rstd.contiguous();
  at::Tensor gw = at::zeros_like(a.word), gp = at::zeros_like(a.pos), gt = at::zeros_like(a.type);
  at::Tensor dgamma = at::empty({H}, ln_weight.options()), dbeta = at::empty({H}, ln_weight.options());
  const int device = word_weight.get_device();
  int sms = 0;
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const bool aligned = aligned16({&a.word, &a.pos, &a.type, &dy, &a.gamma});
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  const auto f32 = word_weight.options().dtype(at::kFloat);
  dispatch(a.word.scalar_type(), [&](auto z) {
    using T_ = decltype(z);
    at::Tensor dx = at::empty({T, H}, f32);
    at::Tensor part = at::empty({T > 0 ? cuda::bwd_nparts<T_>(T, static_cast<int>(H), aligned, sms) : 0, 2, H}, f32);
    cuda::BwdIO io;
    io.dy = dy.data_ptr();
    io.mean = mu.data_ptr<float>();
    io.rstd = rs.data_ptr<float>();
    io.gamma = a.gamma.data_ptr();
    io.param_is_float = a.param_is_float;
    io.dx = dx.data_ptr<float>();
    io.part = part.data_ptr<float>();
    // Stable sort of each table's ids: one segmented sort over a (3, T) key tensor.
    at::Tensor keys = at::stack({a.word_ids.tensor.reshape(-1).to(at::kLong), a.pos_ids.tensor.reshape(-1).to(at::kLong),
                                 a.type_ids.tensor.reshape(-1).to(at::kLong)});
    auto sorted = at::sort(keys, /*stable=*/true, /*dim=*/1, /*descending=*/false);
    at::Tensor skeys = std::get<0>(sorted).contiguous(), perm = std::get<1>(sorted).contiguous();
    const int64_t nchunks = (T + cuda::kChunk - 1) / cuda::kChunk;
    at::Tensor pfirst = at::empty({3, nchunks, H}, f32), plast = at::empty({3, nchunks, H}, f32);
    cuda::SegIO seg;
    seg.sorted = skeys.data_ptr<int64_t>();
    seg.perm = perm.data_ptr<int64_t>();
    seg.dx = dx.data_ptr<float>();
    seg.part_first = pfirst.data_ptr<float>();
    seg.part_last = plast.data_ptr<float>();
    seg.grad[0] = gw.data_ptr();
    seg.grad[1] = gp.data_ptr();
    seg.grad[2] = gt.data_ptr();
    seg.rows[0] = a.word.size(0);
    seg.rows[1] = a.pos.size(0);
    seg.rows[2] = a.type.size(0);
    seg.padding_idx = a.padding_idx;
    seg.tokens = T;
    seg.nchunks = nchunks;
    seg.hidden = static_cast<int>(H);
    check_cuda(cuda::launch_embedding_bwd<T_>(tables<T_>(a), io, dropout(a, seed), aligned, sms, dgamma.data_ptr(),
                                              dbeta.data_ptr(), seg, stream));
  });
  return {gw, gp, gt, dgamma, dbeta};
}

}  // namespace
}  // namespace fastbert

TORCH_LIBRARY_IMPL(fastbert, CUDA, m) {
  m.impl("embedding_fwd", &fastbert::embedding_fwd_cuda);
  m.impl("embedding_bwd", &fastbert::embedding_bwd_cuda);
}
