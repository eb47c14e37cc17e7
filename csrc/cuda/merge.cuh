// The split merge and finish, merge_splits_kernel: tokens, logp, grad = -r (W[x] - sum_s f_s acc_s / s).
//
// Split-V partials. When the grid has fewer (row tile, slice) CTAs than the GPU holds, the vocabulary is split
// and each split writes its per-row state (RowState of latentseek/online_softmax.h) and its unnormalised fp32
// accumulator; merge_splits_kernel merges them in vocabulary order (so ties keep the lowest index) and finishes
// tokens, logp and grad. With one split the fused kernels finish in place. The partials take
// splits x N x H x 4 bytes, where splits x row_tiles x slices is about one wave of CTAs: O(#SM x 32 x H).
#pragma once

#include <climits>
#include <cstdint>
#include <limits>

#include "common.cuh"

namespace latentseek {

constexpr int kMergeThreads = 256;

// The merge kernel's shared memory, all of it dynamic: [merged RowState][factor per split, zero padded]. Why the
// padding: on an H200, compute-sanitizer memcheck reported a 12-byte shared read in the grad loop's factor[s]
// that ran past a 2-split factor array. In nvcc 13's PTX (sm_90a) the loop is unrolled by 4: ld.shared.v4 loads cover
// whole groups of 4 splits only (in bounds), and the remainder, all of a 2-split array, loads one float at a time
// under s < splits; so the wider read is ptxas's (inferred; the SASS was not inspected). Padding to a multiple of 4
// entries plus 4 keeps every such read inside the allocation and reading zeros; memcheck was clean after it.
template <typename acc_t>
constexpr size_t merge_state_bytes() {
  return (sizeof(RowState<acc_t>) + 15) / 16 * 16;
}
__host__ __device__ inline int merge_factor_slots(int splits) { return (splits + 3) / 4 * 4 + 4; }
template <typename acc_t>
size_t merge_smem_bytes(int splits) {
  return merge_state_bytes<acc_t>() + static_cast<size_t>(merge_factor_slots(splits)) * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMergeThreads)
    merge_splits_kernel(const RowState<acc_t>* part_state, const acc_t* part_acc, int splits, int N, int H, int V,
                        acc_t acc_scale, const scalar_t* w, const int64_t* tokens, const RowReward<acc_t> reward,
                        int64_t* tokens_out, acc_t* logp_out, acc_t* grad_out) {
  extern __shared__ __align__(128) unsigned char merge_smem[];
  RowState<acc_t>& final_state = *reinterpret_cast<RowState<acc_t>*>(merge_smem);
  acc_t* factor = reinterpret_cast<acc_t*>(merge_smem + merge_state_bytes<acc_t>());  // [merge_factor_slots]
  const int n = blockIdx.x, tid = threadIdx.x;
  grid_dependency_wait();  // launched with programmatic dependent launch after the sm90 kernel

  if (tid < 32) {
    // Lane l merges splits [l * per, (l + 1) * per) in order; then lanes merge pairwise in order (lane l takes
    // lane l + off, which covers higher indices), so ties keep the lowest index and the first NaN wins.
    const int per = (splits + 31) / 32;
    const int lo = tid * per, hi = min(splits, lo + per);
    RowState<acc_t> st = RowState<acc_t>::empty(std::numeric_limits<int64_t>::max());
    for (int s = lo; s < hi; ++s) {
      const RowState<acc_t> b = part_state[static_cast<int64_t>(s) * N + n];
      if (s == lo) {
        st = b;
      } else {
        acc_t fa, fb;
        merge_states(st, b, fa, fb);
      }
    }
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const RowState<acc_t> other = shfl_down_state(st, off);
      if ((tid & (2 * off - 1)) == 0 && tid + off < 32) {
        acc_t fa, fb;
        merge_states(st, other, fa, fb);
      }
    }
    if (tid == 0) final_state = st;
  }
  __syncthreads();
  const RowState<acc_t> st = final_state;
  for (int s = tid; s < merge_factor_slots(splits); s += kMergeThreads)
    factor[s] = s < splits ? rescale_factor(part_state[static_cast<int64_t>(s) * N + n].m, st.m) : acc_t(0);
  __syncthreads();

  const int64_t x = tokens ? given_token(tokens[n], V) : chosen_token(st);
  if (tid == 0) {
    tokens_out[n] = x;
    logp_out[n] = final_logp(st, tokens ? st.lx : st.best);
  }
  if (grad_out == nullptr) return;
  const acc_t r = reward(n);
  const acc_t inv_s = acc_t(1) / st.s * acc_scale;  // acc_scale undoes fp16's P scale
  const scalar_t* wx = w + x * H;
  for (int h = tid; h < H; h += kMergeThreads) {
    acc_t acc = 0;
    for (int s = 0; s < splits; ++s) acc += factor[s] * part_acc[(static_cast<int64_t>(s) * N + n) * H + h];
    // part_acc may alias grad_out (the chunked path, one split): this thread reads its element before writing it.
    grad_out[static_cast<int64_t>(n) * H + h] = -r * (to_acc(wx[h]) - acc * inv_s);
  }
}

}  // namespace latentseek
