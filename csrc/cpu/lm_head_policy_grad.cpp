// CPU kernel of lm_head_policy_grad / lm_head_logprob: one pass over W in vocabulary tiles.
//
// Work is split into items (a block of rows x a slice of the vocabulary) run by at::parallel_for. For each tile
// of W (TV rows) an item computes, with ATen's fp32 GEMM (MKL / oneDNN):
//   L   = Z_blk @ W_t^T                       (RB x TV logits, float32; bf16/fp16 tiles are widened first)
// then per row, in a vectorised loop: bias, tile max / argmax / NaN position, the rescale of the running state
// (latentseek/online_softmax.h) and L <- exp(L - m) in place, summed into s; finally
//   acc += L @ W_t                            (RB x H accumulator, float32, only when the gradient is wanted)
// Nothing of size N x V is ever allocated: per item RB x TV logits, TV x H widened weights, RB x H accumulator.
// Vocabulary slices of the same rows are merged at the end by rescaling to the common max.
//
// All arithmetic happens in float32 (float64 for float64 inputs): the products of bf16/fp16 values are exact in
// float32, so the logits equal those of an fp32 GEMM on the upcast inputs. On this project's CPUs (AVX2, no
// AMX / AVX512-BF16) ATen's bf16 GEMM is several times slower than its fp32 GEMM, which is why tiles are widened.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "latentseek/checks.h"
#include "latentseek/entry.h"
#include "latentseek/online_softmax.h"

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
const bool kHasAvx2 =
    __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif

void update_rows(const TileRows<float>& t) {
#if LS_X86_DISPATCH
  if (kHasAvx2) return update_rows_avx2(t);
#endif
  update_rows_impl(t);
}
void update_rows(const TileRows<double>& t) { update_rows_impl(t); }

template <typename scalar_t>
void widen(const scalar_t* in, float* out, int64_t n) {
#if LS_X86_DISPATCH
  if (kHasAvx2) return widen_avx2(in, out, n);
#endif
  widen_impl(in, out, n);
}

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
void run_cpu(const LmHeadProblem& p, bool with_grad, at::Tensor& tokens_out, at::Tensor& logp_out,
             at::Tensor& grad_out) {
  const int64_t N = p.N, H = p.H, V = p.V;
  const auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  constexpr bool widened = !std::is_same<scalar_t, acc_t>::value;
  // Z is small (N x H): widen it once. W is widened tile by tile inside the pass.
  const at::Tensor z = widened ? p.hidden.to(acc_type).contiguous() : p.hidden;
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

  const int64_t items = plan.row_blocks * plan.splits;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    const auto opts = at::TensorOptions().dtype(acc_type);
    at::Tensor logits_buf = at::empty({plan.row_block * kTileV}, opts);
    at::Tensor w_buf = widened ? at::empty({kTileV, H}, opts) : at::Tensor();
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
        if constexpr (!std::is_same<scalar_t, acc_t>::value) {
          widen(wt.data_ptr<scalar_t>(), w_buf.data_ptr<acc_t>(), tv * H);
          wt = w_buf.narrow(0, 0, tv);
        }
        at::Tensor lt = logits_buf.narrow(0, 0, rows * tv).view({rows, tv});
        at::mm_out(lt, zb, wt.t());
        TileRows<acc_t> t{lt.data_ptr<acc_t>(),
                          rows,
                          tv,
                          v0,
                          bias_ptr ? bias_ptr + v0 : nullptr,
                          tok ? tok + r0 : nullptr,
                          st,
                          with_grad ? accb.data_ptr<acc_t>() : nullptr,
                          H};
        update_rows(t);
        if (with_grad) accb.addmm_(lt, wt);
      }
    }
  });

  // Merge the vocabulary splits of each row, then finish: token, logp and grad = -r * (W[x] - acc / s).
  int64_t* tok_out = tokens_out.data_ptr<int64_t>();
  acc_t* logp_ptr = logp_out.data_ptr<acc_t>();
  const acc_t* reward = p.reward.defined() ? p.reward.data_ptr<acc_t>() : nullptr;
  const scalar_t* w = p.weight.data_ptr<scalar_t>();
  at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      RowState<acc_t> st = states[n];
      acc_t* g = with_grad ? accs[0].data_ptr<acc_t>() + n * H : nullptr;
      for (int64_t s = 1; s < plan.splits; ++s) {
        acc_t fa, fb;
        merge_states(st, states[s * N + n], fa, fb);
        if (g) {
          const acc_t* gs = accs[s].data_ptr<acc_t>() + n * H;
          for (int64_t h = 0; h < H; ++h) g[h] = fa * g[h] + fb * gs[h];
        }
      }
      const int64_t x = tok ? tok[n] : chosen_token(st);
      tok_out[n] = x;
      logp_ptr[n] = final_logp(st, tok ? st.lx : st.best);
      if (g) {
        const acc_t r = reward ? reward[n] : acc_t(1);
        const acc_t inv_s = acc_t(1) / st.s;
        const scalar_t* wx = w + x * H;
        for (int64_t h = 0; h < H; ++h) g[h] = -r * (static_cast<acc_t>(wx[h]) - g[h] * inv_s);
      }
    }
  });
}

// The device part of the entry points (latentseek/entry.h).
struct CpuDevice {
  static void check(const char* op, const LmHeadProblem& p) {
    LS_CHECK(p.hidden.device().is_cpu(), op, ": the CPU kernel got hidden on ", p.hidden.device());
    check_token_range(op, p);
  }
  struct Guard {
    explicit Guard(const at::Tensor&) {}
  };
  template <typename scalar_t, typename acc_t>
  static void run(const LmHeadProblem& p, LmHeadOutputs& out) {
    LmHeadProblem q = p;  // run_cpu reads one reward per row, with the scale folded in
    q.reward = reward_per_row(p);
    q.reward_scale = 1;
    run_cpu<scalar_t, acc_t>(q, out.with_grad, out.tokens, out.logp, out.grad);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(latentseek_ext, CPU, m) {
  m.impl("lm_head_policy_grad", &lm_head_policy_grad_entry<CpuDevice>);
  m.impl("lm_head_logprob", &lm_head_logprob_entry<CpuDevice>);
}

}  // namespace latentseek
