// What the compiled CPU kernels (kernels/*/cpu_kernel.cc, built by kernels/cpu_ffi.py) share: splitting a call's
// work over XLA's intra-op threads, and number-format helpers.

#pragma once

#include <immintrin.h>

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

// 8 e4m3 bytes -> their values times `scale`: normal codes by their bits (exponent + 120, mantissa moved up),
// subnormal ones (exponent 0) as mantissa * 2^-9 (e4m3's NaN codes, which the encoders never write, give 480)
inline __m256 e4m3_values(const uint8_t* src, __m256 scale) {
  const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(src)));
  const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x80)), 24);
  const __m256i normal = _mm256_add_epi32(_mm256_slli_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x7F)), 20),
                                          _mm256_set1_epi32(120 << 23));
  const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(c, _mm256_set1_epi32(7))),
                                   _mm256_set1_ps(1.0f / 512));
  const __m256 is_sub = _mm256_castsi256_ps(
      _mm256_cmpeq_epi32(_mm256_and_si256(c, _mm256_set1_epi32(0x78)), _mm256_setzero_si256()));
  const __m256 mag = _mm256_blendv_ps(_mm256_castsi256_ps(normal), sub, is_sub);
  return _mm256_mul_ps(_mm256_or_ps(mag, _mm256_castsi256_ps(sign)), scale);
}

}  // namespace v4jax_cpu
