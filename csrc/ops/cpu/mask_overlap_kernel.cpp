// CPU kernel of nad::mask_overlap.
//
// 1. Each row is bit-packed per layer into 64-bit words; every layer starts on a word boundary
//    (layers never share a word). Words are stored word-major, (word, row), so that the inner
//    loop over rows of b reads consecutive memory. The per-row, per-layer set sizes come out of
//    the packing.
// 2. Intersections are AND + popcount over a layer's words. The output is cut into tiles of
//    kTileA x kTileB pairs (one at::parallel_for task each); inside a tile, layer by layer, the
//    layer's words of the tile's rows of b stay in L1 while every row of a passes over them.
// 3. The metric is computed per layer from the counts and either written to (L, Ta, Tb) or
//    summed into the (Ta, Tb) output tile while it is in cache: no per-layer matrices.
//
// Popcount: the build has no -march flag, so the counting and the tile loop exist three times
// (AVX2 byte-table popcount on 8 rows of b at once, scalar POPCNT, portable bit tricks) and are
// picked at run time with __builtin_cpu_supports. NAD_EXT_PORTABLE_POPCOUNT=1 forces the
// portable one (the tests use it to check it against the others).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../mask_overlap.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define NAD_X86_DISPATCH 1
#define NAD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define NAD_X86_DISPATCH 0
#define NAD_ALWAYS_INLINE inline
#endif

namespace nad {
namespace cpu {
namespace {

// Tile of the output: 64 rows of a x 256 rows of b. One layer of a b tile is W * 2 KiB (16 KiB
// for VGG's 512-channel layers, L1-resident); the (64 x 256) float output tile is 64 KiB (L2).
constexpr int64_t kTileA = 64;
constexpr int64_t kTileB = 256;

inline int32_t popcount_portable(uint64_t x) {
  x = x - ((x >> 1) & 0x5555555555555555ULL);
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
  return static_cast<int32_t>((x * 0x0101010101010101ULL) >> 56);
}

struct Packed {
  std::vector<uint64_t> words;  // (W_total, T): word w of layer l of row r at (word_off[l] + w) * T + r
  std::vector<int32_t> sizes;   // (L, T): open channels of row r at layer l
};

Packed pack_rows(const at::Tensor& m, const std::vector<int64_t>& chan_off,
                 const std::vector<int64_t>& word_off) {
  const int64_t T = m.size(0), K = m.size(1), L = static_cast<int64_t>(chan_off.size()) - 1;
  Packed p;
  p.words.resize(word_off[L] * T);
  p.sizes.resize(L * T);
  const auto* src = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
  at::parallel_for(0, T, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* row = src + r * K;
      for (int64_t l = 0; l < L; ++l) {
        const int64_t c0 = chan_off[l], C = chan_off[l + 1] - c0;
        int32_t count = 0;
        for (int64_t w = 0; w * 64 < C; ++w) {
          const uint8_t* bytes = row + c0 + 64 * w;
          const int64_t n = std::min<int64_t>(64, C - 64 * w);
          uint64_t word = 0;
          int64_t c = 0;
          for (; c + 8 <= n; c += 8) {
            // Eight 0/1 bytes -> eight bits: the multiply moves byte k's low bit to bit 56 + k.
            uint64_t x;
            std::memcpy(&x, bytes + c, 8);
            word |= (((x & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56) << c;
          }
          for (; c < n; ++c) word |= static_cast<uint64_t>(bytes[c] & 1) << c;
          p.words[(word_off[l] + w) * T + r] = word;
          count += popcount_portable(word);
        }
        p.sizes[l * T + r] = count;
      }
    }
  });
  return p;
}

struct Problem {
  const uint64_t* pa;  // packed a, (W_total, Ta)
  const uint64_t* pb;  // packed b, (W_total, Tb)
  const int32_t* sa;   // (L, Ta)
  const int32_t* sb;   // (L, Tb)
  const int64_t* word_off;
  int64_t L, Ta, Tb;
  bool per_layer;
  float* out;          // (L, Ta, Tb) or (Ta, Tb), the latter zeroed
};

enum class Isa { kPortable, kPopcnt, kAvx2 };

// cnt[j] = |a_row & b row j| of one layer for the nj rows of b at bl (stride Tb between words).
// Called once per (row of a, layer); not inlined, so each keeps its own target attribute.
void count_portable(const uint64_t* __restrict a_words, const uint64_t* __restrict bl, int64_t W,
                    int64_t Tb, int64_t nj, int32_t* __restrict cnt) {
  for (int64_t j = 0; j < nj; ++j) {
    int32_t c = 0;
    for (int64_t w = 0; w < W; ++w) c += popcount_portable(a_words[w] & bl[w * Tb + j]);
    cnt[j] = c;
  }
}

#if NAD_X86_DISPATCH
__attribute__((target("popcnt"))) void count_popcnt(const uint64_t* __restrict a_words,
                                                    const uint64_t* __restrict bl, int64_t W,
                                                    int64_t Tb, int64_t nj,
                                                    int32_t* __restrict cnt) {
  for (int64_t j = 0; j < nj; ++j) {
    int32_t c = 0;
    for (int64_t w = 0; w < W; ++w) c += __builtin_popcountll(a_words[w] & bl[w * Tb + j]);
    cnt[j] = c;
  }
}

__attribute__((target("avx2"))) NAD_ALWAYS_INLINE __m256i popcount_bytes(__m256i v, __m256i lut,
                                                                         __m256i low) {
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, low)),
                         _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), low)));
}

// Eight rows of b at a time (two vectors of four words: the word-major layout makes them one
// load each). Popcount per byte by two 4-bit table lookups (vpshufb, Mula et al.), summed as
// bytes over up to 31 words (31 x 8 < 256), then per 64-bit lane by vpsadbw.
__attribute__((target("avx2,popcnt"))) void count_avx2(const uint64_t* __restrict a_words,
                                                       const uint64_t* __restrict bl, int64_t W,
                                                       int64_t Tb, int64_t nj,
                                                       int32_t* __restrict cnt) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i low = _mm256_set1_epi8(0x0f);
  const __m256i zero = _mm256_setzero_si256();
  const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
  int64_t j = 0;
  for (; j + 8 <= nj; j += 8) {
    __m256i tot0 = zero, tot1 = zero;
    for (int64_t w0 = 0; w0 < W; w0 += 31) {
      const int64_t w1 = std::min<int64_t>(W, w0 + 31);
      __m256i acc0 = zero, acc1 = zero;
      for (int64_t w = w0; w < w1; ++w) {
        const __m256i av = _mm256_set1_epi64x(static_cast<long long>(a_words[w]));
        const auto* bw = reinterpret_cast<const __m256i*>(bl + w * Tb + j);
        acc0 = _mm256_add_epi8(acc0, popcount_bytes(_mm256_and_si256(av, _mm256_loadu_si256(bw)), lut, low));
        acc1 = _mm256_add_epi8(acc1, popcount_bytes(_mm256_and_si256(av, _mm256_loadu_si256(bw + 1)), lut, low));
      }
      tot0 = _mm256_add_epi64(tot0, _mm256_sad_epu8(acc0, zero));
      tot1 = _mm256_add_epi64(tot1, _mm256_sad_epu8(acc1, zero));
    }
    // Rows j..j+3 are in tot0's 64-bit lanes, j+4..j+7 in tot1's: interleave the low halves,
    // then put them in order.
    const __m256i both = _mm256_blend_epi32(tot0, _mm256_slli_epi64(tot1, 32), 0xAA);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(cnt + j),
                        _mm256_permutevar8x32_epi32(both, order));
  }
  for (; j < nj; ++j) {
    int32_t c = 0;
    for (int64_t w = 0; w < W; ++w) c += __builtin_popcountll(a_words[w] & bl[w * Tb + j]);
    cnt[j] = c;
  }
}
#endif

// One output tile. Inlined into each target-specific wrapper below, so that the metric loops
// are vectorised for that target.
template <OverlapMetric M, Isa kIsa>
NAD_ALWAYS_INLINE void overlap_tile(const Problem& p, int64_t i0, int64_t i1, int64_t j0,
                                    int64_t j1, int32_t* __restrict cnt,
                                    uint64_t* __restrict a_words) {
  const int64_t nj = j1 - j0;
  for (int64_t l = 0; l < p.L; ++l) {
    const int64_t W = p.word_off[l + 1] - p.word_off[l];
    const uint64_t* __restrict al = p.pa + p.word_off[l] * p.Ta;
    const uint64_t* __restrict bl = p.pb + p.word_off[l] * p.Tb + j0;
    const int32_t* __restrict sbl = p.sb + l * p.Tb + j0;
    for (int64_t i = i0; i < i1; ++i) {
      for (int64_t w = 0; w < W; ++w) a_words[w] = al[w * p.Ta + i];
#if NAD_X86_DISPATCH
      if constexpr (kIsa == Isa::kAvx2) {
        count_avx2(a_words, bl, W, p.Tb, nj, cnt);
      } else if constexpr (kIsa == Isa::kPopcnt) {
        count_popcnt(a_words, bl, W, p.Tb, nj, cnt);
      } else {
        count_portable(a_words, bl, W, p.Tb, nj, cnt);
      }
#else
      count_portable(a_words, bl, W, p.Tb, nj, cnt);
#endif
      const int32_t sai = p.sa[l * p.Ta + i];
      if (p.per_layer) {
        float* __restrict o = p.out + (l * p.Ta + i) * p.Tb + j0;
        for (int64_t j = 0; j < nj; ++j) o[j] = overlap_value<M>(cnt[j], sai, sbl[j]);
      } else {
        float* __restrict o = p.out + i * p.Tb + j0;
        for (int64_t j = 0; j < nj; ++j) o[j] += overlap_value<M>(cnt[j], sai, sbl[j]);
      }
    }
  }
  if (!p.per_layer) {
    const float L = static_cast<float>(p.L);
    for (int64_t i = i0; i < i1; ++i) {
      float* __restrict o = p.out + i * p.Tb + j0;
      for (int64_t j = 0; j < nj; ++j) o[j] /= L;
    }
  }
}

using TileFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, int32_t*, uint64_t*);

template <OverlapMetric M>
void tile_portable(const Problem& p, int64_t i0, int64_t i1, int64_t j0, int64_t j1, int32_t* cnt,
                   uint64_t* a_words) {
  overlap_tile<M, Isa::kPortable>(p, i0, i1, j0, j1, cnt, a_words);
}

#if NAD_X86_DISPATCH
template <OverlapMetric M>
__attribute__((target("popcnt"))) void tile_popcnt(const Problem& p, int64_t i0, int64_t i1,
                                                   int64_t j0, int64_t j1, int32_t* cnt,
                                                   uint64_t* a_words) {
  overlap_tile<M, Isa::kPopcnt>(p, i0, i1, j0, j1, cnt, a_words);
}

template <OverlapMetric M>
__attribute__((target("avx2,popcnt"))) void tile_avx2(const Problem& p, int64_t i0, int64_t i1,
                                                      int64_t j0, int64_t j1, int32_t* cnt,
                                                      uint64_t* a_words) {
  overlap_tile<M, Isa::kAvx2>(p, i0, i1, j0, j1, cnt, a_words);
}
#endif

Isa detect_isa() {
  const char* force = std::getenv("NAD_EXT_PORTABLE_POPCOUNT");
  if (force != nullptr && force[0] != '\0' && std::strcmp(force, "0") != 0) return Isa::kPortable;
#if NAD_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("popcnt")) {
    return __builtin_cpu_supports("avx2") ? Isa::kAvx2 : Isa::kPopcnt;
  }
#endif
  return Isa::kPortable;
}

template <OverlapMetric M>
TileFn pick_tile_fn() {
  static const Isa isa = detect_isa();
#if NAD_X86_DISPATCH
  if (isa == Isa::kAvx2) return &tile_avx2<M>;
  if (isa == Isa::kPopcnt) return &tile_popcnt<M>;
#endif
  (void)isa;
  return &tile_portable<M>;
}

}  // namespace

at::Tensor mask_overlap(const at::Tensor& a_in, const at::Tensor& b_in,
                        at::IntArrayRef layer_sizes, c10::string_view metric, bool per_layer) {
  const OverlapMetric kind = check_mask_overlap_args(a_in, b_in, layer_sizes, metric);
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const int64_t L = static_cast<int64_t>(layer_sizes.size()), Ta = a.size(0), Tb = b.size(0);
  auto out = per_layer ? at::empty({L, Ta, Tb}, a.options().dtype(at::kFloat))
                       : at::zeros({Ta, Tb}, a.options().dtype(at::kFloat));
  if (Ta == 0 || Tb == 0) return out;

  std::vector<int64_t> chan_off(L + 1, 0), word_off(L + 1, 0);
  int64_t max_words = 0;
  for (int64_t l = 0; l < L; ++l) {
    const int64_t W = (layer_sizes[l] + 63) / 64;
    chan_off[l + 1] = chan_off[l] + layer_sizes[l];
    word_off[l + 1] = word_off[l] + W;
    max_words = std::max(max_words, W);
  }
  const Packed pa = pack_rows(a, chan_off, word_off);
  const Packed pb = pack_rows(b, chan_off, word_off);
  const Problem prob{pa.words.data(), pb.words.data(), pa.sizes.data(), pb.sizes.data(),
                     word_off.data(), L, Ta, Tb, per_layer, out.data_ptr<float>()};

  TileFn tile = nullptr;
  switch (kind) {
    case OverlapMetric::kIoU: tile = pick_tile_fn<OverlapMetric::kIoU>(); break;
    case OverlapMetric::kIoMin: tile = pick_tile_fn<OverlapMetric::kIoMin>(); break;
    case OverlapMetric::kIntersection: tile = pick_tile_fn<OverlapMetric::kIntersection>(); break;
  }
  const int64_t tiles_a = (Ta + kTileA - 1) / kTileA, tiles_b = (Tb + kTileB - 1) / kTileB;
  at::parallel_for(0, tiles_a * tiles_b, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int32_t> cnt(kTileB);
    std::vector<uint64_t> a_words(max_words);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t i0 = (t / tiles_b) * kTileA, j0 = (t % tiles_b) * kTileB;
      tile(prob, i0, std::min(i0 + kTileA, Ta), j0, std::min(j0 + kTileB, Tb), cnt.data(),
           a_words.data());
    }
  });
  return out;
}

}  // namespace cpu
}  // namespace nad

TORCH_LIBRARY_IMPL(nad, CPU, m) { m.impl("mask_overlap", &nad::cpu::mask_overlap); }
