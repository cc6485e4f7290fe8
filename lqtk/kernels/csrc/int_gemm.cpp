// W4A8 integer GEMM for CPUs with AVX2 (no VNNI): y = F.linear(x̂, W · scale), x̂ the per-token 8-bit fake
// quantization of x (lqtk.quant.activations.quantize_tokens), W (N, K) integer weights with |W| ≤ 64 (4-bit codes
// minus their zero point, times TRIP factors 2^α, α ≤ 2), per output channel or per group of inputs scales.
//
// One call quantizes x per token (vectorized, bit-identical to torch's fp32 ops) into uint8 codes and computes
//     y[t, o] = s_t · Σ_g s_og · (Σ_{c in g} q[t, c] W[o, c]  −  z_t Σ_{c in g} W[o, c])
// with the inner sums exact in integers.
//
// Micro-kernel (inline asm): 3 tokens × 16 outputs. Per step of 4 inputs, the 16 outputs' weights (4 consecutive
// inputs per int32 lane: 2 ymm) are multiplied by each token's 4 codes broadcast (vpmaddubsw: u8 × s8, adjacent
// products added in int16). vpmaddubsw stays exact while 2 · 255 · |W| < 2^15; the usual chain widens every
// product pair to int32 at once (vpmaddwd by ones, vpaddd). Here CHAIN products are first added in int16
// (vpaddw), CHAIN · 2 · 255 · max|W| < 2^15: 4 for |W| ≤ 16 (plain 4-bit codes), 2 for |W| ≤ 32, 1 up to 64, so
// that for 4-bit weights one vpmaddwd + vpaddd serves 4 vpmaddubsw instead of 1: 1.25 multiplier-port ops per
// 32 multiply-adds instead of 2. Weights are packed once into panels of 16 outputs interleaved by 4 inputs;
// the codes of 3 tokens are stored interleaved by 4 inputs too, so the kernel reads two sequential streams.
// Per-group scales: after each group the kernel converts its int32 sums to fp32, subtracts z_t Σ_{c in g} W[o, c]
// (exactly: integers below 2^24) and accumulates them times the group scales in an L1 buffer of the tile.
// Blocks of tokens × outputs are handed out dynamically to torch's threads (at::parallel_for + an atomic counter).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>

namespace {

constexpr int MR = 3;   // tokens per micro-tile
constexpr int NR = 16;  // outputs per micro-tile (2 ymm of int32)
constexpr int KU = 16;  // inputs per kernel loop iteration (4 steps of 4): K is padded to a multiple

int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// ---- per-token quantization --------------------------------------------------------------------------------------

// Codes of one token into its slot of a triple (step s of 4 inputs at byte 12 s + 4 slot), its scale and zero
// point: the fp32 operations of range_qparams(amin · clip, amax · clip) and quantize_affine, in torch's order
// (true division, round half to even), so the codes are the same as quantize_tokens'.
void quantize_token(const float* x, int64_t K, int64_t K_pad, float clip, uint8_t* triple, int slot, float* scale_out,
                    float* zero_out) {
  __m256 mn0 = _mm256_set1_ps(INFINITY), mn1 = mn0, mx0 = _mm256_set1_ps(-INFINITY), mx1 = mx0;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + k), v1 = _mm256_loadu_ps(x + k + 8);
    mn0 = _mm256_min_ps(mn0, v0);
    mx0 = _mm256_max_ps(mx0, v0);
    mn1 = _mm256_min_ps(mn1, v1);
    mx1 = _mm256_max_ps(mx1, v1);
  }
  alignas(32) float lo8[8], hi8[8];
  _mm256_store_ps(lo8, _mm256_min_ps(mn0, mn1));
  _mm256_store_ps(hi8, _mm256_max_ps(mx0, mx1));
  float mn = INFINITY, mx = -INFINITY;
  for (int i = 0; i < 8; ++i) {
    mn = std::min(mn, lo8[i]);
    mx = std::max(mx, hi8[i]);
  }
  for (; k < K; ++k) {
    mn = std::min(mn, x[k]);
    mx = std::max(mx, x[k]);
  }
  const float wmin = std::min(mn * clip, 0.0f), wmax = std::max(mx * clip, 0.0f);
  float span = wmax - wmin;
  if (!(span > 0)) span = 1.0f;  // an all-zero token
  const float scale = span / 255.0f;
  const float zero = std::nearbyint(-wmin / scale);
  *scale_out = scale;
  *zero_out = zero;

  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(zero), lo = _mm256_setzero_ps(),
               hi = _mm256_set1_ps(255.0f);
  auto codes8 = [&](const float* p) {  // clamp(round(x / s) + z, 0, 255), 8 int32 lanes
    const __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(p), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(_mm256_add_ps(r, vz), lo), hi));
  };
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  alignas(32) uint32_t steps[8];
  uint8_t* dst = triple + 4 * slot;
  for (k = 0; k + 32 <= K; k += 32) {
    // the packs work within 128-bit lanes: dwords come out as c0[0:4] c1[0:4] c2[0:4] c3[0:4] c0[4:8] ...
    const __m256i p = _mm256_packus_epi16(_mm256_packs_epi32(codes8(x + k), codes8(x + k + 8)),
                                          _mm256_packs_epi32(codes8(x + k + 16), codes8(x + k + 24)));
    _mm256_store_si256((__m256i*)steps, _mm256_permutevar8x32_epi32(p, order));
    for (int j = 0; j < 8; ++j) std::memcpy(dst + 12 * (k / 4 + j), steps + j, 4);
  }
  for (; k < K_pad; ++k) {
    float r = k < K ? std::min(std::max(std::nearbyint(x[k] / scale) + zero, 0.0f), 255.0f) : 0.0f;
    dst[12 * (k / 4) + k % 4] = (uint8_t)r;
  }
}

// ---- micro-kernels -----------------------------------------------------------------------------------------------
// Registers: ymm0-5 int32 sums (token i: outputs 0-7 in ymm 2i, 8-15 in 2i+1), ymm6-11 int16 partial sums,
// ymm12-13 one step's weights, ymm14 one token's 4 codes broadcast, ymm15 a product. [a] advances 48 bytes and
// [w] 256 per iteration of 16 inputs.
#define IG_W(u) "vmovdqu 64*" #u "(%[w]), %%ymm12\n\t" "vmovdqu 64*" #u "+32(%[w]), %%ymm13\n\t"
#define IG_B(i, u) "vbroadcastss 12*" #u "+4*" #i "(%[a]), %%ymm14\n\t"  // (a little faster than vpbroadcastd on Zen 3)
#define IG_SET(x, y) "vpmaddubsw %%ymm12, %%ymm14, %%ymm" #x "\n\t" "vpmaddubsw %%ymm13, %%ymm14, %%ymm" #y "\n\t"
#define IG_ADD(x, y)                                                                                   \
  "vpmaddubsw %%ymm12, %%ymm14, %%ymm15\n\t" "vpaddw %%ymm15, %%ymm" #x ", %%ymm" #x "\n\t"            \
  "vpmaddubsw %%ymm13, %%ymm14, %%ymm15\n\t" "vpaddw %%ymm15, %%ymm" #y ", %%ymm" #y "\n\t"
#define IG_FIRST(u) IG_W(u) IG_B(0, u) IG_SET(6, 7) IG_B(1, u) IG_SET(8, 9) IG_B(2, u) IG_SET(10, 11)
#define IG_NEXT(u) IG_W(u) IG_B(0, u) IG_ADD(6, 7) IG_B(1, u) IG_ADD(8, 9) IG_B(2, u) IG_ADD(10, 11)
#define IG_WIDEN1(i, j) "vpmaddwd (%[ones]), %%ymm" #j ", %%ymm" #j "\n\t" "vpaddd %%ymm" #j ", %%ymm" #i ", %%ymm" #i "\n\t"
#define IG_WIDEN IG_WIDEN1(0, 6) IG_WIDEN1(1, 7) IG_WIDEN1(2, 8) IG_WIDEN1(3, 9) IG_WIDEN1(4, 10) IG_WIDEN1(5, 11)
#define IG_BODY4 IG_FIRST(0) IG_NEXT(1) IG_NEXT(2) IG_NEXT(3) IG_WIDEN
#define IG_BODY2 IG_FIRST(0) IG_NEXT(1) IG_WIDEN IG_FIRST(2) IG_NEXT(3) IG_WIDEN
#define IG_BODY1 IG_FIRST(0) IG_WIDEN IG_FIRST(1) IG_WIDEN IG_FIRST(2) IG_WIDEN IG_FIRST(3) IG_WIDEN
#define IG_ZERO                                                                                             \
  "vpxor %%xmm0, %%xmm0, %%xmm0\n\t" "vpxor %%xmm1, %%xmm1, %%xmm1\n\t" "vpxor %%xmm2, %%xmm2, %%xmm2\n\t"   \
  "vpxor %%xmm3, %%xmm3, %%xmm3\n\t" "vpxor %%xmm4, %%xmm4, %%xmm4\n\t" "vpxor %%xmm5, %%xmm5, %%xmm5\n\t"
#define IG_CLOBBERS                                                                                              \
  "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", \
      "xmm12", "xmm13", "xmm14", "xmm15"

// acc[16 i + o] = Σ over `iters` × 16 inputs of codes(token i) · W[o]
#define IG_KERNEL(BODY)                                                                                    \
  __asm__ volatile(IG_ZERO "1:\n\t" BODY "add $256, %[w]\n\t" "add $48, %[a]\n\t" "dec %[n]\n\t" "jnz 1b\n\t"   \
                   "vmovdqu %%ymm0, (%[acc])\n\t" "vmovdqu %%ymm1, 32(%[acc])\n\t" "vmovdqu %%ymm2, 64(%[acc])\n\t" \
                   "vmovdqu %%ymm3, 96(%[acc])\n\t" "vmovdqu %%ymm4, 128(%[acc])\n\t"                            \
                   "vmovdqu %%ymm5, 160(%[acc])\n\t" "vzeroupper\n\t"                                            \
                   : [w] "+r"(w), [a] "+r"(a), [n] "+r"(iters)                                                   \
                   : [acc] "r"(acc), [ones] "r"(kOnes16)                                                         \
                   : IG_CLOBBERS)

// f[16 i + o] += Σ_g sc[16 g + o] · (Σ over group g of codes(token i) · W[o]  −  z[i] · sw[16 g + o]), `groups`
// groups of `iters` × 16 inputs. The difference is computed in fp32 from exact operands (int32 sums below 2^24,
// z · sw exact) by one fma: exact while it stays below 2^24, i.e. 255 · max|W| · group < 2^24 (groups ≤ 1024).
// Fold registers: ymm12-13 the group's scales, ymm6-7 its weight sums, ymm8-10 the 3 zero points.
#define IG_FOLD1(i, sw, z, sc, off)                                                                  \
  "vcvtdq2ps %%ymm" #i ", %%ymm" #i "\n\t" "vfnmadd231ps %%ymm" #sw ", %%ymm" #z ", %%ymm" #i "\n\t" \
  "vfmadd213ps " #off "(%[f]), %%ymm" #sc ", %%ymm" #i "\n\t" "vmovups %%ymm" #i ", " #off "(%[f])\n\t"
#define IG_GKERNEL(BODY)                                                                                         \
  __asm__ volatile("2:\n\t" IG_ZERO "mov %[iters], %[n]\n\t"                                                     \
                   "1:\n\t" BODY "add $256, %[w]\n\t" "add $48, %[a]\n\t" "dec %[n]\n\t" "jnz 1b\n\t"            \
                   "vmovups (%[sc]), %%ymm12\n\t" "vmovups 32(%[sc]), %%ymm13\n\t"                               \
                   "vmovups (%[sw]), %%ymm6\n\t" "vmovups 32(%[sw]), %%ymm7\n\t"                                 \
                   "vbroadcastss (%[z]), %%ymm8\n\t" "vbroadcastss 4(%[z]), %%ymm9\n\t"                          \
                   "vbroadcastss 8(%[z]), %%ymm10\n\t"                                                           \
                   IG_FOLD1(0, 6, 8, 12, 0) IG_FOLD1(1, 7, 8, 13, 32) IG_FOLD1(2, 6, 9, 12, 64)                   \
                   IG_FOLD1(3, 7, 9, 13, 96) IG_FOLD1(4, 6, 10, 12, 128) IG_FOLD1(5, 7, 10, 13, 160)             \
                   "add $64, %[sc]\n\t" "add $64, %[sw]\n\t" "dec %[g]\n\t" "jnz 2b\n\t" "vzeroupper\n\t"        \
                   : [w] "+r"(w), [a] "+r"(a), [n] "=&r"(n), [g] "+r"(groups), [sc] "+r"(sc), [sw] "+r"(sw)     \
                   : [iters] "r"(iters), [f] "r"(f), [z] "r"(z), [ones] "r"(kOnes16)                             \
                   : IG_CLOBBERS)

alignas(32) const int16_t kOnes16[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1};

template <int CHAIN>
void dot_3x16(const uint8_t* a, const int8_t* w, int64_t iters, int32_t* acc) {
  if (CHAIN == 4) IG_KERNEL(IG_BODY4);
  else if (CHAIN == 2) IG_KERNEL(IG_BODY2);
  else IG_KERNEL(IG_BODY1);
}

template <int CHAIN>
void dot_groups_3x16(const uint8_t* a, const int8_t* w, const float* sc, const float* sw, const float* z,
                     int64_t iters, int64_t groups, float* f) {
  int64_t n;
  if (CHAIN == 4) IG_GKERNEL(IG_BODY4);
  else if (CHAIN == 2) IG_GKERNEL(IG_BODY2);
  else IG_GKERNEL(IG_BODY1);
}

// ---- blocks and threads ------------------------------------------------------------------------------------------

enum Mode { RAW = 0, CHANNEL = 1, GROUP = 2 };

struct Problem {
  const uint8_t* codes;       // (T_pad / 3, K_pad / 4, 3, 4)
  int64_t T_pad, K_pad;
  const int8_t* panels;       // (N_pad / 16, K_pad / 4, 16, 4)
  int64_t N_pad;
  Mode mode;
  const float* token_scale;   // (T_pad)
  const float* token_zero;    // (T_pad)
  const float* scales;        // CHANNEL: (N_pad) s_o; GROUP: (N_pad / 16, G, 16) s_og
  const int32_t* weight_sum;  // CHANNEL: (N_pad) Σ_c W[o, c]
  const float* group_sums;    // GROUP: (N_pad / 16, G, 16) Σ_{c in g} W[o, c]
  int64_t group, groups;      // GROUP: inputs per group (a multiple of 16), number of groups
  void* out;                  // (T_pad, N_pad), fp32 (int32 for RAW)
};

// Tokens [t0, t1) × outputs [n0, n1) (multiples of 3 and 16): per panel of 16 outputs (16 · K bytes, 64 KiB at
// K = 4096: it stays in L2 while) every triple of tokens runs over all the inputs at once. (Blocking K to keep the
// panel in L1 measured slower: the partial sums then go through memory once per block.)
template <int CHAIN>
void run_block(const Problem& p, int64_t t0, int64_t t1, int64_t n0, int64_t n1) {
  alignas(32) int32_t acc[MR * NR];
  alignas(32) float f[MR * NR];
  const int64_t full = p.mode == GROUP ? p.K_pad / p.group : 0, tail = p.mode == GROUP ? p.K_pad - full * p.group : 0;
  for (int64_t n = n0; n < n1; n += NR) {
    const int8_t* w = p.panels + n * p.K_pad;
    for (int64_t t = t0; t < t1; t += MR) {
      const uint8_t* a = p.codes + t * p.K_pad;
      if (p.mode == GROUP) {
        const float *sc = p.scales + n * p.groups, *sw = p.group_sums + n * p.groups, *z = p.token_zero + t;
        std::memset(f, 0, sizeof(f));
        if (full) dot_groups_3x16<CHAIN>(a, w, sc, sw, z, p.group / KU, full, f);
        if (tail)  // a shorter last group
          dot_groups_3x16<CHAIN>(a + full * p.group * MR, w + full * p.group * NR, sc + full * NR, sw + full * NR, z,
                                 tail / KU, 1, f);
        for (int i = 0; i < MR; ++i) {  // y = Σ_g s_og (acc_g − z_t Σ_{c in g} W[o, c]) · s_t
          const __m256 st = _mm256_set1_ps(p.token_scale[t + i]);
          float* y = (float*)p.out + (t + i) * p.N_pad + n;
          _mm256_storeu_ps(y, _mm256_mul_ps(_mm256_load_ps(f + NR * i), st));
          _mm256_storeu_ps(y + 8, _mm256_mul_ps(_mm256_load_ps(f + NR * i + 8), st));
        }
        continue;
      }
      dot_3x16<CHAIN>(a, w, p.K_pad / KU, acc);
      for (int i = 0; i < MR; ++i) {
        const __m256i s0 = _mm256_load_si256((const __m256i*)(acc + NR * i));
        const __m256i s1 = _mm256_load_si256((const __m256i*)(acc + NR * i + 8));
        if (p.mode == RAW) {
          int32_t* y = (int32_t*)p.out + (t + i) * p.N_pad + n;
          _mm256_storeu_si256((__m256i*)y, s0);
          _mm256_storeu_si256((__m256i*)(y + 8), s1);
          continue;
        }
        // y = (acc − z_t Σ_c W[o, c]) · s_o · s_t, the difference exact in int32
        const __m256i z = _mm256_set1_epi32((int32_t)p.token_zero[t + i]);
        const __m256 st = _mm256_set1_ps(p.token_scale[t + i]);
        auto finish = [&](__m256i s, int64_t o) {
          const __m256i ws = _mm256_loadu_si256((const __m256i*)(p.weight_sum + o));
          const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(s, _mm256_mullo_epi32(z, ws)));
          return _mm256_mul_ps(_mm256_mul_ps(d, _mm256_loadu_ps(p.scales + o)), st);
        };
        float* y = (float*)p.out + (t + i) * p.N_pad + n;
        _mm256_storeu_ps(y, finish(s0, n));
        _mm256_storeu_ps(y + 8, finish(s1, n + 8));
      }
    }
  }
}

// fn(i) for i in [0, tasks), handed out one at a time to torch's threads (a busy machine slows threads unevenly)
template <class F>
void parallel_tasks(int64_t tasks, const F& fn) {
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i; (i = next.fetch_add(1)) < tasks;) fn(i);
  });
}

void run(const Problem& p, int chain, int64_t block_tokens, int64_t block_outputs) {
  const int64_t mc = std::max<int64_t>(MR, block_tokens / MR * MR), nc = std::max<int64_t>(NR, block_outputs / NR * NR);
  const int64_t tb = (p.T_pad + mc - 1) / mc, nb = (p.N_pad + nc - 1) / nc;
  parallel_tasks(tb * nb, [&](int64_t i) {
    const int64_t t0 = (i % tb) * mc, n0 = (i / tb) * nc;
    const int64_t t1 = std::min(t0 + mc, p.T_pad), n1 = std::min(n0 + nc, p.N_pad);
    if (chain == 4) run_block<4>(p, t0, t1, n0, n1);
    else if (chain == 2) run_block<2>(p, t0, t1, n0, n1);
    else run_block<1>(p, t0, t1, n0, n1);
  });
}

// ---- torch entry points ------------------------------------------------------------------------------------------

int chain_for(int64_t max_abs) { return max_abs <= 16 ? 4 : max_abs <= 32 ? 2 : 1; }

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous(), name, " must be a contiguous CPU tensor");
}

// W (N, K) int8 -> panels (N_pad / 16, K_pad / 4, 16, 4): output o of a panel holds inputs 4s..4s+3 at [s, o]
torch::Tensor pack_weight(torch::Tensor weight) {
  check_cpu(weight, "weight");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kChar, "weight must be int8 (N, K)");
  const int64_t N = weight.size(0), K = weight.size(1), N_pad = round_up(N, NR), K_pad = round_up(K, KU);
  TORCH_CHECK(N > 0 && K > 0 && K_pad <= (int64_t(1) << 17), "weight (", N, ", ", K, "): the kernels take 1 to 2^17 ",
              "inputs (int32 sums of 255 · 64 · K)");
  auto panels = torch::zeros({N_pad / NR, K_pad / 4, NR, 4}, weight.options());
  const int8_t* src = weight.data_ptr<int8_t>();
  int8_t* dst = panels.data_ptr<int8_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      int8_t* panel = dst + (o / NR) * K_pad * NR + (o % NR) * 4;
      for (int64_t k = 0; k < K; ++k) panel[(k / 4) * NR * 4 + k % 4] = src[o * K + k];
    }
  });
  return panels;
}

// x (T, K) fp32 -> codes (T_pad / 3, K_pad / 4, 3, 4) uint8, scales (T_pad), zero points (T_pad) (padding rows 0)
std::vector<torch::Tensor> quantize(torch::Tensor x, double clip) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be fp32 (T, K)");
  const int64_t T = x.size(0), K = x.size(1), T_pad = round_up(std::max<int64_t>(T, 1), MR), K_pad = round_up(K, KU);
  auto codes = torch::empty({T_pad / MR, K_pad / 4, MR, 4}, x.options().dtype(at::kByte));
  auto scale = torch::empty({T_pad}, x.options()), zero = torch::empty({T_pad}, x.options());
  const float* xs = x.data_ptr<float>();
  uint8_t* q = codes.data_ptr<uint8_t>();
  float *s = scale.data_ptr<float>(), *z = zero.data_ptr<float>();
  at::parallel_for(0, T_pad, 8, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      uint8_t* triple = q + (t / MR) * MR * K_pad;
      if (t < T) {
        quantize_token(xs + t * K, K, K_pad, (float)clip, triple, t % MR, s + t, z + t);
      } else {
        for (int64_t j = 0; j < K_pad / 4; ++j) std::memset(triple + 12 * j + 4 * (t % MR), 0, 4);
        s[t] = 1.0f;
        z[t] = 0.0f;
      }
    }
  });
  return {codes, scale, zero};
}

// Σ_c codes[t, c] W[o, c] in int32, (T_pad, N_pad), from quantize's codes layout
torch::Tensor int_matmul(torch::Tensor codes, torch::Tensor panels, int64_t chain, int64_t block_tokens,
                         int64_t block_outputs) {
  check_cpu(codes, "codes");
  check_cpu(panels, "panels");
  TORCH_CHECK(codes.dim() == 4 && codes.size(2) == MR && panels.dim() == 4 && codes.size(1) == panels.size(1),
              "codes and panels must come from quantize and pack_weight, for the same number of inputs");
  const int64_t T_pad = codes.size(0) * MR, K_pad = codes.size(1) * 4, N_pad = panels.size(0) * NR;
  auto out = torch::empty({T_pad, N_pad}, codes.options().dtype(at::kInt));
  Problem p{codes.data_ptr<uint8_t>(), T_pad, K_pad, panels.data_ptr<int8_t>(), N_pad, RAW, nullptr, nullptr,
            nullptr, nullptr, nullptr, 0, 0, out.data_ptr()};
  run(p, (int)chain, block_tokens, block_outputs);
  return out;
}

// y (T, N) fp32 = F.linear(fake_quantize_tokens(x, 8, clip), W · scales): per channel (scales (N, 1), weight_sum
// (N_pad) int32) or per group of `group` inputs (scales (N, G), group_sums (N_pad / 16, G, 16) fp32 from
// pack_group_sums)
torch::Tensor w4a8_linear(torch::Tensor x, torch::Tensor panels, int64_t out_features, int64_t chain,
                          torch::Tensor scales, torch::Tensor weight_sum, torch::Tensor group_sums, int64_t group,
                          double clip, int64_t block_tokens, int64_t block_outputs) {
  check_cpu(panels, "panels");
  check_cpu(scales, "scales");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == out_features && scales.scalar_type() == at::kFloat,
              "scales must be fp32 (N, G)");
  const int64_t T = x.size(0), K_pad = panels.size(1) * 4, N_pad = panels.size(0) * NR, G = scales.size(1);
  TORCH_CHECK(x.dim() == 2 && round_up(x.size(1), KU) == K_pad, "x has ", x.size(1), " inputs; the weight has ",
              K_pad, " (padded)");
  auto q = quantize(x, clip);
  const int64_t T_pad = q[0].size(0) * MR;
  auto out = torch::empty({T_pad, N_pad}, x.options());
  Problem p{q[0].data_ptr<uint8_t>(), T_pad, K_pad, panels.data_ptr<int8_t>(), N_pad, CHANNEL,
            q[1].data_ptr<float>(), q[2].data_ptr<float>(), nullptr, nullptr, nullptr, 0, 0, out.data_ptr()};
  // the scales padded to N_pad, per group in the panels' order (N_pad / 16, G, 16)
  auto packed_scales = torch::zeros({N_pad / NR, G, NR}, x.options());
  const float* s = scales.data_ptr<float>();
  float* ps = packed_scales.data_ptr<float>();
  for (int64_t o = 0; o < out_features; ++o)
    for (int64_t g = 0; g < G; ++g) ps[((o / NR) * G + g) * NR + o % NR] = s[o * G + g];
  p.scales = ps;
  if (group == 0) {
    check_cpu(weight_sum, "weight_sum");
    TORCH_CHECK(G == 1 && weight_sum.numel() == N_pad && weight_sum.scalar_type() == at::kInt,
                "per channel: scales (N, 1) and weight_sum int32 (N_pad)");
    p.weight_sum = weight_sum.data_ptr<int32_t>();
  } else {
    check_cpu(group_sums, "group_sums");
    TORCH_CHECK(group % KU == 0, "the group size must be a multiple of ", KU, ", got ", group);
    const int64_t full = K_pad / group, tail = K_pad - full * group;
    TORCH_CHECK(G == full + (tail > 0) && group_sums.numel() == N_pad * G && group_sums.scalar_type() == at::kFloat,
                "scales have ", G, " groups; ", K_pad, " inputs in groups of ", group, " make ", full + (tail > 0));
    p.mode = GROUP;
    p.group_sums = group_sums.data_ptr<float>();
    p.group = group;
    p.groups = G;
  }
  run(p, (int)chain, block_tokens, block_outputs);
  if (N_pad != out_features) return out.narrow(0, 0, T).narrow(1, 0, out_features).contiguous();
  return out.narrow(0, 0, T);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_weight", &pack_weight, "int8 W (N, K) -> panels of 16 outputs interleaved by 4 inputs");
  m.def("quantize", &quantize, "per-token uint8 codes (triples interleaved by 4 inputs), scales, zero points");
  m.def("int_matmul", &int_matmul, "int32 Σ codes · W from quantize's codes and pack_weight's panels");
  m.def("w4a8_linear", &w4a8_linear, "per-token quantization of x and the integer GEMM with scales, one call");
}
