// Attention of a few query rows (a decode step) over their window rows and some stored compressed entries, with
// the sink, on x86-64 CPUs with AVX2 + FMA, as an XLA FFI custom call (built by kernels/cpu_ffi.py). The math is
// reference.py's sparse_attention over keys = [kv[idx[b, s, :]] ; the stored entries the row sees], which are
// either a range of slots, entries[b, lo[b, s] .. hi[b, s] - 1] (an HCA layer, CSA's dense phase), or a list of
// slots, entries[b, picks[b, s, :]] (CSA's top-k; -1 = unused):
//
//     z_k = scale * q . key_k,   o = sum_k exp(z_k - m) key_k / (sum_k exp(z_k - m) + exp(sink - m)),
//     lse = m + log(sum_k exp(z_k - m) + exp(sink - m))
//
// What it adds over the reference in a cached step: each stored entry it attends is read once, in its stored
// format, and decoded into a block buffer that stays in L1 (XLA:CPU decodes the whole filled prefix, or the picked
// rows, to memory, copies them after the window rows and gathers them again for the score dot); the softmax is
// taken online, block by block (a running max rescales the sums), so nothing is read twice; a long range or list is
// split over XLA's intra-op threads and the partial sums merged. Where the compute dtype is bf16, keys are rounded
// to it as the reference decodes them, and so are the probabilities that weight the values; the rounding then
// happens relative to the running max, not the final one, and exp is glibc's, not XLA's: outputs agree with the
// reference to rounding (tests/kernels/test_sparse_attention_cpu.py), not bit for bit.
//
// Entry formats (cpu_kernel.py's F32 .. FP8): 0 fp32 [b, n, d]; 1 bf16 [b, n, d]; 2 Fp8Entries: the first dn dims
// as e4m3 bytes [b, n, dn] with one UE8M0 scale byte per 64 [b, n, >= dn / 64], the last d - dn dims bf16
// [b, n, d - dn] (e4m3's NaN codes, which the encoder never writes, decode as 480 here).

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

constexpr int kF32 = 0, kBF16 = 1, kFP8 = 2;
constexpr int kBlock = 8;           // keys decoded and scored together
static_assert(kBlock % 4 == 0, "add_block scores and sums in tiles of 4 keys");
constexpr int kMaxDim = 1024;       // head dim at most
constexpr int64_t kMinPart = 256;  // entries per task at least when a row's entries are split across threads

inline void bf16_to_f32(const uint16_t* src, int n, float* out) {  // n a multiple of 8
  for (int j = 0; j < n; j += 8) {
    const __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j)));
    _mm256_storeu_ps(out + j, _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)));
  }
}

// One sequence's stored entries: entry t's first leaf at a + t * a_bytes, and so on.
struct Entries {
  const char *a, *b, *c;
  int64_t a_bytes, b_bytes, c_bytes;
  int dn;  // FP8: the e4m3 dims
};

template <int Fmt>
inline void decode_entry(const Entries& e, int64_t t, int d, bool round, float* out) {
  if constexpr (Fmt == kF32) {
    std::memcpy(out, e.a + t * e.a_bytes, d * sizeof(float));
    if (round)
      for (int j = 0; j < d; ++j) out[j] = round_bf16(out[j]);
  } else if constexpr (Fmt == kBF16) {
    bf16_to_f32(reinterpret_cast<const uint16_t*>(e.a + t * e.a_bytes), d, out);
  } else {  // e4m3 x 2^k has at most 4 significant bits: exact in bf16, nothing to round
    const uint8_t* codes = reinterpret_cast<const uint8_t*>(e.a + t * e.a_bytes);
    const uint8_t* scales = reinterpret_cast<const uint8_t*>(e.b + t * e.b_bytes);
    for (int j = 0; j < e.dn; j += 32) e4m3_decode32(codes + j, pow2_minus_127(scales[j / 64]), out + j);
    bf16_to_f32(reinterpret_cast<const uint16_t*>(e.c + t * e.c_bytes), d - e.dn, out + e.dn);
  }
}

// z[h * kBlock + j] = scale * q[h] . keys[j] for H heads and the 4 keys from keys (rows of d): 4H accumulators,
// so that a loaded query chunk serves 4 keys and a loaded key chunk H heads (the loop is not load-bound)
template <int H>
inline void score_tile(const float* q, const float* keys, int d, float scale, float* z) {
  __m256 acc[H][4];
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < 4; ++j) acc[h][j] = _mm256_setzero_ps();
  for (int i = 0; i < d; i += 8) {
    __m256 qi[H];
    for (int h = 0; h < H; ++h) qi[h] = _mm256_loadu_ps(q + h * d + i);
    for (int j = 0; j < 4; ++j) {
      const __m256 k = _mm256_loadu_ps(keys + j * d + i);
      for (int h = 0; h < H; ++h) acc[h][j] = _mm256_fmadd_ps(qi[h], k, acc[h][j]);
    }
  }
  for (int h = 0; h < H; ++h) _mm_storeu_ps(z + h * kBlock, _mm_mul_ps(hsum4(acc[h]), _mm_set1_ps(scale)));
}

// acc[h] (rows of d from acc) += sum_j p[h * kBlock + j] keys[j] for H heads and the 4 keys from keys: per 8 dims,
// the H sums stay in registers over the 4 keys (one load and one store per 4 FMAs, not per FMA)
template <int H>
inline void accumulate_tile(float* acc, const float* p, const float* keys, int d) {
  __m256 pv[H][4];
  for (int h = 0; h < H; ++h)
    for (int j = 0; j < 4; ++j) pv[h][j] = _mm256_set1_ps(p[h * kBlock + j]);
  for (int i = 0; i < d; i += 8) {
    __m256 a[H];
    for (int h = 0; h < H; ++h) a[h] = _mm256_loadu_ps(acc + h * d + i);
    for (int j = 0; j < 4; ++j) {
      const __m256 k = _mm256_loadu_ps(keys + j * d + i);
      for (int h = 0; h < H; ++h) a[h] = _mm256_fmadd_ps(pv[h][j], k, a[h]);
    }
    for (int h = 0; h < H; ++h) _mm256_storeu_ps(acc + h * d + i, a[h]);
  }
}

// The online softmax of one query row over some of its keys: per head the running max m, the sum l of
// exp(z - m) and acc = sum of exp(z - m) key (the sink is added when the parts are merged); z and p: one block's
// scores and probabilities, [heads, kBlock].
struct Partial {
  std::vector<float> m, l, acc, z, p;
  Partial(int heads, int d)
      : m(heads, -INFINITY), l(heads, 0.0f), acc(size_t(heads) * d, 0.0f), z(size_t(heads) * kBlock),
        p(size_t(heads) * kBlock, 0.0f) {}
};

// Adds n (<= kBlock) decoded keys buf [kBlock, d] to `part` (rows from n on are read but not used): q [heads, d]
// (fp32), scale, round: the compute dtype is bf16. Scores and sums go in tiles of 2 heads x 4 keys.
void add_block(Partial& part, const float* q, int heads, int d, float scale, bool round, const float* buf, int n) {
  float* z = part.z.data();
  float* p = part.p.data();
  for (int j = 0; j < kBlock; j += 4) {
    int h = 0;
    for (; h + 2 <= heads; h += 2) score_tile<2>(q + h * d, buf + j * d, d, scale, z + h * kBlock + j);
    if (h < heads) score_tile<1>(q + h * d, buf + j * d, d, scale, z + h * kBlock + j);
  }
  for (int h = 0; h < heads; ++h) {
    float top = -INFINITY;
    for (int j = 0; j < n; ++j) top = std::max(top, z[h * kBlock + j]);
    float* acc = part.acc.data() + size_t(h) * d;
    if (top > part.m[h]) {  // a new max: rescale what was summed
      const float alpha = std::exp(part.m[h] - top);
      part.l[h] *= alpha;
      const __m256 a = _mm256_set1_ps(alpha);
      for (int i = 0; i < d; i += 8) _mm256_storeu_ps(acc + i, _mm256_mul_ps(_mm256_loadu_ps(acc + i), a));
      part.m[h] = top;
    }
    for (int j = 0; j < kBlock; ++j) {
      const float pj = j < n ? std::exp(z[h * kBlock + j] - part.m[h]) : 0.0f;
      part.l[h] += pj;
      p[h * kBlock + j] = round ? round_bf16(pj) : pj;
    }
  }
  float* acc = part.acc.data();
  for (int j = 0; j + 4 <= n; j += 4) {
    int h = 0;
    for (; h + 2 <= heads; h += 2) accumulate_tile<2>(acc + size_t(h) * d, p + h * kBlock + j, buf + j * d, d);
    if (h < heads) accumulate_tile<1>(acc + size_t(h) * d, p + h * kBlock + j, buf + j * d, d);
  }
  for (int j = n / 4 * 4; j < n; ++j)  // the keys past the last 4 (a task's last block)
    for (int h = 0; h < heads; ++h) {
      const __m256 pv = _mm256_set1_ps(p[h * kBlock + j]);
      float* a = acc + size_t(h) * d;
      for (int i = 0; i < d; i += 8)
        _mm256_storeu_ps(a + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(buf + j * d + i), _mm256_loadu_ps(a + i)));
    }
}

ffi::Error StoredAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer kv,
                               ffi::Buffer<ffi::S32> idx, ffi::AnyBuffer ent_a, ffi::AnyBuffer ent_b,
                               ffi::AnyBuffer ent_c, ffi::Buffer<ffi::S32> lo, ffi::Buffer<ffi::S32> hi,
                               ffi::Buffer<ffi::S32> picks, ffi::Buffer<ffi::F32> sink,
                               ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse, int64_t fmt,
                               float scale, bool bf16, bool picked) {
  const auto qd = q.dimensions(), kd = kv.dimensions(), id = idx.dimensions(), ad = ent_a.dimensions();
  const auto pd = picks.dimensions();
  if (qd.size() != 4 || kd.size() != 3 || id.size() != 3 || ad.size() != 3 || pd.size() != 3 ||
      (picked && (pd[0] != qd[0] || pd[1] != qd[1])))
    return ffi::Error::InvalidArgument("stored_attention: q [b, s, h, d], kv [b, m, d], idx [b, s, w], entries "
                                       "[b, n, .], picks [b, s, k]");
  const int64_t b = qd[0], s = qd[1], heads = qd[2], d = qd[3], m_rows = kd[1], w = id[2], n = ad[1];
  const int64_t n_picks = picked ? pd[2] : 0;
  const bool kv_bf16 = kv.element_type() == ffi::DataType::BF16;
  if (d % 8 || d > kMaxDim || fmt < kF32 || fmt > kFP8 || (fmt == kFP8 && ad[2] % 64) ||
      (!kv_bf16 && kv.element_type() != ffi::DataType::F32))
    return ffi::Error::InvalidArgument("stored_attention: entry format " + std::to_string(fmt) + ", head dim " +
                                       std::to_string(d) + " or kv dtype not supported");
  const int64_t a_item = fmt == kF32 ? 4 : fmt == kBF16 ? 2 : 1;
  const auto bd = ent_b.dimensions(), cd = ent_c.dimensions();
  const int64_t a_row = ad[2] * a_item, b_row = fmt == kFP8 ? bd[2] : 0, c_row = fmt == kFP8 ? cd[2] * 2 : 0;

  // a task: row `row`'s entries [t0, t1) (slots of the range, or positions in its picks), its window keys too
  struct Task {
    int64_t row, t0, t1;
    bool window;
  };
  std::vector<Task> tasks;
  const int64_t threads = pool_threads(pool);
  for (int64_t r = 0; r < b * s; ++r) {
    const int64_t t0 = picked ? 0 : std::max<int64_t>(lo.typed_data()[r], 0);
    const int64_t t1 = picked ? n_picks : std::max(t0, std::min<int64_t>(hi.typed_data()[r], n));
    const int64_t parts = std::clamp<int64_t>((t1 - t0) / kMinPart, 1, threads);
    for (int64_t p = 0; p < parts; ++p)
      tasks.push_back({r, t0 + (t1 - t0) * p / parts, t0 + (t1 - t0) * (p + 1) / parts, p == 0});
  }
  std::vector<Partial> partial(tasks.size(), Partial(int(heads), int(d)));
  run_tasks(pool, int64_t(tasks.size()), [&](int64_t i) {
    const Task& task = tasks[i];
    const int64_t bi = task.row / s;
    const Entries e{static_cast<const char*>(ent_a.untyped_data()) + bi * n * a_row,
                    static_cast<const char*>(ent_b.untyped_data()) + bi * n * b_row,
                    static_cast<const char*>(ent_c.untyped_data()) + bi * n * c_row,
                    a_row, b_row, c_row, fmt == kFP8 ? int(ad[2]) : 0};
    const float* qr = q.typed_data() + task.row * heads * d;
    std::vector<float> buf(size_t(kBlock) * d);
    int filled = 0;
    auto flush = [&] {
      if (filled) add_block(partial[i], qr, int(heads), int(d), scale, bf16, buf.data(), filled);
      filled = 0;
    };
    if (task.window) {  // window rows of kv, in the compute dtype already
      const int32_t* ir = idx.typed_data() + task.row * w;
      for (int64_t j = 0; j < w; ++j) {
        if (ir[j] < 0 || ir[j] >= m_rows) continue;
        float* out_row = buf.data() + size_t(filled) * d;
        const int64_t at = bi * m_rows + ir[j];
        if (kv_bf16)
          bf16_to_f32(static_cast<const uint16_t*>(kv.untyped_data()) + at * d, int(d), out_row);
        else
          std::memcpy(out_row, static_cast<const float*>(kv.untyped_data()) + at * d, d * sizeof(float));
        if (++filled == kBlock) flush();
      }
    }
    const int32_t* pr = picks.typed_data() + task.row * n_picks;
    for (int64_t j = task.t0; j < task.t1; ++j) {
      const int64_t t = picked ? pr[j] : j;
      if (picked && (t < 0 || t >= n)) continue;
      float* out_row = buf.data() + size_t(filled) * d;
      switch (fmt) {
        case kF32: decode_entry<kF32>(e, t, int(d), bf16, out_row); break;
        case kBF16: decode_entry<kBF16>(e, t, int(d), bf16, out_row); break;
        default: decode_entry<kFP8>(e, t, int(d), bf16, out_row);
      }
      if (++filled == kBlock) flush();
    }
    flush();
  });

  // each row: its parts merged, the sink added to the denominator
  for (int64_t r = 0, i = 0; r < b * s; ++r) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t first = i;
      float m = sink.typed_data()[h];
      for (int64_t j = first; j < int64_t(tasks.size()) && tasks[j].row == r; ++j) m = std::max(m, partial[j].m[h]);
      float l = std::exp(sink.typed_data()[h] - m);
      float* o = out->typed_data() + (r * heads + h) * d;
      std::fill(o, o + d, 0.0f);
      for (int64_t j = first; j < int64_t(tasks.size()) && tasks[j].row == r; ++j) {
        if (partial[j].l[h] == 0.0f) continue;  // no keys
        const float alpha = std::exp(partial[j].m[h] - m);
        l += partial[j].l[h] * alpha;
        const float* acc = partial[j].acc.data() + h * d;
        for (int64_t k = 0; k < d; ++k) o[k] += acc[k] * alpha;
      }
      for (int64_t k = 0; k < d; ++k) o[k] /= l;
      lse->typed_data()[r * heads + h] = m + std::log(l);
    }
    while (i < int64_t(tasks.size()) && tasks[i].row == r) ++i;
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(V4jaxStoredAttention, StoredAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("fmt")
                                  .Attr<float>("scale")
                                  .Attr<bool>("bf16")
                                  .Attr<bool>("picked"));
