// CUDA kernels of lm_head_policy_grad / lm_head_logprob. Same outputs as the CPU kernel (csrc/cpu): tokens (given,
// or the argmax with torch.argmax's tie and NaN rules), logp in fp32 (fp64 for fp64 inputs) and
// grad = -r * (W[x] - sum_v softmax(l)_v W_v), never an [N, V] buffer in the fused kernels.
//
// Three kernels, chosen per call (choose_kernel; LATENTSEEK_CUDA_KERNEL=fused|simt|chunked overrides `auto`):
//
// 1. fused_mma_kernel (bf16 / fp16, the default while W is streamed through L2 at most kMaxFusedPasses times).
//    Grid = (row tiles of 32 rows x H slices) x vocabulary splits. A CTA walks its vocabulary range in tiles of 64
//    rows of W. Phase A streams the tile in 64-column chunks of H through a 3-stage cp.async ring together with the
//    matching chunk of Z and computes S = Z_blk W_t^T (+ bias) with mma.sync m16n8k16 into fp32 registers. Phase B
//    updates the online state of each row (max, argmax, first NaN, sum of exp, the given token's logit) and writes
//    P = exp(S - m_new) as bf16/fp16 to shared memory. Phase C rescales the fp32 accumulator O (kept in registers)
//    and adds P W_t for the CTA's H slice. The W chunks of that slice are kept in shared memory during phase A, so
//    phase C reads them from there: within a CTA each byte of W feeds both products and is read from memory once.
//
//    Large H. O for 32 rows is 32 x H fp32 (448 KB at H = 3584): it does not fit on one SM. A CTA therefore owns an
//    H slice of at most 512 columns (8 chunks, 64 fp32 registers per thread) and there are ceil(H / 512) slices.
//    Every slice CTA recomputes the full S = Z W_t^T for its rows (the logits need all of H), so the cost is:
//      flops      = 2NHV * (slices + 1)            (slices = 1 up to H = 512, 2 at H = 896, 7 at H = 3584)
//      W traffic  = row_tiles * slices passes over W from L2; the CTAs of one split that share a W tile are
//                   adjacent in the grid and run together, so HBM sees W about once per split wave.
//    The alternatives were (a) two passes over W with a stats pass first: the same recompute in pass 2 plus one
//    more read of W; (b) a cluster of CTAs (sm_90) each owning an H slice of O and exchanging partial logits
//    through distributed shared memory: 4NHV flops and one read of W, but not expressible on sm_80 and not
//    something to write without a GPU to test on. This kernel is the robust one; (b) is the next step for sm_90.
//    For large N the recompute makes the fused kernel L2-bound, hence kernel 3.
//
// 2. fused_simt_kernel (fp32 / fp64, and bf16 / fp16 inputs that the tensor-core path cannot take: H % 8 != 0 or a
//    misaligned weight). The same algorithm with fp32 (fp64) FMAs: no TF32 anywhere, so fp32 results match the
//    fp32 reference to ~1e-6. A warp owns two rows, one vocabulary entry per lane, and reduces with shuffles.
//
// 3. chunked (bf16 / fp16 with many rows): the vocabulary in chunks of Vc entries; per chunk
//      L = Z W_c^T            cuBLAS, bf16/fp16 in, fp32 out (at::mm with out_dtype; no TF32 question)
//      chunk_rows_kernel      bias, online state, P = exp(L - m_new) in bf16/fp16, O = alpha (O + T)
//      T = P W_c              cuBLAS, fp32 out
//    4NHV flops at cuBLAS speed plus 12 bytes per logit of traffic; W_c is read twice (the second time mostly
//    from L2). Buffers: L and P are N x Vc with N * Vc * 6 bytes <= max(64 MiB, 16 N H bytes): O(N*H).
//
// Split-V partials. When the grid has fewer (row tile, slice) CTAs than the GPU holds, the vocabulary is split
// and each split writes its per-row state (RowState of latentseek/online_softmax.h) and its unnormalised fp32
// accumulator; merge_splits_kernel merges them in vocabulary order (so ties keep the lowest index) and finishes
// tokens, logp and grad. With one split the fused kernels finish in place. The partials take
// splits x N x H x 4 bytes, where splits x row_tiles x slices is about one wave of CTAs: O(#SM x 32 x H).
//
// Precision. S and O accumulate in fp32. P is rounded to bf16/fp16 only as an operand of P W_t. The row maximum
// enters P as exp(0) = 1, exact in both formats, and so does the argmax x when p(x) -> 1; every other P_v has a
// relative rounding error <= 2^-9 (bf16) / 2^-11 (fp16), so the error of acc/s is at most
// 2^-9 * sum_{v != x} p_v |W_v|, which vanishes with 1 - p(x) like the true gradient W[x] - acc/s does. Had the
// dominant term been rounded (e.g. exp computed in bf16 around a shifted max), W[x] - acc/s would carry an error
// of 2^-9 |W[x]| however small the gradient is. The sum s is accumulated from the fp32 P (not the rounded one), so
// logp keeps fp32 accuracy. With ties for the maximum each tied entry enters P as exactly 1.
// fp16 has 5 exponent bits: P below 6e-5 would be subnormal (relative error up to 50 % near 6e-8) and below 3e-8
// it would vanish, so fp16 P is stored times 2^14 (max 16384 < 65504) and the accumulator is scaled back by 2^-14
// at the end, both exact. bf16 has fp32's exponent range and needs no scale.
//
// Non-finite logits follow the CPU kernel (latentseek_ext/ops.py): NaN never enters the running max (fmaxf),
// the token is the first NaN if any, a +inf logit makes exp(inf - inf) = NaN so logp and grad become NaN, and -inf
// logits contribute exp(-inf) = 0 (rows whose logits are all -inf shift by 0 instead of -inf).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>
#include <torch/version.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>

#include "latentseek/checks.h"
#include "latentseek/online_softmax.h"

// at::mm(a, b, out_dtype) (bf16/fp16 in, fp32 out) appeared in torch 2.8; older torch builds without kernel 3.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define LS_HAVE_MM_OUT_DTYPE 1
#else
#define LS_HAVE_MM_OUT_DTYPE 0
#endif

namespace latentseek {
namespace {

constexpr int kMaxSplits = 1024;    // vocabulary splits of one call (the merge kernel keeps a factor per split)
constexpr int kMaxFusedPasses = 8;  // auto: the fused kernel while row_tiles * slices <= this, else chunked

// ------------------------------------------------------------------------------------------------------------
// Device helpers
// ------------------------------------------------------------------------------------------------------------

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -std::numeric_limits<acc_t>::infinity();
}

__device__ __forceinline__ float exp_acc(float x) { return __expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return ::exp(x); }
__device__ __forceinline__ float max_acc(float a, float b) { return fmaxf(a, b); }  // NaN-ignoring
__device__ __forceinline__ double max_acc(double a, double b) { return fmax(a, b); }

// Storage type <-> accumulation type. bf16/fp16 go through the CUDA intrinsics; fp32/fp64 are identities.
__device__ __forceinline__ float to_acc(const at::BFloat16& x) {
  return __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&x));
}
__device__ __forceinline__ float to_acc(const at::Half& x) {
  return __half2float(*reinterpret_cast<const __half*>(&x));
}
__device__ __forceinline__ float to_acc(const float& x) { return x; }
__device__ __forceinline__ double to_acc(const double& x) { return x; }

// The better of two (value, vocabulary index) argmax candidates: larger value, then lower index. A total order,
// so warp and block reductions may combine candidates in any order.
template <typename acc_t>
__device__ __forceinline__ bool better(acc_t va, int ia, acc_t vb, int ib) {
  return va > vb || (va == vb && ia < ib);
}

// Ordered merge of two row states through shuffles: `a` covers lower vocabulary indices than `b`.
template <typename acc_t>
__device__ __forceinline__ RowState<acc_t> shfl_down_state(const RowState<acc_t>& st, int offset) {
  RowState<acc_t> o;
  o.m = __shfl_down_sync(0xffffffffu, st.m, offset);
  o.s = __shfl_down_sync(0xffffffffu, st.s, offset);
  o.best = __shfl_down_sync(0xffffffffu, st.best, offset);
  o.idx = __shfl_down_sync(0xffffffffu, static_cast<long long>(st.idx), offset);
  o.nan_idx = __shfl_down_sync(0xffffffffu, static_cast<long long>(st.nan_idx), offset);
  o.lx = __shfl_down_sync(0xffffffffu, st.lx, offset);
  return o;
}

// --- PTX wrappers for the tensor-core kernel -----------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that bypasses L1; with valid == false it writes 16 zero bytes and reads nothing
// (src must still be a valid address, so callers pass the tensor's base pointer).
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// The 16-bit element type: D = A B + D with m16n8k16 (fp32 accumulate) and packing of two fp32 into one register.
template <typename scalar_t>
struct Tc;

template <>
struct Tc<at::BFloat16> {
  static constexpr float kPScale = 1.f;  // see "Precision" above
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
};

template <>
struct Tc<at::Half> {
  static constexpr float kPScale = 16384.f;  // 2^14: keeps P out of fp16's subnormal range
  __device__ __forceinline__ static void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
  }
};

template <typename scalar_t>
__device__ __forceinline__ scalar_t from_float(float x);
template <>
__device__ __forceinline__ at::BFloat16 from_float<at::BFloat16>(float x) {
  __nv_bfloat16 v = __float2bfloat16_rn(x);
  at::BFloat16 out;
  memcpy(&out, &v, 2);
  return out;
}
template <>
__device__ __forceinline__ at::Half from_float<at::Half>(float x) {
  __half v = __float2half_rn(x);
  at::Half out;
  memcpy(&out, &v, 2);
  return out;
}

// ------------------------------------------------------------------------------------------------------------
// Kernel arguments shared by the fused kernels
// ------------------------------------------------------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct FusedArgs {
  const scalar_t* z;      // [N, H] contiguous
  const scalar_t* w;      // [V, H] contiguous
  const scalar_t* bias;   // [V] or nullptr
  const int64_t* tokens;  // [N] or nullptr (argmax)
  const acc_t* reward;    // [N] or nullptr (1)
  int N, H, V;
  int row_tiles;  // blockIdx.x = slice * row_tiles + row_tile
  int slices;     // H slices of the accumulator (1 without grad)
  int split_len;  // vocabulary entries per split, a multiple of the tile width
  int splits;     // gridDim.y
  // splits == 1: the kernel finishes the rows itself.
  int64_t* tokens_out;  // [N]
  acc_t* logp_out;      // [N]
  acc_t* grad_out;      // [N, H] or nullptr without grad
  // splits > 1: partial results for merge_splits_kernel.
  RowState<acc_t>* part_state;  // [splits, N]
  acc_t* part_acc;              // [splits, N, H] or nullptr without grad
};

// Writes the finished token and logp of one row (splits == 1) or its partial state (splits > 1).
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_row_state(const FusedArgs<scalar_t, acc_t>& a, int split, int row,
                                                const RowState<acc_t>& st) {
  if (a.splits == 1) {
    const int64_t x = a.tokens ? a.tokens[row] : chosen_token(st);
    a.tokens_out[row] = x;
    a.logp_out[row] = final_logp(st, a.tokens ? st.lx : st.best);
  } else {
    a.part_state[static_cast<int64_t>(split) * a.N + row] = st;
  }
}

// ------------------------------------------------------------------------------------------------------------
// 1. The tensor-core kernel (bf16 / fp16)
// ------------------------------------------------------------------------------------------------------------

struct MmaTile {
  static constexpr int kWarpsM = 2;  // warps along rows (16 rows each)
  static constexpr int kWarpsN = 4;  // warps along vocabulary (S) and along H (O)
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kBM = 16 * kWarpsM;   // rows per CTA
  static constexpr int kBN = 64;             // vocabulary entries per tile (16 per warp)
  static constexpr int kBK = 64;             // H elements per chunk: 128-byte smem rows
  static constexpr int kStages = 3;          // cp.async ring depth
  static constexpr int kMaxSliceChunks = 8;  // O columns per CTA: 8 x 64 = 512 (64 regs/thread)
  static constexpr int kZChunkBytes = kBM * kBK * 2;
  static constexpr int kWChunkBytes = kBN * kBK * 2;
  static constexpr int kPBytes = kBM * kBN * 2;
  static constexpr int kRedBytes = 4 * kWarpsN * kBM * 4;  // max, idx, nan, sum per (column warp, row)
  static constexpr int kRowBytes = 6 * kBM * 4;            // m, s, best, lx, idx, nan per row

  static constexpr int smem_bytes(bool with_grad) {
    return kStages * (kZChunkBytes + kWChunkBytes) + (with_grad ? kMaxSliceChunks * kWChunkBytes : 0) + kPBytes +
           kRedBytes + kRowBytes;
  }
};

// Byte offset of (row, 16-byte column chunk) in a tile of 128-byte rows. XOR-ing the chunk with the row's low
// three bits puts the 8 rows that one ldmatrix phase (or 8 consecutive cp.async threads) touches on 8 distinct
// 16-byte bank groups: no bank conflicts for row-wise and transposed fragment loads alike.
__device__ __forceinline__ uint32_t swz(int row, int chunk) {
  return static_cast<uint32_t>(row * 128 + ((chunk ^ (row & 7)) << 4));
}

template <typename scalar_t, bool kWithGrad>
__global__ void __launch_bounds__(MmaTile::kThreads, 2) fused_mma_kernel(const FusedArgs<scalar_t, float> a) {
  using T = MmaTile;
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
  // Where chunk k of the current W tile lives: the kept slot when it belongs to this CTA's slice (phase C reads it
  // again), else the ring stage.
  auto w_chunk = [&](int k) -> unsigned char* {
    if (kWithGrad && k >= c_lo && k < c_hi) return kept + (k - c_lo) * T::kWChunkBytes;
    return z_stage(k % T::kStages) + T::kZChunkBytes;
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
      if (row < a.N) tok[rh] = a.tokens[row];
    }
  }

  float o[kWithGrad ? T::kMaxSliceChunks : 1][2][4];
#pragma unroll
  for (int c = 0; c < (kWithGrad ? T::kMaxSliceChunks : 1); ++c)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) o[c][nt][e] = 0.f;

  // Issues the copies of H chunk k (Z rows of this CTA, W rows [v0, v0 + 64)) into ring stage k % kStages.
  // Rows past N or v_end and columns past H are zero-filled: zero logits that are masked below, zero W rows that
  // meet P = 0. H % 8 == 0 (checked by the launcher), so a 16-byte vector is either inside H or past it.
  auto load_chunk = [&](int k, int v0) {
    const int vec = tid & 7;
    const int col = k * T::kBK + vec * 8;
    {
      const int row = tid >> 3;  // 256 threads = 32 rows x 8 vectors
      const int grow = r0 + row;
      const bool ok = grow < a.N && col < a.H;
      const scalar_t* src = ok ? a.z + static_cast<int64_t>(grow) * a.H + col : a.z;
      cp_async_16(smem_u32(z_stage(k % T::kStages)) + swz(row, vec), src, ok);
    }
    const uint32_t wdst = smem_u32(w_chunk(k));
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int row = (tid >> 3) + 32 * j;  // 64 W rows x 8 vectors
      const int v = v0 + row;
      const bool ok = v < v_end && col < a.H;
      const scalar_t* src = ok ? a.w + static_cast<int64_t>(v) * a.H + col : a.w;
      cp_async_16(wdst + swz(row, vec), src, ok);
    }
  };

  for (int v0 = v_begin; v0 < v_end; v0 += T::kBN) {
    // The previous tile's phase C has finished reading `kept` and `p_tile` before they are overwritten.
    __syncthreads();

    // ---- Phase A: S = Z_blk W_t^T over H, 3-stage cp.async pipeline (one commit group per chunk) ----
#pragma unroll
    for (int s = 0; s < T::kStages - 1; ++s) {
      if (s < KT) load_chunk(s, v0);
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
      if (k + T::kStages - 1 < KT) load_chunk(k + T::kStages - 1, v0);
      cp_async_commit();

      const uint32_t zs = smem_u32(z_stage(k % T::kStages));
      const uint32_t ws = smem_u32(w_chunk(k));
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
    cp_async_wait<0>();  // only empty groups can remain; start the next tile with none outstanding

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
        const int64_t x = a.tokens ? tok[rh] : chosen_token(st);
        const float r = a.reward ? a.reward[row] : 1.f;
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

// ------------------------------------------------------------------------------------------------------------
// 2. The SIMT kernel (fp32 / fp64; bf16 / fp16 fallback)
// ------------------------------------------------------------------------------------------------------------

struct SimtTile {
  static constexpr int kThreads = 256;  // 8 warps; warp w owns rows w and w + 8 of the tile
  static constexpr int kRows = 16;
  static constexpr int kBN = 32;  // one vocabulary entry per lane
  static constexpr int kBK = 32;
  template <typename acc_t>
  static constexpr int slice_cols() {  // O columns per CTA: 2 rows x 16 registers per lane
    return sizeof(acc_t) == 8 ? 256 : 512;
  }
};

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x = max_acc(x, __shfl_xor_sync(0xffffffffu, x, off));
  return x;
}
template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename scalar_t, typename acc_t, bool kWithGrad>
__global__ void __launch_bounds__(SimtTile::kThreads) fused_simt_kernel(const FusedArgs<scalar_t, acc_t> a) {
  using T = SimtTile;
  constexpr int kCols = T::slice_cols<acc_t>();
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
      const int64_t x = a.tokens ? tok[rh] : chosen_token(st[rh]);
      const acc_t r = a.reward ? a.reward[row] : acc_t(1);
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

// ------------------------------------------------------------------------------------------------------------
// Split merge and finish: tokens, logp, grad = -r (W[x] - sum_s f_s acc_s / s)
// ------------------------------------------------------------------------------------------------------------

constexpr int kMergeThreads = 256;

// The merge kernel's shared memory, all of it dynamic: [merged RowState][factor per split, zero padded]. Why the
// padding: on an H200, compute-sanitizer memcheck reported a 12-byte shared read in the grad loop's factor[s]
// that ran past a 2-split factor array. The PTX loads there are separate and guarded by s < splits, so the wider
// read is ptxas's (inferred; the SASS was not inspected). Padding to a multiple of 4 entries plus 4 keeps every
// such read inside the allocation and reading zeros; memcheck was clean after it.
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
    merge_splits_kernel(const RowState<acc_t>* part_state, const acc_t* part_acc, int splits, int N, int H,
                        acc_t acc_scale, const scalar_t* w, const int64_t* tokens, const acc_t* reward,
                        int64_t* tokens_out, acc_t* logp_out, acc_t* grad_out) {
  extern __shared__ __align__(128) unsigned char merge_smem[];
  RowState<acc_t>& final_state = *reinterpret_cast<RowState<acc_t>*>(merge_smem);
  acc_t* factor = reinterpret_cast<acc_t*>(merge_smem + merge_state_bytes<acc_t>());  // [merge_factor_slots]
  const int n = blockIdx.x, tid = threadIdx.x;

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

  const int64_t x = tokens ? tokens[n] : chosen_token(st);
  if (tid == 0) {
    tokens_out[n] = x;
    logp_out[n] = final_logp(st, tokens ? st.lx : st.best);
  }
  if (grad_out == nullptr) return;
  const acc_t r = reward ? reward[n] : acc_t(1);
  const acc_t inv_s = acc_t(1) / st.s * acc_scale;  // acc_scale undoes fp16's P scale
  const scalar_t* wx = w + x * H;
  for (int h = tid; h < H; h += kMergeThreads) {
    acc_t acc = 0;
    for (int s = 0; s < splits; ++s) acc += factor[s] * part_acc[(static_cast<int64_t>(s) * N + n) * H + h];
    // part_acc may alias grad_out (kernel 3, one split): this thread reads its element before writing it.
    grad_out[static_cast<int64_t>(n) * H + h] = -r * (to_acc(wx[h]) - acc * inv_s);
  }
}

// ------------------------------------------------------------------------------------------------------------
// 3. The per-chunk row kernel of the chunked path
// ------------------------------------------------------------------------------------------------------------

constexpr int kChunkThreads = 256;

template <typename scalar_t>
struct ChunkArgs {
  const float* logits;  // [N, vc] = Z W_c^T, fp32
  int vc, v0, N;
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

// ------------------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------------------

enum class Kernel { kMma, kSimt, kChunked };

int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int c = cache[device].load(std::memory_order_relaxed);
    if (c > 0) return c;
  }
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < 64) cache[device].store(n, std::memory_order_relaxed);
  return n;
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

struct Grid {
  int row_tiles, slices, splits, split_len;
};

// Splits the vocabulary until the grid fills the GPU once (resident = CTAs the GPU holds at a time), keeping at
// least 4 tiles per split.
Grid make_grid(int64_t N, int64_t V, int rows_per_cta, int tile_v, int slices, int64_t resident) {
  Grid g;
  g.row_tiles = static_cast<int>((N + rows_per_cta - 1) / rows_per_cta);
  g.slices = slices;
  const int64_t base = static_cast<int64_t>(g.row_tiles) * slices;
  int64_t splits = 1;
  if (base < resident) {
    splits = (resident + base - 1) / base;
    splits = std::min<int64_t>({splits, std::max<int64_t>(1, V / (4 * tile_v)), kMaxSplits});
  }
  const int64_t per = (V + splits - 1) / splits;
  g.split_len = static_cast<int>((per + tile_v - 1) / tile_v * tile_v);
  g.splits = static_cast<int>((V + g.split_len - 1) / g.split_len);  // no empty split after rounding up
  return g;
}

struct Outputs {
  at::Tensor tokens, logp, grad;  // grad [N, H] in the accumulation dtype, or undefined without grad
};

template <typename scalar_t, typename acc_t>
void launch_merge(const Grid& g, const at::Tensor& part_state, const at::Tensor& part_acc, acc_t acc_scale,
                  const LmHeadProblem& p, Outputs& out, cudaStream_t stream) {
  const size_t smem = merge_smem_bytes<acc_t>(g.splits);
  merge_splits_kernel<scalar_t, acc_t><<<static_cast<unsigned>(p.N), kMergeThreads, smem, stream>>>(
      reinterpret_cast<const RowState<acc_t>*>(part_state.data_ptr()),
      part_acc.defined() ? part_acc.data_ptr<acc_t>() : nullptr, g.splits, static_cast<int>(p.N), static_cast<int>(p.H),
      acc_scale, p.weight.data_ptr<scalar_t>(), p.tokens.defined() ? p.tokens.data_ptr<int64_t>() : nullptr,
      p.reward.defined() ? p.reward.data_ptr<acc_t>() : nullptr, out.tokens.data_ptr<int64_t>(),
      out.logp.data_ptr<acc_t>(), out.grad.defined() ? out.grad.data_ptr<acc_t>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Runs a fused kernel (mma or simt) over the grid, then the merge when the vocabulary was split.
// acc_scale: what the kernel's accumulator must be multiplied by (undoes fp16's P scale in the tensor-core kernel).
template <typename scalar_t, typename acc_t, typename KernelFn>
void run_fused(KernelFn kernel, int threads, size_t smem, int rows_per_cta, int tile_v, int slices, acc_t acc_scale,
               const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const int device = z.get_device();
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  LS_CHECK(per_sm > 0, "lm_head_policy_grad: the CUDA kernel does not fit on this GPU (", smem,
           " bytes of shared memory per block)");
  const Grid g = make_grid(p.N, p.V, rows_per_cta, tile_v, slices, static_cast<int64_t>(per_sm) * sm_count(device));
  const bool with_grad = out.grad.defined();

  FusedArgs<scalar_t, acc_t> a{};
  a.z = z.data_ptr<scalar_t>();
  a.w = p.weight.data_ptr<scalar_t>();
  a.bias = p.bias.defined() ? p.bias.data_ptr<scalar_t>() : nullptr;
  a.tokens = p.tokens.defined() ? p.tokens.data_ptr<int64_t>() : nullptr;
  a.reward = p.reward.defined() ? p.reward.data_ptr<acc_t>() : nullptr;
  a.N = static_cast<int>(p.N);
  a.H = static_cast<int>(p.H);
  a.V = static_cast<int>(p.V);
  a.row_tiles = g.row_tiles;
  a.slices = g.slices;
  a.split_len = g.split_len;
  a.splits = g.splits;
  a.tokens_out = out.tokens.data_ptr<int64_t>();
  a.logp_out = out.logp.data_ptr<acc_t>();
  a.grad_out = with_grad ? out.grad.data_ptr<acc_t>() : nullptr;
  at::Tensor part_state, part_acc;
  if (g.splits > 1) {
    part_state = at::empty({static_cast<int64_t>(g.splits) * p.N * static_cast<int64_t>(sizeof(RowState<acc_t>))},
                           z.options().dtype(at::kByte));
    a.part_state = reinterpret_cast<RowState<acc_t>*>(part_state.data_ptr());
    if (with_grad) {
      part_acc = at::empty({g.splits, p.N, p.H}, z.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      a.part_acc = part_acc.data_ptr<acc_t>();
    }
  }
  const dim3 grid(static_cast<unsigned>(g.row_tiles) * static_cast<unsigned>(g.slices),
                  static_cast<unsigned>(g.splits));
  kernel<<<grid, threads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (g.splits > 1) launch_merge<scalar_t, acc_t>(g, part_state, part_acc, acc_scale, p, out, stream);
}

template <typename scalar_t>
void run_mma(const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const bool with_grad = out.grad.defined();
  const int64_t chunks = (p.H + MmaTile::kBK - 1) / MmaTile::kBK;
  const int slices =
      with_grad
          ? static_cast<int>(std::max<int64_t>(1, (chunks + MmaTile::kMaxSliceChunks - 1) / MmaTile::kMaxSliceChunks))
          : 1;
  const size_t smem = MmaTile::smem_bytes(with_grad);
  if (with_grad)
    run_fused<scalar_t, float>(fused_mma_kernel<scalar_t, true>, MmaTile::kThreads, smem, MmaTile::kBM, MmaTile::kBN,
                               slices, 1.f / Tc<scalar_t>::kPScale, p, z, out, stream);
  else
    run_fused<scalar_t, float>(fused_mma_kernel<scalar_t, false>, MmaTile::kThreads, smem, MmaTile::kBM, MmaTile::kBN,
                               slices, 1.f, p, z, out, stream);
}

template <typename scalar_t, typename acc_t>
void run_simt(const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const bool with_grad = out.grad.defined();
  constexpr int kCols = SimtTile::slice_cols<acc_t>();
  const int slices = with_grad ? static_cast<int>(std::max<int64_t>(1, (p.H + kCols - 1) / kCols)) : 1;
  if (with_grad)
    run_fused<scalar_t, acc_t>(fused_simt_kernel<scalar_t, acc_t, true>, SimtTile::kThreads, 0, SimtTile::kRows,
                               SimtTile::kBN, slices, acc_t(1), p, z, out, stream);
  else
    run_fused<scalar_t, acc_t>(fused_simt_kernel<scalar_t, acc_t, false>, SimtTile::kThreads, 0, SimtTile::kRows,
                               SimtTile::kBN, slices, acc_t(1), p, z, out, stream);
}

#if LS_HAVE_MM_OUT_DTYPE
template <typename scalar_t>
void run_chunked(const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const bool with_grad = out.grad.defined();
  const int64_t N = p.N, H = p.H, V = p.V;
  // L (fp32) and P (16-bit) take N * vc * 6 bytes; keep that within max(64 MiB, 16 N H bytes).
  const int64_t budget = std::max<int64_t>(int64_t(64) << 20, 16 * N * H);
  int64_t vc = budget / (6 * N) / 256 * 256;
  vc = std::min<int64_t>(std::max<int64_t>(vc, 256), V);
  const auto f32 = z.options().dtype(at::kFloat);
  at::Tensor logits = at::empty({N * vc}, f32);
  at::Tensor probs = with_grad ? at::empty({N * vc}, z.options()) : at::Tensor();
  at::Tensor prev = with_grad ? at::empty({N, H}, f32) : at::Tensor();  // T = P_{c-1} W_{c-1}
  if (with_grad) out.grad.zero_();
  at::Tensor state = at::empty({N * static_cast<int64_t>(sizeof(RowState<float>))}, z.options().dtype(at::kByte));

  for (int64_t c0 = 0; c0 < V; c0 += vc) {
    const int64_t cur = std::min(vc, V - c0);
    const at::Tensor wc = p.weight.narrow(0, c0, cur);
    at::Tensor l = logits.narrow(0, 0, N * cur).view({N, cur});
    at::mm_out(l, z, wc.t(), at::kFloat);
    ChunkArgs<scalar_t> a{};
    a.logits = l.data_ptr<float>();
    a.vc = static_cast<int>(cur);
    a.v0 = static_cast<int>(c0);
    a.N = static_cast<int>(N);
    a.H = H;
    a.bias = p.bias.defined() ? p.bias.data_ptr<scalar_t>() : nullptr;
    a.tokens = p.tokens.defined() ? p.tokens.data_ptr<int64_t>() : nullptr;
    a.state = reinterpret_cast<RowState<float>*>(state.data_ptr());
    a.first = c0 == 0;
    a.p = with_grad ? probs.data_ptr<scalar_t>() : nullptr;
    a.o = with_grad ? out.grad.data_ptr<float>() : nullptr;
    a.t = with_grad ? prev.data_ptr<float>() : nullptr;
    chunk_rows_kernel<scalar_t><<<static_cast<unsigned>(N), kChunkThreads, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (with_grad) {
      at::Tensor pc = probs.narrow(0, 0, N * cur).view({N, cur});
      at::mm_out(prev, pc, wc, at::kFloat);
    }
  }
  if (with_grad) out.grad.add_(prev);  // the last chunk's product, relative to the final max
  Grid g{1, 1, 1, static_cast<int>(V)};
  launch_merge<scalar_t, float>(g, state, with_grad ? out.grad : at::Tensor(), 1.f / Tc<scalar_t>::kPScale, p, out,
                                stream);
}
#endif

Kernel choose_kernel(const LmHeadProblem& p, bool with_grad) {
  const auto dtype = p.hidden.scalar_type();
  const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
  // The tensor-core paths copy 16-byte vectors of W rows: rows must start on 16-byte boundaries.
  const bool tc_ok = half && p.H >= 8 && p.H % 8 == 0 && aligned16(p.weight.data_ptr());
  const char* env = std::getenv("LATENTSEEK_CUDA_KERNEL");
  const std::string choice = env ? env : "auto";
  LS_CHECK(choice == "auto" || choice == "fused" || choice == "simt" || choice == "chunked",
           "LATENTSEEK_CUDA_KERNEL must be auto, fused, simt or chunked, got '", choice, "'");
  if (!tc_ok || choice == "simt") return Kernel::kSimt;
  if (choice == "fused" || !LS_HAVE_MM_OUT_DTYPE) return Kernel::kMma;
  if (choice == "chunked") return Kernel::kChunked;
  const int64_t row_tiles = (p.N + MmaTile::kBM - 1) / MmaTile::kBM;
  const int64_t chunks = (p.H + MmaTile::kBK - 1) / MmaTile::kBK;
  const int64_t slices = with_grad ? (chunks + MmaTile::kMaxSliceChunks - 1) / MmaTile::kMaxSliceChunks : 1;
  return row_tiles * slices <= kMaxFusedPasses ? Kernel::kMma : Kernel::kChunked;
}

template <typename scalar_t, typename acc_t>
void run_cuda(const LmHeadProblem& p, Outputs& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The kernels index hidden as a dense [N, H] matrix whose rows start on 16-byte boundaries (cp.async).
  at::Tensor z = p.hidden;
  if (!z.is_contiguous() || !aligned16(z.data_ptr())) z = z.clone(at::MemoryFormat::Contiguous);
  const bool with_grad = out.grad.defined();
  const Kernel k = choose_kernel(p, with_grad);
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value || std::is_same<scalar_t, at::Half>::value) {
    if (k == Kernel::kMma) return run_mma<scalar_t>(p, z, out, stream);
#if LS_HAVE_MM_OUT_DTYPE
    if (k == Kernel::kChunked) return run_chunked<scalar_t>(p, z, out, stream);
#endif
  }
  run_simt<scalar_t, acc_t>(p, z, out, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_cuda(const char* op, const at::Tensor& hidden,
                                                            const at::Tensor& weight,
                                                            const c10::optional<at::Tensor>& reward,
                                                            const c10::optional<at::Tensor>& tokens,
                                                            const c10::optional<at::Tensor>& bias, bool with_grad) {
  // The shared checks name the argument on the wrong device; they run first so that a CPU hidden with a CUDA
  // weight gets the same message as on the CPU kernel.
  // The op is a leaf of autograd (its backward is registered in Python), but the dispatcher runs this kernel with
  // grad mode as the caller left it: ATen calls in here (reshape, clone, the cuBLAS products of the chunked
  // kernel, whose out= forms refuse inputs that require grad) must not record a graph.
  const at::NoGradGuard no_grad;
  const LmHeadProblem p = check_lm_head_inputs(op, hidden, weight, reward, tokens, bias);
  LS_CHECK(hidden.is_cuda(), op, ": the CUDA kernel got hidden on ", hidden.device());
  const c10::cuda::CUDAGuard guard(hidden.device());
  // The kernels index rows and vocabulary entries with 32-bit integers (element offsets are 64-bit).
  LS_CHECK(p.N < (int64_t(1) << 31) && p.V < (int64_t(1) << 31) - MmaTile::kBN && p.H < (int64_t(1) << 31), op,
           ": the CUDA kernel supports N, V and H below 2^31, got N = ", p.N, ", V = ", p.V, ", H = ", p.H);
  const auto acc = acc_dtype(hidden.scalar_type());
  at::Tensor tokens_out = at::empty({p.N}, hidden.options().dtype(at::kLong));
  at::Tensor logp_out = at::empty({p.N}, hidden.options().dtype(acc));
  at::Tensor grad_out = at::empty({with_grad ? p.N : 0, with_grad ? p.H : 0}, hidden.options().dtype(acc));
  if (p.N > 0) {
    Outputs out{tokens_out, logp_out, with_grad ? grad_out : at::Tensor()};
    switch (hidden.scalar_type()) {
      case at::kBFloat16: run_cuda<at::BFloat16, float>(p, out); break;
      case at::kHalf: run_cuda<at::Half, float>(p, out); break;
      case at::kFloat: run_cuda<float, float>(p, out); break;
      case at::kDouble: run_cuda<double, double>(p, out); break;
      default: LS_CHECK(false, op, ": unsupported dtype ", hidden.scalar_type());
    }
  }
  std::vector<int64_t> grad_shape = p.lead;
  grad_shape.push_back(p.H);
  return {tokens_out.view(p.lead), logp_out.view(p.lead), with_grad ? grad_out.view(grad_shape) : grad_out.view({0})};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_policy_grad_cuda(const at::Tensor& hidden,
                                                                        const at::Tensor& weight,
                                                                        const c10::optional<at::Tensor>& reward,
                                                                        const c10::optional<at::Tensor>& tokens,
                                                                        const c10::optional<at::Tensor>& bias) {
  return lm_head_cuda("lm_head_policy_grad", hidden, weight, reward, tokens, bias, /*with_grad=*/true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> lm_head_logprob_cuda(const at::Tensor& hidden, const at::Tensor& weight,
                                                                    const c10::optional<at::Tensor>& tokens,
                                                                    const c10::optional<at::Tensor>& bias,
                                                                    bool with_grad) {
  // d logp / d hidden is the policy gradient with reward -1.
  auto minus_one = at::full({}, -1.0, hidden.options().dtype(acc_dtype(hidden.scalar_type())));
  auto [x, logp, dlogp] = lm_head_cuda("lm_head_logprob", hidden, weight, minus_one, tokens, bias, with_grad);
  return {logp, x, dlogp};  // the schema's order: logp leads
}

}  // namespace

TORCH_LIBRARY_IMPL(latentseek_ext, CUDA, m) {
  m.impl("lm_head_policy_grad", &lm_head_policy_grad_cuda);
  m.impl("lm_head_logprob", &lm_head_logprob_cuda);
}

}  // namespace latentseek
