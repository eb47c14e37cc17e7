// The CUDA launcher's host decisions (latentseek/cuda_plan.h), checked on the CPU: the grid never asks for a second
// wave, the tile configuration follows the device's shared memory limit, the kernel choice, the chunk length.
#include <cstdint>
#include <cstdio>
#include <string>

#include "latentseek/cuda_plan.h"

namespace {

using namespace latentseek;

int failures = 0;
int64_t checks = 0;

void expect(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    if (++failures <= 20) std::printf("FAIL %s\n", what.c_str());
  }
}

std::string shape(int64_t N, int64_t V, int64_t H, int sms, int per_sm) {
  return "N=" + std::to_string(N) + " V=" + std::to_string(V) + " H=" + std::to_string(H) +
         " SMs=" + std::to_string(sms) + " CTAs/SM=" + std::to_string(per_sm);
}

// One (grid, problem) pair: the vocabulary splits cover V exactly, in whole tiles, and the grid fits in one wave
// whenever its rows and H slices alone do.
void check_grid(int64_t N, int64_t V, int64_t H, bool with_grad, int sms, int per_sm, const GridTiles& t) {
  const Grid g = make_grid(N, V, H, with_grad, sms, per_sm, t);
  const std::string s = shape(N, V, H, sms, per_sm);
  const int64_t resident = static_cast<int64_t>(sms) * per_sm;
  const int64_t base = static_cast<int64_t>(g.row_tiles) * g.slices;
  expect(g.row_tiles == (N + t.rows_per_cta - 1) / t.rows_per_cta, s + ": row tiles");
  expect(g.slices == (with_grad ? (H + t.slice_cols - 1) / t.slice_cols : 1), s + ": H slices");
  expect(g.split_len % t.tile_v == 0, s + ": splits are whole tiles");
  expect(static_cast<int64_t>(g.splits) * g.split_len >= V && static_cast<int64_t>(g.splits - 1) * g.split_len < V,
         s + ": splits cover V with none empty");
  expect(g.splits >= 1 && g.splits <= kMaxSplits, s + ": 1 <= splits <= kMaxSplits");
  if (base <= resident) {
    expect(g.ctas() <= resident, s + ": one wave (" + std::to_string(g.ctas()) + " CTAs for " +
                                     std::to_string(resident) + " slots)");
    // Not degenerate: with a vocabulary long enough to split that far, at least half the slots are used.
    if (V >= 4 * t.tile_v * resident) expect(2 * g.ctas() >= resident, s + ": fills at least half the GPU");
  } else {
    expect(g.splits == 1, s + ": more row tiles than slots: one split");
  }
}

void test_grid_one_wave() {
  const GridTiles mma{MmaTileLarge::kBM, MmaTileLarge::kBN, MmaTileLarge::kSliceCols};
  const GridTiles simt32{SimtTile::kRows, SimtTile::kBN, SimtTile::slice_cols(4)};
  const GridTiles simt64{SimtTile::kRows, SimtTile::kBN, SimtTile::slice_cols(8)};
  // (SMs, CTAs per SM): H100 / H200 (the large tiles: 2), A100 (1), an sm_86 / sm_89 part, a small GPU.
  const int gpus[][2] = {{132, 2}, {108, 1}, {84, 1}, {128, 1}, {20, 2}};
  for (const auto& gpu : gpus)
    for (int64_t H : {64, 512, 896, 1536, 3584, 4096})
      for (int64_t V : {151936, 152064, 32000, 4099, 65})
        for (int64_t N = 1; N <= 20000; N += (N < 2000 ? 1 : 37)) {
          check_grid(N, V, H, true, gpu[0], gpu[1], mma);
          check_grid(N, V, H, false, gpu[0], gpu[1], mma);
          if (N <= 4000) {
            check_grid(N, V, H, true, gpu[0], 8, simt32);
            check_grid(N, V, H, true, gpu[0], 8, simt64);
          }
        }
}

void test_grid_issue_ranges() {
  // The ranges where rounding the splits up launched 265-266 CTAs for 264 slots (132 SMs x 2) at H <= 512.
  const GridTiles mma{MmaTileLarge::kBM, MmaTileLarge::kBN, MmaTileLarge::kSliceCols};
  for (int64_t H : {64, 256, 512})
    for (int64_t N = 129; N <= 224; ++N) {
      const Grid g = make_grid(N, 151936, H, true, 132, 2, mma);
      expect(g.ctas() <= 264, shape(N, 151936, H, 132, 2) + ": at most 264 CTAs, got " + std::to_string(g.ctas()));
      expect(g.splits >= 264 / g.row_tiles - 1, shape(N, 151936, H, 132, 2) + ": split about 264 / row tiles ways");
    }
  // N = 64 at H = 896: 2 row tiles x 2 slices, 66 splits of 2304 rows, exactly one wave of 264.
  const Grid g = make_grid(64, 151936, 896, true, 132, 2, mma);
  expect(g.row_tiles == 2 && g.slices == 2 && g.splits == 66 && g.split_len == 2304 && g.ctas() == 264,
         "N=64 H=896 on 132 SMs: grid (4, 66) of 2304-row splits");
}

void test_tiles_follow_the_device() {
  constexpr int64_t kH100 = 232448;  // 227 KB per block (H100 / H200, sm_90)
  constexpr int64_t kA100 = 166912;  // 163 KB (sm_80)
  constexpr int64_t kSm86 = 101376;  // 99 KB (sm_86 / sm_89)
  constexpr int64_t kSm75 = 65536;   // 64 KB: neither configuration with the gradient
  expect(MmaTileLarge::smem_bytes(true) == 109312, "large tiles take 109,312 bytes with the gradient");
  expect(MmaTileSmall::smem_bytes(true) == 97024 && MmaTileSmall::smem_bytes(true) <= kSm86,
         "small tiles take 97,024 bytes with the gradient, within sm_86's limit");
  expect(MmaTileSmall::kSliceCols == MmaTileLarge::kSliceCols, "both configurations slice H alike (same flops)");
  expect(2 * MmaTileLarge::smem_bytes(true) <= kH100, "two large CTAs fit one H100 SM's shared memory");
  for (bool grad : {true, false}) {
    const std::string g = grad ? " (gradient)" : " (no gradient)";
    expect(choose_mma_tiles(kH100, grad, TilesRequest::kAuto) == MmaTiles::kLarge, "H100/H200 auto: large" + g);
    expect(choose_mma_tiles(kA100, grad, TilesRequest::kAuto) == MmaTiles::kLarge, "A100 auto: large" + g);
    for (int64_t limit : {kH100, kA100, kSm86})
      expect(choose_mma_tiles(limit, grad, TilesRequest::kSmall) == MmaTiles::kSmall,
             "small forced at " + std::to_string(limit) + " bytes: small" + g);
  }
  expect(choose_mma_tiles(kSm86, true, TilesRequest::kAuto) == MmaTiles::kSmall, "sm_86 auto with gradient: small");
  expect(choose_mma_tiles(kSm86, false, TilesRequest::kAuto) == MmaTiles::kLarge,
         "sm_86 auto without gradient: large (under 48 KB)");
  expect(choose_mma_tiles(kSm86, true, TilesRequest::kLarge) == MmaTiles::kNone, "sm_86 large forced: does not fit");
  expect(choose_mma_tiles(kSm75, true, TilesRequest::kAuto) == MmaTiles::kNone, "64 KB with gradient: none fits");
  expect(choose_mma_tiles(kSm75, false, TilesRequest::kAuto) == MmaTiles::kLarge, "64 KB without gradient: large");
}

void test_requests_parse() {
  expect(parse_kernel_request(nullptr) == KernelRequest::kAuto, "unset kernel: auto");
  expect(parse_kernel_request("") == KernelRequest::kAuto, "empty kernel: auto");
  expect(parse_kernel_request("fused") == KernelRequest::kFused, "fused");
  expect(parse_kernel_request("simt") == KernelRequest::kSimt, "simt");
  expect(parse_kernel_request("chunked") == KernelRequest::kChunked, "chunked");
  expect(parse_kernel_request("sm90") == KernelRequest::kSm90, "sm90");
  expect(parse_kernel_request("SM90") == KernelRequest::kInvalid, "SM90: invalid (case matters)");
  expect(parse_kernel_request("fastest") == KernelRequest::kInvalid, "fastest: invalid");
  expect(parse_tiles_request(nullptr) == TilesRequest::kAuto, "unset tiles: auto");
  expect(parse_tiles_request("small") == TilesRequest::kSmall, "small");
  expect(parse_tiles_request("large") == TilesRequest::kLarge, "large");
  expect(parse_tiles_request("Small") == TilesRequest::kInvalid, "Small: invalid (case matters)");
}

void test_kernel_choice() {
  const auto in = [](int64_t N, int64_t H, bool tc = true, bool chunked = true, bool fits = true) {
    return KernelChoiceInputs{tc, chunked, fits, N, H, true};
  };
  // auto: fused while row tiles x slices <= 8: N=64 at H=896 is 2 x 2; N=300 at H=896 is 10 x 2.
  expect(choose_kernel(KernelRequest::kAuto, in(64, 896)) == Kernel::kMma, "N=64 H=896: fused");
  expect(choose_kernel(KernelRequest::kAuto, in(300, 896)) == Kernel::kChunked, "N=300 H=896: chunked");
  expect(choose_kernel(KernelRequest::kAuto, in(256, 512)) == Kernel::kMma, "N=256 H=512: 8 passes, fused");
  expect(choose_kernel(KernelRequest::kAuto, in(257, 512)) == Kernel::kChunked, "N=257 H=512: 9 passes, chunked");
  expect(choose_kernel(KernelRequest::kAuto, in(64, 896, false)) == Kernel::kSimt, "no tensor cores: simt");
  expect(choose_kernel(KernelRequest::kChunked, in(64, 896, false)) == Kernel::kSimt, "chunked forced, fp32: simt");
  expect(choose_kernel(KernelRequest::kAuto, in(300, 896, true, false)) == Kernel::kMma, "no chunked build: fused");
  expect(choose_kernel(KernelRequest::kAuto, in(64, 896, true, true, false)) == Kernel::kChunked,
         "no tile fits: chunked");
  expect(choose_kernel(KernelRequest::kAuto, in(64, 896, true, false, false)) == Kernel::kSimt,
         "no tile fits, no chunked build: simt");
  expect(choose_kernel(KernelRequest::kFused, in(64, 896, true, true, false)) == Kernel::kMma,
         "fused forced stays fused (the launcher reports that it does not fit)");
  expect(choose_kernel(KernelRequest::kChunked, in(64, 896)) == Kernel::kChunked, "chunked forced");
  expect(choose_kernel(KernelRequest::kSimt, in(64, 896)) == Kernel::kSimt, "simt forced");
}

// The sm90 kernel's auto-never rule and its fallbacks: forced, it runs where the device has it and the layout fits;
// fp32 goes to SIMT as for every forced kernel; an H it cannot take goes to the automatic choice; on a device
// without it, it stays kSm90 (the launcher then raises the error that names the device).
void test_sm90_choice() {
  const auto in = [](int64_t N, int64_t H, bool device, bool fits, bool tc = true) {
    KernelChoiceInputs k{tc, true, true, N, H, true};
    k.sm90_device = device;
    k.sm90_fits = fits;
    return k;
  };
  for (int64_t N : {1, 64, 300, 4096}) {
    const std::string n = "N=" + std::to_string(N);
    expect(choose_kernel(KernelRequest::kSm90, in(N, 896, true, true)) == Kernel::kSm90, n + ": sm90 forced: sm90");
    expect(choose_kernel(KernelRequest::kAuto, in(N, 896, true, true)) != Kernel::kSm90, n + ": auto never sm90");
    expect(choose_kernel(KernelRequest::kSm90, in(N, 896, true, true, false)) == Kernel::kSimt,
           n + ": sm90 forced, fp32: simt");
    expect(choose_kernel(KernelRequest::kSm90, in(N, 8192, true, false)) ==
               choose_kernel(KernelRequest::kAuto, in(N, 8192, true, false)),
           n + ": sm90 forced, H it cannot take: the automatic choice");
    expect(choose_kernel(KernelRequest::kSm90, in(N, 896, false, false)) == Kernel::kSm90,
           n + ": sm90 forced on a device without it: kSm90, for the launcher's error");
  }
}

// The cluster split of H: at most 8 chunks (512 columns) per CTA, at most 8 CTAs, the fewest CTAs that do it; the
// CTAs' chunks cover H; the ring has 2 to 4 stages and the whole fits the device's shared memory per block.
void test_sm90_layout() {
  constexpr int64_t kH100 = 232448, kA100 = 166912;
  for (int64_t H = 8; H <= 5000; H += 8) {
    const Sm90Layout l = sm90_layout(H, kH100);
    const std::string s = "sm90 H=" + std::to_string(H);
    const int64_t kt = (H + 63) / 64;
    if (kt > 64) {
      expect(!l.ok(), s + ": above 4096 columns the cluster would exceed 8 CTAs: not taken");
      continue;
    }
    expect(l.ok(), s + ": taken on an H100 / H200");
    if (!l.ok()) continue;
    expect(l.cluster >= 1 && l.cluster <= Sm90Tile::kMaxCluster, s + ": 1 <= cluster <= 8");
    expect(l.chunks >= 1 && l.chunks <= Sm90Tile::kMaxChunks, s + ": at most 512 columns per CTA");
    expect(static_cast<int64_t>(l.cluster) * l.chunks >= kt, s + ": the CTAs' chunks cover H");
    expect(static_cast<int64_t>(l.cluster - 1) * l.chunks < kt, s + ": every CTA owns a chunk inside H");
    expect(l.cluster == (kt + 7) / 8, s + ": the fewest CTAs");
    expect(l.stages >= 2 && l.stages <= Sm90Tile::kMaxStages, s + ": 2 to 4 stages");
    expect(l.smem_bytes == sm90_smem_bytes(l.chunks, l.stages) && l.smem_bytes <= kH100, s + ": fits 227 KB");
    expect(l.stages == Sm90Tile::kMaxStages || sm90_smem_bytes(l.chunks, l.stages + 1) > kH100,
           s + ": as many stages as fit");
  }
  // The design review's clusters: 896 -> 2 x 448, 1536 -> 3 x 512, 3584 -> 7 x 512, 4096 -> 8 x 512.
  const int64_t shapes[][3] = {{896, 2, 7}, {1536, 3, 8}, {3584, 7, 8}, {4096, 8, 8}, {512, 1, 8}, {64, 1, 1}};
  for (const auto& x : shapes) {
    const Sm90Layout l = sm90_layout(x[0], kH100);
    expect(l.cluster == x[1] && l.chunks == x[2],
           "sm90 H=" + std::to_string(x[0]) + ": cluster " + std::to_string(x[1]) + " x " + std::to_string(x[2]) +
               " chunks, got " + std::to_string(l.cluster) + " x " + std::to_string(l.chunks));
  }
  expect(sm90_layout(896, kH100).smem_bytes == 202880 && sm90_layout(1536, kH100).smem_bytes == 227456,
         "sm90 shared memory: 202,880 bytes at H=896, 227,456 at H=1536 (the header's numbers)");
  expect(sm90_layout(1536, kA100).ok() == false, "sm90 at 512 columns per CTA needs more than an A100's 163 KB");
  expect(!sm90_layout(0, kH100).ok(), "sm90 H=0: not taken");
  // The grid over clusters: make_grid with 64-token tiles and one CTA slot per cluster never exceeds the clusters.
  const GridTiles t{Sm90Tile::kRows, Sm90Tile::kBN, 0};
  for (int clusters : {132, 66, 44, 18, 16})
    for (int64_t N : {1, 64, 65, 300, 2000, 9000}) {
      const Grid g = make_grid(N, 151936, 896, false, clusters, 1, t);
      expect(g.slices == 1 && g.row_tiles == (N + 63) / 64, "sm90 grid: token tiles, no H slices");
      if (g.row_tiles <= clusters)
        expect(g.ctas() <= clusters, "sm90 grid N=" + std::to_string(N) + ": items within one wave of clusters");
    }
}

void test_chunk_len() {
  for (int64_t N : {1, 7, 64, 300, 2048, 4096, 16384})
    for (int64_t H : {64, 896, 3584})
      for (int64_t V : {100, 4099, 151936}) {
        const int64_t vc = chunk_len(N, H, V);
        const std::string s = "N=" + std::to_string(N) + " H=" + std::to_string(H) + " V=" + std::to_string(V);
        expect(vc >= 1 && vc <= V, s + ": 1 <= chunk <= V");
        expect(vc == V || vc % 256 == 0, s + ": whole 256-entry blocks unless all of V");
        const int64_t budget = std::max<int64_t>(int64_t(64) << 20, 16 * N * H);
        expect(vc <= 256 || N * vc * 6 <= budget, s + ": logits and probabilities within the budget");
      }
}

}  // namespace

int main() {
  test_grid_one_wave();
  test_grid_issue_ranges();
  test_tiles_follow_the_device();
  test_requests_parse();
  test_kernel_choice();
  test_sm90_choice();
  test_sm90_layout();
  test_chunk_len();
  std::printf("%s: %lld checks, %d failed\n", failures ? "FAIL" : "ok", static_cast<long long>(checks), failures);
  return failures ? 1 : 0;
}
