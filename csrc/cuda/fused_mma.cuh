// The tensor-core kernel fused_mma_kernel (bf16 / fp16, the default while W is streamed through L2 at most
// kMaxFusedPasses times). Grid = (row tiles of 32 rows x H slices) x vocabulary splits. A CTA walks its vocabulary
// range in tiles of 64 rows of W. Phase A streams the tile in 64-column chunks of H through a cp.async ring
// together with the matching chunk of Z and computes S = Z_blk W_t^T (+ bias) with mma.sync m16n8k16 into fp32
// registers. Phase B updates the online state of each row (max, argmax, first NaN, sum of exp, the given token's logit)
// and writes P = exp(S - m_new) as bf16/fp16 to shared memory. Phase C rescales the fp32 accumulator O (kept in
// registers) and adds P W_t for the CTA's H slice. The W chunks of that slice are kept in shared memory during phase A,
// so phase C reads them from there: within a CTA each byte of W feeds both products and is read from memory once.
// The ring has 3 stages (MmaTileLarge: 109,312 bytes of shared memory with the gradient) or 2 (MmaTileSmall: 97,024
// bytes, for the 99 KB per block of sm_86 / sm_89); the launcher takes the one the device holds, and
// LATENTSEEK_CUDA_TILES=small forces the small one on any GPU.
// The ring is not drained between vocabulary tiles: the last iterations of a tile's phase A issue the next tile's
// first chunks, which stay in flight through phases B and C (except the W of chunks that this CTA keeps: their slots
// are read in phase C, so the next tile's prologue issues them).
//
// Large H. O for 32 rows is 32 x H fp32 (448 KB at H = 3584): it does not fit on one SM. A CTA therefore owns an
// H slice of at most 512 columns (8 chunks, 64 fp32 registers per thread) and there are ceil(H / 512) slices.
// Every slice CTA recomputes the full S = Z W_t^T for its rows (the logits need all of H), so the cost is:
//   flops      = 2NHV * (slices + 1)            (slices = 1 up to H = 512, 2 at H = 896, 7 at H = 3584)
//   W traffic  = row_tiles * slices passes over W from L2; the CTAs of one split that share a W tile are
//                adjacent in the grid and run together, so HBM sees W about once per split wave.
// The alternatives were (a) two passes over W with a stats pass first: the same recompute in pass 2 plus one
// more read of W; (b) a cluster of CTAs (sm_90) each owning an H slice of O and exchanging partial logits
// through distributed shared memory: 4NHV flops and one read of W, but not expressible on sm_80 and not
// something to write without a GPU to test on. This kernel is the robust one; (b) is the next step for sm_90.
// For large N the recompute makes the fused kernel L2-bound, hence the chunked path (chunked.cuh).
#pragma once

#include <climits>
#include <cstdint>
#include <limits>

#include "common.cuh"
#include "latentseek/cuda_plan.h"

namespace latentseek {

// Byte offset of (row, 16-byte column chunk) in a tile of 128-byte rows. XOR-ing the chunk with the row's low
// three bits puts the 8 rows that one ldmatrix phase (or 8 consecutive cp.async threads) touches on 8 distinct
// 16-byte bank groups: no bank conflicts for row-wise and transposed fragment loads alike.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

// Tile: MmaTileLarge or MmaTileSmall (latentseek/cuda_plan.h), chosen per device by the launcher.
template <typename Tile, typename scalar_t, bool kWithGrad>
__global__ void __launch_bounds__(Tile::kThreads, 2) fused_mma_kernel(const FusedArgs<scalar_t, float> a) {
  using T = Tile;
  extern __shared__ __align__(128) unsigned char smem[];
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wr = warp / T::kWarpsN;       // row group: rows [16 wr, 16 wr + 16) of the tile
  const int wc = warp % T::kWarpsN;       // column group: S columns [16 wc, +16); O columns 16 wc + 64 c + [0, 16)
  const int g = lane >> 2, t = lane & 3;  // mma fragment coordinates
  const int row_tile = blockIdx.x % a.row_tiles, slice = blockIdx.x / a.row_tiles, split = blockIdx.y;
  const int r0 = row_tile * T::kBM;
  const int KT = (a.H + T::kBK - 1) / T::kBK;  // H chunks
  // This CTA's H slice of O: chunks [c_lo, c_hi), a balanced partition of the KT chunks (<= kMaxSliceChunks each).
  const int c_lo = kWithGrad ? static_cast<int>(static_cast<int64_t>(slice) * KT / a.slices) : 0;
  const int c_hi = kWithGrad ? static_cast<int>(static_cast<int64_t>(slice + 1) * KT / a.slices) : 0;
  const int n_kept = c_hi - c_lo;
  const int v_begin = split * a.split_len;
  const int v_end = min(a.V, v_begin + a.split_len);

  unsigned char* ring = smem;
  unsigned char* kept = ring + T::kStages * (T::kZChunkBytes + T::kWChunkBytes);
  unsigned char* p_tile = kept + (kWithGrad ? T::kMaxSliceChunks * T::kWChunkBytes : 0);
  float* red_max = reinterpret_cast<float*>(p_tile + T::kPBytes);
  int* red_idx = reinterpret_cast<int*>(red_max + T::kWarpsN * T::kBM);
  int* red_nan = red_idx + T::kWarpsN * T::kBM;
  float* red_sum = reinterpret_cast<float*>(red_nan + T::kWarpsN * T::kBM);
  float* row_m = red_sum + T::kWarpsN * T::kBM;
  float* row_s = row_m + T::kBM;
  float* row_best = row_s + T::kBM;
  float* row_lx = row_best + T::kBM;
  int* row_idx = reinterpret_cast<int*>(row_lx + T::kBM);
  int* row_nan = row_idx + T::kBM;

  auto z_stage = [&](int stage) { return ring + stage * (T::kZChunkBytes + T::kWChunkBytes); };
  // The ring is one stream of chunks over all of the CTA's tiles: chunk k of a tile whose first chunk is stream
  // position `base` lives in stage (base + k) % kStages, so that the last chunks of one tile and the first of the next
  // are in flight together (the ring is not drained between tiles).
  auto is_kept = [&](int k) { return kWithGrad && k >= c_lo && k < c_hi; };
  // Where chunk k of a W tile lives: the kept slot when it belongs to this CTA's slice (phase C reads it again), else
  // the ring stage.
  auto w_chunk = [&](int k, int base) -> unsigned char* {
    if (is_kept(k)) return kept + (k - c_lo) * T::kWChunkBytes;
    return z_stage((base + k) % T::kStages) + T::kZChunkBytes;
  };

  if (tid < T::kBM) {
    row_m[tid] = kNegInf;
    row_s[tid] = 0.f;
    row_best[tid] = kNegInf;
    row_lx[tid] = std::numeric_limits<float>::quiet_NaN();
    row_idx[tid] = v_begin;  // the argmax of a row of -inf logits is the first index, as in torch.argmax
    row_nan[tid] = -1;
  }
  // The given token of the two rows this thread holds in S and O (rows 16 wr + g and 16 wr + g + 8).
  int64_t tok[2] = {-1, -1};
  if (a.tokens) {
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int row = r0 + wr * 16 + g + 8 * rh;
      if (row < a.N) {
        tok[rh] = a.tokens[row];
        if (split == 0 && slice == 0 && wc == 0 && t == 0) check_given_token(tok[rh], row, a.V);  // one per row
      }
    }
  }

  float o[kWithGrad ? T::kMaxSliceChunks : 1][2][4];
#pragma unroll
  for (int c = 0; c < (kWithGrad ? T::kMaxSliceChunks : 1); ++c)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[c][nt][e] = 0.f;

  // Issues the copies of H chunk k of the tile at v0 whose stream base is `base`: the Z rows of this CTA into ring
  // stage (base + k) % kStages, and with_w, the W rows [v0, v0 + 64) to w_chunk(k, base). Rows past N or v_end and
  // columns past H are zero-filled: zero logits that are masked below, zero W rows that meet P = 0. H % 8 == 0
  // (checked by the launcher), so a 16-byte vector is either inside H or past it.
  auto load_chunk = [&](int k, int v0, int base, bool with_z, bool with_w) {
    const int vec = tid & 7;
    const int col = k * T::kBK + vec * 8;
    if (with_z) {
      const int row = tid >> 3;  // 256 threads = 32 rows x 8 vectors
      const int grow = r0 + row;
      const bool ok = grow < a.N && col < a.H;
      const scalar_t* src = ok ? a.z + static_cast<int64_t>(grow) * a.H + col : a.z;
      cp_async_16(smem_u32(z_stage((base + k) % T::kStages)) + swz(row, vec), src, ok);
    }
    if (with_w) {
      const uint32_t wdst = smem_u32(w_chunk(k, base));
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int row = (tid >> 3) + 32 * j;  // 64 W rows x 8 vectors
        const int v = v0 + row;
        const bool ok = v < v_end && col < a.H;
        const scalar_t* src = ok ? a.w + static_cast<int64_t>(v) * a.H + col : a.w;
        cp_async_16(wdst + swz(row, vec), src, ok);
      }
    }
  };

  int base = 0;  // stream position of the current tile's chunk 0, modulo kStages
  for (int v0 = v_begin; v0 < v_end; v0 += T::kBN, base = (base + KT) % T::kStages) {
    // The previous tile's phase C has finished reading `kept` and `p_tile` before they are overwritten.
    __syncthreads();

    // ---- Phase A: S = Z_blk W_t^T over H, kStages-deep cp.async pipeline (one commit group per chunk) ----
    // Chunk s < kStages - 1 was prefetched during the previous tile's phase A when that tile had an iteration
    // k = s + KT - (kStages - 1) >= 0: its Z and, unless the chunk is kept (phase C of the previous tile was still
    // reading the kept slots), its W. What is missing is issued now; one group per chunk either way (possibly empty),
    // so that the group count below stays "chunks 0 .. k + kStages - 2 committed".
#pragma unroll
    for (int s = 0; s < T::kStages - 1; ++s) {
      if (s < KT) {
        const bool prefetched = v0 != v_begin && s + KT >= T::kStages - 1;
        if (!prefetched || is_kept(s)) load_chunk(s, v0, base, !prefetched, true);
      }
      cp_async_commit();
    }
    float acc[2][4];
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] = 0.f;

    for (int k = 0; k < KT; ++k) {
      // Groups committed so far: chunks 0 .. k + kStages - 2; allowing kStages - 2 pending means chunk k is in.
      cp_async_wait<T::kStages - 2>();
      // Everyone's copies of chunk k are visible, and everyone has finished chunk k - 1, whose stage is refilled.
      __syncthreads();
      const int ahead = k + T::kStages - 1;  // the chunk this iteration issues
      if (ahead < KT) {
        load_chunk(ahead, v0, base, true, true);
      } else if (v0 + T::kBN < v_end && ahead - KT < KT) {
        // The next tile's first chunks, in flight during this tile's phases B and C; a kept W chunk must wait for
        // this tile's phase C (the next tile's prologue issues it).
        load_chunk(ahead - KT, v0 + T::kBN, base + KT, true, !is_kept(ahead - KT));
      }
      cp_async_commit();

      const uint32_t zs = smem_u32(z_stage((base + k) % T::kStages));
      const uint32_t ws = smem_u32(w_chunk(k, base));
#pragma unroll
      for (int kk = 0; kk < T::kBK / 16; ++kk) {
        uint32_t af[4], bf[4];
        // A: rows 16 wr + (lane & 15), k-columns 16 kk + 8 (lane >> 4).
        ldmatrix_x4(af, zs + swz(wr * 16 + (lane & 15), kk * 2 + (lane >> 4)));
        // B = W_t^T: matrix i = lane >> 3 holds W rows 16 wc + 8 (i >> 1) + (lane & 7), k-columns 16 kk + 8 (i & 1)
        // -> bf[0], bf[1] = n-tile 0 (k 0-7, 8-15); bf[2], bf[3] = n-tile 1.
        const int i = lane >> 3;
        ldmatrix_x4(bf, ws + swz(wc * 16 + (i >> 1) * 8 + (lane & 7), kk * 2 + (i & 1)));
        Tc<scalar_t>::mma(acc[0], af, bf[0], bf[1]);
        Tc<scalar_t>::mma(acc[1], af, bf[2], bf[3]);
      }
    }
    // No drain: the groups still pending are the next tile's first chunks (or empty), and phases B and C below touch
    // neither the ring stages they fill nor (kept chunks are not prefetched) the kept slots.

    // ---- Phase B: online softmax state ----
    // acc[nt][e] holds row 16 wr + g + 8 (e >> 1), tile column 16 wc + 8 nt + 2 t + (e & 1). For row half rh the
    // four values j = 0..3 are nt = j >> 1, e = 2 rh + (j & 1), in ascending column order.
    float tmax[2], alpha[2], shift[2];
    int tidx[2], tnan[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int lrow = wr * 16 + g + 8 * rh;
      float mx = kNegInf;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int v = v0 + wc * 16 + (j >> 1) * 8 + 2 * t + (j & 1);
        float x = acc[j >> 1][2 * rh + (j & 1)];
        if (v < v_end) {
          if (a.bias) x += to_acc(a.bias[v]);
          if (v == tok[rh]) row_lx[lrow] = x;  // a single thread of a single tile ever matches
        } else {
          x = kNegInf;  // outside this split: no probability mass, never the argmax of a finite row
        }
        acc[j >> 1][2 * rh + (j & 1)] = x;
        mx = fmaxf(mx, x);
      }
      int ix = INT_MAX, nx = INT_MAX;
#pragma unroll
      for (int j = 3; j >= 0; --j) {  // descending, so the lowest matching column wins
        const int v = v0 + wc * 16 + (j >> 1) * 8 + 2 * t + (j & 1);
        const float x = acc[j >> 1][2 * rh + (j & 1)];
        if (x == mx) ix = v;
        if (isnan(x)) nx = v;
      }
      // Reduce over the 4 lanes of the quad (same g): together they hold the warp's 16 columns of this row.
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float mo = __shfl_xor_sync(0xffffffffu, mx, off);
        const int io = __shfl_xor_sync(0xffffffffu, ix, off);
        const int no = __shfl_xor_sync(0xffffffffu, nx, off);
        if (better(mo, io, mx, ix)) {
          mx = mo;
          ix = io;
        }
        nx = min(nx, no);
      }
      if (t == 0) {
        red_max[wc * T::kBM + lrow] = mx;
        red_idx[wc * T::kBM + lrow] = ix;
        red_nan[wc * T::kBM + lrow] = nx;
      }
    }
    __syncthreads();

    float psum[2];
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int lrow = wr * 16 + g + 8 * rh;
      float mx = kNegInf;
      int ix = INT_MAX, nx = INT_MAX;
#pragma unroll
      for (int w = 0; w < T::kWarpsN; ++w) {
        const float mo = red_max[w * T::kBM + lrow];
        const int io = red_idx[w * T::kBM + lrow];
        if (better(mo, io, mx, ix)) {
          mx = mo;
          ix = io;
        }
        nx = min(nx, red_nan[w * T::kBM + lrow]);
      }
      tmax[rh] = mx;
      tidx[rh] = ix;
      tnan[rh] = nx;
      const float m_old = row_m[lrow];
      const float m_new = fmaxf(m_old, mx);
      alpha[rh] = rescale_factor(m_old, m_new);
      shift[rh] = m_new == kNegInf ? 0.f : m_new;  // all -inf so far: exp(-inf - 0) = 0, and no inf - inf
      float sum = 0.f;
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const float p0 = exp_acc(acc[nt][2 * rh] - shift[rh]);
        const float p1 = exp_acc(acc[nt][2 * rh + 1] - shift[rh]);
        sum += p0 + p1;
        if constexpr (kWithGrad) {
          const int col = wc * 16 + nt * 8 + 2 * t;  // even: the pair shares one 32-bit word
          constexpr float kScale = Tc<scalar_t>::kPScale;
          *reinterpret_cast<uint32_t*>(p_tile + swz(lrow, col >> 3) + (col & 7) * 2) =
              Tc<scalar_t>::pack(p0 * kScale, p1 * kScale);
        }
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      sum += __shfl_xor_sync(0xffffffffu, sum, 2);
      psum[rh] = sum;
    }
#pragma unroll
    for (int rh = 0; rh < 2; ++rh)
      if (t == 0) red_sum[wc * T::kBM + wr * 16 + g + 8 * rh] = psum[rh];
    // All threads have read row_m (m_old) and written P and the partial sums.
    __syncthreads();

    if (wc == 0 && t == 0) {  // one owner per row commits the new state
#pragma unroll
      for (int rh = 0; rh < 2; ++rh) {
        const int lrow = wr * 16 + g + 8 * rh;
        float tile_sum = 0.f;
#pragma unroll
        for (int w = 0; w < T::kWarpsN; ++w) tile_sum += red_sum[w * T::kBM + lrow];
        row_s[lrow] = row_s[lrow] * alpha[rh] + tile_sum;
        row_m[lrow] = fmaxf(row_m[lrow], tmax[rh]);
        if (tmax[rh] > row_best[lrow]) {  // strict: an equal maximum in a later tile keeps the earlier index
          row_best[lrow] = tmax[rh];
          row_idx[lrow] = tidx[rh];
        }
        if (row_nan[lrow] < 0 && tnan[rh] != INT_MAX) row_nan[lrow] = tnan[rh];
      }
    }

    // ---- Phase C: O = alpha O + P W_t[:, slice] from the kept chunks ----
    if constexpr (kWithGrad) {
#pragma unroll
      for (int c = 0; c < T::kMaxSliceChunks; ++c)
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          o[c][nt][0] *= alpha[0];
          o[c][nt][1] *= alpha[0];
          o[c][nt][2] *= alpha[1];
          o[c][nt][3] *= alpha[1];
        }
      uint32_t pf[T::kBN / 16][4];
#pragma unroll
      for (int kk = 0; kk < T::kBN / 16; ++kk)
        ldmatrix_x4(pf[kk], smem_u32(p_tile) + swz(wr * 16 + (lane & 15), kk * 2 + (lane >> 4)));
      const int i = lane >> 3;
#pragma unroll
      for (int c = 0; c < T::kMaxSliceChunks; ++c) {
        if (c < n_kept) {
          const uint32_t wk = smem_u32(kept + c * T::kWChunkBytes);
#pragma unroll
          for (int kk = 0; kk < T::kBN / 16; ++kk) {
            uint32_t bf[4];
            // B = W_t (k = vocabulary rows, n = H columns), transposed load: matrix i holds vocabulary rows
            // 16 kk + 8 (i & 1) + (lane & 7), H columns 16 wc + 8 (i >> 1) of this chunk.
            ldmatrix_x4_trans(bf, wk + swz(kk * 16 + (i & 1) * 8 + (lane & 7), wc * 2 + (i >> 1)));
            Tc<scalar_t>::mma(o[c][0], pf[kk], bf[0], bf[1]);
            Tc<scalar_t>::mma(o[c][1], pf[kk], bf[2], bf[3]);
          }
        }
      }
    }
  }
  __syncthreads();  // the last tile's state commit is visible

  if (slice == 0 && tid < T::kBM && r0 + tid < a.N) {
    RowState<float> st;
    st.m = row_m[tid];
    st.s = row_s[tid];
    st.best = row_best[tid];
    st.idx = row_idx[tid];
    st.nan_idx = row_nan[tid];
    st.lx = row_lx[tid];
    store_row_state(a, split, r0 + tid, st);
  }
  if constexpr (kWithGrad) {
#pragma unroll
    for (int rh = 0; rh < 2; ++rh) {
      const int lrow = wr * 16 + g + 8 * rh;
      const int row = r0 + lrow;
      if (row >= a.N) continue;
      if (a.splits == 1) {
        // grad = -r (W[x] - O / s) for this CTA's columns.
        RowState<float> st;
        st.idx = row_idx[lrow];
        st.nan_idx = row_nan[lrow];
        const int64_t x = a.tokens ? given_token(tok[rh], a.V) : chosen_token(st);
        const float r = a.reward(row);
        const float inv_s = 1.f / row_s[lrow] * (1.f / Tc<scalar_t>::kPScale);
        const scalar_t* wx = a.w + x * a.H;
        float* grow = a.grad_out + static_cast<int64_t>(row) * a.H;
#pragma unroll
        for (int c = 0; c < T::kMaxSliceChunks; ++c) {
          if (c >= n_kept) continue;
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int h = (c_lo + c) * T::kBK + wc * 16 + nt * 8 + 2 * t;
            if (h < a.H) {  // h even and H % 8 == 0: h + 1 < H as well
              float2 gv;
              gv.x = -r * (to_acc(wx[h]) - o[c][nt][2 * rh] * inv_s);
              gv.y = -r * (to_acc(wx[h + 1]) - o[c][nt][2 * rh + 1] * inv_s);
              *reinterpret_cast<float2*>(grow + h) = gv;
            }
          }
        }
      } else {
        float* prow = a.part_acc + (static_cast<int64_t>(split) * a.N + row) * a.H;
#pragma unroll
        for (int c = 0; c < T::kMaxSliceChunks; ++c) {
          if (c >= n_kept) continue;
#pragma unroll
          for (int nt = 0; nt < 2; ++nt) {
            const int h = (c_lo + c) * T::kBK + wc * 16 + nt * 8 + 2 * t;
            if (h < a.H) *reinterpret_cast<float2*>(prow + h) = make_float2(o[c][nt][2 * rh], o[c][nt][2 * rh + 1]);
          }
        }
      }
    }
  }
}

}  // namespace latentseek
