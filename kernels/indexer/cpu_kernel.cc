// The lightning indexer's scores and top-k (architecture §3.4.5) for a few query rows (a decode step) on x86-64
// CPUs with AVX2 + FMA, as an XLA FFI custom call. Built and registered by cpu_kernel.py; the math and the picks
// are reference.py's:
//
//     I[b, s, t] = sum_i w[b, s, i] * relu(q[b, s, i] . key[b, t])    (fp32, rounded to bf16 when asked)
//
// over the slots lo[b, s] <= t < hi[b, s]; the top k, best first, equal scores lower slot first (XLA's total order
// of floats: -0 below +0); -1 / -inf fill a row with fewer than k visible slots. What it adds over the reference:
// each stored key is read once, in its packed format, and decoded in registers (one head) or into a buffer that
// stays in L1 (XLA:CPU decodes a whole span to memory and reads it back), with a multiple of 8 heads in the lanes
// of the score dot (each decoded key value broadcast against 8 or 16 heads' queries); the top-k keeps a candidate
// list that a threshold prunes, 8 compares per instruction (XLA's top_k sorts every span into the running top-k);
// a long range is split across XLA's intra-op threads, each keeping its own best k, merged at the end (exact: the
// union of the parts' best k holds the row's).
//
// Key formats (cpu_kernel.py's F32 .. FP4): 0 fp32 [b, n, d]; 1 bf16 [b, n, d]; 2 Fp8Keys (e4m3 bytes [b, n, d],
// one fp32 scale per key [b, n, 1]); 3 Fp4Keys (MXFP4: e2m1 codes two per byte, low nibble = even dim [b, n, d / 2],
// one UE8M0 byte per 32 dims [b, n, d / 32]). Decoded values are exact (e2m1 and e4m3 values are fp32 values, times
// a power of two), except an MXFP4 value below 2^-126 (a block scale byte of 1), which a flush-to-zero mode may make
// 0 here and the reference's bit decode keeps. The dot's order of additions is not XLA's: scores can differ from
// the reference's in the last bits (tests/kernels/test_indexer_cpu.py), and so can a pick between two scores that
// close.
//
// MXFP4 keys go through a filter first, once the candidate list has a threshold: every head's query is rounded to
// int8 per 32-dim block, each key's codes become bytes 12 + 2 x e2m1 (one table lookup, shared by the heads), and
// their integer dots (vpmaddubsw: 32 products per instruction, where an fp32 dot does 8) with a bound on their
// error give an upper bound on the key's score. Only keys whose bound reaches the threshold are scored as above,
// so the picks and their scores are those without the filter (tests/kernels/test_indexer_cpu.py).

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cpu_common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using v4jax_cpu::e4m3_decode32;
using v4jax_cpu::hsum4;
using v4jax_cpu::pool_threads;
using v4jax_cpu::pow2_minus_127;
using v4jax_cpu::round_bf16;
using v4jax_cpu::run_tasks;

constexpr int kF32 = 0, kBF16 = 1, kFP8 = 2, kFP4 = 3;

// the bf16 bit pattern of each e2m1 code (bit 3 sign; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6), low and high byte
const __m256i kFp4Lo = _mm256_setr_epi8(0, 0, char(0x80), char(0xC0), 0, 0x40, char(0x80), char(0xC0), 0, 0,
                                        char(0x80), char(0xC0), 0, 0x40, char(0x80), char(0xC0), 0, 0, char(0x80),
                                        char(0xC0), 0, 0x40, char(0x80), char(0xC0), 0, 0, char(0x80), char(0xC0), 0,
                                        0x40, char(0x80), char(0xC0));
const __m256i kFp4Hi = _mm256_setr_epi8(0, 0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, char(0x80), char(0xBF),
                                        char(0xBF), char(0xBF), char(0xC0), char(0xC0), char(0xC0), char(0xC0), 0,
                                        0x3F, 0x3F, 0x3F, 0x40, 0x40, 0x40, 0x40, char(0x80), char(0xBF), char(0xBF),
                                        char(0xBF), char(0xC0), char(0xC0), char(0xC0), char(0xC0));

// Where each key dim lands in the decoded buffer. The decoders below write in the order their unpack
// instructions give (no interleaving shuffles); the queries are permuted the same way once per row, and a dot
// product does not care about the order of its terms.
std::vector<int> decoded_order(int fmt, int d) {
  std::vector<int> dim(d);
  for (int j = 0; j < d; ++j) {
    if (fmt == kBF16) {  // 16 dims per load: unpack{lo,hi}_epi16 take words 0-3 / 4-7 of each 128-bit lane
      int base = j / 16 * 16, r = j % 16, half = r / 8, l = r % 8;
      dim[j] = base + (l < 4 ? 4 * half + l : 8 + 4 * half + l - 4);
    } else if (fmt == kFP4) {  // 64 dims (32 bytes) per load: fp4_values' f[v][e]
      const int base = j / 64 * 64, v = j % 64 / 8, e = j % 8;
      dim[j] = base + 32 * (e / 4) + 2 * (4 * (v % 4) + e % 4) + v / 4;
    } else {
      dim[j] = j;
    }
  }
  return dim;
}

// Decoding, in decoded_order. 16 BF16 values -> f[0], f[1]: zero low halves make them fp32.
inline void bf16_values(const uint16_t* src, __m256 f[2]) {
  const __m256i zero = _mm256_setzero_si256(), x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  f[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, x));
  f[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, x));
}

// 64 MXFP4 values (32 bytes: two blocks of 32) -> f[0..7], the e2m1 values before the blocks' scales: lanes 0-3 of
// every f[v] hold the first block's values, lanes 4-7 the second's (AVX2 works in 128-bit lanes). Each code's bf16
// pattern comes from two byte tables (pshufb), then the same zero-extension as bf16_values.
inline void fp4_values(const uint8_t* src, __m256 f[8]) {
  const __m256i nib = _mm256_set1_epi8(0x0F), zero = _mm256_setzero_si256();
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  const __m256i codes[2] = {_mm256_and_si256(x, nib), _mm256_and_si256(_mm256_srli_epi16(x, 4), nib)};
  for (int half = 0; half < 2; ++half) {  // the even dims (low nibbles), then the odd
    const __m256i lo = _mm256_shuffle_epi8(kFp4Lo, codes[half]), hi = _mm256_shuffle_epi8(kFp4Hi, codes[half]);
    const __m256i w0 = _mm256_unpacklo_epi8(lo, hi), w1 = _mm256_unpackhi_epi8(lo, hi);  // bf16 words
    f[4 * half] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w0));
    f[4 * half + 1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w0));
    f[4 * half + 2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, w1));
    f[4 * half + 3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, w1));
  }
}

// The stored keys of one sequence: key t's codes at data + t * bytes, its scales at scales + t * scale_bytes.
struct Keys {
  const char* data;
  const uint8_t* scales;
  int64_t bytes, scale_bytes;
};

// Key t decoded -> out[0 .. d) (to be read by several heads).
template <int Fmt>
inline void decode_key(const Keys& keys, int64_t t, int d, float* out) {
  const char* kp = keys.data + t * keys.bytes;
  if constexpr (Fmt == kF32) {
    std::memcpy(out, kp, d * sizeof(float));
  } else if constexpr (Fmt == kBF16) {
    __m256 f[2];
    for (int j = 0; j < d; j += 16) {
      bf16_values(reinterpret_cast<const uint16_t*>(kp) + j, f);
      _mm256_storeu_ps(out + j, f[0]);
      _mm256_storeu_ps(out + j + 8, f[1]);
    }
  } else if constexpr (Fmt == kFP8) {
    float scale;
    std::memcpy(&scale, keys.scales + t * keys.scale_bytes, 4);
    for (int j = 0; j < d; j += 32) e4m3_decode32(reinterpret_cast<const uint8_t*>(kp) + j, scale, out + j);
  } else {
    __m256 f[8];
    const uint8_t* e = keys.scales + t * keys.scale_bytes;
    for (int c = 0; c < d / 64; ++c) {
      fp4_values(reinterpret_cast<const uint8_t*>(kp) + 32 * c, f);
      const __m256 s =
          _mm256_set_m128(_mm_set1_ps(pow2_minus_127(e[2 * c + 1])), _mm_set1_ps(pow2_minus_127(e[2 * c])));
      for (int v = 0; v < 8; ++v) _mm256_storeu_ps(out + 64 * c + 8 * v, _mm256_mul_ps(f[v], s));
    }
  }
}

// 8 partial sums of qp . key t, decoded in registers (one head: nothing to share a decoded key with).
template <int Fmt>
inline __m256 key_dot(const Keys& keys, int64_t t, const float* qp, int d) {
  const char* kp = keys.data + t * keys.bytes;
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  if constexpr (Fmt == kF32) {
    const float* k = reinterpret_cast<const float*>(kp);
    for (int j = 0; j < d; j += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp + j), _mm256_loadu_ps(k + j), acc0);
  } else {
    static_assert(Fmt == kBF16, "FP4 keys: fp4_dots4; FP8 keys: decode_key");
    __m256 f[2];
    for (int j = 0; j < d; j += 16) {
      bf16_values(reinterpret_cast<const uint16_t*>(kp) + j, f);
      acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(qp + j), f[0], acc0);
      acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(qp + j + 8), f[1], acc1);
    }
  }
  return _mm256_add_ps(acc0, acc1);
}

constexpr int kMaxDim = 512;  // topk_row's decode buffer holds kGroup keys of up to this many dims
constexpr int kGroup = 4;  // keys scored together: independent FMA chains, one horizontal sum for all four
constexpr int kChunk = 256;  // slots scored before their scores are compared with the top-k threshold

// XLA's relu(x) * w: max(0, x) keeps a NaN x (the second operand's on NaN), + 0 turns a -0 into +0
inline __m128 relu_times(__m128 x, float w) {
  const __m128 zero = _mm_setzero_ps();
  return _mm_mul_ps(_mm_add_ps(_mm_max_ps(zero, x), zero), _mm_set1_ps(w));
}

// 2^(e - 127) for 8 UE8M0 bytes (as int32 lanes), from bits; e = 0 is the subnormal 2^-127
inline __m256 pow2_minus_127(__m256i e) {
  const __m256 normal = _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  const __m256 zero_byte = _mm256_castsi256_ps(_mm256_cmpeq_epi32(e, _mm256_setzero_si256()));
  return _mm256_blendv_ps(normal, _mm256_set1_ps(std::ldexp(1.0f, -127)), zero_byte);
}

// The UE8M0 scale bytes of blocks 2c (lanes 0-3) and 2c + 1 (lanes 4-7) of the kGroup slots t, as int32 lanes;
// `consecutive` slots (t[g] = t[0] + g) with two scale bytes each come in one 8-byte load
inline __m256i block_scale_bytes(const Keys& keys, const int64_t t[kGroup], int c, bool consecutive) {
  const uint8_t* s = keys.scales + 2 * c;
  const int64_t sb = keys.scale_bytes;
  if (consecutive && sb == 2) {
    const __m128i order = _mm_setr_epi8(0, 2, 4, 6, 1, 3, 5, 7, -1, -1, -1, -1, -1, -1, -1, -1);
    return _mm256_cvtepu8_epi32(_mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s + t[0] * sb)),
                                                 order));
  }
  return _mm256_setr_epi32(s[t[0] * sb], s[t[1] * sb], s[t[2] * sb], s[t[3] * sb], s[t[0] * sb + 1],
                           s[t[1] * sb + 1], s[t[2] * sb + 1], s[t[3] * sb + 1]);
}

// lane g = qp . key t[g] for kGroup slots t, MXFP4 decoded in registers (one head). Each block's partial dot is
// scaled once, which rounds as scaling every value would (the scale is a power of two; barring under- or overflow).
inline __m128 fp4_dots4(const Keys& keys, const int64_t t[kGroup], const float* qp, int d) {
  __m128 total = _mm_setzero_ps();
  for (int c = 0; c < d / 64; ++c) {
    const float* q = qp + 64 * c;
    __m256 acc[kGroup];
    for (int g = 0; g < kGroup; ++g) {
      __m256 f[8];
      fp4_values(reinterpret_cast<const uint8_t*>(keys.data + t[g] * keys.bytes) + 32 * c, f);
      __m256 a = _mm256_mul_ps(_mm256_loadu_ps(q), f[0]), b = _mm256_mul_ps(_mm256_loadu_ps(q + 8), f[1]);
      for (int v = 2; v < 8; v += 2) {
        a = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v), f[v], a);
        b = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * v + 8), f[v + 1], b);
      }
      acc[g] = _mm256_add_ps(a, b);
    }
    // lane g: slot g's dot over block 2c; lane 4 + g: over block 2c + 1
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    const __m256 p = _mm256_mul_ps(h, pow2_minus_127(block_scale_bytes(keys, t, c, false)));
    total = _mm_add_ps(total, _mm_add_ps(_mm256_castps256_ps128(p), _mm256_extractf128_ps(p, 1)));
  }
  return total;
}

// e2m1 code -> 2 x |its value|, as a byte, in both 128-bit lanes
const __m256i kFp4Abs2 = _mm256_setr_epi8(0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12, 0, 1, 2, 3, 4, 6, 8, 12,
                                          0, 1, 2, 3, 4, 6, 8, 12);
// e2m1 code -> 12 + 2 x its value, as a byte (bit 3 sign; magnitudes 0, .5, 1, 1.5, 2, 3, 4, 6), in both 128-bit
// lanes: non-negative, the unsigned operand vpmaddubsw takes
const __m256i kFp4Offset = _mm256_setr_epi8(12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0, 12, 13, 14, 15,
                                            16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0);

// One head's query for the MXFP4 filter: q rounded to int8 per 32-dim block b, q ~ q8 * 2 f_b, the even dims of each
// 64-dim chunk, then its odd dims (the low and high nibbles of the key's 32 bytes). A key block's dot with q is then
// f_b s_k (I_b - c_b), I_b the integer dot of q8 with the codes' bytes (12 + 2 x value), c_b = 12 sum q8, s_k the
// key block's scale, within s_k (0.51 f_b A + p_b): each q_j is off by at most f_b (0.51 with fp32's slack), times
// |value_j|, summed: 0.51 f_b A with A = sum_j 2 |value_j| (the key's own, an integer dot too); p_b = 6 x 2^-15 x
// sum_j |q_j| bounds the fp32 roundings of either dot (far above both). Kept per 64-dim chunk c in fp4_bound4's
// lanes (0-3: block 2c, 4-7: block 2c + 1): f, f c, 0.51 f and p.
constexpr int kMaxFilterHeads = 128;  // fp4_bound4's per-head sums; rows with more heads are not filtered
struct Fp4Filter {
  alignas(32) int8_t q8[kMaxDim];
  alignas(32) float f[kMaxDim / 64][8], fc[kMaxDim / 64][8], fa[kMaxDim / 64][8], p[kMaxDim / 64][8];
};

// -> whether q (one head, d dims, original order) can be filtered (finite, every block 0 or of a magnitude whose
// bound cannot under- or overflow), filling `out`
bool make_filter(const float* q, int d, Fp4Filter& out) {
  float f[kMaxDim / 32], c[kMaxDim / 32] = {}, pad[kMaxDim / 32];
  for (int blk = 0; blk < d / 32; ++blk) {
    float amax = 0.0f, sum = 0.0f;
    for (int j = 32 * blk; j < 32 * blk + 32; ++j) {
      if (!std::isfinite(q[j])) return false;
      amax = std::max(amax, std::fabs(q[j]));
      sum += std::fabs(q[j]);
    }
    if (amax != 0 && (amax < 1e-18f || amax > 1e18f)) return false;
    const float sq = amax / 127.0f;
    f[blk] = sq / 2;
    pad[blk] = 6 * std::ldexp(1.0f, -15) * sum;
  }
  for (int p = 0; p < d; ++p) {  // p: 64 c + i (i < 32: dim 64 c + 2 i), or 64 c + 32 + i (dim 64 c + 2 i + 1)
    const int i = p % 64 % 32, j = p / 64 * 64 + 2 * i + p % 64 / 32, blk = j / 32;
    const int8_t v = f[blk] > 0 ? int8_t(std::clamp(std::lrint(q[j] / (2 * f[blk])), -127L, 127L)) : 0;
    out.q8[p] = v;
    c[blk] += 12.0f * v;
  }
  for (int blk = 0; blk < d / 32; ++blk)
    for (int lane = 4 * (blk % 2); lane < 4 * (blk % 2) + 4; ++lane) {
      out.f[blk / 2][lane] = f[blk];
      out.fc[blk / 2][lane] = f[blk] * c[blk];  // c: an integer below 2^16; rounded by far less than p
      out.fa[blk / 2][lane] = 0.51f * f[blk];
      out.p[blk / 2][lane] = pad[blk];
    }
  return true;
}

// lane g: an upper bound on sum_h w[h] relu(q_h . key t[g]) for kGroup slots t (consecutive: scale bytes in one
// load), flt[h] head h's filter (heads <= kMaxFilterHeads). Per head, the dot lies within center +- err (the
// filter's bound); w relu(.) is increasing in the dot where w >= 0 and decreasing where w < 0, so the upper end
// bounds the one term and the lower end the other. Each chunk of the keys' bytes is made once for every head. With
// one head, A is taken at its largest (32 x 12 per block): there its tighter bound saves less than it costs.
// Always inlined, so that a call with heads = 1 is compiled for one head.
__attribute__((always_inline)) inline __m128 fp4_bound4(const Keys& keys, const int64_t t[kGroup], bool consecutive,
                                                        const Fp4Filter* flt, const float* w, int heads, int d) {
  const __m256i nib = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), ones8 = _mm256_set1_epi8(1);
  const auto halves = [](__m256 x) { return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1)); };
  // lane g: slot g's value over block 2c; lane 4 + g: over block 2c + 1 (integers, exact in fp32: below 2^17)
  const auto per_slot = [](const __m256i v[kGroup]) {
    return _mm256_cvtepi32_ps(_mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3])));
  };
  __m128 center[kMaxFilterHeads], err[kMaxFilterHeads];
  for (int c = 0; c < d / 64; ++c) {
    __m256i lo[kGroup], hi[kGroup], a[kGroup] = {};  // the even dims' bytes 12 + 2 x value, the odd dims'; A
    for (int g = 0; g < kGroup; ++g) {
      const __m256i x =
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys.data + t[g] * keys.bytes + 32 * c));
      const __m256i cl = _mm256_and_si256(x, nib), ch = _mm256_and_si256(_mm256_srli_epi16(x, 4), nib);
      lo[g] = _mm256_shuffle_epi8(kFp4Offset, cl);
      hi[g] = _mm256_shuffle_epi8(kFp4Offset, ch);
      if (heads > 1)
        a[g] = _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi8(kFp4Abs2, cl), ones8),
                                                  _mm256_maddubs_epi16(_mm256_shuffle_epi8(kFp4Abs2, ch), ones8)),
                                 ones);
    }
    const __m256 abs2 = heads > 1 ? per_slot(a) : _mm256_set1_ps(32 * 12);
    const __m256 scale = pow2_minus_127(block_scale_bytes(keys, t, c, consecutive));
    for (int h = 0; h < heads; ++h) {
      const Fp4Filter& f = flt[h];
      const __m256i qe = _mm256_load_si256(reinterpret_cast<const __m256i*>(f.q8 + 64 * c));
      const __m256i qo = _mm256_load_si256(reinterpret_cast<const __m256i*>(f.q8 + 64 * c + 32));
      __m256i acc[kGroup];  // pairs <= 2 x 24 x 127: no saturation
      for (int g = 0; g < kGroup; ++g)
        acc[g] = _mm256_madd_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(lo[g], qe), _mm256_maddubs_epi16(hi[g], qo)), ones);
      const __m128 cen = halves(
          _mm256_mul_ps(scale, _mm256_fmsub_ps(_mm256_load_ps(f.f[c]), per_slot(acc), _mm256_load_ps(f.fc[c]))));
      const __m128 e =
          halves(_mm256_mul_ps(scale, _mm256_fmadd_ps(_mm256_load_ps(f.fa[c]), abs2, _mm256_load_ps(f.p[c]))));
      center[h] = c ? _mm_add_ps(center[h], cen) : cen;
      err[h] = c ? _mm_add_ps(err[h], e) : e;
    }
  }
  const __m128 zero = _mm_setzero_ps();
  __m128 bound = zero, mag = zero;  // mag: sum_h |w[h]| relu(upper end), which bounds every term's size
  for (int h = 0; h < heads; ++h) {
    const __m128 upper = _mm_max_ps(zero, _mm_add_ps(center[h], err[h]));  // relu; NaN stays NaN
    const __m128 end = w[h] >= 0 ? upper : _mm_max_ps(zero, _mm_sub_ps(center[h], err[h]));
    bound = _mm_add_ps(bound, _mm_mul_ps(end, _mm_set1_ps(w[h])));
    mag = _mm_add_ps(mag, _mm_mul_ps(upper, _mm_set1_ps(std::fabs(w[h]))));
  }
  // the roundings of the terms and of either sum over heads (the score's and this one's)
  return _mm_add_ps(bound, _mm_mul_ps(mag, _mm_set1_ps(std::ldexp(float(heads + 8), -22))));
}

// lane g = a . keys[g] for the kGroup keys at keys + g * d (d a multiple of 8)
inline __m128 dot4(const float* a, const float* keys, int d) {
  __m256 acc[kGroup];
  for (int g = 0; g < kGroup; ++g) acc[g] = _mm256_setzero_ps();
  for (int j = 0; j < d; j += 8) {
    const __m256 x = _mm256_loadu_ps(a + j);
    for (int g = 0; g < kGroup; ++g) acc[g] = _mm256_fmadd_ps(x, _mm256_loadu_ps(keys + g * d + j), acc[g]);
  }
  return hsum4(acc);
}

// The relu(x) * w terms of 8 heads (relu_times, 8 lanes)
inline __m256 relu_times8(__m256 x, __m256 w) {
  const __m256 zero = _mm256_setzero_ps();
  return _mm256_mul_ps(_mm256_add_ps(_mm256_max_ps(zero, x), zero), w);
}

// Heads in lanes, 8 * B of them from head h0: adds their terms for the kGroup keys at keys + g * d to sum[g] (or
// starts it, `first`). qt [d, heads]: every key value is broadcast against the heads' query values, so a decoded
// key is read once per dim for all of them, not once per head.
template <int B>
inline void heads_terms(const float* qt, const float* w, int heads, int h0, const float* keys, int d,
                        __m256 sum[kGroup], bool first) {
  __m256 acc[kGroup][B];
  for (int g = 0; g < kGroup; ++g)
    for (int b = 0; b < B; ++b) acc[g][b] = _mm256_setzero_ps();
  for (int j = 0; j < d; ++j) {
    __m256 qj[B];
    for (int b = 0; b < B; ++b) qj[b] = _mm256_loadu_ps(qt + j * heads + h0 + 8 * b);
    for (int g = 0; g < kGroup; ++g) {
      const __m256 x = _mm256_broadcast_ss(keys + g * d + j);
      for (int b = 0; b < B; ++b) acc[g][b] = _mm256_fmadd_ps(qj[b], x, acc[g][b]);
    }
  }
  for (int b = 0; b < B; ++b) {
    const __m256 wb = _mm256_loadu_ps(w + h0 + 8 * b);
    for (int g = 0; g < kGroup; ++g) {
      const __m256 term = relu_times8(acc[g][b], wb);
      sum[g] = first && b == 0 ? term : _mm256_add_ps(sum[g], term);
    }
  }
}

// lane g = sum_h w[h] relu(qt[., h] . keys[g]) for the kGroup keys at keys + g * d; heads a multiple of 8, qt
// [d, heads]. The first heads' terms start each sum (a sum of -0 terms stays -0).
inline __m128 heads_dot4(const float* qt, const float* w, int heads, const float* keys, int d) {
  __m256 sum[kGroup];
  int h0 = 0;
  for (; h0 + 16 <= heads; h0 += 16) heads_terms<2>(qt, w, heads, h0, keys, d, sum, h0 == 0);
  if (h0 < heads) heads_terms<1>(qt, w, heads, h0, keys, d, sum, h0 == 0);
  return hsum4(sum);
}

// XLA's top_k order of floats, as integers: the total order (-NaN < -inf < ... < -0 < +0 < ... < +inf < NaN)
inline int32_t order_key(float x) {
  int32_t i;
  std::memcpy(&i, &x, 4);
  return i < 0 ? i ^ 0x7FFFFFFF : i;
}

// bit g set where order_key(x[g]) > thr, for x[0 .. 7]
inline int beats8(const float* x, int32_t thr) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i key = _mm256_xor_si256(v, _mm256_and_si256(_mm256_srai_epi32(v, 31), _mm256_set1_epi32(0x7FFFFFFF)));
  return _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, _mm256_set1_epi32(thr))));
}

struct Cand {
  int32_t key;  // order_key(score)
  int32_t slot;
  float score;
};
// the reference's order: higher score first, equal scores lower slot first
inline bool better(const Cand& a, const Cand& b) { return a.key > b.key || (a.key == b.key && a.slot < b.slot); }

// cand -> its best k (all if fewer), best first
inline void best_first(std::vector<Cand>& cand, int64_t k) {
  if (int64_t(cand.size()) > k) {
    std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
    cand.resize(k);
  }
  std::sort(cand.begin(), cand.end(), better);
}

// lane g = sum_h w[h] relu(q[h] . key t[g]) for kGroup slots t (repeats allowed; `consecutive`: t[g] = t[0] + g),
// before the rounding to bf16; buf holds kGroup decoded keys.
template <int Fmt>
inline __m128 score_group(const Keys& keys, const int64_t t[kGroup], bool consecutive, const float* qp,
                          const float* w, int heads, int d, float* buf) {
  if constexpr (Fmt != kFP8) {
    if (heads == 1) {  // decoded in registers
      if constexpr (Fmt == kFP4) {
        return relu_times(fp4_dots4(keys, t, qp, d), w[0]);
      } else {
        __m256 acc[kGroup];
        for (int g = 0; g < kGroup; ++g) acc[g] = key_dot<Fmt>(keys, t[g], qp, d);
        return relu_times(hsum4(acc), w[0]);
      }
    }
  }
  const float* group = buf;  // kGroup keys decoded once, read by every head
  if (Fmt == kF32 && consecutive) {
    group = reinterpret_cast<const float*>(keys.data + t[0] * keys.bytes);
  } else {
    for (int g = 0; g < kGroup; ++g) decode_key<Fmt>(keys, t[g], d, buf + g * d);
  }
  if (heads % 8 == 0) return heads_dot4(qp, w, heads, group, d);
  // the first head's term starts the sum, so that a sum of -0 terms stays -0, as the reference's
  __m128 score = relu_times(dot4(qp, group, d), w[0]);
  for (int h = 1; h < heads; ++h) score = _mm_add_ps(score, relu_times(dot4(qp + h * d, group, d), w[h]));
  return score;
}

// scores[j] = score of slot t + j for j < m (m <= kChunk, a multiple of kGroup or the range's end; a short last
// group repeats slot t + j, its scores unused), before the rounding to bf16.
template <int Fmt>
inline void score_chunk(const Keys& keys, const float* qp, const float* w, int heads, int d, int64_t t, int m,
                        float* scores, float* buf) {
  for (int j = 0; j < m; j += kGroup) {
    const int mg = std::min(kGroup, m - j);
    int64_t u[kGroup];
    for (int g = 0; g < kGroup; ++g) u[g] = t + j + (g < mg ? g : 0);
    _mm_storeu_ps(scores + j, score_group<Fmt>(keys, u, mg == kGroup, qp, w, heads, d, buf));
  }
}

// The least float that rounds to bf16 at or above x (a bf16 value; -inf where x is not finite or near 0)
inline float bf16_bar(float x) {
  if (!std::isfinite(x) || std::fabs(x) < 1e-30f) return -INFINITY;
  uint32_t i;
  std::memcpy(&i, &x, 4);
  i = x > 0 ? i - 0x8000 : i + 0x8000;  // half a bf16 step below x
  std::memcpy(&x, &i, 4);
  return x;
}

// The best k of slots [t0, t1) for one query row: qp [heads, d] in decoded_order ([d, heads] for a multiple of 8
// heads: heads_dot4), w [heads]. Leaves them in `cand`, best first (at most k; fewer if fewer slots). Scores a
// chunk of slots at a time, then keeps those that beat the running threshold, 8 compares per instruction. With
// `flt` (MXFP4 keys: every head's filter), once there is a threshold, scores only the slots whose filter bound
// reaches it.
template <int Fmt>
void topk_row(const Keys& keys, const float* qp, const float* w, int heads, int d, int64_t t0, int64_t t1, int64_t k,
              bool bf16_scores, const Fp4Filter* flt, std::vector<Cand>& cand) {
  alignas(32) float scores[kChunk + kGroup], buf[kGroup * kMaxDim];
  cand.clear();
  // With every weight negative (or -0) no score exceeds -0: once k slots score -0, no later slot can enter.
  bool negative = true;
  for (int h = 0; h < heads; ++h) negative = negative && std::signbit(w[h]) && !std::isnan(w[h]);
  int32_t thr = 0;  // once `cand` was pruned to k: the k-th best's order_key; later slots must beat it
  float bar = 0.0f;  // and (the filter) a score before any bf16 rounding below this one, or with `above`, at or
  bool above = false;  // below it, cannot
  bool pruned = false, full = false;
  auto keep = [&](int32_t key, int64_t slot, float score) {
    cand.push_back({key, int32_t(slot), score});
    if (int64_t(cand.size()) >= 4 * k + 64) {
      std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
      cand.resize(k);
      const float kth = cand[k - 1].score;
      thr = cand[k - 1].key;  // the worst kept; a later slot with an equal score ranks below it
      above = kth == 0 && !std::signbit(kth);  // +0: a positive score beats it
      bar = kth != 0 ? (bf16_scores ? bf16_bar(kth) : kth) : above ? 0.0f : -INFINITY;  // -0: +0 beats it
      full = negative && kth == 0 && std::signbit(kth);
      pruned = true;
    }
  };
  for (int64_t t = t0; t < t1 && !full; t += kChunk) {
    const int m = int(std::min<int64_t>(kChunk, t1 - t));
    if constexpr (Fmt == kFP4) {
      if (flt && pruned) {
        int64_t pass[kChunk + kGroup];  // the slots whose bound reaches the bar
        int n_pass = 0;
        for (int j = 0; j < m; j += kGroup) {
          const int mg = std::min(kGroup, m - j);
          int64_t u[kGroup];
          for (int g = 0; g < kGroup; ++g) u[g] = t + j + (g < mg ? g : 0);  // a short group repeats its first
          const __m128 bound = heads == 1 ? fp4_bound4(keys, u, mg == kGroup, flt, w, 1, d)  // specialized
                                          : fp4_bound4(keys, u, mg == kGroup, flt, w, heads, d);
          const __m128 reach = above ? _mm_cmp_ps(bound, _mm_set1_ps(bar), _CMP_NLE_UQ)  // (or NaN)
                                     : _mm_cmp_ps(bound, _mm_set1_ps(bar), _CMP_NLT_UQ);
          int mask = _mm_movemask_ps(reach) & ((1 << mg) - 1);
          for (; mask; mask &= mask - 1) pass[n_pass++] = t + j + __builtin_ctz(mask);
        }
        for (int j = n_pass; j % kGroup; ++j) pass[j] = pass[n_pass - 1];  // a short group repeats its last slot
        for (int j = 0; j < n_pass; j += kGroup) {  // scored as score_chunk and the loop below do
          float sc[kGroup];
          _mm_storeu_ps(sc, score_group<kFP4>(keys, pass + j, false, qp, w, heads, d, buf));
          for (int g = 0; g < std::min(kGroup, n_pass - j); ++g) {
            const float score = bf16_scores ? round_bf16(sc[g]) : sc[g];
            if (order_key(score) > thr) keep(order_key(score), pass[j + g], score);
          }
        }
        continue;
      }
    }
    score_chunk<Fmt>(keys, qp, w, heads, d, t, m, scores, buf);
    if (bf16_scores)
      for (int j = 0; j < m; ++j) scores[j] = round_bf16(scores[j]);
    int j = 0;
    for (; pruned && j + 8 <= m; j += 8) {
      for (int mask = beats8(scores + j, thr); mask; mask &= mask - 1) {
        const int g = __builtin_ctz(mask);
        if (order_key(scores[j + g]) > thr) keep(order_key(scores[j + g]), t + j + g, scores[j + g]);
      }
    }
    for (; j < m; ++j)
      if (!pruned || order_key(scores[j]) > thr) keep(order_key(scores[j]), t + j, scores[j]);
  }
  best_first(cand, k);
}

constexpr int64_t kMinPart = 16384;  // slots per task at least when a row's range is split across threads
ffi::Error IndexerTopkImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> w,
                           ffi::AnyBuffer keys, ffi::AnyBuffer scales, ffi::Buffer<ffi::S32> lo,
                           ffi::Buffer<ffi::S32> hi, ffi::ResultBuffer<ffi::S32> out_slots,
                           ffi::ResultBuffer<ffi::F32> out_scores, int64_t fmt, bool bf16_scores) {
  auto qd = q.dimensions();
  auto kd = keys.dimensions();
  auto sd = scales.dimensions();
  if (qd.size() != 4 || kd.size() != 3)
    return ffi::Error::InvalidArgument("indexer_topk: q must be [b, s, i, d] and keys [b, n, .]");
  const int64_t b = qd[0], s = qd[1], heads = qd[2], d = qd[3], n = kd[1], rows = b * s;
  const int64_t k = out_slots->dimensions()[2];
  if (d % 8 || d > kMaxDim || (fmt == kBF16 && d % 16) || (fmt == kFP8 && d % 32) || (fmt == kFP4 && d % 64) ||
      fmt < kF32 || fmt > kFP4)
    return ffi::Error::InvalidArgument("indexer_topk: key format " + std::to_string(fmt) + " with head dim " +
                                       std::to_string(d) + " is not supported");
  const int64_t bytes = kd[2] * (fmt == kF32 ? 4 : fmt == kBF16 ? 2 : 1);
  const int64_t scale_bytes = sd[sd.size() - 1] * (fmt == kFP8 ? 4 : 1);
  const std::vector<int> order = decoded_order(int(fmt), int(d));
  // every row's queries in decoded_order: [heads, d], or [d, heads] for heads in lanes (a multiple of 8)
  std::vector<float> qp(rows * heads * d);
  const bool lanes = heads % 8 == 0;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t j = 0; j < d; ++j)
        qp[r * heads * d + (lanes ? j * heads + h : h * d + j)] = q.typed_data()[(r * heads + h) * d + order[j]];

  // tasks: each row's visible range, in parts of at least kMinPart slots, at most one per thread
  struct Task {
    int64_t row, t0, t1;
  };
  std::vector<Task> tasks;
  const int64_t threads = pool_threads(pool);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t0 = std::max<int64_t>(lo.typed_data()[r], 0), t1 = std::min<int64_t>(hi.typed_data()[r], n);
    const int64_t parts = std::clamp<int64_t>((t1 - t0) / kMinPart, 1, threads);
    for (int64_t p = 0; p < parts; ++p)
      tasks.push_back({r, t0 + (t1 - t0) * p / parts, t0 + (t1 - t0) * (p + 1) / parts});
  }
  std::vector<std::vector<Cand>> found(tasks.size());
  run_tasks(pool, int64_t(tasks.size()), [&](int64_t i) {
    const Task& t = tasks[i];
    const Keys seq{static_cast<const char*>(keys.untyped_data()) + t.row / s * n * bytes,
                   static_cast<const uint8_t*>(scales.untyped_data()) + t.row / s * n * scale_bytes, bytes,
                   scale_bytes};
    const float* qr = qp.data() + t.row * heads * d;
    const float* wr = w.typed_data() + t.row * heads;
    std::vector<Cand>& cand = found[i];
    cand.reserve(4 * k + 64);
    const int hd = int(heads), di = int(d);
    std::vector<Fp4Filter> filters(fmt == kFP4 && heads <= kMaxFilterHeads ? heads : 0);  // the row's heads'
    bool filtered = !filters.empty();  // filters, if every head has one
    for (int64_t h = 0; h < int64_t(filters.size()) && filtered; ++h)
      filtered = make_filter(q.typed_data() + (t.row * heads + h) * d, int(d), filters[h]);
    const Fp4Filter* flt = filtered ? filters.data() : nullptr;
    switch (fmt) {
      case kF32: topk_row<kF32>(seq, qr, wr, hd, di, t.t0, t.t1, k, bf16_scores, nullptr, cand); break;
      case kBF16: topk_row<kBF16>(seq, qr, wr, hd, di, t.t0, t.t1, k, bf16_scores, nullptr, cand); break;
      case kFP8: topk_row<kFP8>(seq, qr, wr, hd, di, t.t0, t.t1, k, bf16_scores, nullptr, cand); break;
      default: topk_row<kFP4>(seq, qr, wr, hd, di, t.t0, t.t1, k, bf16_scores, flt, cand);
    }
  });

  // each row's best k over its parts: the union of the parts' best k holds it
  std::vector<Cand> cand;
  for (int64_t r = 0, i = 0; r < rows; ++r) {
    cand.clear();
    for (; i < int64_t(tasks.size()) && tasks[i].row == r; ++i)
      cand.insert(cand.end(), found[i].begin(), found[i].end());
    best_first(cand, k);
    int32_t* os = out_slots->typed_data() + r * k;
    float* oc = out_scores->typed_data() + r * k;
    for (int64_t j = 0; j < k; ++j) {
      const bool some = j < int64_t(cand.size()) && cand[j].score > -INFINITY;  // -inf picks nothing, as the
      os[j] = some ? cand[j].slot : -1;                                         // reference's
      oc[j] = j < int64_t(cand.size()) ? cand[j].score : -INFINITY;
    }
  }
  return ffi::Error::Success();
}

// running_topk's merge step (reference.py) for rows r: the best k of [vals[r] | scores[r]], the running top k
// (sorted, best first) at positions 0 .. k - 1 and a span's scores of slots start .. start + m - 1 after them, in
// XLA's top_k order (total order, equal values lower position first: a running entry before a span slot) ->
// their values and slots (the running entries' idx, or the span's slot). Exact: only span scores that beat the
// running k-th (8 compares per instruction) can enter, and they are merged into the running list.
ffi::Error TopkMergeImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> vals, ffi::Buffer<ffi::S32> idx,
                         ffi::Buffer<ffi::F32> scores, ffi::Buffer<ffi::S32> start,
                         ffi::ResultBuffer<ffi::F32> out_vals, ffi::ResultBuffer<ffi::S32> out_idx) {
  auto vd = vals.dimensions();
  auto sd = scores.dimensions();
  if (vd.size() != 2 || sd.size() != 2 || vd[0] != sd[0] || idx.dimensions()[1] != vd[1])
    return ffi::Error::InvalidArgument("topk_merge: vals and idx must be [rows, k], scores [rows, m]");
  const int64_t rows = vd[0], k = vd[1], m = sd[1];
  const int32_t slot0 = start.typed_data()[0];
  const int64_t parts = std::min<int64_t>(rows, 4 * pool_threads(pool));
  run_tasks(pool, parts, [&](int64_t p) {
    std::vector<Cand> cand;
    for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
      const float* v = vals.typed_data() + r * k;
      const int32_t* ix = idx.typed_data() + r * k;
      const float* sc = scores.typed_data() + r * m;
      int32_t thr = order_key(v[k - 1]);  // a span slot must beat it; once `cand` was pruned to its best k,
      cand.clear();                         // its k-th too (a later slot with an equal score ranks below)
      auto keep = [&](int64_t g) {
        cand.push_back({order_key(sc[g]), int32_t(slot0 + g), sc[g]});
        if (int64_t(cand.size()) >= 4 * k + 64) {
          std::nth_element(cand.begin(), cand.begin() + (k - 1), cand.end(), better);
          cand.resize(k);
          thr = cand[k - 1].key;  // above the running k-th, as every candidate
        }
      };
      int64_t j = 0;
      for (; j + 8 <= m; j += 8) {
        for (int mask = beats8(sc + j, thr); mask; mask &= mask - 1) {
          const int64_t g = j + __builtin_ctz(mask);
          if (order_key(sc[g]) > thr) keep(g);
        }
      }
      for (; j < m; ++j)
        if (order_key(sc[j]) > thr) keep(j);
      best_first(cand, k);
      float* ov = out_vals->typed_data() + r * k;
      int32_t* oi = out_idx->typed_data() + r * k;
      int64_t a = 0, c = 0;  // next running entry, next candidate
      for (int64_t o = 0; o < k; ++o) {
        if (c < int64_t(cand.size()) && cand[c].key > order_key(v[a])) {
          ov[o] = cand[c].score, oi[o] = cand[c].slot, ++c;
        } else {
          ov[o] = v[a], oi[o] = ix[a], ++a;
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(V4jaxIndexerTopk, IndexerTopkImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("fmt")
                                  .Attr<bool>("bf16_scores"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(V4jaxTopkMerge, TopkMergeImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S32>>());
