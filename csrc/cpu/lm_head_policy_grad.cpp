// CPU kernel of lm_head_policy_grad / lm_head_logprob: one pass over W in vocabulary tiles.
//
// Work is split into items (a block of rows x a slice of the vocabulary) run by at::parallel_for. For each tile
// of W (TV rows) an item computes
//   L   = Z_blk @ W_t^T                       (RB x TV logits, float32)
// then per row, in a vectorised loop: bias, tile max / argmax / NaN position, the rescale of the running state
// (latentseek/online_softmax.h) and L <- exp(L - m) in place, summed into s; finally
//   acc += L @ W_t                            (RB x H accumulator, float32, only when the gradient is wanted)
// Nothing of size N x V is ever allocated: per item RB x TV logits, TV x H packed weights, RB x H accumulator.
// Vocabulary slices of the same rows are merged at the end by rescaling to the common max.
//
// The two products of bf16/fp16 inputs take one of two paths, chosen per call from the CPU's capability
// (latentseek/cpu_paths.h, which also holds the LATENTSEEK_CPU_PATH override):
// - widen: the W tile is widened to fp32 and both products run in ATen's fp32 GEMM (MKL). Without bf16/fp16 matrix
//   units (an AVX2 or plain AVX-512 CPU) ATen's 16-bit GEMMs are emulated and several times slower than fp32.
// - units (AMX-BF16 or AVX512-BF16 for bf16, AMX-FP16 for fp16): both products run on the 16-bit operands with fp32
//   accumulation and fp32 output through oneDNN's brgemm ukernel (UnitsTile below).
// fp32 and fp64 inputs use ATen's GEMM in their own dtype.
//
// Precision. The logits are accumulated and kept in float32 (float64 for float64 inputs) on every path: products of
// bf16/fp16 values are exact in float32, so they equal the logits of an fp32 GEMM on the upcast inputs up to the
// order of the sum. The units path rounds P to bf16/fp16 only as the operand of P W_t, as the CUDA kernel does
// (its header has the argument): P = exp(L - m) is computed in fp32 against the running max m, so the maximum, and
// the argmax x as p(x) -> 1, enters as exactly 1 and W[x] - acc/s stays accurate as the gradient vanishes; every
// other entry carries a relative error <= 2^-8 (bf16) / 2^-11 (fp16); s is summed from the fp32 P; the accumulator
// stays fp32. fp16 P is stored times 2^14 so that no probability is subnormal.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#include "latentseek/checks.h"
#include "latentseek/cpu_paths.h"
#include "latentseek/entry.h"
#include "latentseek/online_softmax.h"
#include "latentseek/sampling.h"

namespace latentseek {
namespace {

// Tile shape: RB rows x TV vocabulary entries. TV keeps a widened W tile (TV x H floats) and the logits
// (RB x TV) near the cache; RB bounds the row block so that a large N still splits into several items.
constexpr int64_t kTileV = 512;
constexpr int64_t kMaxRowBlock = 512;

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define LS_X86_DISPATCH 1
#define LS_ALWAYS_INLINE inline __attribute__((always_inline))
#define LS_TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define LS_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")))
#include <immintrin.h>
// The vector helpers are always inlined, so the AVX calling-convention note does not apply.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define LS_X86_DISPATCH 0
#define LS_ALWAYS_INLINE inline
#endif

// Eight floats in GCC/Clang vector extensions: AVX registers where the caller is compiled for AVX2, two SSE
// registers otherwise. Every helper below is always_inline, so each dispatch target gets its own copy.
typedef float vf8 __attribute__((vector_size(32)));
typedef int32_t vi8 __attribute__((vector_size(32)));

LS_ALWAYS_INLINE vf8 splat(float x) { return vf8{x, x, x, x, x, x, x, x}; }
LS_ALWAYS_INLINE vi8 splati(int32_t x) { return vi8{x, x, x, x, x, x, x, x}; }
LS_ALWAYS_INLINE vf8 loadu(const float* p) {
  vf8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
LS_ALWAYS_INLINE void storeu(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }
LS_ALWAYS_INLINE vf8 select(vi8 mask, vf8 a, vf8 b) {  // mask lanes are all-ones or zero
  return reinterpret_cast<vf8>((reinterpret_cast<vi8>(a) & mask) | (reinterpret_cast<vi8>(b) & ~mask));
}

// exp(x) for x <= 0, NaN or -inf (the only arguments an online softmax produces): Cody-Waite reduction
// x = k ln2 + r, a degree-7 polynomial for exp(r) (Cephes expf, ~1 ulp), 2^k through the exponent bits.
// Arguments below -87 give exactly 0 (so -inf logits contribute nothing); NaN stays NaN.
LS_ALWAYS_INLINE vf8 exp_nonpositive(vf8 x) {
  const vi8 underflow = x < splat(-87.0f);
  const vf8 xc = select(underflow, splat(-87.0f), x);
  // Round to nearest through the 1.5 * 2^23 trick (no rounding instruction needed on plain SSE2).
  const vf8 magic = splat(12582912.0f);
  const vf8 k = (xc * splat(1.44269504088896341f) + magic) - magic;
  vf8 r = xc - k * splat(0.693359375f);
  r = r - k * splat(-2.12194440e-4f);
  vf8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  const vi8 bits = (__builtin_convertvector(k, vi8) + splati(127)) << 23;
  const vf8 result = p * reinterpret_cast<vf8>(bits);
  return select(underflow, splat(0.0f), result);
}

// Max over a row tile ignoring NaN (like MAXPS), and whether a NaN was seen.
LS_ALWAYS_INLINE float max_ignore_nan(const float* x, int64_t n, bool& has_nan) {
  const float ninf = -std::numeric_limits<float>::infinity();
  vf8 mv = splat(ninf);
  vi8 nanv = splati(0);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const vf8 v = loadu(x + j);
    mv = select(v > mv, v, mv);
    nanv |= (v != v);
  }
  float m = ninf;
  bool nan = false;
  for (int i = 0; i < 8; ++i) {
    m = mv[i] > m ? mv[i] : m;
    nan = nan || nanv[i] != 0;
  }
  for (; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    nan = nan || x[j] != x[j];
  }
  has_nan = nan;
  return m;
}

// x <- exp(x - m) in place; returns the sum. m is finite or +inf here (the caller maps -inf to 0).
LS_ALWAYS_INLINE float exp_shift_sum(float* x, int64_t n, float m) {
  const vf8 mv = splat(m);
  vf8 sv = splat(0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const vf8 e = exp_nonpositive(loadu(x + j) - mv);
    storeu(x + j, e);
    sv += e;
  }
  if (j < n) {  // pad the tail with -inf, whose exp is exactly 0
    float tail[8];
    const int64_t t = n - j;
    for (int i = 0; i < 8; ++i) tail[i] = i < t ? x[j + i] : -std::numeric_limits<float>::infinity();
    const vf8 e = exp_nonpositive(loadu(tail) - mv);
    storeu(tail, e);
    sv += e;
    std::memcpy(x + j, tail, t * sizeof(float));
  }
  float s = 0.0f;
  for (int i = 0; i < 8; ++i) s += sv[i];
  return s;
}

LS_ALWAYS_INLINE void add_bias(float* x, const float* b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] += b[j];
}

LS_ALWAYS_INLINE void scale_inplace(float* x, float a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

// Scalar versions for float64 (the gradcheck dtype; speed does not matter there).
inline double max_ignore_nan(const double* x, int64_t n, bool& has_nan) {
  double m = -std::numeric_limits<double>::infinity();
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    m = x[j] > m ? x[j] : m;
    nan = nan || std::isnan(x[j]);
  }
  has_nan = nan;
  return m;
}
inline double exp_shift_sum(double* x, int64_t n, double m) {
  double s = 0.0;
  for (int64_t j = 0; j < n; ++j) s += (x[j] = std::exp(x[j] - m));
  return s;
}
inline void add_bias(double* x, const double* b, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] += b[j];
}
inline void scale_inplace(double* x, double a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) x[j] *= a;
}

template <typename acc_t>
int64_t first_index_of(const acc_t* x, int64_t n, acc_t value) {
  for (int64_t j = 0; j < n; ++j)
    if (x[j] == value) return j;
  return n - 1;  // unreachable: value is the max of x
}

template <typename acc_t>
int64_t first_nan(const acc_t* x, int64_t n) {
  for (int64_t j = 0; j < n; ++j)
    if (x[j] != x[j]) return j;
  return -1;
}

// The arguments of one tile's per-row update.
template <typename acc_t>
struct TileRows {
  acc_t* logits;        // [rows, tv], overwritten with exp(l - m)
  int64_t rows, tv, v0;
  const acc_t* bias;    // [tv] slice or nullptr
  const int64_t* tokens;  // [rows] or nullptr
  RowState<acc_t>* state;  // [rows]
  acc_t* acc;           // [rows, H] or nullptr
  int64_t H;
};

// Per-row online-softmax update of one tile: bias, max, argmax, NaN position, given-token logit, rescale of the
// running (m, s, acc), then exp in place.
template <typename acc_t>
LS_ALWAYS_INLINE void update_rows_impl(const TileRows<acc_t>& t) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < t.rows; ++i) {
    acc_t* l = t.logits + i * t.tv;
    RowState<acc_t>& st = t.state[i];
    if (t.bias) add_bias(l, t.bias, t.tv);
    bool has_nan = false;
    const acc_t tmax = max_ignore_nan(l, t.tv, has_nan);
    if (tmax > st.best) {  // strict: an equal max in a later tile keeps the earlier index
      st.best = tmax;
      st.idx = t.v0 + first_index_of(l, t.tv, tmax);
    }
    if (has_nan && st.nan_idx < 0) st.nan_idx = t.v0 + first_nan(l, t.tv);
    if (t.tokens) {
      const int64_t j = t.tokens[i] - t.v0;
      if (j >= 0 && j < t.tv) st.lx = l[j];
    }
    const acc_t m_new = tmax > st.m ? tmax : st.m;
    const acc_t scale = rescale_factor(st.m, m_new);
    st.m = m_new;
    // While every logit so far is -inf, shift by 0 instead (exp(-inf) = 0, NaN stays NaN).
    const acc_t shift = m_new == ninf ? acc_t(0) : m_new;
    st.s = st.s * scale + exp_shift_sum(l, t.tv, shift);
    if (t.acc && scale != acc_t(1)) scale_inplace(t.acc + i * t.H, scale, t.H);
  }
}

// Widening of a W tile to float32. bf16 -> fp32 is a 16-bit shift of the bits; fp16 uses F16C where present.
LS_ALWAYS_INLINE void widen_impl(const at::BFloat16* in, float* out, int64_t n) {
  const uint16_t* src = reinterpret_cast<const uint16_t*>(in);
  uint32_t* dst = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<uint32_t>(src[j]) << 16;
}
LS_ALWAYS_INLINE void widen_impl(const at::Half* in, float* out, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(in[j]);
}

#if LS_X86_DISPATCH
LS_TARGET_AVX2 void update_rows_avx2(const TileRows<float>& t) { update_rows_impl(t); }
LS_TARGET_AVX2 void widen_avx2(const at::BFloat16* in, float* out, int64_t n) { widen_impl(in, out, n); }
LS_TARGET_AVX2 void widen_avx2(const at::Half* in, float* out, int64_t n) {
  int64_t j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j))));
  widen_impl(in + j, out + j, n - j);
}
#endif

void update_rows(const TileRows<float>& t) {
#if LS_X86_DISPATCH
  if (cpu_caps().avx2) return update_rows_avx2(t);
#endif
  update_rows_impl(t);
}
void update_rows(const TileRows<double>& t) { update_rows_impl(t); }

template <typename scalar_t>
void widen(const scalar_t* in, float* out, int64_t n) {
#if LS_X86_DISPATCH
  if (cpu_caps().avx2) return widen_avx2(in, out, n);
#endif
  widen_impl(in, out, n);
}

// --- The options (temperature, entropy, top-k, sampling; latentseek/checks.h LmHeadOptions) -----------------------
//
// They live in the same per-row update of each logits tile (update_rows_options, used only by calls with options, so
// the plain path is unchanged): scale the tile by 1 / T after the bias; merge the tile into the row's top-k list;
// draw the Gumbel noise of the tile and keep the best perturbed score; and sum s2 = sum e^{l'-m} (l'-m) beside s in
// the exp pass. One pass over W as without options.

// The sampler's state of a row: the best perturbed score l'_v + g_v so far, its logit l'_v and index v.
template <typename acc_t>
struct SampleState {
  acc_t score, logit;
  int64_t idx;
};

// Per-row option state of a tile's rows (nullptr where the option is off).
template <typename acc_t>
struct TileOptions {
  acc_t inv_t;                  // 1 / T
  bool scale;                   // T != 1
  acc_t* s2;                    // [rows]: entropy's second sum
  SampleState<acc_t>* sample;   // [rows]
  uint64_t seed;
  const int64_t* offsets;       // [rows] or nullptr: row r0 + i uses offset r0 + i
  int64_t r0;
  acc_t* top_v;                 // [rows, k], descending; empty slots -inf with index INT64_MAX
  int64_t* top_i;               // [rows, k]
  int64_t k;
};

constexpr int64_t kNoIndex = std::numeric_limits<int64_t>::max();

// x[j, n) <- exp(x - m) in place, in scalar, adding sum exp(x - m) to s and sum exp(x - m) (x - m) to t (entries whose
// exp is 0, including -inf logits, add nothing to t).
template <typename T>
LS_ALWAYS_INLINE void exp_shift_sum2_scalar(T* x, int64_t j, int64_t n, T m, T& s, T& t) {
  for (; j < n; ++j) {
    const T d = x[j] - m;
    const T e = std::exp(d);
    x[j] = e;
    s += e;
    if (e > T(0)) t += e * d;
  }
}

// x <- exp(x - m) in place; returns the sum s and adds sum exp(x - m) (x - m) to s2.
LS_ALWAYS_INLINE float exp_shift_sum2(float* x, int64_t n, float m, float& s2) {
  const vf8 mv = splat(m);
  vf8 sv = splat(0.0f), s2v = splat(0.0f);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const vf8 d = loadu(x + j) - mv;
    const vf8 e = exp_nonpositive(d);
    storeu(x + j, e);
    sv += e;
    s2v += select(e > splat(0.0f), e * d, splat(0.0f));
  }
  float s = 0.0f, t = 0.0f;
  for (int i = 0; i < 8; ++i) {
    s += sv[i];
    t += s2v[i];
  }
  // the tail in scalar (the vector exp's accuracy is not needed for a handful of entries)
  exp_shift_sum2_scalar(x, j, n, m, s, t);
  s2 += t;
  return s;
}
inline double exp_shift_sum2(double* x, int64_t n, double m, double& s2) {
  double s = 0.0, t = 0.0;
  exp_shift_sum2_scalar(x, 0, n, m, s, t);
  s2 += t;
  return s;
}

// Inserts (x, v) into a row's top-k list (descending by value, ties by ascending index) if it belongs there.
template <typename acc_t>
LS_ALWAYS_INLINE void topk_insert(acc_t* vals, int64_t* idx, int64_t k, acc_t x, int64_t v) {
  if (!(x > vals[k - 1] || (x == vals[k - 1] && v < idx[k - 1]))) return;  // NaN never enters
  int64_t pos = k - 1;
  while (pos > 0 && (vals[pos - 1] < x || (vals[pos - 1] == x && idx[pos - 1] > v))) {
    vals[pos] = vals[pos - 1];
    idx[pos] = idx[pos - 1];
    --pos;
  }
  vals[pos] = x;
  idx[pos] = v;
}

// Merges a tile's scaled logits l[0, tv) (indices v0..) into the row's top-k list: a vector pass finds the blocks
// holding an entry >= the list's k-th value, and only those go through the insertion.
LS_ALWAYS_INLINE void topk_tile(const float* l, int64_t tv, int64_t v0, float* vals, int64_t* idx, int64_t k) {
  int64_t j = 0;
  for (; j + 8 <= tv; j += 8) {
    const vi8 hit = loadu(l + j) >= splat(vals[k - 1]);
    bool any = false;
    for (int i = 0; i < 8; ++i) any = any || hit[i] != 0;
    if (!any) continue;
    for (int i = 0; i < 8; ++i) topk_insert(vals, idx, k, l[j + i], v0 + j + i);
  }
  for (; j < tv; ++j) topk_insert(vals, idx, k, l[j], v0 + j);
}
inline void topk_tile(const double* l, int64_t tv, int64_t v0, double* vals, int64_t* idx, int64_t k) {
  for (int64_t j = 0; j < tv; ++j) topk_insert(vals, idx, k, l[j], v0 + j);
}
#if LS_X86_DISPATCH
LS_TARGET_AVX512 void topk_tile_avx512(const float* l, int64_t tv, int64_t v0, float* vals, int64_t* idx, int64_t k) {
  int64_t j = 0;
  for (; j + 16 <= tv; j += 16) {
    __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(l + j), _mm512_set1_ps(vals[k - 1]), _CMP_GE_OQ);
    for (; hit; hit &= hit - 1) {
      const int i = __builtin_ctz(hit);
      topk_insert(vals, idx, k, l[j + i], v0 + j + i);
    }
  }
  for (; j < tv; ++j) topk_insert(vals, idx, k, l[j], v0 + j);
}
#endif

// The sampler, scalar (fp64, and CPUs without AVX-512): every entry's noise from latentseek/sampling.h, one Philox
// call per four entries.
template <typename acc_t>
void sample_tile_scalar(const acc_t* l, int64_t tv, int64_t v0, uint64_t seed, uint64_t offset,
                        SampleState<acc_t>& ss) {
  uint32_t lanes[4];
  int64_t group = -1;
  for (int64_t j = 0; j < tv; ++j) {
    const int64_t v = v0 + j;
    if (!(l[j] + acc_t(kGumbelBound) >= ss.score)) continue;  // cannot win (NaN: ignored, as in the max)
    if ((v >> 2) != group) {
      group = v >> 2;
      philox_group(seed, offset, static_cast<uint64_t>(group), lanes);
    }
    const acc_t score = l[j] + static_cast<acc_t>(gumbel_from_uniform(uniform_from_bits(lanes[v & 3])));
    if (score > ss.score) {
      ss.score = score;
      ss.logit = l[j];
      ss.idx = v;
    }
  }
}

#if LS_X86_DISPATCH
typedef float vf16 __attribute__((vector_size(64)));
typedef int32_t vi16 __attribute__((vector_size(64)));

LS_ALWAYS_INLINE vf16 splatf16(float x) { return vf16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
LS_ALWAYS_INLINE vf16 select16(vi16 mask, vf16 a, vf16 b) {
  return reinterpret_cast<vf16>((reinterpret_cast<vi16>(a) & mask) | (reinterpret_cast<vi16>(b) & ~mask));
}

// log(x) for positive normal x (Cephes logf, ~1 ulp; x - 1 is exact near 1, so -log(u) keeps its relative accuracy
// there, as log1p would).
LS_ALWAYS_INLINE vf16 log16(vf16 x) {
  const vi16 bits = reinterpret_cast<vi16>(x);
  vf16 e = __builtin_convertvector(((bits >> 23) & 0xff) - 126, vf16);
  vf16 m = reinterpret_cast<vf16>((bits & 0x807fffff) | 0x3f000000);  // in [0.5, 1)
  const vi16 small = m < splatf16(0.707106781186547524f);
  e = select16(small, e - splatf16(1.0f), e);
  m = select16(small, m + m, m) - splatf16(1.0f);
  const vf16 z = m * m;
  vf16 y = splatf16(7.0376836292e-2f);
  y = y * m + splatf16(-1.1514610310e-1f);
  y = y * m + splatf16(1.1676998740e-1f);
  y = y * m + splatf16(-1.2420140846e-1f);
  y = y * m + splatf16(1.4249322787e-1f);
  y = y * m + splatf16(-1.6668057665e-1f);
  y = y * m + splatf16(2.0000714765e-1f);
  y = y * m + splatf16(-2.4999993993e-1f);
  y = y * m + splatf16(3.3333331174e-1f);
  y = y * m * z;
  y = y + e * splatf16(-2.12194440e-4f);
  y = y - z * splatf16(0.5f);
  return (m + y) + e * splatf16(0.693359375f);
}

// (hi, lo) of the 32 x 32-bit products c * m in 16 lanes: the even and the odd lanes as 64-bit products.
LS_ALWAYS_INLINE LS_TARGET_AVX512 void mulhilo16(__m512i c, __m512i m, __m512i& hi, __m512i& lo) {
  const __m512i even = _mm512_mul_epu32(c, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(c, 32), m);
  lo = _mm512_mask_blend_epi32(0xAAAA, even, _mm512_slli_epi64(odd, 32));
  hi = _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}

// The sampler in AVX-512: 16 Philox counters (64 entries) at a time.
//  - A block of 64 logits whose maximum plus kGumbelBound stays below the best perturbed score is skipped.
//  - The 64 logits are loaded as four vectors and transposed 4 x 4 inside each 128-bit lane, so that vector L holds
//    the entries 4 (g0 + j) + L of lane L of Philox, with the groups j in the order jp below.
//  - Most entries cannot win, and that is known from their bits alone: with d = (best score so far) - l'_v - margin
//    and n = floor(d log2 e) clamped to [0, 24], 1 - u >= 2^-n >= e^-d implies u <= 1 - e^-d <= exp(-e^-d), i.e.
//    g <= d: the entry's score stays below the best. The two logarithms run only for the vectors of 16 where some
//    entry passes that test. The margin (1e-3 + 2^-20 of the score) covers the rounding of d and of the kernel's g.
//  - Candidates go through a scalar update by (score, then lowest index), since lanes are not in index order.
LS_TARGET_AVX512 void sample_tile_avx512(const float* l, int64_t tv, int64_t v0, uint64_t seed, uint64_t offset,
                                         SampleState<float>& ss) {
  static const int32_t jp[16] = {0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15};
  const __m512i lane_group = _mm512_loadu_si512(jp);
  const __m512i m0 = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM0));
  const __m512i m1 = _mm512_set1_epi32(static_cast<int32_t>(kPhiloxM1));
  const __m512i off_lo = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset)));
  const __m512i off_hi = _mm512_set1_epi32(static_cast<int32_t>(static_cast<uint32_t>(offset >> 32)));
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t g_begin = v0 >> 2, g_end = (v0 + tv + 3) >> 2;
  alignas(64) float lv[64];
  alignas(64) float sc[16], xs[16];
  for (int64_t g0 = g_begin; g0 < g_end; g0 += 16) {
    const int64_t first = 4 * g0 - v0;  // the tile position of entry 4 g0
    const float* src = l + first;
    if (first < 0 || first + 64 > tv) {  // the tile's edges: -inf outside
      for (int64_t i = 0; i < 64; ++i) lv[i] = first + i >= 0 && first + i < tv ? l[first + i] : ninf;
      src = lv;
    }
    const __m512 a0 = _mm512_loadu_ps(src), a1 = _mm512_loadu_ps(src + 16);
    const __m512 a2 = _mm512_loadu_ps(src + 32), a3 = _mm512_loadu_ps(src + 48);
    const float block_max = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(a0, a1), _mm512_max_ps(a2, a3)));
    if (block_max + kGumbelBound < ss.score) continue;
    const __m512d t0 = _mm512_castps_pd(_mm512_unpacklo_ps(a0, a1)), t1 = _mm512_castps_pd(_mm512_unpackhi_ps(a0, a1));
    const __m512d t2 = _mm512_castps_pd(_mm512_unpacklo_ps(a2, a3)), t3 = _mm512_castps_pd(_mm512_unpackhi_ps(a2, a3));
    const __m512 x[4] = {_mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2)), _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2)),
                         _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3)), _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3))};
    // Lane p of x[L] is entry 4 (g0 + jp[p]) + L: Philox's counter of lane p is group g0 + jp[p].
    __m512i c[4] = {_mm512_add_epi32(_mm512_set1_epi32(static_cast<int32_t>(g0)), lane_group), off_lo, off_hi,
                    _mm512_setzero_si512()};
    uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
    for (int r = 0; r < kPhiloxRounds; ++r) {
      if (r) {
        k0 += kPhiloxW0;
        k1 += kPhiloxW1;
      }
      __m512i hi0, lo0, hi1, lo1;
      mulhilo16(c[0], m0, hi0, lo0);
      mulhilo16(c[2], m1, hi1, lo1);
      c[0] = _mm512_ternarylogic_epi32(hi1, c[1], _mm512_set1_epi32(static_cast<int32_t>(k0)), 0x96);
      c[2] = _mm512_ternarylogic_epi32(hi0, c[3], _mm512_set1_epi32(static_cast<int32_t>(k1)), 0x96);
      c[1] = lo1;
      c[3] = lo0;
    }
    for (int L = 0; L < 4; ++L) {
      const __m512i odd = _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(c[L], 32 - kUniformBits), 1),
                                          _mm512_set1_epi32(1));
      const __m512 u = _mm512_mul_ps(_mm512_cvtepi32_ps(odd), _mm512_set1_ps(5.9604644775390625e-8f));
      const __m512 q = _mm512_sub_ps(_mm512_set1_ps(1.0f), u);  // exact: an odd multiple of 2^-24 below 1
      const float best = ss.score;
      const __m512 d = _mm512_sub_ps(_mm512_sub_ps(_mm512_set1_ps(best), x[L]),
                                     _mm512_set1_ps(1e-3f + std::fabs(best) * 9.5367431640625e-7f));
      // n = clamp(floor(d log2 e), 0, 24); max_ps gives 0 for a NaN d (a NaN logit, or -inf on both sides): "may win".
      const __m512 t = _mm512_min_ps(_mm512_max_ps(_mm512_mul_ps(d, _mm512_set1_ps(1.44269504088896341f)),
                                                   _mm512_setzero_ps()),
                                     _mm512_set1_ps(24.0f));
      const __m512i n = _mm512_cvttps_epi32(t);
      const __m512 pow2 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(_mm512_set1_epi32(127), n), 23));
      if (_mm512_cmp_ps_mask(q, pow2, _CMP_GE_OQ) == 0xFFFF) continue;
      const vf16 g = -log16(-log16(reinterpret_cast<vf16>(u)));
      const __m512 score = _mm512_add_ps(x[L], reinterpret_cast<__m512>(g));
      __mmask16 maybe = _mm512_cmp_ps_mask(score, _mm512_set1_ps(best), _CMP_GE_OQ);
      if (!maybe) continue;
      _mm512_store_ps(sc, score);
      _mm512_store_ps(xs, x[L]);
      for (; maybe; maybe &= maybe - 1) {
        const int p = __builtin_ctz(maybe);
        const int64_t v = 4 * (g0 + jp[p]) + L;
        if (v < v0 || v >= v0 + tv) continue;
        if (sc[p] > ss.score || (sc[p] == ss.score && v < ss.idx)) {
          ss.score = sc[p];
          ss.logit = xs[p];
          ss.idx = v;
        }
      }
    }
  }
}
#endif

// The per-row update of one tile with options: update_rows_impl plus the options, in the order that keeps each
// step's input: scale, (max, argmax, NaN, given token), top-k and sampling on l', then the exp pass with s2.
template <typename acc_t>
LS_ALWAYS_INLINE void update_rows_options_impl(const TileRows<acc_t>& t, const TileOptions<acc_t>& o) {
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  for (int64_t i = 0; i < t.rows; ++i) {
    acc_t* l = t.logits + i * t.tv;
    RowState<acc_t>& st = t.state[i];
    if (t.bias) add_bias(l, t.bias, t.tv);
    if (o.scale) scale_inplace(l, o.inv_t, t.tv);
    bool has_nan = false;
    const acc_t tmax = max_ignore_nan(l, t.tv, has_nan);
    if (tmax > st.best) {
      st.best = tmax;
      st.idx = t.v0 + first_index_of(l, t.tv, tmax);
    }
    if (has_nan && st.nan_idx < 0) st.nan_idx = t.v0 + first_nan(l, t.tv);
    if (t.tokens) {
      const int64_t j = t.tokens[i] - t.v0;
      if (j >= 0 && j < t.tv) st.lx = l[j];
    }
    if (o.k && tmax >= o.top_v[i * o.k + o.k - 1]) {  // else no entry of the tile enters the list
      acc_t* vals = o.top_v + i * o.k;
      int64_t* idx = o.top_i + i * o.k;
#if LS_X86_DISPATCH
      if constexpr (std::is_same<acc_t, float>::value) {
        if (cpu_caps().avx512) {
          topk_tile_avx512(l, t.tv, t.v0, vals, idx, o.k);
        } else {
          topk_tile(l, t.tv, t.v0, vals, idx, o.k);
        }
      } else {
        topk_tile(l, t.tv, t.v0, vals, idx, o.k);
      }
#else
      topk_tile(l, t.tv, t.v0, vals, idx, o.k);
#endif
    }
    if (o.sample && tmax + acc_t(kGumbelBound) >= o.sample[i].score) {
      bool vectorised = false;
      const int64_t row = o.r0 + i;
      const uint64_t offset = static_cast<uint64_t>(o.offsets ? o.offsets[i] : row);
#if LS_X86_DISPATCH
      if constexpr (std::is_same<acc_t, float>::value) {
        if (cpu_caps().avx512) {
          sample_tile_avx512(l, t.tv, t.v0, o.seed, offset, o.sample[i]);
          vectorised = true;
        }
      }
#endif
      if (!vectorised) sample_tile_scalar(l, t.tv, t.v0, o.seed, offset, o.sample[i]);
    }
    const acc_t m_new = tmax > st.m ? tmax : st.m;
    const acc_t scale = rescale_factor(st.m, m_new);
    const acc_t shift = m_new == ninf ? acc_t(0) : m_new;
    if (o.s2) {
      o.s2[i] = rescale_s2(o.s2[i], st.s, st.m, m_new, scale);
      st.s = st.s * scale + exp_shift_sum2(l, t.tv, shift, o.s2[i]);
    } else {
      st.s = st.s * scale + exp_shift_sum(l, t.tv, shift);
    }
    st.m = m_new;
    if (t.acc && scale != acc_t(1)) scale_inplace(t.acc + i * t.H, scale, t.H);
  }
}

#if LS_X86_DISPATCH
LS_TARGET_AVX512 void update_rows_options_avx512(const TileRows<float>& t, const TileOptions<float>& o) {
  update_rows_options_impl(t, o);
}
LS_TARGET_AVX2 void update_rows_options_avx2(const TileRows<float>& t, const TileOptions<float>& o) {
  update_rows_options_impl(t, o);
}
#endif

void update_rows_options(const TileRows<float>& t, const TileOptions<float>& o) {
#if LS_X86_DISPATCH
  if (cpu_caps().avx512) return update_rows_options_avx512(t, o);
  if (cpu_caps().avx2) return update_rows_options_avx2(t, o);
#endif
  update_rows_options_impl(t, o);
}
void update_rows_options(const TileRows<double>& t, const TileOptions<double>& o) { update_rows_options_impl(t, o); }

// Merges row list b (a slice of higher indices) into a; both sorted, k entries each.
template <typename acc_t>
void merge_topk(acc_t* av, int64_t* ai, const acc_t* bv, const int64_t* bi, int64_t k) {
  acc_t v[kMaxTopK];
  int64_t x[kMaxTopK];
  int64_t ia = 0, ib = 0;
  for (int64_t j = 0; j < k; ++j) {
    const bool take_a = av[ia] > bv[ib] || (av[ia] == bv[ib] && ai[ia] <= bi[ib]);
    if (take_a) {
      v[j] = av[ia];
      x[j] = ai[ia++];
    } else {
      v[j] = bv[ib];
      x[j] = bi[ib++];
    }
  }
  std::copy(v, v + k, av);
  std::copy(x, x + k, ai);
}

// --- The units path: bf16 / fp16 matrix units through oneDNN's brgemm (latentseek/cpu_paths.h) --------------------
//
// Per tile of tv rows of W (the contracted dimension of each product padded to even, as VNNI-2 pairs it):
//   L^T = W_t Z^T        A = W_t [tv, H] as stored; B = Z^T in VNNI-2 ([H/2, N, 2], packed once per call)
//   L   = (L^T)^T        fp32, so that the row update reads each row contiguously
//   update_rows(L)       as on the widening path: L becomes P = exp(L - m) in fp32 and s is summed from it
//   P16 = round(c P)     the only rounding: bf16 (c = 1) or fp16 (c = 2^14); the maximum enters as exactly c
//   acc += P16 W_t       A = P16 [rows, tv]; B = W_t in VNNI-2 ([tv/2, H, 2], packed per tile); acc stays fp32
// Computing W_t Z^T instead of Z W_t^T spares W a transpose: the small Z is packed once, and per tile the transpose
// moves rows x tv logits instead of tv x H weights (the pair interleave of W_t for the second product is unavoidable).

constexpr float kFp16PScale = 16384.0f;  // 2^14: fp16 P stays out of the subnormal range (as in the CUDA kernel)

// Z^T in VNNI-2, [Hp/2, N, 2]: entry (k/2, n) holds (Z[n][k], Z[n][k+1]); an odd H pairs Z[n][H-1] with 0.
template <typename scalar_t>
void pack_z_vnni(const scalar_t* z, int64_t ldz, int64_t N, int64_t H, scalar_t* out) {
  const int64_t pairs = (H + 1) / 2;
  at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t kp = 0; kp < pairs; ++kp) {
        out[(kp * N + n) * 2] = z[n * ldz + 2 * kp];
        out[(kp * N + n) * 2 + 1] = 2 * kp + 1 < H ? z[n * ldz + 2 * kp + 1] : scalar_t(0);
      }
  });
}

// W_t [tv, H] in VNNI-2, [tvp/2, H, 2]: entry (v/2, h) holds (W_t[v][h], W_t[v+1][h]); an odd tv pairs the last
// row with 0. The 16-bit pair is one little-endian 32-bit word (x86, the only place this path runs).
LS_ALWAYS_INLINE void pack_rows_vnni_impl(const uint16_t* w, int64_t tv, int64_t H, uint32_t* out) {
  for (int64_t vp = 0; vp < tv / 2; ++vp) {
    const uint16_t* r0 = w + 2 * vp * H;
    const uint16_t* r1 = r0 + H;
    uint32_t* o = out + vp * H;
    for (int64_t h = 0; h < H; ++h) o[h] = static_cast<uint32_t>(r0[h]) | (static_cast<uint32_t>(r1[h]) << 16);
  }
  if (tv & 1) {
    const uint16_t* r0 = w + (tv - 1) * H;
    uint32_t* o = out + (tv / 2) * H;
    for (int64_t h = 0; h < H; ++h) o[h] = r0[h];
  }
}

// out [C, R] = in [R, C]^T in 16 x 16 blocks.
LS_ALWAYS_INLINE void transpose_impl(const float* in, int64_t R, int64_t C, float* out) {
  constexpr int64_t B = 16;
  for (int64_t r0 = 0; r0 < R; r0 += B) {
    const int64_t r1 = std::min(R, r0 + B);
    for (int64_t c0 = 0; c0 < C; c0 += B) {
      const int64_t c1 = std::min(C, c0 + B);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t r = r0; r < r1; ++r) out[c * R + r] = in[r * C + c];
    }
  }
}

// P [rows, tv] fp32 -> bf16 [rows, tvp], round to nearest even (NaN stays NaN), the odd column padded with 0.
LS_ALWAYS_INLINE void round_p_impl(const float* p, int64_t rows, int64_t tv, int64_t tvp, at::BFloat16* out) {
  uint16_t* o = reinterpret_cast<uint16_t*>(out);
  for (int64_t i = 0; i < rows; ++i) {
    const uint32_t* src = reinterpret_cast<const uint32_t*>(p + i * tv);
    uint16_t* dst = o + i * tvp;
    for (int64_t j = 0; j < tv; ++j) {
      const uint32_t u = src[j];
      const uint16_t r = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
      dst[j] = (u & 0x7fffffffu) > 0x7f800000u ? static_cast<uint16_t>(0x7fc0u) : r;
    }
    if (tvp > tv) dst[tv] = 0;
  }
}

#if LS_X86_DISPATCH
LS_TARGET_AVX512 void pack_rows_vnni(const uint16_t* w, int64_t tv, int64_t H, uint32_t* out) {
  pack_rows_vnni_impl(w, tv, H, out);
}
// out [C, R] = in [R, C]^T: 8 x 8 blocks through registers (unpack, shuffle, lane permute), the edges scalar.
LS_TARGET_AVX512 void transpose(const float* in, int64_t R, int64_t C, float* out) {
  const int64_t R8 = R / 8 * 8, C8 = C / 8 * 8;
  for (int64_t r0 = 0; r0 < R8; r0 += 8)
    for (int64_t c0 = 0; c0 < C8; c0 += 8) {
      const float* src = in + r0 * C + c0;
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * C);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
      }
      float* dst = out + c0 * R + r0;
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + i * R, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(dst + (i + 4) * R, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
  for (int64_t r = 0; r < R; ++r)  // the right edge (columns from C8) of every row, then the bottom rows
    for (int64_t c = r < R8 ? C8 : 0; c < C; ++c) out[c * R + r] = in[r * C + c];
}
LS_TARGET_AVX512 void round_p(const float* p, int64_t rows, int64_t tv, int64_t tvp, at::BFloat16* out) {
  round_p_impl(p, rows, tv, tvp, out);
}
// fp16: times 2^14, then F16C's round to nearest even.
LS_TARGET_AVX512 void round_p(const float* p, int64_t rows, int64_t tv, int64_t tvp, at::Half* out) {
  const __m512 scale = _mm512_set1_ps(kFp16PScale);
  for (int64_t i = 0; i < rows; ++i) {
    const float* src = p + i * tv;
    at::Half* dst = out + i * tvp;
    int64_t j = 0;
    for (; j + 16 <= tv; j += 16)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j),
                          _mm512_cvtps_ph(_mm512_mul_ps(_mm512_loadu_ps(src + j), scale),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    for (; j < tv; ++j) dst[j] = static_cast<at::Half>(src[j] * kFp16PScale);
    if (tvp > tv) dst[tv] = static_cast<at::Half>(0.0f);
  }
}
#else  // the units path needs x86 matrix units and never runs here; these keep the build portable
void pack_rows_vnni(const uint16_t* w, int64_t tv, int64_t H, uint32_t* out) { pack_rows_vnni_impl(w, tv, H, out); }
void transpose(const float* in, int64_t R, int64_t C, float* out) { transpose_impl(in, R, C, out); }
void round_p(const float* p, int64_t rows, int64_t tv, int64_t tvp, at::BFloat16* out) {
  round_p_impl(p, rows, tv, tvp, out);
}
void round_p(const float* p, int64_t rows, int64_t tv, int64_t tvp, at::Half* out) {
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < tv; ++j) out[i * tvp + j] = static_cast<at::Half>(p[i * tv + j] * kFp16PScale);
    if (tvp > tv) out[i * tvp + tv] = static_cast<at::Half>(0.0f);
  }
}
#endif

// The per-thread buffers and the two products of one tile on the units path.
template <typename scalar_t>
struct UnitsTile {
  int64_t N, H, Hp;        // Hp: H rounded up to even (the contracted dimension of L^T = W_t Z^T)
  const scalar_t* z_vnni;  // [Hp/2, N, 2], shared by all threads
  at::Tensor lt, p16, w_vnni, w_pad;

  UnitsTile(int64_t N_, int64_t H_, int64_t row_block, const scalar_t* z_vnni_)
      : N(N_), H(H_), Hp(H_ + (H_ & 1)), z_vnni(z_vnni_) {
    const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<scalar_t>::value);
    lt = at::empty({kTileV * row_block}, opts.dtype(at::kFloat));
    p16 = at::empty({row_block * kTileV}, opts);  // kTileV is even: tvp <= kTileV
    w_vnni = at::empty({kTileV * H}, opts);
    if (Hp != H) w_pad = at::zeros({kTileV, Hp}, opts);
  }

  // logits [rows, tv] (fp32) = W_t Z_blk^T, transposed; wt = W rows [v0, v0 + tv), rows of Z from r0.
  void logits(const scalar_t* wt, int64_t tv, int64_t r0, int64_t rows, float* logits) {
    const scalar_t* a = wt;
    if (Hp != H) {  // the A operand must hold Hp columns: copy the tile beside a zero column
      scalar_t* pad = w_pad.data_ptr<scalar_t>();
      for (int64_t v = 0; v < tv; ++v) std::memcpy(pad + v * Hp, wt + v * H, H * sizeof(scalar_t));
      a = pad;
    }
    float* l_t = lt.data_ptr<float>();
    units_gemm<scalar_t>(tv, rows, Hp, Hp, N, rows, /*add_c=*/false, a, z_vnni + 2 * r0, l_t);
    transpose(l_t, tv, rows, logits);
  }

  // acc [rows, H] += round(P) W_t, with P = the [rows, tv] probabilities that update_rows left in `probs`.
  void accumulate(const scalar_t* wt, int64_t tv, int64_t rows, const float* probs, float* acc) {
    const int64_t tvp = tv + (tv & 1);
    scalar_t* p = p16.data_ptr<scalar_t>();
    round_p(probs, rows, tv, tvp, p);
    scalar_t* wv = w_vnni.data_ptr<scalar_t>();
    pack_rows_vnni(reinterpret_cast<const uint16_t*>(wt), tv, H, reinterpret_cast<uint32_t*>(wv));
    units_gemm<scalar_t>(rows, H, tvp, tvp, H, H, /*add_c=*/true, p, wv, acc);
  }
};

struct Plan {
  int64_t row_blocks, row_block, splits, split_len;
};

// Items = row blocks x vocabulary splits, enough of them to keep every thread busy: many rows split by rows
// (W is read once per row block), few rows split the vocabulary (merged at the end).
Plan make_plan(int64_t N, int64_t V) {
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  int64_t row_blocks = std::max<int64_t>(1, (N + kMaxRowBlock - 1) / kMaxRowBlock);
  int64_t splits = 1;
  if (row_blocks >= threads) {
    row_blocks = (row_blocks + threads - 1) / threads * threads;
  } else {
    splits = std::min((threads + row_blocks - 1) / row_blocks, std::max<int64_t>(1, V / kTileV));
  }
  row_blocks = std::min(row_blocks, std::max<int64_t>(N, 1));
  const int64_t row_block = (N + row_blocks - 1) / row_blocks;
  const int64_t split_len = (V + splits - 1) / splits;
  return {row_blocks, row_block, splits, split_len};
}

template <typename scalar_t, typename acc_t>
void run_cpu(const LmHeadProblem& p, LmHeadOutputs& out) {
  const bool with_grad = out.with_grad;
  at::Tensor& grad_out = out.grad;
  const int64_t N = p.N, H = p.H, V = p.V;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  constexpr bool sixteen = std::is_same<scalar_t, at::BFloat16>::value || std::is_same<scalar_t, at::Half>::value;
  const CpuPath path = choose_cpu_path(p.hidden.scalar_type());
  const bool units = sixteen && path != CpuPath::kWiden;
  const bool widened = sixteen && !units;
  // Z is small (N x H): widened once for the fp32 GEMM, or packed once as the B operand of the units' L^T = W_t Z^T.
  // W is widened (or packed) tile by tile inside the pass.
  const at::Tensor z = widened ? p.hidden.to(acc_type).contiguous() : p.hidden;
  at::Tensor z_vnni;
  if constexpr (sixteen) {
    if (units) {
      z_vnni = at::empty({(H + 1) / 2 * 2 * N}, p.hidden.options());
      pack_z_vnni(p.hidden.data_ptr<scalar_t>(), p.hidden.stride(0), N, H, z_vnni.data_ptr<scalar_t>());
    }
  }
  const at::Tensor bias = p.bias.defined() ? p.bias.to(acc_type) : at::Tensor();
  const Plan plan = make_plan(N, V);

  std::vector<RowState<acc_t>> states(plan.splits * N);
  for (int64_t s = 0; s < plan.splits; ++s)
    std::fill_n(states.begin() + s * N, N, RowState<acc_t>::empty(std::min(V - 1, s * plan.split_len)));
  // Split 0 accumulates straight into grad_out; further splits get their own [N, H] partials.
  std::vector<at::Tensor> accs;
  if (with_grad) {
    accs.push_back(grad_out.zero_());
    for (int64_t s = 1; s < plan.splits; ++s) accs.push_back(at::zeros({N, H}, grad_out.options()));
  }
  const int64_t* tok = p.tokens.defined() ? p.tokens.data_ptr<int64_t>() : nullptr;
  const acc_t* bias_ptr = bias.defined() ? bias.data_ptr<acc_t>() : nullptr;

  // The options' per-row state, per vocabulary split like `states` (empty without options).
  const LmHeadOptions& opt = p.opt;
  const bool options = opt.any();
  const int64_t K = opt.topk;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  std::vector<acc_t> s2s(opt.entropy ? plan.splits * N : 0, acc_t(0));
  std::vector<SampleState<acc_t>> samples(opt.sample ? plan.splits * N : 0);
  for (int64_t s = 0; s < (opt.sample ? plan.splits : 0); ++s)
    std::fill_n(samples.begin() + s * N, N, SampleState<acc_t>{ninf, ninf, std::min(V - 1, s * plan.split_len)});
  std::vector<acc_t> top_v(plan.splits * N * K, ninf);
  std::vector<int64_t> top_i(plan.splits * N * K, kNoIndex);
  const int64_t* offsets = opt.offsets.defined() ? opt.offsets.data_ptr<int64_t>() : nullptr;
  const acc_t inv_t = static_cast<acc_t>(1.0 / opt.temperature);

  const int64_t items = plan.row_blocks * plan.splits;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const auto opts = at::TensorOptions().dtype(acc_type);
    at::Tensor logits_buf = at::empty({plan.row_block * kTileV}, opts);
    at::Tensor w_buf = widened ? at::empty({kTileV, H}, opts) : at::Tensor();
    std::unique_ptr<UnitsTile<scalar_t>> unit;
    if constexpr (sixteen) {
      if (units) unit = std::make_unique<UnitsTile<scalar_t>>(N, H, plan.row_block, z_vnni.data_ptr<scalar_t>());
    }
    for (int64_t item = begin; item < end; ++item) {
      const int64_t rb = item / plan.splits, split = item % plan.splits;
      const int64_t r0 = rb * plan.row_block, r1 = std::min(N, r0 + plan.row_block);
      const int64_t vs0 = split * plan.split_len, vs1 = std::min(V, vs0 + plan.split_len);
      if (r0 >= r1 || vs0 >= vs1) continue;
      const int64_t rows = r1 - r0;
      RowState<acc_t>* st = states.data() + split * N + r0;
      const at::Tensor zb = z.narrow(0, r0, rows);
      at::Tensor accb = with_grad ? accs[split].narrow(0, r0, rows) : at::Tensor();
      for (int64_t v0 = vs0; v0 < vs1; v0 += kTileV) {
        const int64_t tv = std::min(kTileV, vs1 - v0);
        at::Tensor wt = p.weight.narrow(0, v0, tv);
        at::Tensor lt = logits_buf.narrow(0, 0, rows * tv).view({rows, tv});
        if constexpr (sixteen) {
          if (units) unit->logits(wt.data_ptr<scalar_t>(), tv, r0, rows, lt.data_ptr<float>());
        }
        if (!units) {
          if constexpr (sixteen) {
            widen(wt.data_ptr<scalar_t>(), w_buf.data_ptr<acc_t>(), tv * H);
            wt = w_buf.narrow(0, 0, tv);
          }
          at::mm_out(lt, zb, wt.t());
        }
        TileRows<acc_t> t{lt.data_ptr<acc_t>(),
                          rows,
                          tv,
                          v0,
                          bias_ptr ? bias_ptr + v0 : nullptr,
                          tok ? tok + r0 : nullptr,
                          st,
                          with_grad ? accb.data_ptr<acc_t>() : nullptr,
                          H};
        if (options) {
          const int64_t row0 = split * N + r0;
          const TileOptions<acc_t> o{inv_t,
                                     opt.temperature != 1,
                                     opt.entropy ? s2s.data() + row0 : nullptr,
                                     opt.sample ? samples.data() + row0 : nullptr,
                                     opt.seed,
                                     offsets ? offsets + r0 : nullptr,
                                     r0,
                                     K ? top_v.data() + row0 * K : nullptr,
                                     K ? top_i.data() + row0 * K : nullptr,
                                     K};
          update_rows_options(t, o);
        } else {
          update_rows(t);
        }
        if (!with_grad) continue;
        if constexpr (sixteen) {
          if (units) unit->accumulate(wt.data_ptr<scalar_t>(), tv, rows, lt.data_ptr<float>(), accb.data_ptr<float>());
        }
        if (!units) accb.addmm_(lt, wt);
      }
    }
    if (units) units_release();
  });

  // Merge the vocabulary splits of each row, then finish: token, logp and grad = -r * (W[x] - acc / s), and the
  // options' outputs.
  int64_t* tok_out = out.tokens.data_ptr<int64_t>();
  acc_t* logp_ptr = out.logp.data_ptr<acc_t>();
  acc_t* entropy_ptr = opt.entropy ? out.entropy.data_ptr<acc_t>() : nullptr;
  acc_t* topk_logp = K ? out.topk_logp.data_ptr<acc_t>() : nullptr;
  int64_t* topk_tokens = K ? out.topk_tokens.data_ptr<int64_t>() : nullptr;
  const acc_t* reward = p.reward.defined() ? p.reward.data_ptr<acc_t>() : nullptr;
  const scalar_t* w = p.weight.data_ptr<scalar_t>();
  // The fp16 units accumulated 2^14 P W; s was summed from the unscaled P.
  const acc_t acc_unscale = units && path == CpuPath::kFp16Units ? acc_t(1) / acc_t(kFp16PScale) : acc_t(1);
  const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      RowState<acc_t> st = states[n];
      acc_t* g = with_grad ? accs[0].data_ptr<acc_t>() + n * H : nullptr;
      acc_t* tv_n = K ? top_v.data() + n * K : nullptr;
      int64_t* ti_n = K ? top_i.data() + n * K : nullptr;
      for (int64_t s = 1; s < plan.splits; ++s) {
        const RowState<acc_t>& b = states[s * N + n];
        if (opt.entropy) s2s[n] = merge_s2(s2s[n], st.s, st.m, s2s[s * N + n], b.s, b.m);
        if (opt.sample && samples[s * N + n].score > samples[n].score) samples[n] = samples[s * N + n];
        if (K) merge_topk(tv_n, ti_n, top_v.data() + (s * N + n) * K, top_i.data() + (s * N + n) * K, K);
        acc_t fa, fb;
        merge_states(st, b, fa, fb);
        if (g) {
          const acc_t* gs = accs[s].data_ptr<acc_t>() + n * H;
          for (int64_t h = 0; h < H; ++h) g[h] = fa * g[h] + fb * gs[h];
        }
      }
      // A NaN or +inf logit: the plain token rule, NaN entropy and top-k log-probabilities, top-k tokens 0..k-1.
      const bool non_finite = st.nan_idx >= 0 || st.m == std::numeric_limits<acc_t>::infinity();
      const bool sampled = opt.sample && !non_finite;
      const int64_t x = tok ? tok[n] : sampled ? samples[n].idx : chosen_token(st);
      tok_out[n] = x;
      logp_ptr[n] = final_logp(st, tok ? st.lx : sampled ? samples[n].logit : st.best);
      if (options) {
        const acc_t lse = st.m + static_cast<acc_t>(std::log(st.s));
        if (entropy_ptr) entropy_ptr[n] = non_finite ? nan : final_entropy(st.s, s2s[n]);
        for (int64_t j = 0; j < K; ++j) {
          topk_logp[n * K + j] = non_finite ? nan : tv_n[j] - lse;
          topk_tokens[n * K + j] = non_finite ? j : ti_n[j];
        }
      }
      if (g) {
        const acc_t r = reward ? reward[n] : acc_t(1);
        const acc_t inv_s = acc_unscale / st.s;
        const scalar_t* wx = w + x * H;
        for (int64_t h = 0; h < H; ++h) g[h] = -r * (static_cast<acc_t>(wx[h]) - g[h] * inv_s);
      }
    }
  });
}

// gumbel_uniform(seed, offsets, V) -> [N, V] float32: the sampler's uniforms (latentseek/sampling.h), for tests.
at::Tensor gumbel_uniform_op(int64_t seed, const at::Tensor& offsets, int64_t V) {
  LS_CHECK(seed >= 0, "gumbel_uniform: seed must lie in [0, 2**63), got ", seed);
  LS_CHECK(V >= 0, "gumbel_uniform: V must be >= 0, got ", V);
  LS_CHECK(offsets.scalar_type() == at::kLong && offsets.dim() == 1, "gumbel_uniform: offsets must be an int64 [N] "
           "tensor, got ", offsets.scalar_type(), " of shape ", shape_str(offsets.sizes()));
  const at::Tensor off = offsets.contiguous();
  const int64_t N = off.size(0);
  if (N > 0) LS_CHECK(off.min().item<int64_t>() >= 0, "gumbel_uniform: offsets must be >= 0");
  at::Tensor u = at::empty({N, V}, off.options().dtype(at::kFloat));
  const int64_t* o = off.data_ptr<int64_t>();
  float* out = u.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n)
      for (int64_t v = 0; v < V; ++v)
        out[n * V + v] = uniform_from_bits(philox_bits(static_cast<uint64_t>(seed), static_cast<uint64_t>(o[n]),
                                                       static_cast<uint64_t>(v)));
  });
  return u;
}

// cpu_paths() and cpu_path(dtype): what the CPU kernel can run and what a call in `dtype` runs now.
std::vector<std::string> cpu_paths_op() { return available_cpu_paths(); }
std::string cpu_path_op(at::ScalarType dtype) { return cpu_path_name(dtype); }

// The device part of the entry points (latentseek/entry.h).
struct CpuDevice {
  static void check(const char* op, const LmHeadProblem& p) {
    LS_CHECK(p.hidden.device().is_cpu(), op, ": the CPU kernel got hidden on ", p.hidden.device());
    check_token_range(op, p);
    check_offsets_range(op, p);
  }
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  template <typename scalar_t, typename acc_t>
  static void run(const LmHeadProblem& p, LmHeadOutputs& out) {
    LmHeadProblem q = p;  // run_cpu reads one reward per row, with the scale (and 1 / T) folded in
    q.reward_scale = p.opt.temperature == 1 ? p.reward_scale : p.reward_scale / p.opt.temperature;
    q.reward = reward_per_row(q);
    q.reward_scale = 1;
    run_cpu<scalar_t, acc_t>(q, out);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(latentseek_ext, CPU, m) {
  m.impl("lm_head_policy_grad", &lm_head_policy_grad_entry<CpuDevice>);
  m.impl("lm_head_policy_grad.float_reward", &lm_head_policy_grad_float_reward_entry<CpuDevice>);
  m.impl("lm_head_logprob", &lm_head_logprob_entry<CpuDevice>);
  m.impl("lm_head_policy_grad.options", &lm_head_policy_grad_options_entry<CpuDevice>);
  m.impl("lm_head_logprob.options", &lm_head_logprob_options_entry<CpuDevice>);
  m.impl("gumbel_uniform", &gumbel_uniform_op);
}

// The path queries take no tensor: one kernel for every dispatch key.
TORCH_LIBRARY_IMPL(latentseek_ext, CompositeExplicitAutograd, m) {
  m.impl("cpu_paths", &cpu_paths_op);
  m.impl("cpu_path", &cpu_path_op);
}

}  // namespace latentseek
