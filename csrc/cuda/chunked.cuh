// The chunked path (bf16 / fp16 with many rows): the vocabulary in chunks of Vc entries; per chunk
//   L = Z W_c^T            cuBLAS, bf16/fp16 in, fp32 out (at::mm with out_dtype; no TF32 question)
//   chunk_rows_kernel      bias, online state, P = exp(L - m_new) in bf16/fp16, O = alpha (O + T)
//   T = P W_c              cuBLAS, fp32 out
// 4NHV flops at cuBLAS speed plus 12 bytes per logit of traffic; W_c is read twice (the second time mostly
// from L2). Buffers: L and P are N x Vc with N * Vc * 6 bytes <= max(64 MiB, 16 N H bytes): O(N*H).
#pragma once

#include <climits>
#include <cstdint>
#include <limits>

#include "common.cuh"

namespace latentseek {

// The per-chunk row kernel; the launcher (run_chunked in lm_head_policy_grad.cu) issues the cuBLAS products.
constexpr int kChunkThreads = 256;

template <typename scalar_t>
struct ChunkArgs {
  const float* logits;  // [N, vc] = Z W_c^T, fp32
  int vc, v0, N, V;
  int64_t H;
  const scalar_t* bias;    // [V] or nullptr
  const int64_t* tokens;   // [N] or nullptr
  RowState<float>* state;  // [N], read unless first
  bool first;              // chunk 0: start from the empty state, O is still zero
  scalar_t* p;             // [N, vc] exp(l - m_new) * Tc::kPScale, or nullptr without grad
  float* o;                // [N, H] accumulator relative to the running max, or nullptr without grad
  const float* t;          // [N, H] = P_{c-1} W_{c-1} of the previous chunk (relative to the previous max)
};

template <typename scalar_t>
__global__ void __launch_bounds__(kChunkThreads) chunk_rows_kernel(const ChunkArgs<scalar_t> a) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr int kWarps = kChunkThreads / 32;
  __shared__ float red_v[kWarps], red_s[kWarps];
  __shared__ int red_i[kWarps], red_n[kWarps];
  __shared__ float lx_value;
  __shared__ int lx_found;
  __shared__ float bc_alpha, bc_shift;
  const int n = blockIdx.x, tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const float* l = a.logits + static_cast<int64_t>(n) * a.vc;
  const int64_t tl = a.tokens ? a.tokens[n] - a.v0 : -1;  // the given token's column in this chunk, if any
  if (a.tokens && a.first && tid == 0) check_given_token(a.tokens[n], n, a.V);  // one thread per row, chunk 0

  if (tid == 0) lx_found = 0;
  __syncthreads();
  float mx = kNegInf;
  int ix = INT_MAX, nx = INT_MAX;
  for (int j = tid; j < a.vc; j += kChunkThreads) {
    float x = l[j];
    if (a.bias) x += to_acc(a.bias[a.v0 + j]);
    if (j == tl) {
      lx_value = x;
      lx_found = 1;
    }
    if (x > mx) {  // strict, ascending j: the thread's first maximum; NaN never compares greater
      mx = x;
      ix = j;
    }
    if (isnan(x) && nx == INT_MAX) nx = j;
  }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float mo = __shfl_xor_sync(0xffffffffu, mx, off);
    const int io = __shfl_xor_sync(0xffffffffu, ix, off);
    if (better(mo, io, mx, ix)) {
      mx = mo;
      ix = io;
    }
    nx = min(nx, __shfl_xor_sync(0xffffffffu, nx, off));
  }
  if (lane == 0) {
    red_v[warp] = mx;
    red_i[warp] = ix;
    red_n[warp] = nx;
  }
  __syncthreads();
  RowState<float> st;
  if (tid == 0) {
    for (int w = 1; w < kWarps; ++w) {
      if (better(red_v[w], red_i[w], mx, ix)) {
        mx = red_v[w];
        ix = red_i[w];
      }
      nx = min(nx, red_n[w]);
    }
    st = a.first ? RowState<float>::empty(0) : a.state[n];
    const float m_new = fmaxf(st.m, mx);
    bc_alpha = rescale_factor(st.m, m_new);
    bc_shift = m_new == kNegInf ? 0.f : m_new;
    st.m = m_new;
    if (mx > st.best) {  // an all -inf chunk (mx = -inf, ix = INT_MAX) never gets here
      st.best = mx;
      st.idx = a.v0 + ix;
    }
    if (st.nan_idx < 0 && nx != INT_MAX) st.nan_idx = a.v0 + nx;
    if (lx_found) st.lx = lx_value;
  }
  __syncthreads();
  const float alpha = bc_alpha, shift = bc_shift;

  float sum = 0.f;
  for (int j = tid; j < a.vc; j += kChunkThreads) {
    float x = l[j];
    if (a.bias) x += to_acc(a.bias[a.v0 + j]);
    const float pv = exp_acc(x - shift);
    sum += pv;
    if (a.p) a.p[static_cast<int64_t>(n) * a.vc + j] = from_float<scalar_t>(pv * Tc<scalar_t>::kPScale);
  }
  sum = warp_sum(sum);
  if (lane == 0) red_s[warp] = sum;
  __syncthreads();
  if (tid == 0) {
    float tile_sum = 0.f;
    for (int w = 0; w < kWarps; ++w) tile_sum += red_s[w];
    st.s = st.s * alpha + tile_sum;
    a.state[n] = st;
  }
  if (a.o && !a.first) {
    float* orow = a.o + static_cast<int64_t>(n) * a.H;
    const float* trow = a.t + static_cast<int64_t>(n) * a.H;
    for (int64_t h = tid; h < a.H; h += kChunkThreads) orow[h] = alpha * (orow[h] + trow[h]);
  }
}

}  // namespace latentseek
