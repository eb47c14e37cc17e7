// The SIMT kernel fused_simt_kernel (fp32 / fp64, and bf16 / fp16 inputs that the tensor-core path cannot take:
// H % 8 != 0 or a misaligned weight). The same algorithm with fp32 (fp64) FMAs: no TF32 anywhere, so fp32 results
// match the fp32 reference to ~1e-6. A warp owns two rows, one vocabulary entry per lane, and reduces with shuffles.
#pragma once

#include <climits>
#include <cstdint>
#include <limits>

#include "common.cuh"
#include "latentseek/cuda_plan.h"

namespace latentseek {

template <typename scalar_t, typename acc_t, bool kWithGrad>
__global__ void __launch_bounds__(SimtTile::kThreads) fused_simt_kernel(const FusedArgs<scalar_t, acc_t> a) {
  using T = SimtTile;
  constexpr int kCols = T::slice_cols(sizeof(acc_t));
  constexpr int kPerLane = kCols / 32;
  __shared__ acc_t zs[T::kRows][T::kBK + 1];  // +1: conflict-free column reads
  __shared__ acc_t ws[T::kBN][T::kBK + 1];
  const acc_t ninf = neg_inf<acc_t>();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int row_tile = blockIdx.x % a.row_tiles, slice = blockIdx.x / a.row_tiles, split = blockIdx.y;
  const int r0 = row_tile * T::kRows;
  const int h0 = slice * kCols, h1 = min(a.H, h0 + kCols);
  const int v_begin = split * a.split_len;
  const int v_end = min(a.V, v_begin + a.split_len);

  RowState<acc_t> st[2];
  int64_t tok[2];
  acc_t o[2][kWithGrad ? kPerLane : 1];
#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    st[rh] = RowState<acc_t>::empty(v_begin);
    const int row = r0 + warp + 8 * rh;
    tok[rh] = (a.tokens && row < a.N) ? a.tokens[row] : -1;
    if (a.tokens && row < a.N && split == 0 && slice == 0 && lane == 0) check_given_token(tok[rh], row, a.V);
#pragma unroll
    for (int j = 0; j < (kWithGrad ? kPerLane : 1); ++j) o[rh][j] = acc_t(0);
  }

  for (int v0 = v_begin; v0 < v_end; v0 += T::kBN) {
    acc_t s0 = 0, s1 = 0;
    for (int k0 = 0; k0 < a.H; k0 += T::kBK) {
      __syncthreads();  // the previous chunk has been consumed
#pragma unroll
      for (int j = 0; j < T::kRows * T::kBK / T::kThreads; ++j) {
        const int e = tid + j * T::kThreads, r = e / T::kBK, k = e % T::kBK;
        const int row = r0 + r, h = k0 + k;
        zs[r][k] = (row < a.N && h < a.H) ? to_acc(a.z[static_cast<int64_t>(row) * a.H + h]) : acc_t(0);
      }
#pragma unroll
      for (int j = 0; j < T::kBN * T::kBK / T::kThreads; ++j) {
        const int e = tid + j * T::kThreads, r = e / T::kBK, k = e % T::kBK;
        const int v = v0 + r, h = k0 + k;
        ws[r][k] = (v < v_end && h < a.H) ? to_acc(a.w[static_cast<int64_t>(v) * a.H + h]) : acc_t(0);
      }
      __syncthreads();
#pragma unroll 8
      for (int k = 0; k < T::kBK; ++k) {
        const acc_t wv = ws[lane][k];
        s0 += zs[warp][k] * wv;
        s1 += zs[warp + 8][k] * wv;
      }
    }

    const int v = v0 + lane;
    const bool valid = v < v_end;
    const int n_valid = min(T::kBN, v_end - v0);  // warp-uniform
    acc_t p[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      acc_t x = rh == 0 ? s0 : s1;
      x = valid ? x + (a.bias ? to_acc(a.bias[v]) : acc_t(0)) : ninf;
      const int64_t tl = tok[rh] - v0;
      if (tl >= 0 && tl < n_valid) st[rh].lx = __shfl_sync(0xffffffffu, x, static_cast<int>(tl));
      const bool is_nan = isnan(x);
      const acc_t tmax = warp_max(x);  // NaN-ignoring max
      const unsigned at_max = __ballot_sync(0xffffffffu, valid && x == tmax);
      const unsigned nans = __ballot_sync(0xffffffffu, valid && is_nan);
      const acc_t m_new = max_acc(st[rh].m, tmax);
      const acc_t alpha = rescale_factor(st[rh].m, m_new);
      const acc_t shift = m_new == ninf ? acc_t(0) : m_new;
      p[rh] = exp_acc(x - shift);
      st[rh].s = st[rh].s * alpha + warp_sum(p[rh]);
      st[rh].m = m_new;
      if (tmax > st[rh].best && at_max != 0u) {
        st[rh].best = tmax;
        st[rh].idx = v0 + __ffs(at_max) - 1;  // lowest lane = lowest index
      }
      if (st[rh].nan_idx < 0 && nans != 0u) st[rh].nan_idx = v0 + __ffs(nans) - 1;
      if constexpr (kWithGrad) {
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) o[rh][j] *= alpha;
      }
    }
    if constexpr (kWithGrad) {
      // O[r, h] += sum_v p[r, v] W[v, h]; lane handles h = h0 + lane + 32 j (coalesced reads of W rows).
      for (int vv = 0; vv < n_valid; ++vv) {
        const acc_t p0 = __shfl_sync(0xffffffffu, p[0], vv);
        const acc_t p1 = __shfl_sync(0xffffffffu, p[1], vv);
        const scalar_t* wrow = a.w + static_cast<int64_t>(v0 + vv) * a.H;
#pragma unroll
        for (int j = 0; j < kPerLane; ++j) {
          const int h = h0 + lane + 32 * j;
          if (h < h1) {
            const acc_t wv = to_acc(wrow[h]);
            o[0][j] += p0 * wv;
            o[1][j] += p1 * wv;
          }
        }
      }
    }
  }

#pragma unroll
  for (int rh = 0; rh < 2; ++rh) {
    const int row = r0 + warp + 8 * rh;
    if (row >= a.N) continue;
    if (slice == 0 && lane == 0) store_row_state(a, split, row, st[rh]);
    if constexpr (!kWithGrad) continue;
    if (a.splits == 1) {
      const int64_t x = a.tokens ? given_token(tok[rh], a.V) : chosen_token(st[rh]);
      const acc_t r = a.reward(row);
      const acc_t inv_s = acc_t(1) / st[rh].s;
      const scalar_t* wx = a.w + x * a.H;
#pragma unroll
      for (int j = 0; j < (kWithGrad ? kPerLane : 1); ++j) {
        const int h = h0 + lane + 32 * j;
        if (h < h1) a.grad_out[static_cast<int64_t>(row) * a.H + h] = -r * (to_acc(wx[h]) - o[rh][j] * inv_s);
      }
    } else {
      acc_t* prow = a.part_acc + (static_cast<int64_t>(split) * a.N + row) * a.H;
#pragma unroll
      for (int j = 0; j < (kWithGrad ? kPerLane : 1); ++j) {
        const int h = h0 + lane + 32 * j;
        if (h < h1) prow[h] = o[rh][j];
      }
    }
  }
}

}  // namespace latentseek
