// The chunked path: bf16 / fp16 with many rows, and every call with options (temperature, sample, entropy, topk) in
// any dtype. The vocabulary in equal chunks of len entries; per chunk c (W_c its rows of W)
//   L = Z W_c^T                cuBLAS, into the accumulation type (bf16/fp16 in, fp32 out; no TF32 question for them)
//   chunk_rows_kernel          one read of L: l' = (L + b) / T into shared memory with the max, argmax and first NaN;
//                              then from shared memory P = exp(l' - m_new) (16-bit for bf16/fp16, times 2^14 for
//                              fp16), s, the options' running state, and O *= exp(m_old - m_new) where the max moved
//   O += P W_c                 cuBLAS with beta = 1 straight into the fp32 (fp64) grad buffer (beta = 0 for c = 0)
// and at the end chunk_finish_kernel: tokens, logp, grad = -r (W_x - O / s) / T, entropy, top-k log p.
//
// Precision: as the fused kernels (common.cuh, "Precision"). L and O are in the accumulation type, P is rounded to
// 16 bits only as the operand of P W_c, and the row's running max enters P as exp(0) = 1 exactly; O is multiplied
// by exp(m_old - m_new) < 1 in the accumulation type when the max moves, as the fused kernels do at a new max. The
// sum s (and the entropy's s2) accumulates the unrounded P.
//
// Traffic per logit: 4 bytes of L written by GEMM 1 and read once here (8 for fp64), 2 bytes of P written here and
// read by GEMM 2 (the width of the input dtype for fp32 / fp64); W_c is read twice (the second time mostly from L2);
// O [N, H] is read and written once per chunk in which a row's max moves. Buffers: L and P are N x len with
// N * len * (bytes of both) <= max(64 MiB, 16 N H bytes) (chunk_len's budget), so O(N*H); len is also capped by the
// shared memory that holds one row of L.
//
// Options. Sampling keeps, per row, the best perturbed score l'_v + g_v seen (lowest index on ties; the noise g of
// latentseek/sampling.h, one Philox call per group of four entries, skipped where l'_v + kGumbelBound cannot reach
// the best score so far or the floor m + min g), and the entry's l'. Entropy keeps s2 = sum exp(l' - m) (l' - m)
// beside s, rescaled with it (rescale_s2). Top-k keeps a running sorted list per row in the outputs themselves
// (values l', then l' - lse at the end): each chunk extracts its own best entries above the list's k-th (k rounds
// of a block argmax, each round rescanning only the winner's thread) and merges them in (ties: the list first, its
// indices are lower).
#pragma once

#include <climits>
#include <cstdint>
#include <limits>

#include "common.cuh"
#include "latentseek/online_softmax.h"
#include "latentseek/sampling.h"

namespace latentseek {

constexpr int kChunkThreads = 512;
constexpr int kChunkWarps = kChunkThreads / 32;
constexpr int kChunkFinishThreads = 256;
constexpr int kMaxTopk = 32;
// The smallest Gumbel noise of any u >= 2^-24: -log(-log(2^-24)) = -2.81; less a margin for the rounding of l' + g.
constexpr float kGumbelFloor = -2.875f;

// The per-row state carried across chunks.
template <typename acc_t>
struct ChunkState {
  RowState<acc_t> st;  // m, s, lx of the scaled logits l'; best / idx the unscaled argmax; nan_idx
  acc_t s2;            // entropy: sum exp(l' - m) (l' - m)
  acc_t g_best;        // sampling: the best perturbed score l'_v + g_v so far
  acc_t g_lx;          // sampling: l' of that entry
  int64_t g_idx;       // sampling: its index (lowest on ties)
  int topk_count;      // entries of the running top-k list
};

template <typename scalar_t, typename acc_t>
struct ChunkArgs {
  const acc_t* logits;  // [N, len] = Z W_c^T
  int len, v0, N, V;
  int64_t H;
  const scalar_t* bias;     // [V] or nullptr
  const int64_t* tokens;    // [N] or nullptr
  ChunkState<acc_t>* state;  // [N], read unless first
  bool first;                // chunk 0: start from the empty state; O holds nothing yet (GEMM 2 writes it with beta 0)
  scalar_t* p;               // [N, len] exp(l' - m_new) * p_scale, or nullptr without grad
  acc_t* o;                  // [N, H] sum of the previous chunks' P W, relative to the previous max; or nullptr
  // The options (the kernel's kOpts instantiation only).
  acc_t temperature;       // l' = l / temperature
  bool entropy;
  bool sample;
  uint64_t seed;
  const int64_t* offsets;  // [N] or nullptr (the row index)
  int topk;                // 0: none
  acc_t* topk_val;         // [N, topk] the running list's l' (sorted, descending)
  int64_t* topk_idx;       // [N, topk] its indices
};

// P's scale before it is rounded to the operand type: 2^14 keeps fp16 P out of the subnormal range (common.cuh).
template <typename scalar_t>
constexpr float p_scale() {
  return std::is_same<scalar_t, at::Half>::value ? 16384.f : 1.f;
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ scalar_t to_operand(acc_t x) {
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value || std::is_same<scalar_t, at::Half>::value)
    return from_float<scalar_t>(x);
  else
    return static_cast<scalar_t>(x);
}

// IEEE division: --use_fast_math would make `/` an approximate division, and l' = l / T must match the reference's.
__device__ __forceinline__ float div_acc(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double div_acc(double a, double b) { return a / b; }

// Four consecutive entries at a 16-byte (fp32) / 32-byte (fp64) aligned address.
__device__ __forceinline__ void load4(const float* p, float (&x)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(p);
  x[0] = v.x, x[1] = v.y, x[2] = v.z, x[3] = v.w;
}
__device__ __forceinline__ void load4(const double* p, double (&x)[4]) {
  const double2 v0 = *reinterpret_cast<const double2*>(p), v1 = *reinterpret_cast<const double2*>(p + 2);
  x[0] = v0.x, x[1] = v0.y, x[2] = v1.x, x[3] = v1.y;
}
__device__ __forceinline__ void store4(float* p, const float (&x)[4]) {
  *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
}
__device__ __forceinline__ void store4(double* p, const double (&x)[4]) {
  *reinterpret_cast<double2*>(p) = make_double2(x[0], x[1]);
  *reinterpret_cast<double2*>(p + 2) = make_double2(x[2], x[3]);
}

// An offset below 0 is a device-side assert, as an out-of-range token (common.cuh, report_bad_token).
[[noreturn]] __device__ __noinline__ inline void report_bad_offset(int64_t off, int64_t row) {
  printf("latentseek_ext: offsets must be >= 0, got %lld at row %lld\n", static_cast<long long>(off),
         static_cast<long long>(row));
  CUDA_KERNEL_ASSERT(false && "latentseek_ext: offsets must be >= 0");
  __trap();
}

// The block-wide best (value, index) candidate (larger value, then lower index; NaN never wins), returned to every
// thread. red_v / red_i: kChunkWarps entries of shared memory, free again when this returns.
template <typename acc_t>
__device__ __forceinline__ void block_best(acc_t& v, int& i, acc_t* red_v, int* red_i) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const acc_t vo = __shfl_xor_sync(0xffffffffu, v, off);
    const int io = __shfl_xor_sync(0xffffffffu, i, off);
    if (better(vo, io, v, i)) {
      v = vo;
      i = io;
    }
  }
  if (lane == 0) {
    red_v[warp] = v;
    red_i[warp] = i;
  }
  __syncthreads();
  v = red_v[0];
  i = red_i[0];
#pragma unroll
  for (int w = 1; w < kChunkWarps; ++w) {
    if (better(red_v[w], red_i[w], v, i)) {
      v = red_v[w];
      i = red_i[w];
    }
  }
  __syncthreads();
}

template <typename acc_t>
__device__ __forceinline__ acc_t block_sum(acc_t x, acc_t* red) {
  x = warp_sum(x);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = x;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int w = 0; w < kChunkWarps; ++w) total += red[w];
  __syncthreads();
  return total;
}

// Top-k of one chunk. The thread's candidate: its best entry (j = tid + kChunkThreads i) that enters the list (above
// the threshold when the list is full) and ranks below the key (kv, ki) (any entry when ki < 0).
template <typename acc_t>
__device__ __forceinline__ void topk_candidate(const acc_t* row, int len, bool full, acc_t thr, acc_t kv, int ki,
                                               acc_t& cv, int& ci) {
  cv = neg_inf<acc_t>();
  ci = INT_MAX;
  for (int j = threadIdx.x; j < len; j += kChunkThreads) {
    const acc_t x = row[j];
    if (full && !(x > thr)) continue;  // also drops NaN
    if (x != x) continue;
    if (ki >= 0 && !better(kv, ki, x, j)) continue;
    if (better(x, j, cv, ci)) {
      cv = x;
      ci = j;
    }
  }
}

template <typename scalar_t, typename acc_t, bool kOpts>
__global__ void __launch_bounds__(kChunkThreads, kOpts ? 1 : 2) chunk_rows_kernel(const ChunkArgs<scalar_t, acc_t> a) {
  extern __shared__ __align__(16) unsigned char chunk_smem[];
  acc_t* row = reinterpret_cast<acc_t*>(chunk_smem);  // [len]: this row's l'
  __shared__ acc_t red_v[kChunkWarps];
  __shared__ int red_i[kChunkWarps], red_n[kChunkWarps];
  __shared__ acc_t lx_value, bc_alpha, bc_shift, bc_floor;
  __shared__ int lx_found, bc_has_max;
  // Top-k of this chunk, and the running list's threshold.
  __shared__ acc_t tk_v[kOpts ? kMaxTopk : 1];
  __shared__ int tk_i[kOpts ? kMaxTopk : 1];
  const acc_t ninf = neg_inf<acc_t>();
  const int n = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const acc_t* l = a.logits + static_cast<int64_t>(n) * a.len;
  const int64_t tl = a.tokens ? a.tokens[n] - a.v0 : -1;  // the given token's column in this chunk, if any
  if (a.first && tid == 0) {
    if (a.tokens) check_given_token(a.tokens[n], n, a.V);
    if (kOpts && a.sample && a.offsets && a.offsets[n] < 0) report_bad_offset(a.offsets[n], n);
  }
  if (tid == 0) lx_found = 0;
  __syncthreads();

  // Phase 1: the one read of this chunk's logits, by groups of four (16-byte loads where rows start on 4-entry
  // boundaries). The argmax is taken on the unscaled l (the greedy token is argmax l; l / T is monotone, so the
  // chunk's max of l' is max(l) / T, the same rounding).
  acc_t mx = ninf;
  int ix = INT_MAX, nx = INT_MAX;
  const bool l_vec = a.len % 4 == 0;
  const int groups = (a.len + 3) / 4;
#pragma unroll 2
  for (int q = tid; q < groups; q += kChunkThreads) {
    const int j0 = 4 * q, cnt = min(4, a.len - j0);
    acc_t raw[4];
    if (l_vec) {
      load4(l + j0, raw);
    } else {
#pragma unroll
      for (int e = 0; e < 4; ++e) raw[e] = e < cnt ? l[j0 + e] : ninf;
    }
    acc_t x[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      if (a.bias && e < cnt) raw[e] += to_acc(a.bias[a.v0 + j0 + e]);
      x[e] = kOpts ? div_acc(raw[e], a.temperature) : raw[e];
      if (e < cnt) {
        if (j0 + e == tl) {
          lx_value = x[e];
          lx_found = 1;
        }
        if (raw[e] > mx) {  // strict, ascending j: the thread's first maximum; NaN never compares greater
          mx = raw[e];
          ix = j0 + e;
        }
        if (isnan(raw[e]) && nx == INT_MAX) nx = j0 + e;
      }
    }
    store4(row + j0, x);  // entries past len are -inf, inside the allocation's 4-entry rounding
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) nx = min(nx, __shfl_xor_sync(0xffffffffu, nx, off));
  if (lane == 0) red_n[warp] = nx;
  block_best(mx, ix, red_v, red_i);  // its first barrier also publishes red_n and row[]
  ChunkState<acc_t> cs;
  if (tid == 0) {
    for (int w = 0; w < kChunkWarps; ++w) nx = min(nx, red_n[w]);
    if (a.first) {
      cs.st = RowState<acc_t>::empty(0);
      cs.s2 = 0;
      cs.g_best = ninf;
      cs.g_lx = ninf;
      cs.g_idx = -1;
      cs.topk_count = 0;
    } else {
      cs = a.state[n];
    }
    const acc_t m_old = cs.st.m;
    const acc_t m_new = max_acc(m_old, kOpts ? div_acc(mx, a.temperature) : mx);
    const acc_t alpha = rescale_factor(m_old, m_new);
    if (kOpts) cs.s2 = rescale_s2(cs.s2, cs.st.s, m_old, m_new, alpha);
    bc_alpha = alpha;
    bc_shift = m_new == ninf ? acc_t(0) : m_new;
    bc_has_max = m_new != ninf;  // else every entry so far is -inf (or NaN): no floor for the sampled score
    bc_floor = cs.g_best;  // sampling: the chunk must beat the previous chunks' best score (their indices are lower)
    cs.st.m = m_new;
    cs.st.s *= alpha;
    if (mx > cs.st.best) {  // an all -inf chunk (mx = -inf, ix = INT_MAX) never gets here
      cs.st.best = mx;
      cs.st.idx = a.v0 + ix;
    }
    if (cs.st.nan_idx < 0 && nx != INT_MAX) cs.st.nan_idx = a.v0 + nx;
    if (lx_found) cs.st.lx = lx_value;
  }
  __syncthreads();
  const acc_t alpha = bc_alpha, shift = bc_shift;
  const bool has_max = bc_has_max != 0;

  // Phase 2, from shared memory, by groups of four entries (one Philox call each; 8-byte P stores where aligned).
  acc_t sum = 0, sum2 = 0;
  acc_t g_best = bc_floor;  // the previous chunks' best perturbed score, index -1: it wins ties
  int g_idx = a.first ? INT_MAX : -1;
  acc_t g_lx = ninf;
  // No entry whose l' + kGumbelBound is below the best score so far, or below m_new + kGumbelFloor (the argmax's
  // own score is at least that), can win.
  const acc_t g_floor = has_max ? shift + acc_t(kGumbelFloor) : ninf;
  const uint64_t off = kOpts && a.sample ? static_cast<uint64_t>(a.offsets ? a.offsets[n] : n) : 0;
  scalar_t* prow = a.p ? a.p + static_cast<int64_t>(n) * a.len : nullptr;
  const bool p_vec = a.len % 4 == 0;  // row starts of P on 4-element boundaries
  for (int q = tid; q < groups; q += kChunkThreads) {
    const int j0 = 4 * q, cnt = min(4, a.len - j0);
    acc_t x[4];
    load4(row + j0, x);
    scalar_t pv[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const acc_t d = x[e] - shift;
      const acc_t pe = e < cnt ? exp_acc(d) : acc_t(0);
      sum += pe;
      if (kOpts && a.entropy && pe > acc_t(0)) sum2 += pe * d;  // pe = 0: a -inf entry, whose term is 0
      pv[e] = to_operand<scalar_t>(pe * acc_t(p_scale<scalar_t>()));
    }
    if (prow) {
      if (p_vec && cnt == 4) {
        struct alignas(4 * sizeof(scalar_t)) Four {
          scalar_t v[4];
        } four{{pv[0], pv[1], pv[2], pv[3]}};
        *reinterpret_cast<Four*>(prow + j0) = four;
      } else {
        for (int e = 0; e < cnt; ++e) prow[j0 + e] = pv[e];
      }
    }
    if (kOpts && a.sample) {
      const acc_t xm = max_acc(max_acc(x[0], x[1]), max_acc(x[2], x[3]));
      if (xm + acc_t(kGumbelBound) >= max_acc(g_best, g_floor)) {
        uint32_t bits[4];
        philox_group(a.seed, off, static_cast<uint64_t>(a.v0 + j0) >> 2, bits);  // v0 % 4 == 0
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          if (e >= cnt) break;
          const acc_t score = x[e] + acc_t(gumbel_from_uniform(uniform_from_bits(bits[e])));
          if (better(score, j0 + e, g_best, g_idx)) {
            g_best = score;
            g_idx = j0 + e;
            g_lx = x[e];
          }
        }
      }
    }
  }
  const acc_t tile_sum = block_sum(sum, red_v);
  const acc_t tile_sum2 = kOpts && a.entropy ? block_sum(sum2, red_v) : acc_t(0);
  if (kOpts && a.sample) {
    acc_t lx_of_best = g_lx;
    int who = g_idx;
    block_best(g_best, g_idx, red_v, red_i);
    // The winner's thread publishes its l' (an index -1 or INT_MAX: nothing in this chunk beat the previous best).
    if (g_idx >= 0 && g_idx != INT_MAX && who == g_idx) lx_value = lx_of_best;
    __syncthreads();
    if (tid == 0 && g_idx >= 0 && g_idx != INT_MAX) {
      cs.g_best = g_best;
      cs.g_idx = a.v0 + g_idx;
      cs.g_lx = lx_value;
    }
  }

  // Top-k: this chunk's entries that enter the running list, best first, then the merge.
  if (kOpts && a.topk > 0) {
    const int k = a.topk;
    acc_t* lv = a.topk_val + static_cast<int64_t>(n) * k;
    int64_t* li = a.topk_idx + static_cast<int64_t>(n) * k;
    const int count = a.first ? 0 : a.state[n].topk_count;  // thread 0's cs is not shared
    const bool full = count == k;
    const acc_t thr = full ? lv[k - 1] : ninf;
    acc_t cv;
    int ci;
    topk_candidate(row, a.len, full, thr, ninf, -1, cv, ci);
    int got = 0;
    for (; got < k; ++got) {
      acc_t bv = cv;
      int bi = ci;
      block_best(bv, bi, red_v, red_i);
      if (bi == INT_MAX) break;  // no entry left that enters the list (uniform: every thread has the same bi)
      if (tid == 0) {
        tk_v[got] = bv;
        tk_i[got] = bi;
      }
      if (ci == bi) topk_candidate(row, a.len, full, thr, bv, bi, cv, ci);  // only the winner's thread rescans
    }
    __syncthreads();
    if (warp == 0) {
      // Merge path: the list R (count entries, lower indices: first on ties) and this chunk's C (got entries).
      const acc_t rv = lane < count ? lv[lane] : ninf;
      const int64_t ri = lane < count ? li[lane] : 0;
      const acc_t cv2 = lane < got ? tk_v[lane] : ninf;
      const int64_t ci2 = lane < got ? static_cast<int64_t>(a.v0) + tk_i[lane] : 0;
      int r_rank = lane, c_rank = lane;
      for (int t = 0; t < got; ++t) r_rank += tk_v[t] > rv ? 1 : 0;
      for (int t = 0; t < count; ++t) c_rank += lv[t] >= cv2 ? 1 : 0;
      __syncwarp();  // every lane has read the list before any lane writes it
      if (lane < count && r_rank < k) {
        lv[r_rank] = rv;
        li[r_rank] = ri;
      }
      if (lane < got && c_rank < k) {
        lv[c_rank] = cv2;
        li[c_rank] = ci2;
      }
      if (tid == 0) cs.topk_count = min(k, count + got);
    }
  }

  if (tid == 0) {
    cs.st.s += tile_sum;
    if (kOpts) cs.s2 += tile_sum2;
    a.state[n] = cs;
  }
  // O holds the previous chunks' sum relative to the old max; GEMM 2 then adds this chunk's P W_c (new max).
  if (a.o && !a.first && alpha != acc_t(1)) {
    acc_t* orow = a.o + static_cast<int64_t>(n) * a.H;
    for (int64_t h = tid; h < a.H; h += kChunkThreads) orow[h] *= alpha;
  }
}

template <typename scalar_t, typename acc_t>
struct ChunkFinishArgs {
  const ChunkState<acc_t>* state;  // [N]
  const acc_t* o;                  // [N, H] sum P W (times p_scale), or nullptr without grad
  acc_t acc_scale;                 // 1 / p_scale
  const scalar_t* w;               // [V, H]
  const int64_t* tokens;           // [N] or nullptr
  RowReward<acc_t> reward;
  int N, V;
  int64_t H;
  acc_t temperature;
  bool sample;
  int64_t* tokens_out;  // [N]
  acc_t* logp_out;      // [N]
  acc_t* grad_out;      // [N, H] (may alias o) or nullptr
  acc_t* entropy_out;   // [N] or nullptr
  int topk;
  acc_t* topk_val;      // [N, topk]: l' in, log p out
  int64_t* topk_idx;    // [N, topk]
};

// Tokens (given; else the first NaN; else the sample or the argmax), logp, grad, entropy and the top-k log p of a
// row. A row with a NaN or +inf logit gets NaN logp, grad, entropy and top-k values and top-k tokens 0..k-1.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kChunkFinishThreads) chunk_finish_kernel(const ChunkFinishArgs<scalar_t, acc_t> a) {
  const int n = blockIdx.x, tid = threadIdx.x;
  const ChunkState<acc_t> cs = a.state[n];
  const RowState<acc_t>& st = cs.st;
  int64_t x;
  acc_t lx;
  if (a.tokens) {
    x = given_token(a.tokens[n], a.V);
    lx = st.lx;
  } else if (st.nan_idx >= 0) {
    x = st.nan_idx;
    lx = acc_t(NAN);
  } else if (a.sample) {
    x = cs.g_idx;
    lx = cs.g_lx;
  } else {
    x = st.idx;
    lx = div_acc(st.best, a.temperature);  // best is the unscaled max (phase 1): its l', rounded as there
  }
  const acc_t lse = st.m + static_cast<acc_t>(log(st.s));
  const bool bad = st.nan_idx >= 0 || st.m == -neg_inf<acc_t>();  // a NaN or +inf logit
  if (tid == 0) {
    a.tokens_out[n] = x;
    a.logp_out[n] = lx - lse;
    if (a.entropy_out) a.entropy_out[n] = bad ? acc_t(NAN) : final_entropy(st.s, cs.s2);
  }
  if (tid < a.topk) {
    const int64_t e = static_cast<int64_t>(n) * a.topk + tid;
    a.topk_val[e] = bad ? acc_t(NAN) : a.topk_val[e] - lse;
    if (bad) a.topk_idx[e] = tid;
  }
  if (a.grad_out == nullptr) return;
  const acc_t c = div_acc(-a.reward(n), a.temperature);
  const acc_t inv_s = acc_t(1) / st.s * a.acc_scale;
  const scalar_t* wx = a.w + x * a.H;
  const acc_t* orow = a.o + static_cast<int64_t>(n) * a.H;
  acc_t* grow = a.grad_out + static_cast<int64_t>(n) * a.H;
  // grad may alias O: each thread reads its element before writing it.
  for (int64_t h = tid; h < a.H; h += kChunkFinishThreads) grow[h] = c * (to_acc(wx[h]) - orow[h] * inv_s);
}

// Equal chunks of the vocabulary: the fewest chunks of at most max_len entries, each a multiple of 4 long (Philox
// groups and 8-byte P stores start on 4-entry boundaries) except the last, which is shorter by less than count * 4
// and never empty.
struct ChunkPlan {
  int64_t len, count;
};
inline ChunkPlan plan_chunks(int64_t V, int64_t max_len) {
  max_len = std::max<int64_t>(4, max_len / 4 * 4);
  int64_t count = (V + max_len - 1) / max_len;
  const int64_t len = std::min<int64_t>(V, ((V + count - 1) / count + 3) / 4 * 4);
  count = (V + len - 1) / len;
  return {len, count};
}

}  // namespace latentseek
