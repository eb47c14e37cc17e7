// Device helpers shared by the CUDA kernels of lm_head_policy_grad / lm_head_logprob (csrc/cuda/*.cuh, launched
// from lm_head_policy_grad.cu): accumulation-type arithmetic, argmax candidates, shuffled row states, the PTX
// wrappers of the tensor-core kernel, the 16-bit element types and the arguments of the fused kernels.
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
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <c10/macros/Macros.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>

#include "latentseek/online_softmax.h"

namespace latentseek {

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
  static constexpr float kPScale = 1.f;  // see "Precision" at the top of this file
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

// Programmatic dependent launch (sm_90): a kernel launched with cudaLaunchAttributeProgrammaticStreamSerialization
// may start before the previous kernel on its stream has finished; this waits until that kernel has completed and
// its memory is visible. A no-op for a kernel launched normally, and on older GPUs.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// --- Per-row inputs read on the device ---------------------------------------------------------------------

// The reward of a row: scale * values[row * stride] (stride 0: one 0-d reward for every row), or scale alone. A float
// reward and lm_head_logprob's -1 arrive as the scale: no tensor, no host-to-device copy, no expand.
template <typename acc_t>
struct RowReward {
  const acc_t* values;  // [N] (stride 1), 0-d (stride 0), or nullptr
  int stride;
  acc_t scale;
  __device__ __forceinline__ acc_t operator()(int64_t row) const {
    return values ? scale * values[row * stride] : scale;
  }
};

// Given tokens are range-checked here, not on the host: reading them there would be a device sync per call and
// would keep the op out of CUDA graphs. An out-of-range token is a device-side assert: the launch fails, and the
// error surfaces at the next synchronisation as "device-side assert triggered", with this message on the device's
// stdout, as torch's own index checks do. One thread per row checks it (check_given_token), where each kernel loads
// the tokens, at its start: a call there costs no registers, while the same call beside the finish's live
// accumulators cost the SIMT kernel 26 registers and a spill. Every thread clamps the token where it indexes W
// (given_token), so that nothing reads outside W even where device asserts are compiled out.
[[noreturn]] __device__ __noinline__ inline void report_bad_token(int64_t x, int64_t row, int V) {
  printf("latentseek_ext: tokens must lie in [0, V) = [0, %d), got %lld at row %lld\n", V, static_cast<long long>(x),
         static_cast<long long>(row));
  CUDA_KERNEL_ASSERT(false && "latentseek_ext: tokens must lie in [0, V)");
  __trap();
}

__device__ __forceinline__ void check_given_token(int64_t x, int64_t row, int V) {
  if (x < 0 || x >= V) report_bad_token(x, row, V);
}

__device__ __forceinline__ int64_t given_token(int64_t x, int V) { return x >= 0 && x < V ? x : 0; }

// --- Kernel arguments shared by the fused kernels ------------------------------------------------------------

template <typename scalar_t, typename acc_t>
struct FusedArgs {
  const scalar_t* z;      // [N, H] contiguous
  const scalar_t* w;      // [V, H] contiguous
  const scalar_t* bias;   // [V] or nullptr
  const int64_t* tokens;  // [N] or nullptr (argmax)
  RowReward<acc_t> reward;
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
    const int64_t x = a.tokens ? given_token(a.tokens[row], a.V) : chosen_token(st);
    a.tokens_out[row] = x;
    a.logp_out[row] = final_logp(st, a.tokens ? st.lx : st.best);
  } else {
    a.part_state[static_cast<int64_t>(split) * a.N + row] = st;
  }
}

}  // namespace latentseek
