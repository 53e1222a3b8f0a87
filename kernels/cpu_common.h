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

// 32 e4m3 bytes -> their values times `scale`, at out[0 .. 32). Each value is built as a bf16 bit pattern, then
// widened to fp32: for a normal code (exponent e > 0) the high byte is the sign and e + 120 without its lowest bit
// (a table lookup on the code's high nibble), the low byte e's lowest bit and the mantissa (the low nibble, shifted
// up); a subnormal code (e = 0: mantissa * 2^-9) takes both bytes from tables on its mantissa. e4m3's NaN codes,
// which the encoders never write, give 480.
inline void e4m3_decode32(const uint8_t* src, float scale, float* out) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), nib = _mm256_set1_epi8(0x0F);
  const __m256i lo = _mm256_and_si256(x, nib), hi = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
  const __m256i high_of_hi = _mm256_setr_epi8(60, 61, 62, 63, 64, 65, 66, 67, -68, -67, -66, -65, -64, -63, -62, -61,
                                              60, 61, 62, 63, 64, 65, 66, 67, -68, -67, -66, -65, -64, -63, -62, -61);
  const __m256i sub_high = _mm256_setr_epi8(0, 59, 59, 59, 60, 60, 60, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 59, 59, 59, 60,
                                            60, 60, 60, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i sub_low = _mm256_setr_epi8(0, 0, -128, -64, 0, 32, 64, 96, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, -128, -64, 0,
                                           32, 64, 96, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i sub = _mm256_cmpeq_epi8(_mm256_and_si256(x, _mm256_set1_epi8(0x78)), _mm256_setzero_si256());
  const __m256i high = _mm256_blendv_epi8(
      _mm256_shuffle_epi8(high_of_hi, hi),
      _mm256_or_si256(_mm256_shuffle_epi8(sub_high, lo), _mm256_and_si256(x, _mm256_set1_epi8(char(0x80)))), sub);
  const __m256i low = _mm256_blendv_epi8(_mm256_and_si256(_mm256_slli_epi16(x, 4), _mm256_set1_epi8(char(0xF0))),
                                         _mm256_shuffle_epi8(sub_low, lo), sub);
  // bf16 words: w0 holds values 0-7 | 16-23, w1 8-15 | 24-31 (unpacks work within 128-bit lanes)
  const __m256i w0 = _mm256_unpacklo_epi8(low, high), w1 = _mm256_unpackhi_epi8(low, high);
  const __m256i zero = _mm256_setzero_si256();
  const __m256 s = _mm256_set1_ps(scale);
  const __m256 f0 = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w0)), s);  // 0-3 | 16-19
  const __m256 f1 = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w0)), s);  // 4-7 | 20-23
  const __m256 f2 = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w1)), s);  // 8-11 | 24-27
  const __m256 f3 = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w1)), s);  // 12-15 | 28-31
  _mm256_storeu_ps(out, _mm256_permute2f128_ps(f0, f1, 0x20));
  _mm256_storeu_ps(out + 8, _mm256_permute2f128_ps(f2, f3, 0x20));
  _mm256_storeu_ps(out + 16, _mm256_permute2f128_ps(f0, f1, 0x31));
  _mm256_storeu_ps(out + 24, _mm256_permute2f128_ps(f2, f3, 0x31));
}

// lane j = the sum of acc[j]'s 8 lanes, j < 4
inline __m128 hsum4(const __m256 acc[4]) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

}  // namespace v4jax_cpu
