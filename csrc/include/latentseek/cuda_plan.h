// The host-side decisions of the CUDA kernels (csrc/cuda), as pure functions of the problem and the device's limits:
// the tile configurations of the tensor-core kernel and which one a device holds, the kernel choice, the grid, the
// chunk length of the chunked path. No CUDA or torch dependency, so that csrc/test/test_cuda_plan.cpp checks them on
// a CPU; the launcher feeds them what the CUDA runtime reports (cached per device).
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace latentseek {

constexpr int kMaxSplits = 1024;    // vocabulary splits of one call (the merge kernel keeps a factor per split)
constexpr int kMaxFusedPasses = 8;  // auto: the fused kernel while row_tiles * slices <= this, else chunked

// Tile configuration of the tensor-core kernel (csrc/cuda/fused_mma.cuh). Stages: depth of the cp.async ring;
// MaxSliceChunks: the H chunks of O a CTA keeps in registers and whose W chunks it keeps in shared memory.
template <int Stages, int MaxSliceChunks>
struct MmaTileConfig {
  static constexpr int kWarpsM = 2;  // warps along rows (16 rows each)
  static constexpr int kWarpsN = 4;  // warps along vocabulary (S) and along H (O)
  static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
  static constexpr int kBM = 16 * kWarpsM;                // rows per CTA
  static constexpr int kBN = 64;                          // vocabulary entries per tile (16 per warp)
  static constexpr int kBK = 64;                          // H elements per chunk: 128-byte smem rows
  static constexpr int kStages = Stages;                  // cp.async ring depth (>= 2)
  static constexpr int kMaxSliceChunks = MaxSliceChunks;  // O columns per CTA: kMaxSliceChunks x 64
  static constexpr int kSliceCols = kMaxSliceChunks * kBK;
  static constexpr int kZChunkBytes = kBM * kBK * 2;
  static constexpr int kWChunkBytes = kBN * kBK * 2;
  static constexpr int kPBytes = kBM * kBN * 2;
  static constexpr int kRedBytes = 4 * kWarpsN * kBM * 4;  // max, idx, nan, sum per (column warp, row)
  static constexpr int kRowBytes = 6 * kBM * 4;            // m, s, best, lx, idx, nan per row
  static_assert(Stages >= 2, "the pipeline prefetches one chunk ahead at least");

  static constexpr int smem_bytes(bool with_grad) {
    return kStages * (kZChunkBytes + kWChunkBytes) + (with_grad ? kMaxSliceChunks * kWChunkBytes : 0) + kPBytes +
           kRedBytes + kRowBytes;
  }
};

// Large: 109,312 bytes with the gradient, 2 CTAs per SM on H100 / H200 (227 KB per block), 1 on A100 (163 KB).
// Small: the same slicing (512 columns of O per CTA, so the same flops) with a 2-stage ring: 97,024 bytes, which
// fits the 99 KB per block of sm_86 / sm_89. Without the gradient both are under 48 KB.
using MmaTileLarge = MmaTileConfig<3, 8>;
using MmaTileSmall = MmaTileConfig<2, 8>;

// The SIMT kernel's tile (csrc/cuda/simt.cuh).
struct SimtTile {
  static constexpr int kThreads = 256;  // 8 warps; warp w owns rows w and w + 8 of the tile
  static constexpr int kRows = 16;
  static constexpr int kBN = 32;  // one vocabulary entry per lane
  static constexpr int kBK = 32;
  // O columns per CTA: 2 rows x 16 registers per lane (8 for fp64).
  static constexpr int slice_cols(int acc_bytes) { return acc_bytes == 8 ? 256 : 512; }
};

// The sm_90a kernel (csrc/cuda/sm90.cuh): a cluster of CTAs splits H, each CTA owning `chunks` 64-column chunks
// (at most 8, so H / cluster <= 512) of a 64-token tile; W streams through a ring of `stages` TMA stages of
// chunks x 8 KB. Shared memory: the resident Z tile, the ring, P, the partial-logit exchange buffer, per-row values
// and the mbarriers, plus 1 KB to align the base to the 128-byte swizzle's 1024-byte pattern.
struct Sm90Tile {
  static constexpr int kRows = 64;        // tokens per tile (the wgmma M)
  static constexpr int kBN = 64;          // vocabulary entries per tile
  static constexpr int kChunk = 64;       // H columns per chunk: one 128-byte swizzled row of 16-bit values
  static constexpr int kMaxChunks = 8;    // per CTA
  static constexpr int kMaxCluster = 8;   // the portable cluster size
  static constexpr int kMaxStages = 4;
  static constexpr int kConsumerWarpgroups = 2;
  static constexpr int kThreads = 128 * (1 + kConsumerWarpgroups);  // warpgroup 0 produces (TMA), 1-2 consume
  static constexpr int kChunkBytes = kRows * kChunk * 2;  // a Z chunk and a W chunk alike (kBN == kRows)
  static constexpr int kSRowFloats = 80;                  // exchange rows padded: 2 rows x 64 bytes cover 32 banks
  static constexpr int kSBytes = kRows * kSRowFloats * 4;
  static constexpr int kPBytes = kRows * kBN * 2;
  static constexpr int kRowBytes = kRows * (4 + 4 + 8);  // alpha, final s, final token per row
  static constexpr int kBarrierBytes = 128;               // 2 x kMaxStages + 4 mbarriers of 8 bytes
  static constexpr int kAlignSlack = 1024;
  static_assert(kBN == kRows, "a W chunk and a Z chunk share one TMA box (64 x 64)");
};

inline int64_t sm90_smem_bytes(int chunks, int stages) {
  return Sm90Tile::kAlignSlack + static_cast<int64_t>(chunks) * Sm90Tile::kChunkBytes * (1 + stages) +
         Sm90Tile::kPBytes + Sm90Tile::kSBytes + Sm90Tile::kRowBytes + Sm90Tile::kBarrierBytes;
}

struct Sm90Layout {
  int cluster = 0;  // CTAs per cluster, each with an H slice; 0: the kernel cannot take this H on this device
  int chunks = 0;   // 64-column chunks per CTA (the last CTA's may lie partly or wholly past H: zero-filled)
  int stages = 0;   // TMA ring depth
  int64_t smem_bytes = 0;
  bool ok() const { return cluster > 0; }
};

// The cluster that splits H (the fewest CTAs with at most 8 chunks each: 896 -> 2 x 7, 1536 -> 3 x 8,
// 3584 -> 7 x 8, 4096 -> 8 x 8), and as many ring stages (2 to 4) as the device's shared memory per block holds.
inline Sm90Layout sm90_layout(int64_t H, int64_t smem_per_block_optin) {
  Sm90Layout l;
  if (H <= 0) return l;
  const int64_t kt = (H + Sm90Tile::kChunk - 1) / Sm90Tile::kChunk;
  const int64_t cluster = (kt + Sm90Tile::kMaxChunks - 1) / Sm90Tile::kMaxChunks;
  if (cluster > Sm90Tile::kMaxCluster) return l;
  const int chunks = static_cast<int>((kt + cluster - 1) / cluster);
  const int64_t room = smem_per_block_optin - sm90_smem_bytes(chunks, 0);
  const int64_t stages =
      std::min<int64_t>(Sm90Tile::kMaxStages, room > 0 ? room / (static_cast<int64_t>(chunks) * Sm90Tile::kChunkBytes) : 0);
  if (stages < 2) return l;
  l.cluster = static_cast<int>(cluster);
  l.chunks = chunks;
  l.stages = static_cast<int>(stages);
  l.smem_bytes = sm90_smem_bytes(chunks, l.stages);
  return l;
}

enum class KernelRequest { kAuto, kFused, kSimt, kChunked, kSm90, kInvalid };  // LATENTSEEK_CUDA_KERNEL
enum class TilesRequest { kAuto, kLarge, kSmall, kInvalid };                    // LATENTSEEK_CUDA_TILES
enum class Kernel { kMma, kSimt, kChunked, kSm90 };
enum class MmaTiles { kNone, kLarge, kSmall };

// An unset variable (nullptr) or an empty one means auto.
inline KernelRequest parse_kernel_request(const char* v) {
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return KernelRequest::kAuto;
  if (std::strcmp(v, "fused") == 0) return KernelRequest::kFused;
  if (std::strcmp(v, "simt") == 0) return KernelRequest::kSimt;
  if (std::strcmp(v, "chunked") == 0) return KernelRequest::kChunked;
  if (std::strcmp(v, "sm90") == 0) return KernelRequest::kSm90;
  return KernelRequest::kInvalid;
}

inline TilesRequest parse_tiles_request(const char* v) {
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return TilesRequest::kAuto;
  if (std::strcmp(v, "large") == 0) return TilesRequest::kLarge;
  if (std::strcmp(v, "small") == 0) return TilesRequest::kSmall;
  return TilesRequest::kInvalid;
}

inline int mma_smem_bytes(MmaTiles t, bool with_grad) {
  return t == MmaTiles::kSmall ? MmaTileSmall::smem_bytes(with_grad) : MmaTileLarge::smem_bytes(with_grad);
}

// The tensor-core kernel's configuration on a device that allows smem_per_block_optin bytes of shared memory per
// block (cudaDevAttrMaxSharedMemoryPerBlockOptin): auto takes the large one where it fits, else the small one; a
// request is honoured where it fits. kNone: the request (or, for auto, neither configuration) does not fit.
inline MmaTiles choose_mma_tiles(int64_t smem_per_block_optin, bool with_grad, TilesRequest request) {
  const auto fits = [&](MmaTiles t) { return mma_smem_bytes(t, with_grad) <= smem_per_block_optin; };
  switch (request) {
    case TilesRequest::kLarge: return fits(MmaTiles::kLarge) ? MmaTiles::kLarge : MmaTiles::kNone;
    case TilesRequest::kSmall: return fits(MmaTiles::kSmall) ? MmaTiles::kSmall : MmaTiles::kNone;
    case TilesRequest::kAuto:
      if (fits(MmaTiles::kLarge)) return MmaTiles::kLarge;
      return fits(MmaTiles::kSmall) ? MmaTiles::kSmall : MmaTiles::kNone;
    case TilesRequest::kInvalid: break;
  }
  return MmaTiles::kNone;
}

// H slices of the accumulator: each CTA keeps slice_cols columns of O (one slice without the gradient).
inline int64_t h_slices(int64_t H, bool with_grad, int slice_cols) {
  return with_grad ? std::max<int64_t>(1, (H + slice_cols - 1) / slice_cols) : 1;
}

// What choose_kernel needs to know about one call.
struct KernelChoiceInputs {
  bool tensor_core_ok;  // bf16 / fp16, H % 8 == 0, 16-byte aligned W rows
  bool have_chunked;    // built with at::mm(..., out_dtype) (torch >= 2.8)
  bool mma_fits;        // a tile configuration of the tensor-core kernel fits the device (choose_mma_tiles)
  int64_t N, H;
  bool with_grad;
  bool sm90_device = false;  // an sm_90 device and a build with sm_90a code (the sm90 kernel can run at all)
  bool sm90_fits = false;    // sm90_layout(H, the device's limit).ok(): H <= 4096 and the ring fits
};

// auto: the fused tensor-core kernel while W passes through L2 at most kMaxFusedPasses times (row tiles x H slices),
// else the chunked cuBLAS path; SIMT where the tensor cores cannot be used. A forced kernel that cannot take the
// inputs falls back the same way (simt for non-tensor-core inputs, fused where chunked is not built). Forced fused
// on a device that holds no tile configuration stays kMma, and the launcher says why it cannot run.
// sm90 is only ever forced (auto does not take it until a GPU has validated it): it runs where the device and the
// build have sm_90a; on another device it stays kSm90 and the launcher says why it cannot run; an H it cannot
// take (above 4096) goes to the automatic choice.
inline Kernel choose_kernel(KernelRequest request, const KernelChoiceInputs& in) {
  if (!in.tensor_core_ok || request == KernelRequest::kSimt) return Kernel::kSimt;
  if (request == KernelRequest::kSm90) {
    if (!in.sm90_device || in.sm90_fits) return Kernel::kSm90;
    request = KernelRequest::kAuto;
  }
  if (request == KernelRequest::kFused) return Kernel::kMma;
  if (!in.mma_fits) return in.have_chunked ? Kernel::kChunked : Kernel::kSimt;
  if (!in.have_chunked) return Kernel::kMma;
  if (request == KernelRequest::kChunked) return Kernel::kChunked;
  const int64_t row_tiles = (in.N + MmaTileLarge::kBM - 1) / MmaTileLarge::kBM;
  const int64_t slices = h_slices(in.H, in.with_grad, MmaTileLarge::kSliceCols);
  return row_tiles * slices <= kMaxFusedPasses ? Kernel::kMma : Kernel::kChunked;
}

// The tiles of a fused kernel that the grid depends on.
struct GridTiles {
  int rows_per_cta;  // rows of hidden per CTA
  int tile_v;        // vocabulary entries per tile: splits are multiples of it
  int slice_cols;    // columns of O per CTA (with the gradient)
};

struct Grid {
  int row_tiles, slices, splits, split_len;
  int64_t ctas() const { return static_cast<int64_t>(row_tiles) * slices * splits; }
};

// The grid of a fused kernel: (row tiles x H slices) x vocabulary splits. When the first two give fewer CTAs than
// the GPU holds at a time (sm_count x ctas_per_sm), the vocabulary is split as far as that stays within one wave
// (the number of splits is rounded down: rounding up put 1-2 CTAs in a second wave) and every split keeps at least
// 4 tiles. With more row tiles than that, one split.
inline Grid make_grid(int64_t N, int64_t V, int64_t H, bool with_grad, int sm_count, int ctas_per_sm,
                      const GridTiles& t) {
  Grid g;
  g.row_tiles = static_cast<int>((N + t.rows_per_cta - 1) / t.rows_per_cta);
  g.slices = static_cast<int>(h_slices(H, with_grad, t.slice_cols));
  const int64_t base = static_cast<int64_t>(g.row_tiles) * g.slices;
  const int64_t resident = static_cast<int64_t>(std::max(sm_count, 1)) * std::max(ctas_per_sm, 1);
  int64_t splits = std::max<int64_t>(1, resident / base);
  splits = std::min<int64_t>({splits, std::max<int64_t>(1, V / (4 * t.tile_v)), kMaxSplits});
  // Rounding the split length up to whole tiles can only lower the number of splits (never an empty split).
  const int64_t per = (V + splits - 1) / splits;
  g.split_len = static_cast<int>((per + t.tile_v - 1) / t.tile_v * t.tile_v);
  g.splits = static_cast<int>((V + g.split_len - 1) / g.split_len);
  return g;
}

// Vocabulary entries per chunk of the chunked path: its fp32 logits and 16-bit probabilities take N * len * 6
// bytes, kept within max(64 MiB, 16 N H bytes) (so O(N*H)); a multiple of 256, at least 256, at most V.
inline int64_t chunk_len(int64_t N, int64_t H, int64_t V) {
  const int64_t budget = std::max<int64_t>(int64_t(64) << 20, 16 * N * H);
  const int64_t vc = budget / (6 * N) / 256 * 256;
  return std::min<int64_t>(std::max<int64_t>(vc, 256), V);
}

}  // namespace latentseek
