// CPU matmul kernels for lqtk's quantized weight formats at decode batch sizes (x of 1..16 rows), AVX2 + FMA.
//
// The kernels read the formats' stored tensors in place. A block is 8 consecutive weights of a row, decoded into one
// ymm register. Below kLargeBatch rows of x, a decoded block goes straight into FMAs with x (`gemv`: the work is the
// decoding); from kLargeBatch rows, 4 output rows at a time are decoded into an L1 buffer and multiplied by x in a
// register-blocked loop that loads each x vector once for the 4 rows (`gemm`: the work is the FMAs). Output rows are
// split over torch's threads.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace {

constexpr int64_t kLargeBatch = 4;  // from this many rows of x, `gemm`; below, `gemv` (measured)

float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}

// Rows of packed codes, read 4 or 8 bytes at a time: a read may run up to 7 bytes past a row's codes, into the next
// row, so the last row is read from a copy with room after it.
struct PackedRows {
  const uint8_t* data = nullptr;
  int64_t row_bytes = 0, rows = 0;
  std::vector<uint8_t> last;

  PackedRows() = default;
  explicit PackedRows(const at::Tensor& packed) {
    TORCH_CHECK(packed.scalar_type() == at::kInt && packed.dim() == 2 && packed.is_contiguous(),
                "packed codes must be contiguous int32 (rows, words)");
    data = static_cast<const uint8_t*>(packed.data_ptr());
    row_bytes = packed.size(1) * 4, rows = packed.size(0);
    last.assign(row_bytes + 8, 0);
    if (rows > 0) std::memcpy(last.data(), data + (rows - 1) * row_bytes, row_bytes);
  }
  const uint8_t* row(int64_t o) const { return o == rows - 1 ? last.data() : data + o * row_bytes; }
};

// Codes of block t (inputs 8t..8t+7) of a row packed LSB-first at BITS bits each (lqtk's `pack_bits`), one per
// int32 lane, shifted down but not masked: lane k holds code k in its low BITS bits, the next codes above them.
// The block starts at byte BITS·t; one broadcast load of 4 bytes from there holds its 8·BITS bits.
template <int BITS>
__m256i codes8(const uint8_t* row, int64_t t) {
  static_assert(BITS >= 2 && BITS <= 4, "8 codes must fit one 32-bit word");
  const __m256i shifts = _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS);
  return _mm256_srlv_epi32(_mm256_set1_epi32(int(load_u32(row + BITS * t))), shifts);
}

// A zero-filled fp32 tensor. Filled here, not by at::zeros: torch runs fills and copies of 32K elements and more in
// OpenMP regions, whose barrier may wait a scheduler tick (~4 ms) for a thread when other processes hold the cores.
at::Tensor zero_filled(at::IntArrayRef sizes) {
  auto t = at::empty(sizes, at::kFloat);
  std::memset(t.data_ptr(), 0, t.numel() * sizeof(float));
  return t;
}

// x (B, I) and the y (B, O) = x · Wᵀ being computed (it starts at zero). x is copied with a row stride `ldx` of an
// odd number of 64-byte lines: rows a multiple of 4 KB apart share L1 banks, and the loads of one block from every
// batch row would then run at half speed.
struct Problem {
  at::Tensor x_rows;
  const float* x;
  float* y;
  int64_t ldx, batch, in_features, out_features;

  Problem(const at::Tensor& x_in, const at::Tensor& y_out)
      : ldx(16 * ((x_in.size(1) + 15) / 16 | 1)), batch(x_in.size(0)), in_features(x_in.size(1)),
        out_features(y_out.size(1)) {
    x_rows = at::empty({batch, ldx}, at::kFloat);
    const at::Tensor rows = x_in.contiguous();
    for (int64_t b = 0; b < batch; ++b)  // row by row, not by copy_ (see `zero_filled`)
      std::memcpy(x_rows.data_ptr<float>() + b * ldx, rows.data_ptr<float>() + b * in_features, in_features * 4);
    x = x_rows.data_ptr<float>(), y = y_out.data_ptr<float>();
  }
};

// Runs fn(begin, end) on the chunks of [0, n) of about 2^17 weights (~10 µs of work), taken one at a time by this
// thread and by get_num_threads() - 1 helpers launched on torch's inter-op pool. This thread waits only for chunks a
// helper took: when the cores are shared with other processes, a helper that is not scheduled in time just takes
// nothing, where the barrier of an OpenMP region (at::parallel_for) would spin until the scheduler let it run, up to
// its ~4 ms tick (measured: 8 ms per call instead of 1).
template <class Fn>
void parallel_chunks(int64_t n, int64_t weights_per_item, const Fn& fn) {
  const int64_t chunk = std::max<int64_t>(1, (1 << 17) / weights_per_item), chunks = (n + chunk - 1) / chunk;
  const int64_t helpers = std::min<int64_t>(at::get_num_threads(), chunks) - 1;
  if (helpers <= 0 || at::in_parallel_region()) return fn(0, n);
  struct Progress {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto progress = std::make_shared<Progress>();
  // fn is only called on a chunk taken before all were done, so while this thread still waits and fn is alive
  auto take_chunks = [progress, n, chunk, f = &fn] {
    for (int64_t begin; (begin = progress->next.fetch_add(chunk)) < n; progress->done.fetch_add(1))
      (*f)(begin, std::min(n, begin + chunk));
  };
  for (int64_t i = 0; i < helpers; ++i) at::launch(take_chunks);
  take_chunks();
  while (progress->done.load() < chunks) std::this_thread::yield();  // yield: a helper may share this core
}

// ---- small batches: decoded blocks straight into FMAs ------------------------------------------------------------

// Accumulator sets per batch row: an FMA has a 4-cycle latency and 2 issue per cycle, so 8 independent chains keep
// both pipes busy; a chunk of NB rows has NB, and blocks t, t+1, ... go to different sets.
template <int NB>
constexpr int kSets = 8 / NB;

// Σ_t decode(t) · x[b, 8t:8t+8] over blocks t in [t0, t1) for NB batch rows, added to y[b · ldy] times `scale`.
// The loops over sets and rows are unrolled so that GCC keeps the accumulators in registers.
template <int NB, class Decode>
inline void dot_blocks(const Decode& decode, const float* x, int64_t ldx, int64_t t0, int64_t t1, float scale,
                       float* y, int64_t ldy) {
  constexpr int S = kSets<NB>;
  __m256 acc[S * NB];
#pragma GCC unroll 16
  for (int i = 0; i < S * NB; ++i) acc[i] = _mm256_setzero_ps();
  int64_t t = t0;
  for (; t + S <= t1; t += S) {
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const __m256 w = decode(t + s);
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b)
        acc[s * NB + b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * ldx + 8 * (t + s)), acc[s * NB + b]);
    }
  }
  for (; t < t1; ++t) {
    const __m256 w = decode(t);
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) acc[b] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * ldx + 8 * t), acc[b]);
  }
#pragma GCC unroll 8
  for (int b = 0; b < NB; ++b) {
    __m256 sum = acc[b];
#pragma GCC unroll 8
    for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[s * NB + b]);
    y[b * ldy] += hsum(sum) * scale;
  }
}

// Format::dot<NB>(args, p, o, b0) for every output row o and chunk of NB batch rows from b0 (2, then 1).
template <class Format>
void gemv(const typename Format::Args& args, const Problem& p) {
  parallel_chunks(p.out_features, p.in_features, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      int64_t b0 = 0;
      for (; b0 + 2 <= p.batch; b0 += 2) Format::template dot<2>(args, p, o, b0);
      if (b0 < p.batch) Format::template dot<1>(args, p, o, b0);
    }
  });
}

// ---- large batches: 4 rows decoded to a buffer, multiplied together ----------------------------------------------
constexpr int kRows = 4;  // output rows per buffer: each x vector loaded serves 4 FMAs
constexpr int64_t kBufferBlocks = 128;  // blocks per buffer row: 4 rows of 4 KB, in L1
constexpr int64_t kBufferStride = 8 * kBufferBlocks + 16;  // floats: rows an odd number of lines apart (L1 banks)

// acc[r · NB + b] += Σ_t w[r, t] · x[b, t] over T blocks, w the buffer (kRows, T, 8) and NB batch rows.
template <int NB>
inline void multiply_buffer(const float* w, int64_t T, const float* x, int64_t ldx, float* out) {
  __m256 acc[kRows * NB];
#pragma GCC unroll 16
  for (int i = 0; i < kRows * NB; ++i) acc[i] = _mm256_loadu_ps(out + 8 * i);
  for (int64_t t = 0; t < T; ++t) {
    __m256 xs[NB];
#pragma GCC unroll 4
    for (int b = 0; b < NB; ++b) xs[b] = _mm256_loadu_ps(x + b * ldx + 8 * t);
#pragma GCC unroll 4
    for (int r = 0; r < kRows; ++r) {
      const __m256 wr = _mm256_loadu_ps(w + r * kBufferStride + 8 * t);
#pragma GCC unroll 4
      for (int b = 0; b < NB; ++b) acc[r * NB + b] = _mm256_fmadd_ps(wr, xs[b], acc[r * NB + b]);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows * NB; ++i) _mm256_storeu_ps(out + 8 * i, acc[i]);
}

// fn(b0, NB) for the chunks of NB batch rows from b0 that `gemm` multiplies together: 4 rows × 3 batch rows are
// 12 accumulators, the most that fit the registers with the loads (2 FMAs per cycle, measured); then 2, 1 rows.
template <class Fn>
void for_chunks(int64_t batch, Fn&& fn) {
  int64_t b0 = 0;
  for (; b0 + 3 <= batch; b0 += 3) fn(b0, std::integral_constant<int, 3>{});
  if (b0 + 2 <= batch) fn(b0, std::integral_constant<int, 2>{}), b0 += 2;
  if (b0 < batch) fn(b0, std::integral_constant<int, 1>{});
}

// y = x · Wᵀ with Format::decode(args, o, t0, t1, out) writing the fp32 weights of blocks [t0, t1) of row o.
template <class Format>
void gemm(const typename Format::Args& args, const Problem& p) {
  const int64_t blocks = p.in_features / 8, quads = (p.out_features + kRows - 1) / kRows;
  parallel_chunks(quads, kRows * p.in_features, [&](int64_t begin, int64_t end) {
    std::vector<float> w(kRows * kBufferStride);
    std::vector<float> acc(8 * kRows * p.batch);  // chunk of NB batch rows from b0: kRows·NB vectors from kRows·b0
    for (int64_t q = begin; q < end; ++q) {
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t t0 = 0; t0 < blocks; t0 += kBufferBlocks) {
        const int64_t T = std::min(kBufferBlocks, blocks - t0);
        for (int r = 0; r < kRows; ++r)  // past the last row, any row: its products are not stored
          Format::decode(args, std::min(q * kRows + r, p.out_features - 1), t0, t0 + T, w.data() + r * kBufferStride);
        for_chunks(p.batch, [&](int64_t b0, auto nb) {
          multiply_buffer<decltype(nb)::value>(w.data(), T, p.x + b0 * p.ldx + 8 * t0, p.ldx, &acc[8 * kRows * b0]);
        });
      }
      for_chunks(p.batch, [&](int64_t b0, auto nb) {
        constexpr int NB = decltype(nb)::value;
        for (int r = 0; r < kRows && q * kRows + r < p.out_features; ++r)
          for (int b = 0; b < NB; ++b)
            p.y[(b0 + b) * p.out_features + q * kRows + r] = hsum(_mm256_loadu_ps(&acc[8 * (kRows * b0 + r * NB + b)]));
      });
    }
  });
}

// ---- affine: w = (q - zero[g]) · scale[g] ------------------------------------------------------------------------
template <typename Scale>
struct AffineArgs {
  PackedRows codes, zeros;  // zeros: packed like the codes, (O, words); no rows when symmetric (2^(bits-1))
  const Scale* scales;  // (O, groups)
  int64_t groups, group_blocks;  // a group is group_blocks blocks (the last one may be shorter)
  const float* group_sums;  // (B, groups, 8): Σ over the group's blocks of x[b, 8t:8t+8] (AffineSuperblocks only)

  template <int BITS>
  int zero(int64_t o, int64_t g) const {  // BITS bits at bit g·BITS of the row (3 bits may straddle two bytes)
    if (zeros.rows == 0) return 1 << (BITS - 1);
    const uint8_t* z = zeros.row(o) + g * BITS / 8;
    return ((z[0] | (BITS == 3 ? z[1] << 8 : 0)) >> (g * BITS % 8)) & ((1 << BITS) - 1);
  }
  float scale(int64_t o, int64_t g) const { return static_cast<float>(scales[o * groups + g]); }
};

// Any bits and group size: (q - zero) summed per group against x, then times the group's scale.
template <int BITS, typename Scale>
struct Affine {
  using Args = AffineArgs<Scale>;

  // fn(g, first block, end block, decode) for the groups g overlapping blocks [t0, t1); decode(t): q - zero, fp32
  template <class Fn>
  static void for_groups(const Args& a, int64_t o, int64_t t0, int64_t t1, Fn&& fn) {
    const uint8_t* codes = a.codes.row(o);
    for (int64_t g = t0 / a.group_blocks; g * a.group_blocks < t1; ++g) {
      const __m256i zero = _mm256_set1_epi32(a.template zero<BITS>(o, g)), mask = _mm256_set1_epi32((1 << BITS) - 1);
      auto decode = [&](int64_t t) {
        return _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(codes8<BITS>(codes, t), mask), zero));
      };
      fn(g, std::max(t0, g * a.group_blocks), std::min(t1, (g + 1) * a.group_blocks), decode);
    }
  }

  template <int NB>
  static void dot(const Args& a, const Problem& p, int64_t o, int64_t b0) {
    for_groups(a, o, 0, p.in_features / 8, [&](int64_t g, int64_t begin, int64_t end, const auto& decode) {
      dot_blocks<NB>(decode, p.x + b0 * p.ldx, p.ldx, begin, end, a.scale(o, g), p.y + b0 * p.out_features + o,
                     p.out_features);
    });
  }

  static void decode(const Args& a, int64_t o, int64_t t0, int64_t t1, float* out) {
    for_groups(a, o, t0, t1, [&](int64_t g, int64_t begin, int64_t end, const auto& decode) {
      const __m256 scale = _mm256_set1_ps(a.scale(o, g));
      for (int64_t t = begin; t < end; ++t) _mm256_storeu_ps(out + 8 * (t - t0), _mm256_mul_ps(decode(t), scale));
    });
  }
};

// 2 or 4 bits with groups and rows of whole superblocks: 4 words (P = 16 / BITS blocks) broadcast to both halves of a
// ymm, lane k holding word k % 4. Block s < P - 1 of a superblock is the codes at bits BITS·s of the low half and
// BITS·s + 16 of the high half, masked in place, not shifted: q · 2^shift, exact in fp32. x comes permuted to this
// order and scaled by 2^-shift (exact) once per call (`permute_x`), so a block costs an AND, a convert and the FMAs.
// The last block holds the sign bit: it is shifted down. The zero points are taken off once per group through the
// group's sum of x, and the scale is applied per group too.
template <int BITS>
struct Superblock {
  static constexpr int P = 16 / BITS;

  static int shift(int s, int lane) { return s == P - 1 ? 0 : BITS * s + (lane >= 4 ? 16 : 0); }
  static int source(int s, int lane) { return (lane % 4) * 2 * P + s + (lane >= 4 ? P : 0); }  // input of the lane

  static __m256 decode(__m256i v, int s) {
    const int lo = BITS * s, hi = BITS * s + 16, m = (1 << BITS) - 1;
    if (s == P - 1) {
      const __m256i shifts = _mm256_setr_epi32(lo, lo, lo, lo, hi, hi, hi, hi);
      return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srlv_epi32(v, shifts), _mm256_set1_epi32(m)));
    }
    const __m256i mask = _mm256_setr_epi32(m << lo, m << lo, m << lo, m << lo, m << hi, m << hi, m << hi, m << hi);
    return _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
  }
};

template <int BITS, typename Scale>
struct AffineSuperblocks {
  using Args = AffineArgs<Scale>;

  template <int NB>
  static void dot(const Args& a, const Problem& p, int64_t o, int64_t b0) {
    constexpr int P = Superblock<BITS>::P, S = std::min(kSets<NB>, 4);  // sets: blocks of one superblock
    const uint8_t* codes = a.codes.row(o);
    const float* x = p.x + b0 * p.ldx;
    const int64_t blocks = p.in_features / 8;
    __m256 total[NB];
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) total[b] = _mm256_setzero_ps();
    for (int64_t g = 0; g < a.groups; ++g) {
      __m256 acc[S * NB];
#pragma GCC unroll 16
      for (int i = 0; i < S * NB; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t t = g * a.group_blocks; t < std::min(blocks, (g + 1) * a.group_blocks); t += P) {
        const auto* words = reinterpret_cast<const __m128i*>(codes + BITS * t);  // the superblock's 4 words
        const __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(words));
#pragma GCC unroll 8
        for (int s = 0; s < P; ++s) {
          const __m256 w = Superblock<BITS>::decode(v, s);
#pragma GCC unroll 8
          for (int b = 0; b < NB; ++b)
            acc[s % S * NB + b] =
                _mm256_fmadd_ps(w, _mm256_loadu_ps(x + b * p.ldx + 8 * (t + s)), acc[s % S * NB + b]);
        }
      }
      const __m256 zero = _mm256_set1_ps(-a.template zero<BITS>(o, g)), scale = _mm256_set1_ps(a.scale(o, g));
#pragma GCC unroll 8
      for (int b = 0; b < NB; ++b) {
        __m256 sum = _mm256_fmadd_ps(zero, _mm256_loadu_ps(a.group_sums + ((b0 + b) * a.groups + g) * 8), acc[b]);
#pragma GCC unroll 8
        for (int s = 1; s < S; ++s) sum = _mm256_add_ps(sum, acc[s * NB + b]);
        total[b] = _mm256_fmadd_ps(scale, sum, total[b]);
      }
    }
#pragma GCC unroll 8
    for (int b = 0; b < NB; ++b) p.y[(b0 + b) * p.out_features + o] += hsum(total[b]);
  }
};

// Puts the problem's x in the order and scale the superblocks of BITS bits read it (in place); returns the sums
// (B, G, 8) of each group's blocks of the original x.
template <int BITS>
at::Tensor permute_x(Problem& p, int64_t group_blocks, int64_t groups) {
  constexpr int P = Superblock<BITS>::P;
  int source[8 * P];
  float factor[8 * P], original[8 * P];
  for (int i = 0; i < 8 * P; ++i) {
    source[i] = Superblock<BITS>::source(i / 8, i % 8);
    factor[i] = std::ldexp(1.0f, -Superblock<BITS>::shift(i / 8, i % 8));
  }
  auto sums = zero_filled({p.batch, groups, 8});
  float* sum = sums.data_ptr<float>();
  float* x = p.x_rows.data_ptr<float>();
  for (int64_t b = 0; b < p.batch; ++b)
    for (int64_t start = 0; start < p.in_features; start += 8 * P) {
      float* chunk = x + b * p.ldx + start;
      std::memcpy(original, chunk, sizeof(original));
      for (int i = 0; i < 8 * P; ++i) {
        chunk[i] = original[source[i]] * factor[i];
        sum[(b * groups + (start + i) / 8 / group_blocks) * 8 + i % 8] += original[i];
      }
    }
  return sums;
}

// ---- lut: w = levels[q], the row's 2^bits levels held in registers ----------------------------------------------
template <typename Level>
struct LutArgs {
  PackedRows codes;
  const Level* levels;  // (O, 2^bits)
};

template <int BITS, typename Level>
struct Lut {
  using Args = LutArgs<Level>;

  // vpermps indexes with the low 3 bits of each lane, so the unmasked codes work: with 4 bits, bit 3 (moved to the
  // sign bit) picks the high 8 levels; with 2 bits the table repeats its 4 levels, so bit 2 does not matter
  struct Decoder {
    const uint8_t* codes;
    __m256 low, high;

    Decoder(const Args& a, int64_t o) : codes(a.codes.row(o)) {
      float table[16];
      for (int k = 0; k < 16; ++k) table[k] = static_cast<float>(a.levels[(o << BITS) + k % (1 << BITS)]);
      low = _mm256_loadu_ps(table), high = _mm256_loadu_ps(table + 8);
    }
    __m256 operator()(int64_t t) const {
      const __m256i q = codes8<BITS>(codes, t);
      const __m256 w = _mm256_permutevar8x32_ps(low, q);
      if (BITS < 4) return w;
      return _mm256_blendv_ps(w, _mm256_permutevar8x32_ps(high, q), _mm256_castsi256_ps(_mm256_slli_epi32(q, 28)));
    }
  };

  template <int NB>
  static void dot(const Args& a, const Problem& p, int64_t o, int64_t b0) {
    dot_blocks<NB>(Decoder(a, o), p.x + b0 * p.ldx, p.ldx, 0, p.in_features / 8, 1.0f, p.y + b0 * p.out_features + o,
                   p.out_features);
  }

  static void decode(const Args& a, int64_t o, int64_t t0, int64_t t1, float* out) {
    const Decoder decoder(a, o);
    for (int64_t t = t0; t < t1; ++t) _mm256_storeu_ps(out + 8 * (t - t0), decoder(t));
  }
};

// ---- aqlm: w = scale · Σ_m codebooks[m, code[j, m]], one group of 8 inputs per block ------------------------------
template <typename Scale>
struct AqlmArgs {
  PackedRows codes;  // the byte codes (o, j, m) in order
  const float* codebooks;  // (M, 256, 8) fp32
  const Scale* scales;  // (O, 1)
};

template <int M, typename Scale>
struct Aqlm {
  using Args = AqlmArgs<Scale>;

  // Σ_m codewords of group j of row o, before the row's scale: the codebooks (fp32, 8 KB each) stay in L1. This beats
  // looking up precomputed codeword·x products (the aqlm package's CPU kernel; tried here with tables per group, tiled
  // to fit L1 or L2, scalar or AVX2-gathered: about 2x slower), as a lookup costs a load like a codeword does. With 1
  // or 2 codebooks, the codes come 8 bytes at a time: at one load per code, loads would bound the loop.
  struct Decoder {
    const uint8_t* codes;
    const float* codebooks;

    __m256 operator()(int64_t j) const {
      if constexpr (M == 3) {
        return _mm256_add_ps(_mm256_add_ps(codeword(0, codes[3 * j]), codeword(1, codes[3 * j + 1])),
                             codeword(2, codes[3 * j + 2]));
      } else {
        constexpr int per_word = 8 / M;  // groups whose codes one 8-byte load brings
        uint64_t word;
        std::memcpy(&word, codes + M * (j - j % per_word), 8);
        word >>= 8 * M * (j % per_word);
        if constexpr (M == 1) return codeword(0, word & 255);
        else return _mm256_add_ps(codeword(0, word & 255), codeword(1, word >> 8 & 255));
      }
    }
    __m256 codeword(int m, uint64_t code) const { return _mm256_loadu_ps(codebooks + 8 * (256 * m + code)); }
  };

  template <int NB>
  static void dot(const Args& a, const Problem& p, int64_t o, int64_t b0) {
    dot_blocks<NB>(Decoder{a.codes.row(o), a.codebooks}, p.x + b0 * p.ldx, p.ldx, 0, p.in_features / 8,
                   static_cast<float>(a.scales[o]), p.y + b0 * p.out_features + o, p.out_features);
  }

  static void decode(const Args& a, int64_t o, int64_t t0, int64_t t1, float* out) {
    const Decoder decoder{a.codes.row(o), a.codebooks};
    const __m256 scale = _mm256_set1_ps(static_cast<float>(a.scales[o]));
    for (int64_t j = t0; j < t1; ++j) _mm256_storeu_ps(out + 8 * (j - t0), _mm256_mul_ps(decoder(j), scale));
  }
};

// The small- or large-batch driver for Format.
template <class Format>
void multiply(const typename Format::Args& args, const Problem& p) {
  if (p.batch < kLargeBatch) return gemv<Format>(args, p);
  gemm<Format>(args, p);
}

template <typename Fn>
void dispatch_bits(int64_t bits, Fn&& fn) {
  switch (bits) {
    case 2: return fn(std::integral_constant<int, 2>{});
    case 3: return fn(std::integral_constant<int, 3>{});
    case 4: return fn(std::integral_constant<int, 4>{});
  }
  TORCH_CHECK(false, "bits must be 2, 3 or 4, got ", bits);
}

// fn(T{}) with T the C++ type of a fp16 or fp32 tensor (scales and levels are stored as fp16, may come as fp32)
template <typename Fn>
void dispatch_half_or_float(const at::Tensor& t, Fn&& fn) {
  TORCH_CHECK(t.is_contiguous(), "scales and levels must be contiguous");
  if (t.scalar_type() == at::kHalf) return fn(at::Half{});
  TORCH_CHECK(t.scalar_type() == at::kFloat, "scales and levels must be fp16 or fp32, got ", t.scalar_type());
  fn(float{});
}

void check_x(const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be fp32 (B, I)");
  TORCH_CHECK(x.size(1) == in_features && in_features % 8 == 0, "x has ", x.size(1), " inputs; the weight has ",
              in_features, " (a multiple of 8 is needed)");
}

// Packed codes must hold `values` codes of `bits` bits per row (the kernels read that far).
void check_packed(const at::Tensor& packed, int64_t rows, int64_t values, int64_t bits) {
  TORCH_CHECK(packed.dim() == 2 && packed.size(0) == rows && packed.size(1) == (values * bits + 31) / 32,
              "packed codes must be (", rows, ", ", (values * bits + 31) / 32, "), got ", packed.sizes());
}

}  // namespace

at::Tensor affine_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                       const c10::optional<at::Tensor>& zeros, int64_t bits, c10::optional<int64_t> group_size,
                       int64_t in_features) {
  check_x(x, in_features);
  const int64_t out_features = qweight.size(0), size = group_size.value_or(in_features);
  TORCH_CHECK(size % 8 == 0, "group_size must be a multiple of 8, got ", size);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out_features && scales.size(1) == (in_features + size - 1) / size,
              "scales must be (O, ceil(I / group_size))");
  check_packed(qweight, out_features, in_features, bits);
  if (zeros.has_value()) check_packed(*zeros, out_features, scales.size(1), bits);
  auto y = zero_filled({x.size(0), out_features});
  dispatch_bits(bits, [&](auto bits_c) {
    constexpr int BITS = decltype(bits_c)::value;
    dispatch_half_or_float(scales, [&](auto scale_type) {
      using Scale = decltype(scale_type);
      AffineArgs<Scale> args{PackedRows(qweight), zeros.has_value() ? PackedRows(*zeros) : PackedRows(),
                             scales.data_ptr<Scale>(), scales.size(1), size / 8, nullptr};
      Problem p(x, y);
      if constexpr (BITS != 3) {
        const int64_t superblock = 8 * Superblock<BITS>::P;
        if (p.batch < kLargeBatch && size % superblock == 0 && in_features % superblock == 0) {
          const at::Tensor sums = permute_x<BITS>(p, args.group_blocks, args.groups);
          args.group_sums = static_cast<const float*>(sums.data_ptr());
          return gemv<AffineSuperblocks<BITS, Scale>>(args, p);
        }
      }
      multiply<Affine<BITS, Scale>>(args, p);
    });
  });
  return y;
}

at::Tensor lut_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& levels, int64_t bits,
                    int64_t in_features) {
  check_x(x, in_features);
  const int64_t out_features = qweight.size(0);
  TORCH_CHECK(levels.dim() == 2 && levels.size(0) == out_features && levels.size(1) == (1 << bits),
              "levels must be (O, 2^bits)");
  check_packed(qweight, out_features, in_features, bits);
  auto y = zero_filled({x.size(0), out_features});
  dispatch_bits(bits, [&](auto bits_c) {
    constexpr int BITS = decltype(bits_c)::value;
    dispatch_half_or_float(levels, [&](auto level_type) {
      using Level = decltype(level_type);
      multiply<Lut<BITS, Level>>(LutArgs<Level>{PackedRows(qweight), levels.data_ptr<Level>()}, Problem(x, y));
    });
  });
  return y;
}

at::Tensor aqlm_gemv(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& codebooks,
                     const at::Tensor& scales, int64_t num_codebooks, int64_t nbits, int64_t in_group_size) {
  TORCH_CHECK(nbits == 8 && in_group_size == 8, "aqlm_gemv needs 8-bit codes and groups of 8 inputs");
  const int64_t in_features = x.size(1), out_features = codes.size(0);
  check_x(x, in_features);
  check_packed(codes, out_features, in_features / 8 * num_codebooks, 8);
  TORCH_CHECK(scales.numel() == out_features, "scales must be (O, 1)");
  const at::Tensor books = codebooks.to(at::kFloat).contiguous();
  TORCH_CHECK(books.numel() == num_codebooks * 256 * 8, "codebooks must be (M, 256, 8)");
  auto y = zero_filled({x.size(0), out_features});
  const Problem p(x, y);
  auto run = [&](auto m_c) {
    constexpr int M = decltype(m_c)::value;
    dispatch_half_or_float(scales, [&](auto scale_type) {
      using Scale = decltype(scale_type);
      const AqlmArgs<Scale> args{PackedRows(codes), books.data_ptr<float>(), scales.data_ptr<Scale>()};
      multiply<Aqlm<M, Scale>>(args, p);
    });
  };
  switch (num_codebooks) {
    case 1: run(std::integral_constant<int, 1>{}); break;
    case 2: run(std::integral_constant<int, 2>{}); break;
    case 3: run(std::integral_constant<int, 3>{}); break;
    default: TORCH_CHECK(false, "aqlm_gemv supports 1 to 3 codebooks, got ", num_codebooks);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("affine_gemv", &affine_gemv, "y (B, O) = x (B, I) · Wᵀ for the `affine` format (2-4 bits)");
  m.def("lut_gemv", &lut_gemv, "y (B, O) = x (B, I) · Wᵀ for the `lut` format (2-4 bits)");
  m.def("aqlm_gemv", &aqlm_gemv, "y (B, O) = x (B, I) · Wᵀ for the `aqlm` format (1-3 codebooks of 8 bits, g = 8)");
}
