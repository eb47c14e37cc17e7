// The sm_90a kernel sm90_kernel (bf16 / fp16, H <= 4096): only behind LATENTSEEK_CUDA_KERNEL=sm90 until a GPU has
// run the CUDA tests and compute-sanitizer on it (it has not yet). Written from the design in the CUDA kernel review:
// W is read from memory once, 4NHV flops, no recompute of the logits per H slice.
//
// Cluster. A cluster of C CTAs (latentseek/cuda_plan.h sm90_layout: C = ceil(H / 512), <= 8) works on one
// 64-token tile and one vocabulary split; CTA `rank` owns H chunks [rank * chunks, (rank + 1) * chunks) of 64
// columns: its slice of Z (resident in shared memory), of every W tile and of O. Per 64-entry vocabulary tile:
//   1. the producer warp's TMA brings the CTA's chunks of W rows [v0, v0 + 64) into a ring stage (mbarrier
//      complete_tx); the two consumer warpgroups compute the partial logits S_r = Z_r W_r^T (64 x 64, fp32) with
//      wgmma m64n32k16 (each warpgroup 32 vocabulary columns, K = the CTA's H slice);
//   2. exchange: each CTA writes S_r to its own shared memory and arrives on every CTA's `ready` mbarrier
//      (release at cluster scope); every CTA then reads all C partials through distributed shared memory and sums
//      them in rank order 0, 1, ..., C-1, and arrives on every CTA's `drained` mbarrier, after which the owner may
//      overwrite its partial (next tile). Every CTA adds the same fp32 values in the same order with the same
//      instructions, so all CTAs of the cluster hold bitwise the same logits, hence the same row maxima, sums,
//      argmax (lowest index on ties, first NaN) and P: the tokens and the gradient slices cannot disagree;
//   3. the online softmax state of each row (4 threads per row, quad shuffles), P = exp(S - m_new) rounded to
//      bf16 / fp16 (times 2^14 for fp16) into shared memory, in the 128-byte-swizzled layout wgmma reads;
//   4. O = alpha O + P W_t for the CTA's chunks with wgmma m64n64k16 (A = P, B = the same W stage read MN-major),
//      the chunks dealt alternately to the two consumer warpgroups (at most 4 each: 128 fp32 registers);
//   5. the stage goes back to the producer.
// Precision is the fused kernel's (common.cuh): logits and O accumulate in fp32, P is rounded to 16 bits only as
// the operand of P W_t, and the row maximum's entry is exp(0) = 1, exact.
//
// Grid. Persistent: as many clusters as the device holds at once (cudaOccupancyMaxActiveClusters) and at most one
// per work item; the items are (token tile, vocabulary split) pairs, the splits from make_grid (one wave of
// clusters), walked by cluster id with a stride of the cluster count. A cluster that moves to another token tile
// reloads its Z slice (z_full / z_empty). With one split the kernel finishes the rows; with more, it writes the
// split partials and merge_splits_kernel (merge.cuh) merges them in vocabulary order, launched with programmatic
// dependent launch: it may start while this kernel drains and waits (griddepcontrol.wait) for its results.
//
// Shared memory per CTA (1024-byte aligned, offsets in this order): Z [chunks x 8 KB], ring [stages x chunks x 8 KB]
// (each chunk a 64 x 64 TMA box, 128-byte swizzle), P [8 KB, same swizzle], the exchange buffer [64 x 80 floats],
// per-row alpha / final s / final token, mbarriers. 202,880 bytes at H = 896 (2 stages), 227,456 at H = 1536.
#pragma once

#include <cuda.h>

#include <climits>
#include <cstdint>
#include <limits>

#include "common.cuh"
#include "latentseek/cuda_plan.h"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LS_SM90_DEVICE 1
#else
#define LS_SM90_DEVICE 0
#endif

namespace latentseek {

// What the launcher passes besides FusedArgs (a.row_tiles: token tiles of 64; a.splits, a.split_len: the splits).
struct Sm90Config {
  int cluster, chunks, stages;
};

namespace sm90 {

#if LS_SM90_DEVICE
// --- PTX wrappers (sm_90 / sm_90a) ------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t cluster_ctarank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_id() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%clusterid.x;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_count() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%nclusterid.x;\n" : "=r"(r));
  return r;
}
// All threads of all CTAs of the cluster (not .aligned: the producer warp reaches it from divergent paths).
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
// The same shared memory offset in CTA `rank` of the cluster.
__device__ __forceinline__ uint32_t map_to_rank(uint32_t addr, uint32_t rank) {
  uint32_t r;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(addr), "r"(rank));
  return r;
}
__device__ __forceinline__ float4 ld_cluster_f4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}

__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_init_fence() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Arrives on a barrier of any CTA of the cluster (addr from map_to_rank), releasing this thread's earlier
// shared-memory accesses (and those ordered before them by __syncwarp) at cluster scope.
__device__ __forceinline__ void mbar_arrive_cluster(uint32_t remote_bar) {
  asm volatile("mbarrier.arrive.release.cluster.shared::cluster.b64 _, [%0];\n" ::"r"(remote_bar) : "memory");
}
// Waits until the phase of the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// The same with acquire at cluster scope: what other CTAs released before arriving is visible afterwards.
__device__ __forceinline__ void mbar_wait_cluster(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// One 64 x 64 box of a 2-D tensor map (coordinates: column, row; out-of-range elements arrive as zeros and count
// towards the transaction bytes) into this CTA's shared memory, completing on `bar`.
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int col, int row, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(
          dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(col), "r"(row), "r"(bar)
      : "memory");
}
__device__ __forceinline__ void tma_prefetch_map(const CUtensorMap* map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(map)) : "memory");
}

// Ordinary shared-memory stores (P) made visible to the async proxy (wgmma) that reads them next.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
// The 256 consumer threads only (barrier 0 is __syncthreads).
__device__ __forceinline__ void consumer_sync() { asm volatile("bar.sync 1, 256;\n" ::: "memory"); }

template <int kRegs>
__device__ __forceinline__ void regs_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}
template <int kRegs>
__device__ __forceinline__ void regs_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegs));
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }

__device__ __forceinline__ void launch_dependents() { asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory"); }

// Shared-memory matrix descriptor with the 128-byte swizzle (the layout TMA writes with CU_TENSOR_MAP_SWIZZLE_128B):
// start address, leading and stride byte offsets (>> 4), layout type 1 in bits 62-63. K-major operands (rows of
// 64 K values): SBO = 1024 (8 rows), LBO unused. MN-major (rows of 64 N values at one k): SBO = 1024 (8 k),
// LBO = the next 64 N values (the next chunk). The start may move by 32 bytes (16 K values) inside the pattern.
__device__ __forceinline__ uint64_t sw128_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16 |
         static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32 | static_cast<uint64_t>(1) << 62;
}

// D (64 x 32, fp32) += A (64 x 16, K-major) B (16 x 32, K-major); scale_d == 0 starts from zero.
template <typename scalar_t>
struct Wgmma;

#define LS_WGMMA_N32(TYPE)                                                                                        \
  __device__ __forceinline__ static void s_tile(float (&d)[16], uint64_t da, uint64_t db, int scale_d) {         \
    asm volatile(                                                                                                 \
        "{\n.reg .pred p;\nsetp.ne.b32 p, %18, 0;\n"                                                              \
        "wgmma.mma_async.sync.aligned.m64n32k16.f32." TYPE "." TYPE                                               \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, %16, %17, p, 1, 1, 0, 0;\n}\n" \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),       \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])   \
        : "l"(da), "l"(db), "r"(scale_d));                                                                        \
  }
// D (64 x 64, fp32) += A (64 x 16, K-major) B (16 x 64, MN-major: imm-trans-b = 1).
#define LS_WGMMA_N64_TB(TYPE)                                                                                      \
  __device__ __forceinline__ static void o_chunk(float (&d)[32], uint64_t da, uint64_t db) {                      \
    asm volatile(                                                                                                  \
        "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE                                                \
        " {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21,"   \
        " %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, %32, %33, 1, 1, 1, 0, 1;\n"                          \
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),        \
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),   \
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])  \
        : "l"(da), "l"(db));                                                                                       \
  }

template <>
struct Wgmma<at::BFloat16> {
  LS_WGMMA_N32("bf16")
  LS_WGMMA_N64_TB("bf16")
};
template <>
struct Wgmma<at::Half> {
  LS_WGMMA_N32("f16")
  LS_WGMMA_N64_TB("f16")
};
#undef LS_WGMMA_N32
#undef LS_WGMMA_N64_TB
#endif  // LS_SM90_DEVICE

// Never launched: its static shared memory (256 bytes in sm_90a code, 128 otherwise) tells the launcher, through
// cudaFuncGetAttributes and without a launch or a sync, whether the code the device would run has sm_90a features.
__global__ void build_probe_kernel(int* out) {
#if LS_SM90_DEVICE
  __shared__ int tag[64];
#else
  __shared__ int tag[32];
#endif
  tag[threadIdx.x % (sizeof(tag) / sizeof(int))] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = tag[(threadIdx.x + 1) % (sizeof(tag) / sizeof(int))];
}
constexpr int kProbeSm90aSmem = 64 * sizeof(int);

// The device-side range check of given tokens (common.cuh), in a kernel of its own before sm90_kernel: any function
// call inside sm90_kernel (report_bad_token's) makes ptxas serialize all its wgmma (C7510).
__global__ void check_tokens_kernel(const int64_t* tokens, int N, int V) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row < N) check_given_token(tokens[row], row, V);
}

}  // namespace sm90

// kOChunks: O chunks per consumer warpgroup, ceil(chunks / 2) (1 without the gradient). A warpgroup always issues
// kOChunks products; where it owns fewer chunks (an odd count) the last one repeats a chunk it owns and is never
// stored: a branch around a wgmma would make ptxas serialize every wgmma of the kernel (C7520).
template <typename scalar_t, bool kWithGrad, int kOChunks>
__global__ void __launch_bounds__(Sm90Tile::kThreads, 1)
    sm90_kernel(const __grid_constant__ CUtensorMap z_map, const __grid_constant__ CUtensorMap w_map,
                const FusedArgs<scalar_t, float> a, const Sm90Config cfg) {
#if LS_SM90_DEVICE
  using namespace sm90;
  using T = Sm90Tile;
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  extern __shared__ unsigned char smem_raw[];
  // 1024-byte alignment for the 128-byte swizzle; the same offset in every CTA, so map_to_rank finds the peers'.
  const uint32_t raw = smem_u32(smem_raw);
  const uint32_t base = (raw + 1023u) & ~1023u;
  unsigned char* const smem = smem_raw + (base - raw);
  const int chunks = cfg.chunks, stages = cfg.stages, C = cfg.cluster;
  const uint32_t z_s = base;
  const uint32_t ring_s = z_s + chunks * T::kChunkBytes;
  const uint32_t stage_bytes = chunks * T::kChunkBytes;
  const uint32_t p_s = ring_s + stages * stage_bytes;
  const uint32_t x_s = p_s + T::kPBytes;  // this CTA's partial logits [64][kSRowFloats]
  unsigned char* const p_tile = smem + (p_s - base);
  float* const x_part = reinterpret_cast<float*>(smem + (x_s - base));
  float* const row_alpha = reinterpret_cast<float*>(smem + (x_s - base) + T::kSBytes);
  float* const row_sum = row_alpha + T::kRows;
  int64_t* const row_token = reinterpret_cast<int64_t*>(row_sum + T::kRows);
  const uint32_t bar_s = x_s + T::kSBytes + T::kRowBytes;
  const auto full_bar = [&](int s) { return bar_s + 8u * s; };
  const auto empty_bar = [&](int s) { return bar_s + 8u * (T::kMaxStages + s); };
  const uint32_t z_full = bar_s + 8u * (2 * T::kMaxStages);
  const uint32_t z_empty = z_full + 8u;
  const uint32_t ready = z_full + 16u;    // all C CTAs have written their partial logits of the tile
  const uint32_t drained = z_full + 24u;  // all C CTAs have read this CTA's partial logits of the tile
  constexpr int kConsumerWarps = 4 * T::kConsumerWarpgroups;

  const uint32_t rank = cluster_ctarank();
  const int cid = static_cast<int>(cluster_id()), ncl = static_cast<int>(cluster_count());
  const int items = a.row_tiles * a.splits;

  if (threadIdx.x == 0) {
    for (int s = 0; s < stages; ++s) {
      mbar_init(full_bar(s), 1);
      mbar_init(empty_bar(s), kConsumerWarps);
    }
    mbar_init(z_full, 1);
    mbar_init(z_empty, kConsumerWarps);
    mbar_init(ready, C * kConsumerWarps);
    mbar_init(drained, C * kConsumerWarps);
    mbar_init_fence();
  }
  cluster_sync();  // the barriers exist before any CTA of the cluster arrives on them

  if (threadIdx.x < 128) {
    // ---- Producer warpgroup: one thread issues every TMA copy ----
    regs_dec<40>();
    if (threadIdx.x == 0) {
      tma_prefetch_map(&z_map);
      tma_prefetch_map(&w_map);
      const int h0 = static_cast<int>(rank) * chunks * T::kChunk;
      int g = 0;  // W tiles issued by this CTA, over all its items
      int local = 0;
      for (int item = cid; item < items; item += ncl, ++local) {
        const int tt = item / a.splits, split = item % a.splits;
        const int v_begin = split * a.split_len, v_end = min(a.V, v_begin + a.split_len);
        mbar_wait(z_empty, (local & 1) ^ 1);  // the consumers are done with the previous item's Z
        mbar_arrive_expect_tx(z_full, stage_bytes);
        for (int k = 0; k < chunks; ++k)
          tma_load_2d(z_s + k * T::kChunkBytes, &z_map, h0 + k * T::kChunk, tt * T::kRows, z_full);
        for (int v0 = v_begin; v0 < v_end; v0 += T::kBN, ++g) {
          const int s = g % stages;
          mbar_wait(empty_bar(s), ((g / stages) & 1) ^ 1);
          mbar_arrive_expect_tx(full_bar(s), stage_bytes);
          for (int k = 0; k < chunks; ++k)
            tma_load_2d(ring_s + s * stage_bytes + k * T::kChunkBytes, &w_map, h0 + k * T::kChunk, v0, full_bar(s));
        }
      }
    }
    __syncwarp();
  } else {
    // ---- Consumer warpgroups ----
    regs_inc<232>();
    const int ct = threadIdx.x - 128;       // 0 .. 255
    const int cw = ct >> 7;                 // consumer warpgroup
    const int wq = (ct >> 5) & 3;           // warp within it: accumulator rows [16 wq, 16 wq + 16)
    const int lane = ct & 31;
    const int g8 = lane >> 2, t4 = lane & 3;  // accumulator fragment coordinates
    const int srow = ct >> 2, q = ct & 3;     // softmax layout: row srow, columns 16 j + 4 q + e
    // O chunks of this warpgroup: cw, cw + 2, ... (those below `chunks`; see kOChunks).
    float o[kOChunks][32];
    int g = 0, tile = 0, local = 0;

    for (int item = cid; item < items; item += ncl, ++local) {
      const int tt = item / a.splits, split = item % a.splits;
      const int r0 = tt * T::kRows;
      const int v_begin = split * a.split_len, v_end = min(a.V, v_begin + a.split_len);
      const int row = r0 + srow;
      int64_t tok = -1;
      if (a.tokens && row < a.N) tok = a.tokens[row];  // checked by check_tokens_kernel
      // This row's online state, the same in the 4 threads of the quad (and in every CTA of the cluster).
      float m = kNegInf, s_run = 0.f, best = kNegInf, lx = std::numeric_limits<float>::quiet_NaN();
      int idx = v_begin, nan_idx = -1;
      bool have_lx = false;  // lx is NaN both before the token is seen and when its logit is NaN
      if constexpr (kWithGrad) {
#pragma unroll
        for (int c = 0; c < kOChunks; ++c)
#pragma unroll
          for (int e = 0; e < 32; ++e) o[c][e] = 0.f;
      }
      mbar_wait(z_full, local & 1);

      for (int v0 = v_begin; v0 < v_end; v0 += T::kBN, ++g, ++tile) {
        const int stage = g % stages;
        const uint32_t w_stage = ring_s + stage * stage_bytes;
        mbar_wait(full_bar(stage), (g / stages) & 1);

        // 1. Partial logits of this CTA's H slice: columns [32 cw, 32 cw + 32) of the tile.
        float sacc[16];
#pragma unroll
        for (int e = 0; e < 16; ++e) sacc[e] = 0.f;
        wgmma_fence();
        for (int k = 0; k < chunks; ++k) {
#pragma unroll
          for (int ks = 0; ks < T::kChunk / 16; ++ks) {
            const uint64_t da = sw128_desc(z_s + k * T::kChunkBytes + ks * 32, 16, 1024);
            const uint64_t db = sw128_desc(w_stage + k * T::kChunkBytes + cw * 32 * 128 + ks * 32, 16, 1024);
            Wgmma<scalar_t>::s_tile(sacc, da, db, 1);
          }
        }
        wgmma_commit();
        wgmma_wait_all();
        const bool last_tile = v0 + T::kBN >= v_end;
        if (lane == 0) {
          if (last_tile) mbar_arrive(z_empty);      // this item's Z is no longer read
          if (!kWithGrad) mbar_arrive(empty_bar(stage));  // without the gradient W is read once
        }

        // 2. Exchange through distributed shared memory.
        if (tile > 0) mbar_wait_cluster(drained, (tile - 1) & 1);  // every CTA has read the previous partial
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int r = 16 * wq + g8 + 8 * h;
            const int col = 32 * cw + 8 * j + 2 * t4;
            *reinterpret_cast<float2*>(x_part + r * T::kSRowFloats + col) =
                make_float2(sacc[4 * j + 2 * h], sacc[4 * j + 2 * h + 1]);
          }
        __syncwarp();
        if (lane == 0)
          for (int r = 0; r < C; ++r) mbar_arrive_cluster(map_to_rank(ready, r));
        mbar_wait_cluster(ready, tile & 1);
        float x[16];  // x[4 j + e]: column 16 j + 4 q + e
        {
          const uint32_t off = x_s + static_cast<uint32_t>(srow * T::kSRowFloats + 4 * q) * 4;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const float4 v = ld_cluster_f4(map_to_rank(off + 64 * j, 0));
            x[4 * j] = v.x;
            x[4 * j + 1] = v.y;
            x[4 * j + 2] = v.z;
            x[4 * j + 3] = v.w;
          }
          for (int r = 1; r < C; ++r) {  // rank order, identical in every CTA
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              const float4 v = ld_cluster_f4(map_to_rank(off + 64 * j, r));
              x[4 * j] += v.x;
              x[4 * j + 1] += v.y;
              x[4 * j + 2] += v.z;
              x[4 * j + 3] += v.w;
            }
          }
        }
        __syncwarp();
        if (lane == 0)
          for (int r = 0; r < C; ++r) mbar_arrive_cluster(map_to_rank(drained, r));

        // 3. Online softmax state of the row and P (the fused kernel's phase B, per quad).
        float mx = kNegInf;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int v = v0 + 16 * (i >> 2) + 4 * q + (i & 3);
          if (v < v_end) {
            if (a.bias) x[i] += to_acc(a.bias[v]);
            if (v == tok) {  // one thread of one tile of one split ever matches
              lx = x[i];
              have_lx = true;
            }
          } else {
            x[i] = kNegInf;  // outside this split: no probability mass, never the argmax of a finite row
          }
          mx = fmaxf(mx, x[i]);
        }
        int ix = INT_MAX, nx = INT_MAX;
#pragma unroll
        for (int i = 15; i >= 0; --i) {  // descending, so the lowest matching column wins
          const int v = v0 + 16 * (i >> 2) + 4 * q + (i & 3);
          if (x[i] == mx) ix = v;
          if (isnan(x[i])) nx = v;
        }
#pragma unroll
        for (int off = 1; off <= 2; off <<= 1) {  // the quad holds the row's 64 columns
          const float mo = __shfl_xor_sync(0xffffffffu, mx, off);
          const int io = __shfl_xor_sync(0xffffffffu, ix, off);
          const int no = __shfl_xor_sync(0xffffffffu, nx, off);
          if (better(mo, io, mx, ix)) {
            mx = mo;
            ix = io;
          }
          nx = min(nx, no);
        }
        const float m_new = fmaxf(m, mx);
        const float alpha = rescale_factor(m, m_new);
        const float shift = m_new == kNegInf ? 0.f : m_new;  // all -inf so far: exp(-inf - 0) = 0, no inf - inf
        float psum = 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          float p[4];
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            p[e] = exp_acc(x[4 * j + e] - shift);
            psum += p[e];
          }
          if constexpr (kWithGrad) {
            constexpr float kScale = Tc<scalar_t>::kPScale;
            const int col = 16 * j + 4 * q;  // 4 values, 8 bytes, inside one 16-byte unit of the swizzled row
            uint2 packed;
            packed.x = Tc<scalar_t>::pack(p[0] * kScale, p[1] * kScale);
            packed.y = Tc<scalar_t>::pack(p[2] * kScale, p[3] * kScale);
            *reinterpret_cast<uint2*>(p_tile + srow * 128 + (((col >> 3) ^ (srow & 7)) << 4) + (col & 7) * 2) =
                packed;
          }
        }
        psum += __shfl_xor_sync(0xffffffffu, psum, 1);  // a + b == b + a: the 4 lanes agree bitwise
        psum += __shfl_xor_sync(0xffffffffu, psum, 2);
        s_run = s_run * alpha + psum;
        m = m_new;
        if (mx > best) {  // strict: an equal maximum in a later tile keeps the earlier index
          best = mx;
          idx = ix;
        }
        if (nan_idx < 0 && nx != INT_MAX) nan_idx = nx;

        // 4. O = alpha O + P W_t for this warpgroup's chunks.
        if constexpr (kWithGrad) {
          fence_proxy_async();  // P's generic-proxy stores, before wgmma reads them
          if (q == 0) row_alpha[srow] = alpha;
          consumer_sync();
          const float a0 = row_alpha[16 * wq + g8], a1 = row_alpha[16 * wq + g8 + 8];
#pragma unroll
          for (int c = 0; c < kOChunks; ++c)
#pragma unroll
            for (int e = 0; e < 32; e += 4) {
              o[c][e] *= a0;
              o[c][e + 1] *= a0;
              o[c][e + 2] *= a1;
              o[c][e + 3] *= a1;
            }
          wgmma_fence();
#pragma unroll
          for (int c = 0; c < kOChunks; ++c) {
            const uint32_t w_chunk = w_stage + min(cw + 2 * c, chunks - 1) * T::kChunkBytes;
#pragma unroll
            for (int ks = 0; ks < T::kBN / 16; ++ks) {
              const uint64_t da = sw128_desc(p_s + ks * 32, 16, 1024);
              const uint64_t db = sw128_desc(w_chunk + ks * 16 * 128, T::kChunkBytes, 1024);
              Wgmma<scalar_t>::o_chunk(o[c], da, db);
            }
          }
          wgmma_commit();
          wgmma_wait_all();
          if (lane == 0) mbar_arrive(empty_bar(stage));
        }
      }

      // ---- The item's rows: partial state or finished row (rank 0), the CTA's columns of O ----
      // The given token's logit was seen by one thread of the quad (or none of this split's): share it.
#pragma unroll
      for (int off = 1; off <= 2; off <<= 1) {
        const float lo = __shfl_xor_sync(0xffffffffu, lx, off);
        const int ho = __shfl_xor_sync(0xffffffffu, static_cast<int>(have_lx), off);
        if (!have_lx && ho) {
          lx = lo;
          have_lx = true;
        }
      }
      if (row < a.N && rank == 0 && q == 0) {
        RowState<float> st;
        st.m = m;
        st.s = s_run;
        st.best = best;
        st.idx = idx;
        st.nan_idx = nan_idx;
        st.lx = lx;
        store_row_state(a, split, row, st);
      }
      if constexpr (kWithGrad) {
        if (q == 0) {
          RowState<float> st;
          st.idx = idx;
          st.nan_idx = nan_idx;
          row_sum[srow] = s_run;
          row_token[srow] = a.tokens ? given_token(tok, a.V) : chosen_token(st);
        }
        consumer_sync();
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int lrow = 16 * wq + g8 + 8 * h;
          const int grow = r0 + lrow;
          if (grow >= a.N) continue;
          if (a.splits == 1) {
            // grad = -r (W[x] - O / s) for this CTA's columns.
            const float r = a.reward(grow);
            const float inv_s = 1.f / row_sum[lrow] * (1.f / Tc<scalar_t>::kPScale);
            const scalar_t* wx = a.w + row_token[lrow] * a.H;
            float* gout = a.grad_out + static_cast<int64_t>(grow) * a.H;
#pragma unroll
            for (int c = 0; c < kOChunks; ++c) {
              if (cw + 2 * c >= chunks) continue;
              const int hc = (static_cast<int>(rank) * chunks + cw + 2 * c) * T::kChunk;
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                const int hh = hc + 8 * j + 2 * t4;
                if (hh < a.H) {  // hh even and H % 8 == 0: hh + 1 < H as well
                  float2 gv;
                  gv.x = -r * (to_acc(wx[hh]) - o[c][4 * j + 2 * h] * inv_s);
                  gv.y = -r * (to_acc(wx[hh + 1]) - o[c][4 * j + 2 * h + 1] * inv_s);
                  *reinterpret_cast<float2*>(gout + hh) = gv;
                }
              }
            }
          } else {
            float* prow = a.part_acc + (static_cast<int64_t>(split) * a.N + grow) * a.H;
#pragma unroll
            for (int c = 0; c < kOChunks; ++c) {
              if (cw + 2 * c >= chunks) continue;
              const int hc = (static_cast<int>(rank) * chunks + cw + 2 * c) * T::kChunk;
#pragma unroll
              for (int j = 0; j < 8; ++j) {
                const int hh = hc + 8 * j + 2 * t4;
                if (hh < a.H)
                  *reinterpret_cast<float2*>(prow + hh) = make_float2(o[c][4 * j + 2 * h], o[c][4 * j + 2 * h + 1]);
              }
            }
          }
        }
      }
    }
  }
  // The merge (launched with programmatic dependent launch) may be scheduled now; it waits for this grid's
  // completion and memory flush before it reads anything (griddepcontrol.wait).
  launch_dependents();
  cluster_sync();  // no CTA leaves while a peer may still read its partial logits or arrive on its barriers
#else
  __trap();  // the launcher runs this kernel only where the device's code has sm_90a features (build_probe_kernel)
#endif
}

}  // namespace latentseek
