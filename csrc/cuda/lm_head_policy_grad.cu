// CUDA kernels of lm_head_policy_grad / lm_head_logprob. Same outputs as the CPU kernel (csrc/cpu): tokens (given,
// or the argmax with torch.argmax's tie and NaN rules), logp in fp32 (fp64 for fp64 inputs) and
// grad = -r * (W[x] - sum_v softmax(l)_v W_v), never an [N, V] buffer in the fused kernels.
//
// Four kernels, chosen per call (plan_call; LATENTSEEK_CUDA_KERNEL=fused|simt|chunked|sm90 overrides `auto`, and
// LATENTSEEK_CUDA_TILES=large|small the tensor-core kernel's tile configuration). The choices themselves (kernel,
// tiles from the device's shared memory limit, grid, chunk length) are pure functions in latentseek/cuda_plan.h.
//
// 1. fused_mma_kernel (fused_mma.cuh): bf16 / fp16 on the tensor cores, one pass over W.
// 2. fused_simt_kernel (simt.cuh): fp32 / fp64, and the bf16 / fp16 inputs the tensor cores cannot take.
// 3. chunked (chunked.cuh): bf16 / fp16 with many rows, cuBLAS products around a per-chunk row kernel, and its
//    finish kernel; also every call with options (temperature, sample, entropy, top-k), in any dtype.
// 4. sm90_kernel (sm90.cuh): bf16 / fp16 on sm_90a (TMA, wgmma, a cluster splitting H), only when forced (sm90).
// merge_splits_kernel (merge.cuh) merges the vocabulary splits of the fused kernels.
// This file holds the launchers: kernel and grid choice, buffers, the stream, the device entry and registration.
//
// Non-finite logits follow the CPU kernel (latentseek_ext/ops.py): NaN never enters the running max (fmaxf),
// the token is the first NaN if any, a +inf logit makes exp(inf - inf) = NaN so logp and grad become NaN, and -inf
// logits contribute exp(-inf) = 0 (rows whose logits are all -inf shift by 0 instead of -inf).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cudaTypedefs.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <torch/library.h>
#include <torch/version.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <type_traits>
#include <unordered_map>

#include "latentseek/checks.h"
#include "latentseek/cuda_plan.h"
#include "latentseek/entry.h"
#include "latentseek/online_softmax.h"

// at::mm(a, b, out_dtype) (bf16/fp16 in, fp32 out) appeared in torch 2.8; older torch builds lack the chunked path.
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
#include "sm90.cuh"

namespace latentseek {
namespace {

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// --- Per-device facts, queried once per device ------------------------------------------------------------------

struct DeviceInfo {
  int sm_count;
  int smem_per_block_optin;  // the most dynamic shared memory one block may ask for
};

DeviceInfo device_info(int device) {
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  DeviceInfo d{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.sm_count, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&d.smem_per_block_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  cache.emplace(device, d);
  return d;
}

// CTAs of `kernel` that one SM of the current device (`device`) holds with `smem` bytes of dynamic shared memory,
// after raising the kernel's dynamic shared memory limit where it needs more than 48 KB. Both are facts of the
// (kernel, device) pair, so they are set and queried once, not per call.
int ctas_per_sm(const void* kernel, int threads, size_t smem, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, size_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, threads, smem);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (smem > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  cache.emplace(key, per_sm);
  return per_sm;
}

// --- Launchers ---------------------------------------------------------------------------------------------------

struct Outputs {
  at::Tensor tokens, logp, grad;  // grad [N, H] in the accumulation dtype, or undefined without grad
  at::Tensor entropy, topk_logp, topk_tokens;  // the options' outputs (LmHeadOutputs), or undefined
};

template <typename acc_t>
RowReward<acc_t> row_reward(const LmHeadProblem& p) {
  const bool given = p.reward.defined();
  return {given ? p.reward.data_ptr<acc_t>() : nullptr, given && p.reward.dim() > 0 ? 1 : 0,
          static_cast<acc_t>(p.reward_scale)};
}

// programmatic: launched with programmatic dependent launch (sm_90), so that it is scheduled while the previous
// kernel drains; it waits for that kernel's results (grid_dependency_wait) before reading them.
template <typename scalar_t, typename acc_t>
void launch_merge(int splits, const at::Tensor& part_state, const at::Tensor& part_acc, acc_t acc_scale,
                  const LmHeadProblem& p, Outputs& out, cudaStream_t stream, bool programmatic = false) {
  const size_t smem = merge_smem_bytes<acc_t>(splits);
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(static_cast<unsigned>(p.N));
  cfg.blockDim = dim3(kMergeThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = programmatic ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(
      &cfg, merge_splits_kernel<scalar_t, acc_t>, reinterpret_cast<const RowState<acc_t>*>(part_state.data_ptr()),
      part_acc.defined() ? part_acc.data_ptr<acc_t>() : nullptr, splits, static_cast<int>(p.N), static_cast<int>(p.H),
      static_cast<int>(p.V), acc_scale, p.weight.data_ptr<scalar_t>(),
      p.tokens.defined() ? p.tokens.data_ptr<int64_t>() : nullptr, row_reward<acc_t>(p),
      out.tokens.data_ptr<int64_t>(), out.logp.data_ptr<acc_t>(),
      out.grad.defined() ? out.grad.data_ptr<acc_t>() : nullptr));
}

// The arguments of a fused kernel (mma, simt, sm90) over grid g, and the split partials it writes when g splits the
// vocabulary (kept alive by the caller until the merge is enqueued).
template <typename scalar_t, typename acc_t>
FusedArgs<scalar_t, acc_t> fused_args(const LmHeadProblem& p, const at::Tensor& z, Outputs& out, const Grid& g,
                                      at::Tensor& part_state, at::Tensor& part_acc) {
  const bool with_grad = out.grad.defined();
  FusedArgs<scalar_t, acc_t> a{};
  a.z = z.data_ptr<scalar_t>();
  a.w = p.weight.data_ptr<scalar_t>();
  a.bias = p.bias.defined() ? p.bias.data_ptr<scalar_t>() : nullptr;
  a.tokens = p.tokens.defined() ? p.tokens.data_ptr<int64_t>() : nullptr;
  a.reward = row_reward<acc_t>(p);
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
  if (g.splits > 1) {
    part_state = at::empty({static_cast<int64_t>(g.splits) * p.N * static_cast<int64_t>(sizeof(RowState<acc_t>))},
                           z.options().dtype(at::kByte));
    a.part_state = reinterpret_cast<RowState<acc_t>*>(part_state.data_ptr());
    if (with_grad) {
      part_acc = at::empty({g.splits, p.N, p.H}, z.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      a.part_acc = part_acc.data_ptr<acc_t>();
    }
  }
  return a;
}

// Runs a fused kernel (mma or simt) over the grid, then the merge when the vocabulary was split.
// acc_scale: what the kernel's accumulator must be multiplied by (undoes fp16's P scale in the tensor-core kernel).
template <typename scalar_t, typename acc_t, typename KernelFn>
void run_fused(KernelFn kernel, int threads, size_t smem, const GridTiles& tiles, acc_t acc_scale,
               const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const int device = z.get_device();
  const int per_sm = ctas_per_sm(reinterpret_cast<const void*>(kernel), threads, smem, device);
  LS_CHECK(per_sm > 0, "lm_head_policy_grad: the CUDA kernel does not fit on this GPU (", smem,
           " bytes of shared memory per block)");
  const bool with_grad = out.grad.defined();
  const Grid g = make_grid(p.N, p.V, p.H, with_grad, device_info(device).sm_count, per_sm, tiles);
  at::Tensor part_state, part_acc;
  const FusedArgs<scalar_t, acc_t> a = fused_args<scalar_t, acc_t>(p, z, out, g, part_state, part_acc);
  const dim3 grid(static_cast<unsigned>(g.row_tiles) * static_cast<unsigned>(g.slices),
                  static_cast<unsigned>(g.splits));
  kernel<<<grid, threads, smem, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (g.splits > 1) launch_merge<scalar_t, acc_t>(g.splits, part_state, part_acc, acc_scale, p, out, stream);
}

template <typename Tile, typename scalar_t>
void run_mma(const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const bool with_grad = out.grad.defined();
  const GridTiles tiles{Tile::kBM, Tile::kBN, Tile::kSliceCols};
  const size_t smem = Tile::smem_bytes(with_grad);
  if (with_grad)
    run_fused<scalar_t, float>(fused_mma_kernel<Tile, scalar_t, true>, Tile::kThreads, smem, tiles,
                               1.f / Tc<scalar_t>::kPScale, p, z, out, stream);
  else
    run_fused<scalar_t, float>(fused_mma_kernel<Tile, scalar_t, false>, Tile::kThreads, smem, tiles, 1.f, p, z, out,
                               stream);
}

template <typename scalar_t, typename acc_t>
void run_simt(const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const GridTiles tiles{SimtTile::kRows, SimtTile::kBN, SimtTile::slice_cols(sizeof(acc_t))};
  if (out.grad.defined())
    run_fused<scalar_t, acc_t>(fused_simt_kernel<scalar_t, acc_t, true>, SimtTile::kThreads, 0, tiles, acc_t(1), p, z,
                               out, stream);
  else
    run_fused<scalar_t, acc_t>(fused_simt_kernel<scalar_t, acc_t, false>, SimtTile::kThreads, 0, tiles, acc_t(1), p,
                               z, out, stream);
}

// --- The sm_90a kernel (sm90.cuh) ---------------------------------------------------------------------------------

// Whether `device` can run sm90_kernel: compute capability 9.0 and, in this build, code with sm_90a features for it
// (build_probe_kernel's static shared memory says which code the device would load; nothing is launched).
bool sm90_device(int device) {
  static std::mutex mu;
  static std::unordered_map<int, bool> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = cache.find(device);
  if (it != cache.end()) return it->second;
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  bool ok = false;
  if (major == 9 && minor == 0) {
    cudaFuncAttributes attr{};
    const cudaError_t err = cudaFuncGetAttributes(&attr, sm90::build_probe_kernel);
    if (err == cudaSuccess) {
      ok = attr.sharedSizeBytes == static_cast<size_t>(sm90::kProbeSm90aSmem);
    } else {
      (void)cudaGetLastError();  // no code for this device in the build: not an error of this call
    }
  }
  cache.emplace(device, ok);
  return ok;
}

// A 2-D tensor map of a row-major [rows, cols] 16-bit matrix in 64 x 64 boxes with the 128-byte swizzle; elements
// outside the matrix arrive as zeros. cuTensorMapEncodeTiled is a driver function: fetched through the runtime, so
// that the extension needs no -lcuda.
CUtensorMap tensor_map_64x64(const void* data, int64_t rows, int64_t cols, at::ScalarType dtype) {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    C10_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found));
    LS_CHECK(fn != nullptr && found == cudaDriverEntryPointSuccess,
             "lm_head_policy_grad: the CUDA driver has no cuTensorMapEncodeTiled (needed by the sm90 kernel)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }();
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(cols) * 2};
  const cuuint32_t box[2] = {Sm90Tile::kChunk, Sm90Tile::kRows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUresult r = encode(&map, dtype == at::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
                            2, const_cast<void*>(data), dims, strides, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                            CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  LS_CHECK(r == CUDA_SUCCESS, "lm_head_policy_grad: cuTensorMapEncodeTiled failed (error ", static_cast<int>(r),
           ") for a [", rows, ", ", cols, "] matrix");
  return map;
}

// The launch configuration of sm90_kernel with layout l over `clusters` clusters: the one place its block, shared
// memory and cluster shape are set, for the occupancy query and for the launch. cfg.attrs points into the object,
// hence no copies.
struct Sm90Launch {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg{};
  Sm90Launch(const Sm90Layout& l, int64_t clusters, cudaStream_t stream) {
    cfg.gridDim = dim3(static_cast<unsigned>(clusters * l.cluster));
    cfg.blockDim = dim3(Sm90Tile::kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(l.smem_bytes);
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(l.cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
  }
  Sm90Launch(const Sm90Launch&) = delete;
  Sm90Launch& operator=(const Sm90Launch&) = delete;
};

// Clusters of sm90_kernel that the device holds at once with layout l (set and queried once per kernel, device and
// layout), after raising the kernel's dynamic shared memory limit.
int sm90_clusters(const void* kernel, const Sm90Layout& l, int device) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, int, int64_t>, int> cache;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(kernel, device, l.cluster, l.smem_bytes);
  const auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  C10_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(l.smem_bytes)));
  const Sm90Launch launch(l, device_info(device).sm_count, nullptr);
  int clusters = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveClusters(&clusters, kernel, &launch.cfg));
  cache.emplace(key, clusters);
  return clusters;
}

template <typename scalar_t>
void run_sm90(const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const int device = z.get_device();
  const Sm90Layout l = sm90_layout(p.H, device_info(device).smem_per_block_optin);
  LS_CHECK(l.ok(), "lm_head_policy_grad: the sm90 kernel cannot take H = ", p.H, " on this GPU");
  const bool with_grad = out.grad.defined();
  using KernelPtr = void (*)(const CUtensorMap, const CUtensorMap, const FusedArgs<scalar_t, float>, const Sm90Config);
  KernelPtr kernel = sm90_kernel<scalar_t, false, 1>;
  if (with_grad) {
    switch ((l.chunks + 1) / 2) {  // O chunks per consumer warpgroup
      case 1: kernel = sm90_kernel<scalar_t, true, 1>; break;
      case 2: kernel = sm90_kernel<scalar_t, true, 2>; break;
      case 3: kernel = sm90_kernel<scalar_t, true, 3>; break;
      default: kernel = sm90_kernel<scalar_t, true, 4>; break;
    }
  }
  const int max_clusters = sm90_clusters(reinterpret_cast<const void*>(kernel), l, device);
  LS_CHECK(max_clusters > 0, "lm_head_policy_grad: the sm90 kernel's cluster of ", l.cluster, " CTAs with ",
           l.smem_bytes, " bytes of shared memory each does not fit on this GPU");
  // One wave of clusters over (token tile, vocabulary split) items, as make_grid splits for one wave of CTAs.
  const Grid g = make_grid(p.N, p.V, p.H, false, max_clusters, 1, GridTiles{Sm90Tile::kRows, Sm90Tile::kBN, 0});
  at::Tensor part_state, part_acc;
  const FusedArgs<scalar_t, float> a = fused_args<scalar_t, float>(p, z, out, g, part_state, part_acc);
  const CUtensorMap z_map = tensor_map_64x64(z.data_ptr(), p.N, p.H, z.scalar_type());
  const CUtensorMap w_map = tensor_map_64x64(p.weight.data_ptr(), p.V, p.H, z.scalar_type());
  const int64_t items = static_cast<int64_t>(g.row_tiles) * g.splits;
  const int clusters = static_cast<int>(std::min<int64_t>(max_clusters, items));

  if (a.tokens != nullptr) {
    sm90::check_tokens_kernel<<<static_cast<unsigned>((p.N + 255) / 256), 256, 0, stream>>>(a.tokens, a.N, a.V);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const Sm90Launch launch(l, clusters, stream);
  C10_CUDA_CHECK(cudaLaunchKernelEx(&launch.cfg, kernel, z_map, w_map, a, Sm90Config{l.cluster, l.chunks, l.stages}));
  if (g.splits > 1)
    launch_merge<scalar_t, float>(g.splits, part_state, part_acc, 1.f / Tc<scalar_t>::kPScale, p, out, stream,
                                  /*programmatic=*/true);
}

// out = a b, or out += a b (accumulate), in the accumulation dtype (fp32 for bf16 / fp16 operands).
template <typename scalar_t>
void chunk_gemm(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, bool accumulate) {
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value || std::is_same<scalar_t, at::Half>::value) {
#if LS_HAVE_MM_OUT_DTYPE
    if (!accumulate) {
      at::mm_out(out, a, b, at::kFloat);
      return;
    }
    // beta = 1 straight into the fp32 buffer. Some torch releases refuse addmm's out_dtype with an fp32 `self`
    // ("self and mat2 must have the same dtype"), before any work: those take a product and an add from then on.
    static std::atomic<bool> addmm_into_fp32{true};
    if (addmm_into_fp32.load(std::memory_order_relaxed)) {
      try {
        at::addmm_out(out, out, a, b, at::kFloat, 1, 1);
        return;
      } catch (const c10::Error&) {
        addmm_into_fp32.store(false, std::memory_order_relaxed);
      }
    }
    out.add_(at::mm(a, b, at::kFloat));
#else
    LS_CHECK(false, "the chunked CUDA path needs torch >= 2.8 (at::mm with out_dtype) for bfloat16 / float16 inputs");
#endif
  } else if (accumulate) {
    out.addmm_(a, b);  // fp32 follows torch's TF32 setting for matmuls (off by default)
  } else {
    at::mm_out(out, a, b);
  }
}

template <typename scalar_t, typename acc_t>
void run_chunked(const LmHeadProblem& p, const at::Tensor& z, Outputs& out, cudaStream_t stream) {
  const bool with_grad = out.grad.defined();
  const int64_t N = p.N, H = p.H, V = p.V;
  const int device = z.get_device();
  const LmHeadOptions& opt = p.opt;
  const bool with_opts = opt.any();
  const auto rows_kernel =
      with_opts ? chunk_rows_kernel<scalar_t, acc_t, true> : chunk_rows_kernel<scalar_t, acc_t, false>;
  // A row of L lives in shared memory: at most half of the per-block limit, so that two blocks share an SM.
  const size_t smem_cap = static_cast<size_t>(device_info(device).smem_per_block_optin - 4096) / 2 / 1024 * 1024;
  LS_CHECK(ctas_per_sm(reinterpret_cast<const void*>(rows_kernel), kChunkThreads, smem_cap, device) > 0,
           "lm_head_policy_grad: the chunked row kernel does not fit on this GPU (", smem_cap,
           " bytes of shared memory per block)");
  // L and P take chunk_len's budget of N * len * 6 bytes, counted in their own types' bytes.
  const int64_t elem_bytes = static_cast<int64_t>(sizeof(acc_t) + (with_grad ? sizeof(scalar_t) : 0));
  const int64_t budget_len = std::max<int64_t>(4, chunk_len(N, H, V) * 6 / elem_bytes);
  const ChunkPlan plan = plan_chunks(V, std::min<int64_t>(budget_len, smem_cap / sizeof(acc_t)));
  at::Tensor logits = at::empty({N * plan.len}, z.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
  at::Tensor probs = with_grad ? at::empty({N * plan.len}, z.options()) : at::Tensor();
  at::Tensor state = at::empty({N * static_cast<int64_t>(sizeof(ChunkState<acc_t>))}, z.options().dtype(at::kByte));

  ChunkArgs<scalar_t, acc_t> a{};
  a.N = static_cast<int>(N);
  a.V = static_cast<int>(V);
  a.H = H;
  a.bias = p.bias.defined() ? p.bias.data_ptr<scalar_t>() : nullptr;
  a.tokens = p.tokens.defined() ? p.tokens.data_ptr<int64_t>() : nullptr;
  a.state = reinterpret_cast<ChunkState<acc_t>*>(state.data_ptr());
  a.p = with_grad ? probs.data_ptr<scalar_t>() : nullptr;
  a.o = with_grad ? out.grad.data_ptr<acc_t>() : nullptr;
  a.temperature = static_cast<acc_t>(opt.temperature);
  a.entropy = opt.entropy;
  a.sample = opt.sample;
  a.seed = opt.seed;
  a.offsets = opt.offsets.defined() ? opt.offsets.data_ptr<int64_t>() : nullptr;
  a.topk = static_cast<int>(opt.topk);
  a.topk_val = opt.topk > 0 ? out.topk_logp.data_ptr<acc_t>() : nullptr;
  a.topk_idx = opt.topk > 0 ? out.topk_tokens.data_ptr<int64_t>() : nullptr;
  for (int64_t c = 0; c < plan.count; ++c) {
    const int64_t c0 = c * plan.len, cur = std::min(plan.len, V - c0);
    const at::Tensor wc = p.weight.narrow(0, c0, cur);
    at::Tensor l = logits.narrow(0, 0, N * cur).view({N, cur});
    chunk_gemm<scalar_t>(l, z, wc.t(), /*accumulate=*/false);
    a.logits = l.data_ptr<acc_t>();
    a.len = static_cast<int>(cur);
    a.v0 = static_cast<int>(c0);
    a.first = c == 0;
    const size_t smem = static_cast<size_t>((cur + 3) / 4 * 4) * sizeof(acc_t);  // the row, whole groups of 4
    rows_kernel<<<static_cast<unsigned>(N), kChunkThreads, smem, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (with_grad) {
      at::Tensor pc = probs.narrow(0, 0, N * cur).view({N, cur});
      chunk_gemm<scalar_t>(out.grad, pc, wc, /*accumulate=*/c > 0);  // chunk 0: beta = 0, no zero fill
    }
  }

  ChunkFinishArgs<scalar_t, acc_t> f{};
  f.state = a.state;
  f.o = a.o;
  f.acc_scale = acc_t(1) / acc_t(p_scale<scalar_t>());
  f.w = p.weight.data_ptr<scalar_t>();
  f.tokens = a.tokens;
  f.reward = row_reward<acc_t>(p);
  f.N = a.N;
  f.V = a.V;
  f.H = H;
  f.temperature = a.temperature;
  f.sample = a.sample;
  f.entropy_out = opt.entropy ? out.entropy.data_ptr<acc_t>() : nullptr;
  f.topk = a.topk;
  f.topk_val = a.topk_val;
  f.topk_idx = a.topk_idx;
  f.tokens_out = out.tokens.data_ptr<int64_t>();
  f.logp_out = out.logp.data_ptr<acc_t>();
  f.grad_out = a.o;
  chunk_finish_kernel<scalar_t, acc_t><<<static_cast<unsigned>(N), kChunkFinishThreads, 0, stream>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

struct Plan {
  Kernel kernel;
  MmaTiles tiles;  // for Kernel::kMma
};

// The kernel and tile configuration of one call: LATENTSEEK_CUDA_KERNEL and LATENTSEEK_CUDA_TILES (read per call,
// so that tests can switch them) and the pure choices of latentseek/cuda_plan.h on this device's limits.
Plan plan_call(const LmHeadProblem& p, bool with_grad, int device) {
  const char* kernel_env = std::getenv("LATENTSEEK_CUDA_KERNEL");
  const KernelRequest kernel_request = parse_kernel_request(kernel_env);
  LS_CHECK(kernel_request != KernelRequest::kInvalid,
           "LATENTSEEK_CUDA_KERNEL must be auto, fused, simt, chunked or sm90, got '", kernel_env, "'");
  const char* tiles_env = std::getenv("LATENTSEEK_CUDA_TILES");
  const TilesRequest tiles_request = parse_tiles_request(tiles_env);
  LS_CHECK(tiles_request != TilesRequest::kInvalid, "LATENTSEEK_CUDA_TILES must be auto, large or small, got '",
           tiles_env, "'");

  const auto dtype = p.hidden.scalar_type();
  const bool half = dtype == at::kBFloat16 || dtype == at::kHalf;
  // The tensor-core paths copy 16-byte vectors of W rows: rows must start on 16-byte boundaries.
  KernelChoiceInputs in{half && p.H >= 8 && p.H % 8 == 0 && aligned16(p.weight.data_ptr()),
                        LS_HAVE_MM_OUT_DTYPE != 0, true, p.N, p.H, with_grad};
  const int optin = device_info(device).smem_per_block_optin;
  const MmaTiles tiles = choose_mma_tiles(optin, with_grad, tiles_request);
  // A call that would run the tensor-core kernel if its tiles fitted: a forced tile size or a forced fused kernel
  // that this GPU cannot hold is an error, not a silent fallback.
  if (tiles == MmaTiles::kNone && choose_kernel(kernel_request, in) == Kernel::kMma) {
    const MmaTiles wanted = tiles_request == TilesRequest::kLarge ? MmaTiles::kLarge : MmaTiles::kSmall;
    LS_CHECK(tiles_request == TilesRequest::kAuto && kernel_request != KernelRequest::kFused,
             "the fused tensor-core kernel (LATENTSEEK_CUDA_KERNEL=", kernel_env ? kernel_env : "auto",
             ", LATENTSEEK_CUDA_TILES=", tiles_env ? tiles_env : "auto", ") needs ", mma_smem_bytes(wanted, with_grad),
             " bytes of shared memory per block with its ", wanted == MmaTiles::kLarge ? "large" : "small",
             " tiles, this GPU allows ", optin);
  }
  in.mma_fits = tiles != MmaTiles::kNone;
  if (kernel_request == KernelRequest::kSm90) {  // auto never takes it (not yet validated on a GPU)
    in.sm90_device = sm90_device(device);
    in.sm90_fits = sm90_layout(p.H, optin).ok();
  }
  const Kernel kernel = choose_kernel(kernel_request, in);
  LS_CHECK(kernel != Kernel::kSm90 || in.sm90_device,
           "LATENTSEEK_CUDA_KERNEL=sm90 needs a compute capability 9.0 GPU (H100 / H200) and a build with sm_90a code "
           "(TORCH_CUDA_ARCH_LIST including 9.0a); this GPU or build has neither or one of them");
  return {kernel, tiles};
}

template <typename scalar_t, typename acc_t>
void run_cuda(const LmHeadProblem& p, Outputs& out) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // The kernels index hidden as a dense [N, H] matrix whose rows start on 16-byte boundaries (cp.async).
  at::Tensor z = p.hidden;
  if (!z.is_contiguous() || !aligned16(z.data_ptr())) z = z.clone(at::MemoryFormat::Contiguous);
  // The options (temperature, sample, entropy, top-k) live in the chunked path's row kernel only, for every dtype.
  if (p.opt.any()) return run_chunked<scalar_t, acc_t>(p, z, out, stream);
  const Plan plan = plan_call(p, out.grad.defined(), z.get_device());
  if constexpr (std::is_same<scalar_t, at::BFloat16>::value || std::is_same<scalar_t, at::Half>::value) {
    if (plan.kernel == Kernel::kMma) {
      if (plan.tiles == MmaTiles::kSmall) return run_mma<MmaTileSmall, scalar_t>(p, z, out, stream);
      return run_mma<MmaTileLarge, scalar_t>(p, z, out, stream);
    }
    if (plan.kernel == Kernel::kSm90) return run_sm90<scalar_t>(p, z, out, stream);
    if (plan.kernel == Kernel::kChunked) return run_chunked<scalar_t, float>(p, z, out, stream);
  }
  run_simt<scalar_t, acc_t>(p, z, out, stream);
}

// The device part of the entry points (latentseek/entry.h). No host read of any input: given tokens are checked on
// the device (common.cuh), so a call never synchronises and can be captured in a CUDA graph.
struct CudaDevice {
  static void check(const char* op, const LmHeadProblem& p) {
    LS_CHECK(p.hidden.is_cuda(), op, ": the CUDA kernel got hidden on ", p.hidden.device());
    // The kernels index rows and vocabulary entries with 32-bit integers (element offsets are 64-bit).
    LS_CHECK(p.N < (int64_t(1) << 31) && p.V < (int64_t(1) << 31) - MmaTileLarge::kBN && p.H < (int64_t(1) << 31),
             op, ": the CUDA kernel supports N, V and H below 2^31, got N = ", p.N, ", V = ", p.V, ", H = ", p.H);
  }
  struct Guard {
    c10::cuda::CUDAGuard guard;
    explicit Guard(const at::Tensor& hidden) : guard(hidden.device()) {}
  };
  template <typename scalar_t, typename acc_t>
  static void run(const LmHeadProblem& p, LmHeadOutputs& out) {
    Outputs o{out.tokens,  out.logp,      out.with_grad ? out.grad : at::Tensor(),
              out.entropy, out.topk_logp, out.topk_tokens};
    run_cuda<scalar_t, acc_t>(p, o);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(latentseek_ext, CUDA, m) {
  m.impl("lm_head_policy_grad", &lm_head_policy_grad_entry<CudaDevice>);
  m.impl("lm_head_policy_grad.float_reward", &lm_head_policy_grad_float_reward_entry<CudaDevice>);
  m.impl("lm_head_logprob", &lm_head_logprob_entry<CudaDevice>);
  m.impl("lm_head_policy_grad.options", &lm_head_policy_grad_options_entry<CudaDevice>);
  m.impl("lm_head_logprob.options", &lm_head_logprob_options_entry<CudaDevice>);
}

}  // namespace latentseek
