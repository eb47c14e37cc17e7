// The Gumbel noise of sample=True, written once for the CPU and CUDA kernels (host + device inline functions) and
// mirrored bit for bit by latentseek_ext/reference.py (philox4x32, gumbel_uniform). Row n's noise depends only on
// (seed, offset_n, v), never on N, the row's position or the device:
//
//   bits(seed, o, v) = lane v % 4 of Philox4x32-10(key = (seed mod 2^32, seed >> 32),
//                                                   counter = (v >> 2, o mod 2^32, o >> 32, 0))
//   u = ((bits >> 9) + 1/2) * 2^-23       exact in float32 (an odd 24-bit integer times a power of two), in (0, 1)
//   g = -log(-log(u))                     float32, < kGumbelBound
//
// Why 23 bits and not 24: ((bits >> 8) + 1/2) * 2^-24 has 25 significant bits; float32 would round the largest u to
// exactly 1 and its noise to +inf.
//
// A kernel may skip the noise of an entry v whose scaled logit l'_v satisfies l'_v + kGumbelBound < the best
// perturbed score of its row so far: no noise can lift it to the maximum.
#pragma once

#include <cmath>
#include <cstdint>

#include "latentseek/host_device.h"

namespace latentseek {

// Philox4x32-10's constants (Salmon et al., SC 2011; the same as Random123, curand and torch).
constexpr uint32_t kPhiloxM0 = 0xD2511F53u, kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u, kPhiloxW1 = 0xBB67AE85u;
constexpr int kPhiloxRounds = 10;
// The random bits per uniform (see the header comment).
constexpr int kUniformBits = 23;
// An upper bound of g computed in float32 by any faithful logf: the exact maximum is
// -log(-log(1 - 2^-24)) = 16.6355..., and a few ulp of rounding stay far below the margin.
constexpr float kGumbelBound = 16.75f;

LS_HOST_DEVICE uint32_t philox_mulhi(uint32_t a, uint32_t b, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  lo = static_cast<uint32_t>(p);
  return static_cast<uint32_t>(p >> 32);
}

// Philox4x32-10 of counter c under key (k0, k1), in place: c becomes the four random 32-bit lanes.
LS_HOST_DEVICE void philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1) {
  for (int r = 0; r < kPhiloxRounds; ++r) {
    if (r) {
      k0 += kPhiloxW0;
      k1 += kPhiloxW1;
    }
    uint32_t lo0, lo1;
    const uint32_t hi0 = philox_mulhi(kPhiloxM0, c[0], lo0);
    const uint32_t hi1 = philox_mulhi(kPhiloxM1, c[2], lo1);
    const uint32_t c1 = c[1], c3 = c[3];
    c[0] = hi1 ^ c1 ^ k0;
    c[1] = lo1;
    c[2] = hi0 ^ c3 ^ k1;
    c[3] = lo0;
  }
}

// The bits of the four entries v = 4 * group .. 4 * group + 3 of the row with this offset (lane j: v = 4 group + j).
LS_HOST_DEVICE void philox_group(uint64_t seed, uint64_t offset, uint64_t group, uint32_t out[4]) {
  out[0] = static_cast<uint32_t>(group);
  out[1] = static_cast<uint32_t>(offset);
  out[2] = static_cast<uint32_t>(offset >> 32);
  out[3] = 0;
  philox4x32_10(out, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// bits(seed, offset, v) of one entry (a kernel that walks v in order uses philox_group once per four entries).
LS_HOST_DEVICE uint32_t philox_bits(uint64_t seed, uint64_t offset, uint64_t v) {
  uint32_t lanes[4];
  philox_group(seed, offset, v >> 2, lanes);
  return lanes[v & 3];
}

// u = ((bits >> 9) + 1/2) 2^-23 = (2 (bits >> 9) + 1) 2^-24: the int-to-float conversion of an odd integer below
// 2^24 and the power-of-two scale are both exact.
LS_HOST_DEVICE float uniform_from_bits(uint32_t bits) {
  return static_cast<float>(static_cast<int32_t>(((bits >> (32 - kUniformBits)) << 1) | 1u)) * 5.9604644775390625e-8f;
}

// -log(u) for u in (0, 1), accurate to a few ulp relative everywhere: above 1/2, 1 - u is exact (Sterbenz) and
// log1p keeps the small result accurate, where log(u) under a fast-math logf (CUDA's __logf) would not.
LS_HOST_DEVICE float neg_log_uniform(float u) { return u > 0.5f ? -::log1pf(u - 1.0f) : -::logf(u); }

// g = -log(-log(u)), the Gumbel noise of one entry.
LS_HOST_DEVICE float gumbel_from_uniform(float u) { return -::logf(neg_log_uniform(u)); }

LS_HOST_DEVICE float gumbel_noise(uint64_t seed, uint64_t offset, uint64_t v) {
  return gumbel_from_uniform(uniform_from_bits(philox_bits(seed, offset, v)));
}

}  // namespace latentseek
