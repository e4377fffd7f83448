// A CPU emulator for the subset of CUDA that fastbert's kernels use, so that the kernels of
// csrc/ run, and are tested, on machines without a GPU (tests/cuda_emulator.py builds it).
//
// Each thread of a block is a fiber (ucontext) on one OS thread; blocks run one after
// another, first to last or last to first. A fiber runs until it reaches a warp collective (__shfl_sync, __shfl_xor_sync,
// __ballot_sync) or __syncthreads, and the scheduler completes a collective only when all 32
// lanes of the warp wait at it, and a barrier when every live thread of the block does. So
// the emulation is deterministic, and it reports, instead of hiding, what is undefined on a
// GPU: a full-mask collective that some lanes never reach (they exited or wait elsewhere),
// lanes of one warp at different collectives, a mask other than 0xffffffff. Between
// collectives each thread runs as far as it can before the next one starts, so a value that one
// lane writes and another reads without a barrier between them comes out differently when the
// threads run in the other order (g_reverse): the tests compare the two.
//
// What it does not model: memory ordering between threads outside barriers, the hardware's
// approximate rsqrtf, out-of-bounds accesses (they read host memory), timing.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define __CUDACC__ 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static  // blocks run one at a time; `extern __shared__` is rewritten (cuda_emulator.py)

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) uint4 { unsigned x, y, z, w; };
struct alignas(16) float4 { float x, y, z, w; };
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorLaunchFailure = 719;
typedef struct EmuStream* cudaStream_t;

// fp16 and bf16 as 16-bit patterns; conversions round to nearest even, as CUDA's _rn ones.
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };

inline float emu_bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t emu_float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.x & 0x8000) << 16, exp = (h.x >> 10) & 0x1f, man = h.x & 0x3ff;
  if (exp == 0) return std::copysign(std::ldexp(static_cast<float>(man), -24), sign ? -1.f : 1.f);
  if (exp == 31) return emu_bits_to_float(sign | 0x7f800000u | (man << 13));
  return emu_bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

inline __half __float2half_rn(float f) {
  const uint32_t u = emu_float_to_bits(f), sign = (u >> 16) & 0x8000, a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return __half{static_cast<uint16_t>(sign | 0x7e00)};   // NaN
  if (a >= 0x477ff000u) return __half{static_cast<uint16_t>(sign | 0x7c00)};  // rounds to inf (>= 65520)
  if (a < 0x38800000u) {  // below fp16's smallest normal: multiples of 2^-24, rounded to nearest even
    const float scaled = emu_bits_to_float(a) * 16777216.0f;  // exact: a power of two
    return __half{static_cast<uint16_t>(sign | static_cast<uint32_t>(std::nearbyint(scaled)))};
  }
  const uint32_t r = a + 0xfffu + ((a >> 13) & 1u) - (112u << 23);
  return __half{static_cast<uint16_t>(sign | (r >> 13))};
}

inline float __bfloat162float(__nv_bfloat16 b) { return emu_bits_to_float(static_cast<uint32_t>(b.x) << 16); }

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = emu_float_to_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>(((u >> 16) & 0x8000) | 0x7fc0)};
  return __nv_bfloat16{static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }

namespace emu {

enum class State { kRun, kWarp, kBlock, kDone };
enum class Op { kShfl, kShflXor, kBallot };

struct Lane {
  ucontext_t ctx;
  dim3 tid;
  State state = State::kRun;
  Op op = Op::kShfl;
  uint64_t value = 0, result = 0;
  int arg = 0;
  uint64_t seq = 0;  // collectives reached so far
};

struct Launch {
  dim3 grid, block, bid;
  std::function<void()> body;
  std::vector<Lane> lanes;
  std::vector<char> stacks, shared;
  ucontext_t sched;
  Lane* cur = nullptr;
  std::string error;
};

inline Launch* g_launch = nullptr;
inline cudaError_t g_status = cudaSuccess;  // sticky until cudaGetLastError, as CUDA's launch errors
inline std::string g_message;               // what went wrong, for the caller
inline uint64_t g_collectives = 0;          // warp collectives completed (the tests check they ran)
inline bool g_reverse = false;              // run threads and blocks last first (a race changes the result)

constexpr size_t kStack = 64 * 1024;

inline void fail_from_lane(const std::string& why) {
  Launch* L = g_launch;
  if (L->error.empty()) L->error = why;
  L->cur->state = State::kDone;
  swapcontext(&L->cur->ctx, &L->sched);  // never resumed
}

inline uint64_t collective(unsigned mask, Op op, uint64_t value, int arg) {
  if (mask != 0xffffffffu) fail_from_lane("a warp collective with mask " + std::to_string(mask) + " (only 0xffffffff is emulated)");
  Launch* L = g_launch;
  Lane* me = L->cur;
  me->op = op;
  me->value = value;
  me->arg = arg;
  me->seq++;
  me->state = State::kWarp;
  swapcontext(&me->ctx, &L->sched);
  return me->result;
}

inline void entry() {
  Launch* L = g_launch;
  L->body();
  L->cur->state = State::kDone;  // uc_link returns to the scheduler
}

inline std::string where(const Launch& L, size_t warp) {
  return "block (" + std::to_string(L.bid.x) + "," + std::to_string(L.bid.y) + "," + std::to_string(L.bid.z) + ") warp " +
         std::to_string(warp);
}

// Completes the collective that all 32 lanes of warp w wait at; false with L.error if they do not.
inline bool complete_warp(Launch& L, size_t w) {
  Lane* lanes = &L.lanes[32 * w];
  const size_t n = std::min<size_t>(32, L.lanes.size() - 32 * w);
  size_t waiting = 0;
  for (size_t i = 0; i < n; ++i) waiting += lanes[i].state == State::kWarp;
  if (waiting == 0) return true;
  if (waiting != 32) {
    L.error = where(L, w) + ": a full-mask warp collective reached by " + std::to_string(waiting) +
              " of 32 lanes (the others exited, wait at __syncthreads, or do not exist)";
    return false;
  }
  for (size_t i = 1; i < 32; ++i)
    if (lanes[i].op != lanes[0].op || lanes[i].seq != lanes[0].seq) {
      L.error = where(L, w) + ": lanes 0 and " + std::to_string(i) + " wait at different warp collectives";
      return false;
    }
  uint64_t ballot = 0;
  if (lanes[0].op == Op::kBallot)
    for (size_t i = 0; i < 32; ++i) ballot |= static_cast<uint64_t>(lanes[i].value != 0) << i;
  for (size_t i = 0; i < 32; ++i) {
    switch (lanes[i].op) {
      case Op::kShfl: lanes[i].result = lanes[lanes[i].arg & 31].value; break;
      case Op::kShflXor: lanes[i].result = lanes[(i ^ static_cast<size_t>(lanes[i].arg)) & 31].value; break;
      case Op::kBallot: lanes[i].result = ballot; break;
    }
    lanes[i].state = State::kRun;
  }
  ++g_collectives;
  return true;
}

inline bool run_block(Launch& L) {
  const size_t n = L.lanes.size();
  for (size_t i = 0; i < n; ++i) {
    Lane& lane = L.lanes[i];
    lane = Lane{};
    lane.tid = dim3(i % L.block.x, (i / L.block.x) % L.block.y, i / (L.block.x * L.block.y));
    getcontext(&lane.ctx);
    lane.ctx.uc_stack.ss_sp = L.stacks.data() + i * kStack;
    lane.ctx.uc_stack.ss_size = kStack;
    lane.ctx.uc_link = &L.sched;
    makecontext(&lane.ctx, entry, 0);
  }
  for (;;) {
    for (size_t k = 0; k < n; ++k) {
      const size_t i = g_reverse ? n - 1 - k : k;
      if (L.lanes[i].state != State::kRun) continue;
      L.cur = &L.lanes[i];
      swapcontext(&L.sched, &L.lanes[i].ctx);
      if (!L.error.empty()) return false;
    }
    bool any_warp = false, all_done = true;
    for (size_t w = 0; w * 32 < n; ++w) {
      for (size_t i = 32 * w; i < std::min(n, 32 * w + 32); ++i) any_warp |= L.lanes[i].state == State::kWarp;
      if (!complete_warp(L, w)) return false;
    }
    if (any_warp) continue;
    for (const Lane& lane : L.lanes) all_done &= lane.state == State::kDone;
    if (all_done) return true;
    for (Lane& lane : L.lanes)  // every live thread waits at __syncthreads (exited ones count as arrived)
      if (lane.state == State::kBlock) lane.state = State::kRun;
  }
}

// Runs body() as every thread of every block of the grid; false (g_message says why) on a fault.
inline bool run(dim3 grid, dim3 block, size_t shared_bytes, std::function<void()> body) {
  if (g_status != cudaSuccess) return false;
  Launch L;
  L.grid = grid;
  L.block = block;
  L.body = std::move(body);
  const size_t threads = static_cast<size_t>(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    g_status = cudaErrorLaunchFailure;
    g_message = "invalid launch configuration";
    return false;
  }
  L.lanes.resize(threads);
  L.stacks.resize(threads * kStack);
  L.shared.assign(std::max<size_t>(shared_bytes, 16), 0);
  Launch* outer = g_launch;
  g_launch = &L;
  bool ok = true;
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y * grid.z;
  for (uint64_t k = 0; ok && k < blocks; ++k) {
    const uint64_t b = g_reverse ? blocks - 1 - k : k;
    L.bid = dim3(b % grid.x, (b / grid.x) % grid.y, b / (static_cast<uint64_t>(grid.x) * grid.y));
    ok = run_block(L);
  }
  g_launch = outer;
  if (!ok) {
    g_status = cudaErrorLaunchFailure;
    g_message = L.error;
  }
  return ok;
}

template <typename G, typename B, typename K, typename... A>
void launch(G grid, B block, size_t shared_bytes, cudaStream_t, K kernel, const A&... args) {
  run(dim3(grid), dim3(block), shared_bytes, [&] { kernel(args...); });
}

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(g_launch->shared.data());
}

template <typename T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "64-bit values at most");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}

template <typename T>
T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

}  // namespace emu

#define threadIdx (::emu::g_launch->cur->tid)
#define blockIdx (::emu::g_launch->bid)
#define blockDim (::emu::g_launch->block)
#define gridDim (::emu::g_launch->grid)

template <typename T>
T __shfl_sync(unsigned mask, T v, int src) {
  return emu::from_bits<T>(emu::collective(mask, emu::Op::kShfl, emu::to_bits(v), src));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask) {
  return emu::from_bits<T>(emu::collective(mask, emu::Op::kShflXor, emu::to_bits(v), lane_mask));
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
  return static_cast<unsigned>(emu::collective(mask, emu::Op::kBallot, pred != 0, 0));
}

inline void __syncthreads() {
  emu::Lane* me = emu::g_launch->cur;
  me->state = emu::State::kBlock;
  swapcontext(&me->ctx, &emu::g_launch->sched);
}

inline unsigned long long atomicMin(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  if (value < old) *address = value;
  return old;
}

inline cudaError_t cudaGetLastError() {
  const cudaError_t e = emu::g_status;
  emu::g_status = cudaSuccess;
  return e;
}
