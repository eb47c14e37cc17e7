// CUDA kernels of lm_head_policy_grad / lm_head_logprob. Same outputs as the CPU kernel (csrc/cpu): tokens (given,
// or the argmax with torch.argmax's tie and NaN rules), logp in fp32 (fp64 for fp64 inputs) and
// grad = -r * (W[x] - sum_v softmax(l)_v W_v), never an [N, V] buffer in the fused kernels.
//
// Three kernels, chosen per call (choose_kernel; LATENTSEEK_CUDA_KERNEL=fused|simt|chunked overrides `auto`):
//
// 1. fused_mma_kernel (fused_mma.cuh): bf16 / fp16 on the tensor cores, one pass over W.
// 2. fused_simt_kernel (simt.cuh): fp32 / fp64, and the bf16 / fp16 inputs the tensor cores cannot take.
// 3. chunked (chunked.cuh): bf16 / fp16 with many rows, cuBLAS products around a per-chunk row kernel.
// merge_splits_kernel (merge.cuh) merges the vocabulary splits of kernels 1 and 2 and finishes kernel 3's rows.
// This file holds the launchers: kernel and grid choice, buffers, the stream, the device entry and registration.
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
#include "latentseek/entry.h"
#include "latentseek/online_softmax.h"

// at::mm(a, b, out_dtype) (bf16/fp16 in, fp32 out) appeared in torch 2.8; older torch builds without kernel 3.
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
#define LS_HAVE_MM_OUT_DTYPE 1
#else
#define LS_HAVE_MM_OUT_DTYPE 0
#endif

#include "chunked.cuh"
#include "common.cuh"
#include "fused_mma.cuh"
#include "merge.cuh"
#include "simt.cuh"

namespace latentseek {
namespace {

constexpr int kMaxSplits = 1024;    // vocabulary splits of one call (the merge kernel keeps a factor per split)
constexpr int kMaxFusedPasses = 8;  // auto: the fused kernel while row_tiles * slices <= this, else chunked

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

// The device part of the entry points (latentseek/entry.h).
struct CudaDevice {
  static void check(const char* op, const LmHeadProblem& p) {
    LS_CHECK(p.hidden.is_cuda(), op, ": the CUDA kernel got hidden on ", p.hidden.device());
    // The kernels index rows and vocabulary entries with 32-bit integers (element offsets are 64-bit).
    LS_CHECK(p.N < (int64_t(1) << 31) && p.V < (int64_t(1) << 31) - MmaTile::kBN && p.H < (int64_t(1) << 31), op,
             ": the CUDA kernel supports N, V and H below 2^31, got N = ", p.N, ", V = ", p.V, ", H = ", p.H);
    check_token_range(op, p);
  }
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& hidden) : guard(hidden.device()) {}
  };
  template <typename scalar_t, typename acc_t>
  static void run(const LmHeadProblem& p, LmHeadOutputs& out) {
    LmHeadProblem q = p;  // the kernels read one reward per row, with the scale folded in
    q.reward = reward_per_row(p);
    q.reward_scale = 1;
    Outputs o{out.tokens, out.logp, out.with_grad ? out.grad : at::Tensor()};
    run_cuda<scalar_t, acc_t>(q, o);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(latentseek_ext, CUDA, m) {
  m.impl("lm_head_policy_grad", &lm_head_policy_grad_entry<CudaDevice>);
  m.impl("lm_head_logprob", &lm_head_logprob_entry<CudaDevice>);
}

}  // namespace latentseek

