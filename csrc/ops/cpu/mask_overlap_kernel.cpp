// CPU kernel of nad::mask_overlap.
//
// The work is Ta x Tb x (K / 64) AND + popcounts of 64-bit words (VGG16 at T = 1000: 66 M) and
// one metric value per pair and layer, so the kernel is built to run the popcounts at the
// vector units' throughput and to keep the per-(pair, layer) work small and out of their way.
//
// AVX2 path (x86-64 CPUs with AVX2, picked at run time):
// 1. Packing. Each row is bit-packed per layer into 64-bit words, every layer starting on a word
//    (padding bits are 0, so partial words need no masking later), and each word is stored split
//    into its nibbles, w & 0x0f.. and (w >> 4) & 0x0f..: the nibbles of a & b are then
//    a_lo & b_lo and a_hi & b_hi, ready as vpshufb table indices, and 4 word-pairs cost
//    2 AND + 2 lookups + 2 byte adds. Rows go into panels: 4 rows of a, stored (word, row, lo/hi)
//    to be broadcast; 8 rows of b, stored per word as 4 vectors (lo of rows 0,1,4,5 | lo of
//    2,3,6,7 | hi of 0,1,4,5 | hi of 2,3,6,7), an order in which one shuffle turns the two
//    vectors' per-lane counts into rows 0..7. The last panel is padded with empty rows, which are
//    computed and never stored.
// 2. Blocks. A 4 x 8 block of pairs (a panel x b panel) goes through all layers in one call: per
//    layer, 8 byte accumulators stay in registers over the layer's words (31 at most per pass, so
//    that bytes cannot overflow: 8 x 31 < 256), then are reduced (vpsadbw) to 32 int32 counts in
//    an L1 buffer. The word loop is inline assembly: it needs all 16 ymm registers (8
//    accumulators, 4 vectors of b, the table, 2 broadcasts of a, 1 temporary), and GCC spilled
//    accumulators to the stack in every intrinsics version tried. The metric of all layers runs
//    after the last one, 8 pairs per vector: done after each layer instead, its divisions (long
//    latency, a single divider) held up the next layer's word loop. The division is a true one,
//    so values are bit-identical to overlap_value; the mean is summed over the layers in order
//    and divided by L, as in the scalar paths. The output is written once, never read back.
// 3. Threads. Blocks are grouped into tiles of 64 x 64 pairs, handed out one at a time to
//    PyTorch's intra-op threads (parallel_workers, which says why it is not at::parallel_for). In
//    a tile an a panel (W x 64 bytes) stays in L1 while the tile's b panels (W x 128 bytes, L2)
//    pass it, so that the output is written along its rows.
//
// Scalar paths (x86 without AVX2: POPCNT; other CPUs, or NAD_EXT_PORTABLE_POPCOUNT=1: portable
// bit tricks): words stored word-major, (word, row), tiles of kTileA x kTileB pairs, layer by
// layer with the metric summed into the output tile. They sum the layers in the same order and
// divide the same way, so every path gives bit-identical results (the tests check). The build
// has no -march flag; the ISA is picked once with __builtin_cpu_supports.
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

#include "../mask_overlap.h"
#include "../registration.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#define NAD_X86_DISPATCH 1
#define NAD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define NAD_X86_DISPATCH 0
#define NAD_ALWAYS_INLINE inline
#endif

// The AVX2 kernel's inline assembly needs the 16 ymm registers of x86-64.
#if NAD_X86_DISPATCH && defined(__x86_64__)
#define NAD_AVX2_KERNEL 1
#else
#define NAD_AVX2_KERNEL 0
#endif

namespace nad {
namespace cpu {
namespace {

enum class Isa { kPortable, kPopcnt, kAvx2 };

// Runs worker(next) on each of PyTorch's intra-op threads (at most n of them); the workers share
// tasks [0, n) by taking `next++` until it reaches n, so a thread that runs slower (a busy shared
// machine) just takes fewer tasks.
// Why not at::parallel_for directly: it is a header template whose OpenMP region exists only in
// files compiled with -fopenmp; in a build without it (as this extension's was) it runs the whole
// range on the calling thread. TensorIterator::for_each is compiled into libtorch, so its
// at::parallel_for spreads the range [0, workers) over the intra-op threads with either build.
template <typename F>
void parallel_workers(int64_t n, const F& worker) {
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(n, at::get_num_threads());
  if (workers <= 1) {
    worker(next);
    return;
  }
  // One element per worker; only the count matters, the values are never read.
  const at::Tensor slots = at::empty({workers}, at::TensorOptions().dtype(at::kLong));
  at::TensorIterator iter = at::TensorIteratorConfig().add_const_input(slots).build();
  iter.for_each(
      [&](char**, const int64_t*, int64_t size0, int64_t size1) {
        for (int64_t k = 0; k < size0 * size1; ++k) worker(next);
      },
      /*grain_size=*/1);
}

inline int32_t popcount_portable(uint64_t x) {
  x = x - ((x >> 1) & 0x5555555555555555ULL);
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
  return static_cast<int32_t>((x * 0x0101010101010101ULL) >> 56);
}

// Bits of n <= 64 bool bytes (0 or 1) into one word, channel c at bit c.
inline uint64_t pack_word_portable(const uint8_t* bytes, int64_t n) {
  uint64_t word = 0;
  int64_t c = 0;
  for (; c + 8 <= n; c += 8) {
    // Eight 0/1 bytes -> eight bits: the multiply moves byte k's low bit to bit 56 + k.
    uint64_t x;
    std::memcpy(&x, bytes + c, 8);
    word |= (((x & 0x0101010101010101ULL) * 0x0102040810204080ULL) >> 56) << c;
  }
  for (; c < n; ++c) word |= static_cast<uint64_t>(bytes[c] & 1) << c;
  return word;
}

struct Layout {
  std::vector<int64_t> chan_off;  // (L + 1): first channel of each layer
  std::vector<int64_t> word_off;  // (L + 1): first word of each layer
  int64_t L = 0, W = 0, max_words = 0;
};

Layout make_layout(at::IntArrayRef layer_sizes) {
  Layout g;
  g.L = static_cast<int64_t>(layer_sizes.size());
  g.chan_off.assign(g.L + 1, 0);
  g.word_off.assign(g.L + 1, 0);
  for (int64_t l = 0; l < g.L; ++l) {
    const int64_t W = (layer_sizes[l] + 63) / 64;
    g.chan_off[l + 1] = g.chan_off[l] + layer_sizes[l];
    g.word_off[l + 1] = g.word_off[l] + W;
    g.max_words = std::max(g.max_words, W);
  }
  g.W = g.word_off[g.L];
  return g;
}

// ---------------------------------------------------------------------------------------------
// Scalar paths (portable, POPCNT)
// ---------------------------------------------------------------------------------------------

// Tile of the output: 64 rows of a x 256 rows of b. One layer of a b tile is W * 2 KiB (16 KiB
// for VGG's 512-channel layers, L1-resident); the (64 x 256) float output tile is 64 KiB (L2).
constexpr int64_t kTileA = 64;
constexpr int64_t kTileB = 256;

struct Packed {
  // (W_total, T): word w of layer l of row r at (word_off[l] + w) * T + r
  std::vector<uint64_t> words;
  std::vector<int32_t> sizes;   // (L, T): open channels of row r at layer l
};

Packed pack_rows(const at::Tensor& m, const Layout& g) {
  const int64_t T = m.size(0), K = m.size(1), L = g.L;
  Packed p;
  p.words.resize(g.W * T);
  p.sizes.resize(L * T);
  const auto* src = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
  constexpr int64_t kRows = 16;  // rows per task
  const int64_t tasks = (T + kRows - 1) / kRows;
  parallel_workers(tasks, [&](std::atomic<int64_t>& next) {
    for (int64_t task = next++; task < tasks; task = next++) {
      for (int64_t r = task * kRows; r < std::min(T, (task + 1) * kRows); ++r) {
        const uint8_t* row = src + r * K;
        for (int64_t l = 0; l < L; ++l) {
          const int64_t c0 = g.chan_off[l], C = g.chan_off[l + 1] - c0;
          int32_t count = 0;
          for (int64_t w = 0; w * 64 < C; ++w) {
            const uint64_t word =
                pack_word_portable(row + c0 + 64 * w, std::min<int64_t>(64, C - 64 * w));
            p.words[(g.word_off[l] + w) * T + r] = word;
            count += popcount_portable(word);
          }
          p.sizes[l * T + r] = count;
        }
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
      if constexpr (kIsa == Isa::kPopcnt) {
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
#endif

template <OverlapMetric M>
TileFn pick_tile_fn(Isa isa) {
#if NAD_X86_DISPATCH
  if (isa == Isa::kPopcnt) return &tile_popcnt<M>;
#endif
  (void)isa;
  return &tile_portable<M>;
}

void mask_overlap_scalar(const at::Tensor& a, const at::Tensor& b, const Layout& g,
                         OverlapMetric kind, bool per_layer, Isa isa, at::Tensor& out) {
  const int64_t Ta = a.size(0), Tb = b.size(0);
  if (!per_layer) out.zero_();
  const Packed pa = pack_rows(a, g);
  const Packed pb = pack_rows(b, g);
  const Problem prob{pa.words.data(), pb.words.data(), pa.sizes.data(), pb.sizes.data(),
                     g.word_off.data(), g.L, Ta, Tb, per_layer, out.data_ptr<float>()};
  TileFn tile = nullptr;
  switch (kind) {
    case OverlapMetric::kIoU: tile = pick_tile_fn<OverlapMetric::kIoU>(isa); break;
    case OverlapMetric::kIoMin: tile = pick_tile_fn<OverlapMetric::kIoMin>(isa); break;
    case OverlapMetric::kIntersection:
      tile = pick_tile_fn<OverlapMetric::kIntersection>(isa);
      break;
  }
  const int64_t tiles_a = (Ta + kTileA - 1) / kTileA, tiles_b = (Tb + kTileB - 1) / kTileB;
  const int64_t tiles = tiles_a * tiles_b;
  parallel_workers(tiles, [&](std::atomic<int64_t>& next) {
    std::vector<int32_t> cnt(kTileB);
    std::vector<uint64_t> a_words(g.max_words);
    for (int64_t t = next++; t < tiles; t = next++) {
      const int64_t i0 = (t / tiles_b) * kTileA, j0 = (t % tiles_b) * kTileB;
      tile(prob, i0, std::min(i0 + kTileA, Ta), j0, std::min(j0 + kTileB, Tb), cnt.data(),
           a_words.data());
    }
  });
}

// ---------------------------------------------------------------------------------------------
// AVX2 path
// ---------------------------------------------------------------------------------------------
#if NAD_AVX2_KERNEL

constexpr int64_t kPanelA = 4;  // rows of a per panel (block height)
constexpr int64_t kPanelB = 8;  // rows of b per panel (block width: two vectors of 4 lanes)
constexpr int64_t kMaxPass = 31;  // words per byte-accumulator pass: 31 x 8 < 256

struct Panels {
  at::Tensor words;              // int64, 64-byte aligned: per panel W x P x 2 words
  std::vector<int32_t> sizes;    // (panels, L, P): open channels of each row at each layer
  int64_t panels = 0;
};

__attribute__((target("avx2"))) NAD_ALWAYS_INLINE uint64_t pack_word_avx2(const uint8_t* bytes) {
  // 64 bool bytes -> 64 bits: shift each byte's 0/1 into its sign bit, then movemask.
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + 32));
  const auto lo = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(v0, 7)));
  const auto hi = static_cast<uint32_t>(_mm256_movemask_epi8(_mm256_slli_epi16(v1, 7)));
  return static_cast<uint64_t>(lo) | (static_cast<uint64_t>(hi) << 32);
}

// Rows [r0, r1) of the (T, K) bool rows at src into panels of P rows (P = kPanelA: the a layout,
// P = kPanelB: the b layout; see the top). A function of its own for the target attribute,
// which the worker lambda would not inherit.
template <int64_t P>
__attribute__((target("avx2,popcnt"))) void pack_panel_rows(const uint8_t* src, int64_t K,
                                                            int64_t r0, int64_t r1,
                                                            const Layout& g, uint64_t* words,
                                                            int32_t* sizes) {
  constexpr uint64_t kLow = 0x0f0f0f0f0f0f0f0fULL;
  const int64_t L = g.L, W = g.W;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* row = src + r * K;
    const int64_t q = r % P;
    uint64_t* pw = words + (r / P) * W * P * 2;
    int32_t* ps = sizes + (r / P) * L * P;
    for (int64_t l = 0; l < L; ++l) {
      const int64_t c0 = g.chan_off[l], C = g.chan_off[l + 1] - c0;
      int32_t count = 0;
      for (int64_t w = 0; w * 64 < C; ++w) {
        const int64_t n = C - 64 * w;
        const uint64_t word = n >= 64 ? pack_word_avx2(row + c0 + 64 * w)
                                      : pack_word_portable(row + c0 + 64 * w, n);
        count += static_cast<int32_t>(__builtin_popcountll(word));
        const int64_t gw = g.word_off[l] + w;
        if constexpr (P == kPanelB) {
          // Rows 0,1,4,5 in the first vector (of lo, of hi), rows 2,3,6,7 in the second.
          uint64_t* lo = pw + gw * 16 + ((q / 2) % 2) * 4 + (q % 2) + 2 * (q / 4);
          lo[0] = word & kLow;
          lo[8] = (word >> 4) & kLow;
        } else {
          uint64_t* lo = pw + (gw * P + q) * 2;
          lo[0] = word & kLow;
          lo[1] = (word >> 4) & kLow;
        }
      }
      ps[l * P + q] = count;
    }
  }
}

// Panels of P rows of m, allocated; pack_panel_rows fills them.
template <int64_t P>
Panels alloc_panels(const at::Tensor& m, const Layout& g) {
  const int64_t T = m.size(0);
  Panels p;
  p.panels = (T + P - 1) / P;
  const int64_t panel_words = g.W * P * 2;
  p.words = at::empty({p.panels * panel_words}, m.options().dtype(at::kLong));
  p.sizes.assign(p.panels * g.L * P, 0);
  // Every word of a row is written by pack_panel_rows; the padding rows of a last, partial
  // panel are empty.
  auto* words = reinterpret_cast<uint64_t*>(p.words.data_ptr<int64_t>());
  if (T % P != 0) std::fill_n(words + (p.panels - 1) * panel_words, panel_words, uint64_t{0});
  return p;
}

// Rows [r0, r1) of a (task < tasks_a) or of b, for pack task `task` of kPackRows rows.
constexpr int64_t kPackRows = 32;  // rows per packing task: whole panels of both layouts

void pack_task(int64_t task, int64_t tasks_a, const at::Tensor& a, const at::Tensor& b,
               const Layout& g, Panels& pa, Panels& pb) {
  const bool is_a = task < tasks_a;
  const at::Tensor& m = is_a ? a : b;
  Panels& p = is_a ? pa : pb;
  const int64_t r0 = (is_a ? task : task - tasks_a) * kPackRows;
  const int64_t r1 = std::min(m.size(0), r0 + kPackRows);
  const auto* src = reinterpret_cast<const uint8_t*>(m.const_data_ptr<bool>());
  auto* words = reinterpret_cast<uint64_t*>(p.words.data_ptr<int64_t>());
  if (is_a) {
    pack_panel_rows<kPanelA>(src, m.size(1), r0, r1, g, words, p.sizes.data());
  } else {
    pack_panel_rows<kPanelB>(src, m.size(1), r0, r1, g, words, p.sizes.data());
  }
}

// Byte-wise popcounts of n >= 1 words (n <= kMaxPass) of the 4 x 8 block into x0..x7: x(2i)
// holds the pairs (row i of a, rows 0,1,4,5 of b) in its four 64-bit lanes, x(2i+1) rows 2,3,6,7.
// Advances aw by n words of the a panel and bv by n words of the b panel.
__attribute__((target("avx2"))) NAD_ALWAYS_INLINE void count_block(
    const uint64_t*& aw, const __m256i*& bv, int64_t n, __m256i lut, __m256i& x0, __m256i& x1,
    __m256i& x2, __m256i& x3, __m256i& x4, __m256i& x5, __m256i& x6, __m256i& x7) {
  __m256i ble, blo, bhe, bho, al, ah, t;
  // One row of a: broadcast its low and high nibbles, AND them with the four vectors of b, look
  // up the nibble popcounts (vpshufb) and add them to the row's two accumulators. The first
  // word writes the accumulators instead of adding to them.
#define NAD_OVERLAP_ROW_LOADS(k)              \
  "vpbroadcastq " #k "*16(%[a]), %[al]\n\t"   \
  "vpbroadcastq " #k "*16+8(%[a]), %[ah]\n\t"
#define NAD_OVERLAP_ROW_FIRST(k, y0, y1)          \
  NAD_OVERLAP_ROW_LOADS(k)                        \
  "vpand %[al], %[ble], %[t]\n\t"                 \
  "vpshufb %[t], %[lut], %[" #y0 "]\n\t"          \
  "vpand %[al], %[blo], %[t]\n\t"                 \
  "vpshufb %[t], %[lut], %[" #y1 "]\n\t"          \
  "vpand %[ah], %[bhe], %[t]\n\t"                 \
  "vpshufb %[t], %[lut], %[t]\n\t"                \
  "vpaddb %[t], %[" #y0 "], %[" #y0 "]\n\t"       \
  "vpand %[ah], %[bho], %[t]\n\t"                 \
  "vpshufb %[t], %[lut], %[t]\n\t"                \
  "vpaddb %[t], %[" #y1 "], %[" #y1 "]\n\t"
#define NAD_OVERLAP_ROW(k, y0, y1)                \
  NAD_OVERLAP_ROW_LOADS(k)                        \
  "vpand %[al], %[ble], %[t]\n\t"                 \
  "vpshufb %[t], %[lut], %[t]\n\t"                \
  "vpaddb %[t], %[" #y0 "], %[" #y0 "]\n\t"       \
  "vpand %[al], %[blo], %[t]\n\t"                 \
  "vpshufb %[t], %[lut], %[t]\n\t"                \
  "vpaddb %[t], %[" #y1 "], %[" #y1 "]\n\t"       \
  "vpand %[ah], %[bhe], %[t]\n\t"                 \
  "vpshufb %[t], %[lut], %[t]\n\t"                \
  "vpaddb %[t], %[" #y0 "], %[" #y0 "]\n\t"       \
  "vpand %[ah], %[bho], %[t]\n\t"                 \
  "vpshufb %[t], %[lut], %[t]\n\t"                \
  "vpaddb %[t], %[" #y1 "], %[" #y1 "]\n\t"
#define NAD_OVERLAP_LOAD_B             \
  "vmovdqu (%[b]), %[ble]\n\t"         \
  "vmovdqu 32(%[b]), %[blo]\n\t"       \
  "vmovdqu 64(%[b]), %[bhe]\n\t"       \
  "vmovdqu 96(%[b]), %[bho]\n\t"
#define NAD_OVERLAP_NEXT     \
  "add $64, %[a]\n\t"        \
  "sub $-128, %[b]\n\t"      \
  "dec %[n]\n\t"
  asm volatile(
      NAD_OVERLAP_LOAD_B
      NAD_OVERLAP_ROW_FIRST(0, x0, x1)
      NAD_OVERLAP_ROW_FIRST(1, x2, x3)
      NAD_OVERLAP_ROW_FIRST(2, x4, x5)
      NAD_OVERLAP_ROW_FIRST(3, x6, x7)
      NAD_OVERLAP_NEXT
      "jz 2f\n\t"
      "1:\n\t"
      NAD_OVERLAP_LOAD_B
      NAD_OVERLAP_ROW(0, x0, x1)
      NAD_OVERLAP_ROW(1, x2, x3)
      NAD_OVERLAP_ROW(2, x4, x5)
      NAD_OVERLAP_ROW(3, x6, x7)
      NAD_OVERLAP_NEXT
      "jnz 1b\n\t"
      "2:\n\t"
      : [x0] "=&x"(x0), [x1] "=&x"(x1), [x2] "=&x"(x2), [x3] "=&x"(x3), [x4] "=&x"(x4),
        [x5] "=&x"(x5), [x6] "=&x"(x6), [x7] "=&x"(x7), [a] "+r"(aw), [b] "+r"(bv), [n] "+r"(n),
        [ble] "=&x"(ble), [blo] "=&x"(blo), [bhe] "=&x"(bhe), [bho] "=&x"(bho), [al] "=&x"(al),
        [ah] "=&x"(ah), [t] "=&x"(t)
      : [lut] "x"(lut)
      : "memory", "cc");
#undef NAD_OVERLAP_ROW_LOADS
#undef NAD_OVERLAP_ROW_FIRST
#undef NAD_OVERLAP_ROW
#undef NAD_OVERLAP_LOAD_B
#undef NAD_OVERLAP_NEXT
}

// The metric of 8 pairs, as overlap_value (and so bit-identical to it): the denominator is
// formed in int32, and 0/0 becomes 1/1 by subtracting the all-ones mask of den == 0 from both
// (inter is 0 there), so that no NaN or floating-point exception flag is ever produced.
template <OverlapMetric M>
__attribute__((target("avx2"))) NAD_ALWAYS_INLINE __m256 overlap_avx2(__m256i inter,
                                                                     __m256i size_a,
                                                                     __m256i size_b) {
  if constexpr (M == OverlapMetric::kIntersection) {
    return _mm256_cvtepi32_ps(inter);
  } else {
    const __m256i den = M == OverlapMetric::kIoU
                            ? _mm256_sub_epi32(_mm256_add_epi32(size_a, size_b), inter)
                            : _mm256_min_epi32(size_a, size_b);
    const __m256i empty = _mm256_cmpeq_epi32(den, _mm256_setzero_si256());
    return _mm256_div_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(inter, empty)),
                         _mm256_cvtepi32_ps(_mm256_sub_epi32(den, empty)));
  }
}

__attribute__((target("avx2"))) NAD_ALWAYS_INLINE void store_row(float* o, __m256 v, int64_t nc) {
  if (nc == kPanelB) {
    _mm256_storeu_ps(o, v);
  } else {
    alignas(32) float tmp[kPanelB];
    _mm256_store_ps(tmp, v);
    for (int64_t j = 0; j < nc; ++j) o[j] = tmp[j];
  }
}

// Dwords 0 and 2 of each 128-bit lane of x, then of y: the counts (< 2^32) in the 64-bit lanes
// of x (rows 0,1 | 4,5) and y (rows 2,3 | 6,7) as int32 lanes in row order 0..7.
__attribute__((target("avx2"))) NAD_ALWAYS_INLINE __m256i interleave(__m256i x, __m256i y) {
  return _mm256_castps_si256(
      _mm256_shuffle_ps(_mm256_castsi256_ps(x), _mm256_castsi256_ps(y), 0x88));
}

struct BlockArgs {
  const int64_t* layer_words;  // (L): words of each layer
  int32_t* counts;             // (L, 4, 8) scratch of the calling thread, 32-byte aligned
  int64_t L;
  int64_t ldo;                 // Tb: between rows of the output
  int64_t ldl;                 // Ta * Tb: between layers of the per-layer output
};

// Layer l of a block from its counts: cnt[i] = |A_i & B_j| for row i of a, rows j = 0..7 of b.
// Per layer, writes the values; otherwise adds them to sum.
template <OverlapMetric M, bool kPerLayer>
__attribute__((target("avx2"))) NAD_ALWAYS_INLINE void finish_layer(
    const BlockArgs& args, int64_t l, const __m256i* cnt, const int32_t* sa,
    const int32_t* sb, float* out, int64_t nr, int64_t nc, __m256 (&sum)[kPanelA]) {
  const __m256i sbl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(sb + l * kPanelB));
  const int32_t* sal = sa + l * kPanelA;
  for (int64_t i = 0; i < kPanelA; ++i) {
    const __m256 v = overlap_avx2<M>(_mm256_load_si256(cnt + i), _mm256_set1_epi32(sal[i]), sbl);
    if constexpr (kPerLayer) {
      if (i < nr) store_row(out + l * args.ldl + i * args.ldo, v, nc);  // others: padding
    } else {
      sum[i] = _mm256_add_ps(sum[i], v);
    }
  }
}

// All layers of one 4 x 8 block of pairs: a panel aw (sizes sa, (L, 4)), b panel bw (sizes sb,
// (L, 8)); writes rows [0, nr) x columns [0, nc) of the block at out.
template <OverlapMetric M, bool kPerLayer>
__attribute__((target("avx2"))) void overlap_block(const BlockArgs& args,
                                                   const uint64_t* aw, const uint64_t* bw,
                                                   const int32_t* __restrict sa,
                                                   const int32_t* __restrict sb,
                                                   float* __restrict out, int64_t nr, int64_t nc) {
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,  //
                                       0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i zero = _mm256_setzero_si256();
  const auto* bv = reinterpret_cast<const __m256i*>(bw);
  // The counts of all layers, kept for the metric pass at the end: computed there in one go,
  // the divisions (long latency, one divider) follow each other through the divider, instead of
  // each layer's waiting for the word loop before it and holding up the one after it.
  auto* cnt = reinterpret_cast<__m256i*>(args.counts);
  for (int64_t l = 0; l < args.L; ++l) {
    // Byte counts of up to 31 words at a time, reduced to 64-bit lanes (vpsadbw): c(2i) holds
    // row i of a x rows 0,1,4,5 of b, c(2i+1) rows 2,3,6,7; their low dwords, interleaved, are
    // the counts of rows 0..7 in order. Layers of more than 31 words (rare) add further passes
    // to the stored counts, so that nothing stays live across the word loop.
    __m256i* cl = cnt + l * kPanelA;
    for (int64_t done = 0; done < args.layer_words[l]; done += kMaxPass) {
      __m256i c0, c1, c2, c3, c4, c5, c6, c7;
      count_block(aw, bv, std::min(args.layer_words[l] - done, kMaxPass), lut, c0, c1, c2, c3,
                  c4, c5, c6, c7);
      __m256i r0 = interleave(_mm256_sad_epu8(c0, zero), _mm256_sad_epu8(c1, zero));
      __m256i r1 = interleave(_mm256_sad_epu8(c2, zero), _mm256_sad_epu8(c3, zero));
      __m256i r2 = interleave(_mm256_sad_epu8(c4, zero), _mm256_sad_epu8(c5, zero));
      __m256i r3 = interleave(_mm256_sad_epu8(c6, zero), _mm256_sad_epu8(c7, zero));
      if (done > 0) {
        r0 = _mm256_add_epi32(r0, _mm256_load_si256(cl + 0));
        r1 = _mm256_add_epi32(r1, _mm256_load_si256(cl + 1));
        r2 = _mm256_add_epi32(r2, _mm256_load_si256(cl + 2));
        r3 = _mm256_add_epi32(r3, _mm256_load_si256(cl + 3));
      }
      _mm256_store_si256(cl + 0, r0);
      _mm256_store_si256(cl + 1, r1);
      _mm256_store_si256(cl + 2, r2);
      _mm256_store_si256(cl + 3, r3);
    }
  }
  __m256 sum[kPanelA] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
  for (int64_t l = 0; l < args.L; ++l) {
    finish_layer<M, kPerLayer>(args, l, cnt + l * kPanelA, sa, sb, out, nr, nc, sum);
  }
  if constexpr (!kPerLayer) {
    const __m256 L = _mm256_set1_ps(static_cast<float>(args.L));
    for (int64_t i = 0; i < nr; ++i) store_row(out + i * args.ldo, _mm256_div_ps(sum[i], L), nc);
  }
}

using BlockFn = void (*)(const BlockArgs&, const uint64_t*, const uint64_t*, const int32_t*,
                         const int32_t*, float*, int64_t, int64_t);

template <OverlapMetric M>
BlockFn pick_block_fn(bool per_layer) {
  return per_layer ? &overlap_block<M, true> : &overlap_block<M, false>;
}

void mask_overlap_avx2(const at::Tensor& a, const at::Tensor& b, const Layout& g,
                       OverlapMetric kind, bool per_layer, at::Tensor& out) {
  const int64_t Ta = a.size(0), Tb = b.size(0), W = g.W;
  Panels pa = alloc_panels<kPanelA>(a, g);
  Panels pb = alloc_panels<kPanelB>(b, g);
  std::vector<int64_t> layer_words(g.L);
  for (int64_t l = 0; l < g.L; ++l) layer_words[l] = g.word_off[l + 1] - g.word_off[l];
  const BlockArgs shared_args{layer_words.data(), nullptr, g.L, Tb, Ta * Tb};
  BlockFn block = nullptr;
  switch (kind) {
    case OverlapMetric::kIoU: block = pick_block_fn<OverlapMetric::kIoU>(per_layer); break;
    case OverlapMetric::kIoMin: block = pick_block_fn<OverlapMetric::kIoMin>(per_layer); break;
    case OverlapMetric::kIntersection:
      block = pick_block_fn<OverlapMetric::kIntersection>(per_layer);
      break;
  }
  // Tiles of up to 16 a panels (64 rows) x 8 b panels (64 rows); smaller while there are fewer
  // than 4 tiles per thread, so that small problems still use every thread.
  int64_t tile_a = 16, tile_b = 8;
  const int64_t want = 4 * static_cast<int64_t>(at::get_num_threads());
  auto count_tiles = [&] {
    return ((pa.panels + tile_a - 1) / tile_a) * ((pb.panels + tile_b - 1) / tile_b);
  };
  while (count_tiles() < want && (tile_a > 1 || tile_b > 1)) {
    if (tile_a >= 2 * tile_b || tile_b == 1) {
      tile_a = (tile_a + 1) / 2;
    } else {
      tile_b = (tile_b + 1) / 2;
    }
  }
  const int64_t tiles_b = (pb.panels + tile_b - 1) / tile_b;
  const uint64_t* wa = reinterpret_cast<uint64_t*>(pa.words.data_ptr<int64_t>());
  const uint64_t* wb = reinterpret_cast<uint64_t*>(pb.words.data_ptr<int64_t>());
  float* o = out.data_ptr<float>();
  // One parallel region for packing and tiles (each region costs a wake-up of the other threads
  // and a join, which on a busy machine can wait for a scheduler tick): tasks [0, packs) pack 32
  // rows of a or b each, the others are tiles, which start once every packing task is done.
  const int64_t tasks_a = (Ta + kPackRows - 1) / kPackRows;
  const int64_t packs = tasks_a + (Tb + kPackRows - 1) / kPackRows;
  const int64_t tasks = packs + count_tiles();
  std::atomic<int64_t> packed{0};
  parallel_workers(tasks, [&](std::atomic<int64_t>& next) {
    // The counts of one block, all layers (L x 4 x 8 int32), aligned for the vector stores.
    std::vector<int32_t> scratch(g.L * kPanelA * kPanelB + 8);
    BlockArgs args = shared_args;
    args.counts = reinterpret_cast<int32_t*>(
        (reinterpret_cast<uintptr_t>(scratch.data()) + 31) & ~static_cast<uintptr_t>(31));
    for (int64_t task = next++; task < tasks; task = next++) {
      if (task < packs) {
        pack_task(task, tasks_a, a, b, g, pa, pb);
        packed.fetch_add(1, std::memory_order_release);
        continue;
      }
      // Packing tasks still running are on other threads, which will finish them.
      while (packed.load(std::memory_order_acquire) < packs) std::this_thread::yield();
      const int64_t t = task - packs;
      const int64_t pa0 = (t / tiles_b) * tile_a, pa1 = std::min(pa0 + tile_a, pa.panels);
      const int64_t pb0 = (t % tiles_b) * tile_b, pb1 = std::min(pb0 + tile_b, pb.panels);
      // Along rows of the output: each cache line of it is written whole, by consecutive
      // blocks (a column of blocks wrote each line in two halves, far apart, and was slower).
      for (int64_t ib = pa0; ib < pa1; ++ib) {
        const int64_t i = ib * kPanelA, nr = std::min(kPanelA, Ta - i);
        for (int64_t jb = pb0; jb < pb1; ++jb) {
          const int64_t j = jb * kPanelB, nc = std::min(kPanelB, Tb - j);
          block(args, wa + ib * W * kPanelA * 2, wb + jb * W * kPanelB * 2,
                pa.sizes.data() + ib * g.L * kPanelA, pb.sizes.data() + jb * g.L * kPanelB,
                o + i * Tb + j, nr, nc);
        }
      }
    }
  });
}

#endif  // NAD_AVX2_KERNEL

Isa detect_isa() {
  const char* force = std::getenv("NAD_EXT_PORTABLE_POPCOUNT");
  if (force != nullptr && force[0] != '\0' && std::strcmp(force, "0") != 0) return Isa::kPortable;
#if NAD_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("popcnt")) {
    return NAD_AVX2_KERNEL && __builtin_cpu_supports("avx2") ? Isa::kAvx2 : Isa::kPopcnt;
  }
#endif
  return Isa::kPortable;
}

}  // namespace

at::Tensor mask_overlap(const at::Tensor& a_in, const at::Tensor& b_in,
                        at::IntArrayRef layer_sizes, c10::string_view metric, bool per_layer) {
  const OverlapMetric kind = check_mask_overlap_args(a_in, b_in, layer_sizes, metric);
  const auto a = a_in.contiguous();
  const auto b = b_in.contiguous();
  const int64_t L = static_cast<int64_t>(layer_sizes.size()), Ta = a.size(0), Tb = b.size(0);
  // Not zeroed: the AVX2 path writes every element once (the scalar one zeroes the mean first).
  auto out = per_layer ? at::empty({L, Ta, Tb}, a.options().dtype(at::kFloat))
                       : at::empty({Ta, Tb}, a.options().dtype(at::kFloat));
  if (Ta == 0 || Tb == 0) return out;
  const Layout g = make_layout(layer_sizes);
  static const Isa isa = detect_isa();
#if NAD_AVX2_KERNEL
  if (isa == Isa::kAvx2) {
    mask_overlap_avx2(a, b, g, kind, per_layer, out);
    return out;
  }
#endif
  mask_overlap_scalar(a, b, g, kind, per_layer, isa, out);
  return out;
}

}  // namespace cpu
}  // namespace nad

NAD_LIBRARY_IMPL(CPU, m) { m.impl("mask_overlap", &nad::cpu::mask_overlap); }
