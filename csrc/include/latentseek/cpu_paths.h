// Which path the CPU kernel (csrc/cpu) takes for bf16 / fp16 inputs, chosen per call from what the CPU can do.
// The capability query, the path choice and the LATENTSEEK_CPU_PATH override live here and nowhere else.
//
//   widen  each W tile is widened to fp32 and both tile products, L = Z W_t^T and acc += P W_t, run in ATen's fp32
//          GEMM. The right choice where the CPU has no bf16/fp16 matrix units (AVX2 or plain AVX-512): there ATen's
//          16-bit GEMMs are emulated and slower than fp32.
//   bf16   bf16 matrix units (AMX-BF16, or AVX512-BF16's dot products): both tile products run on bf16 operands with
//          fp32 accumulation and fp32 output, through oneDNN's brgemm ukernel as ATen exposes it
//          (at::native::cpublas::brgemm with B in the VNNI-2 layout [K/2, N, 2]). The logits come out in fp32 and are
//          never rounded; P is rounded to bf16 only as the operand of P W_t (see csrc/cpu for the precision argument).
//   fp16   the same on AMX-FP16, P stored times 2^14 so that no probability is subnormal. A CPU with AVX512-FP16
//          but no AMX-FP16 widens: AVX512-FP16's FMAs accumulate in fp16, which oneDNN avoids for GEMMs (as torch's
//          CPUBlas.cpp notes), so there is no fp16 unit to gain from, and the ukernel's B layout there is unverified.
// fp32 and fp64 inputs have one path each, their own GEMM ("fp32", "fp64").
//
// Capability comes from ATen's query (at::cpu::get_cpu_capabilities(), which reads cpuinfo). A units path counts as
// available only if, in addition, oneDNN is enabled (torch.backends.mkldnn) and a small brgemm with known inputs
// returns the exact fp32 result once per process: this proves that the build has the ukernel, that it takes the
// VNNI-2 layout written by the kernel, and that its output is not rounded to 16 bits. Otherwise auto widens.
//
// LATENTSEEK_CPU_PATH=auto|widen|bf16|fp16 (read on every call) overrides auto for the inputs the named path serves
// (widen: bf16 and fp16; bf16: bf16; fp16: fp16); inputs of another dtype keep their automatic path. Naming a path
// this CPU cannot run is an error, whatever the dtype of the call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/cpu/Utils.h>
#include <ATen/native/CPUBlas.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#include "latentseek/checks.h"

namespace latentseek {

enum class CpuPath { kWiden, kBf16Units, kFp16Units };

// The CPU features the kernel dispatches on, read once from ATen's query.
struct CpuCaps {
  bool avx2 = false;         // AVX2 + FMA + F16C: the vectorised exponentials
  bool avx512 = false;       // AVX-512 F/BW/VL/DQ: the packing loops of the units paths
  bool avx512_bf16 = false;  // vdpbf16ps
  bool amx_bf16 = false;
  bool amx_fp16 = false;

  // The strongest level, for messages: amx, avx512_bf16, avx512, avx2 or baseline.
  const char* level() const {
    if (amx_bf16 || amx_fp16) return "amx";
    if (avx512_bf16) return "avx512_bf16";
    if (avx512) return "avx512";
    if (avx2) return "avx2";
    return "baseline";
  }
};

inline const CpuCaps& cpu_caps() {
  static const CpuCaps caps = [] {
    CpuCaps c;
    const auto all = at::cpu::get_cpu_capabilities();
    const auto has = [&all](const char* key) {
      const auto it = all.find(key);
      return it != all.end() && it->second.isBool() && it->second.toBool();
    };
    c.avx2 = has("avx2") && has("fma3") && has("f16c");
    c.avx512 = has("avx512_f") && has("avx512_bw") && has("avx512_vl") && has("avx512_dq");
    c.avx512_bf16 = c.avx512 && has("avx512_bf16");
    c.amx_bf16 = c.avx512 && has("amx_tile") && has("amx_bf16");
    c.amx_fp16 = c.avx512 && has("amx_tile") && has("amx_fp16");
    return c;
  }();
  return caps;
}

// C[M, N] (+)= A[M, K] @ B[K, N] on 16-bit operands with fp32 accumulation and output: A row-major with leading
// dimension lda, B in the VNNI-2 layout [K/2, N, 2] with ldb = N-stride (in element pairs), K even.
template <typename scalar_t>
inline void units_gemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add_c,
                       const scalar_t* a, const scalar_t* b_vnni, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add_c, a, b_vnni, c, /*is_vnni=*/true);
}

// Releases the matrix-unit state (the AMX tile configuration) that units_gemm leaves on the calling thread.
inline void units_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

// A 3 x 5 x 6 product whose exact fp32 result is known: one product is not representable in 16 bits, C starts at a
// value that 16 bits cannot hold, and B is given in the VNNI-2 layout. True iff the ukernel reproduces it exactly.
template <typename scalar_t>
bool units_self_test() {
  constexpr int64_t M = 3, N = 5, K = 6;
  const float eps = std::is_same<scalar_t, at::BFloat16>::value ? 1.0f / 128 : 1.0f / 1024;  // 1 + eps is exact
  float a[M * K], b[K * N];
  for (int64_t i = 0; i < M; ++i)
    for (int64_t k = 0; k < K; ++k) a[i * K + k] = static_cast<float>((i + 2 * k) % 5 - 2);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b[k * N + n] = static_cast<float>((3 * k + n) % 7 - 3);
  a[0] = b[0] = 1.0f + eps;  // (1 + eps)^2 needs more bits than the inputs have
  scalar_t a16[M * K], b16[K * N];
  for (int64_t j = 0; j < M * K; ++j) a16[j] = static_cast<scalar_t>(a[j]);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) b16[((k / 2) * N + n) * 2 + k % 2] = static_cast<scalar_t>(b[k * N + n]);
  const float c0 = 1.0f + 1.0f / 4096;  // not a 16-bit value: a rounded output would lose it
  float c[M * N];
  for (auto& x : c) x = c0;
  try {
    units_gemm<scalar_t>(M, N, K, K, N, N, /*add_c=*/true, a16, b16, c);
    units_release();
  } catch (const c10::Error&) {
    return false;  // e.g. a build without oneDNN's ukernel
  }
  for (int64_t i = 0; i < M; ++i)
    for (int64_t n = 0; n < N; ++n) {
      double want = c0;
      for (int64_t k = 0; k < K; ++k) want += static_cast<double>(a[i * K + k]) * b[k * N + n];
      if (static_cast<double>(c[i * N + n]) != want) return false;
    }
  return true;
}

// Whether this process can run the bf16 / fp16 units path now.
inline bool units_available(at::ScalarType dtype) {
  const CpuCaps& caps = cpu_caps();
  if (!at::globalContext().userEnabledMkldnn()) return false;
  if (dtype == at::kBFloat16) {
    static const bool ok = (caps.amx_bf16 || caps.avx512_bf16) && units_self_test<at::BFloat16>();
    return ok;
  }
  if (dtype == at::kHalf) {
    static const bool ok = caps.amx_fp16 && units_self_test<at::Half>();
    return ok;
  }
  return false;
}

// Why a units path is unavailable, for the error of a forced path.
inline std::string units_missing(at::ScalarType dtype) {
  const CpuCaps& caps = cpu_caps();
  const bool bf16 = dtype == at::kBFloat16;
  if (bf16 ? !(caps.amx_bf16 || caps.avx512_bf16) : !caps.amx_fp16)
    return std::string("this CPU has no ") + (bf16 ? "AMX-BF16 or AVX512-BF16" : "AMX-FP16") +
           " (its level is " + caps.level() + ")";
  if (!at::globalContext().userEnabledMkldnn()) return "oneDNN is disabled (torch.backends.mkldnn.enabled is False)";
  return "oneDNN's brgemm ukernel did not return the exact fp32 product in a self-test (a torch build without it?)";
}

// The paths this process can run for 16-bit inputs, in the order widen, bf16, fp16.
inline std::vector<std::string> available_cpu_paths() {
  std::vector<std::string> paths{"widen"};
  if (units_available(at::kBFloat16)) paths.emplace_back("bf16");
  if (units_available(at::kHalf)) paths.emplace_back("fp16");
  return paths;
}

inline std::string joined(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

// The path of a call with inputs of `dtype` (kWiden for fp32 and fp64, which have no other).
inline CpuPath choose_cpu_path(at::ScalarType dtype) {
  const char* env = std::getenv("LATENTSEEK_CPU_PATH");
  const std::string choice = env && *env ? env : "auto";
  LS_CHECK(choice == "auto" || choice == "widen" || choice == "bf16" || choice == "fp16",
           "LATENTSEEK_CPU_PATH must be auto, widen, bf16 or fp16, got '", choice, "'");
  if (choice == "bf16") {
    LS_CHECK(units_available(at::kBFloat16), "LATENTSEEK_CPU_PATH=bf16 needs bf16 matrix units, but ",
             units_missing(at::kBFloat16), "; the paths this CPU can run are ", joined(available_cpu_paths()));
  }
  if (choice == "fp16") {
    LS_CHECK(units_available(at::kHalf), "LATENTSEEK_CPU_PATH=fp16 needs fp16 matrix units, but ",
             units_missing(at::kHalf), "; the paths this CPU can run are ", joined(available_cpu_paths()));
  }
  if (dtype != at::kBFloat16 && dtype != at::kHalf) return CpuPath::kWiden;
  if (choice == "widen") return CpuPath::kWiden;
  // auto, this dtype's units path (checked above), or a path named for the other 16-bit dtype: the automatic choice.
  if (!units_available(dtype)) return CpuPath::kWiden;
  return dtype == at::kBFloat16 ? CpuPath::kBf16Units : CpuPath::kFp16Units;
}

// The name of the path a call with `dtype` takes: widen, bf16 or fp16 for 16-bit inputs, else fp32 / fp64.
inline std::string cpu_path_name(at::ScalarType dtype) {
  if (dtype == at::kFloat) return "fp32";
  if (dtype == at::kDouble) return "fp64";
  switch (choose_cpu_path(dtype)) {
    case CpuPath::kBf16Units: return "bf16";
    case CpuPath::kFp16Units: return "fp16";
    default: return "widen";
  }
}

}  // namespace latentseek
