// What the compiled CPU kernels (kernels/*/cpu_kernel.cc, built by kernels/cpu_ffi.py) share: splitting a call's
// work over XLA's intra-op threads, and float helpers.

#pragma once

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace v4jax_cpu {

// Runs run(0) .. run(count - 1) on this thread and up to threads - 1 of the pool's, and returns when all are done.
// The tasks are handed out by an atomic counter; this thread takes tasks too, so the call finishes even if the
// pool never runs a helper, and a helper that starts after the call returned finds none left (the shared state
// is held by shared_ptr).
inline void run_tasks(xla::ffi::ThreadPool& pool, int64_t count, std::function<void(int64_t)> run) {
  struct Work {
    std::atomic<int64_t> next{0}, done{0};
    int64_t count = 0;
    std::function<void(int64_t)> run;
    void help() {
      for (int64_t i; (i = next.fetch_add(1)) < count; done.fetch_add(1)) run(i);
    }
  };
  auto work = std::make_shared<Work>();
  work->count = count;
  work->run = std::move(run);
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  for (int64_t i = 1; i < std::min(threads, count); ++i) pool.Schedule([work] { work->help(); });
  work->help();
  while (work->done.load() < count) std::this_thread::yield();
}

inline int64_t pool_threads(xla::ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

inline float round_bf16(float x) {  // round to nearest even, as XLA's f32 -> bf16 convert
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7FFFFFFF) > 0x7F800000) return x;  // NaN
  u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

inline float pow2_minus_127(uint8_t e) {  // a UE8M0 scale byte's 2^(e - 127), built from bits (ldexp is a libm call)
  if (e == 0) return std::ldexp(1.0f, -127);
  uint32_t u = uint32_t(e) << 23;
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}

}  // namespace v4jax_cpu
