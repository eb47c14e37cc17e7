// The per-row state of the one-pass LM-head policy gradient, shared by the CPU and CUDA kernels.
//
// For a row z and a vocabulary slice S of W, with logits l_v = <W_v, z> (+ b_v):
//   m   = max_{v in S} l_v                      (running max, NaN ignored)
//   s   = sum_{v in S} exp(l_v - m)
//   acc = sum_{v in S} exp(l_v - m) * W_v      (an H-vector, kept by the kernels beside this struct)
//   (best, idx) = the largest logit and its lowest index (the argmax, torch.argmax tie rule)
//   nan_idx     = the lowest index of a NaN logit, or -1 (torch.argmax returns it when present)
//   lx          = l_x for a given token x inside S
// Two slices merge by rescaling to the larger max: s = s1 * exp(m1 - m) + s2 * exp(m2 - m), likewise acc.
// At the end: logp = l_x - (m + log s) and grad = -r * (W_x - acc / s).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "latentseek/host_device.h"

namespace latentseek {

template <typename acc_t>
struct RowState {
  acc_t m;          // running max of the logits seen (-inf before any finite or infinite logit)
  acc_t s;          // sum of exp(l - m)
  acc_t best;       // largest logit seen (== m unless NaN appeared)
  int64_t idx;      // index of `best` (lowest on ties)
  int64_t nan_idx;  // lowest index of a NaN logit, or -1
  acc_t lx;         // logit of the given token when it lies in this slice (NaN until seen)

  LS_HOST_DEVICE static RowState empty(int64_t first_index) {
    RowState r;
    r.m = -std::numeric_limits<acc_t>::infinity();
    r.s = acc_t(0);
    r.best = -std::numeric_limits<acc_t>::infinity();
    r.idx = first_index;
    r.nan_idx = -1;
    r.lx = std::numeric_limits<acc_t>::quiet_NaN();
    return r;
  }
};

// exp(a - b) for the rescale factor, defined as 1 when both are -inf (nothing accumulated yet on either side).
template <typename acc_t>
LS_HOST_DEVICE acc_t rescale_factor(acc_t from_max, acc_t to_max) {
  return from_max == to_max ? acc_t(1) : static_cast<acc_t>(std::exp(from_max - to_max));
}

// Merges `b` (a slice of higher vocabulary indices) into `a`. Returns the factors that the two accumulators must
// be multiplied by before they are added: acc = fa * acc_a + fb * acc_b.
template <typename acc_t>
LS_HOST_DEVICE void merge_states(RowState<acc_t>& a, const RowState<acc_t>& b, acc_t& fa, acc_t& fb) {
  const acc_t m = a.m > b.m ? a.m : b.m;  // NaN never enters m
  fa = rescale_factor(a.m, m);
  fb = rescale_factor(b.m, m);
  a.s = a.s * fa + b.s * fb;
  a.m = m;
  if (b.best > a.best) {  // strict: ties keep the lower index, which lives in `a`
    a.best = b.best;
    a.idx = b.idx;
  }
  if (a.nan_idx < 0) a.nan_idx = b.nan_idx;
  if (!(a.lx == a.lx)) a.lx = b.lx;
}

// Entropy of the row's softmax, online (the option entropy=True): beside s, s2 = sum_{v in S} exp(l_v - m) (l_v - m).
// When the max moves from m to m' both are scaled by f = exp(m - m'), and s2 first gains (m - m') s:
//   s2' = f (s2 + (m - m') s).  At the end entropy = log s - s2 / s.
// rescale_s2 is that update (0 while nothing has been accumulated, so that -inf maxima never meet a 0 sum).
template <typename acc_t>
LS_HOST_DEVICE acc_t rescale_s2(acc_t s2, acc_t s, acc_t from_max, acc_t to_max, acc_t factor) {
  if (from_max == to_max) return s2;
  if (s == acc_t(0)) return acc_t(0);
  return factor * (s2 + (from_max - to_max) * s);
}

// Merges (m_b, s_b, s2_b) into (m_a, s_a, s2_a)'s second sum, given the merged max and the factors of merge_states
// (call before merge_states overwrites a.s and a.m): s2 = rescale(s2_a) + rescale(s2_b).
template <typename acc_t>
LS_HOST_DEVICE acc_t merge_s2(acc_t s2_a, acc_t s_a, acc_t m_a, acc_t s2_b, acc_t s_b, acc_t m_b) {
  const acc_t m = m_a > m_b ? m_a : m_b;
  return rescale_s2(s2_a, s_a, m_a, m, rescale_factor(m_a, m)) + rescale_s2(s2_b, s_b, m_b, m, rescale_factor(m_b, m));
}

// -sum p log p = log s - s2 / s (NaN for a row whose s is 0 or NaN).
template <typename acc_t>
LS_HOST_DEVICE acc_t final_entropy(acc_t s, acc_t s2) {
  return static_cast<acc_t>(std::log(s)) - s2 / s;
}

// The chosen token of a finished row: the first NaN if any (as torch.argmax), else the argmax.
template <typename acc_t>
LS_HOST_DEVICE int64_t chosen_token(const RowState<acc_t>& st) {
  return st.nan_idx >= 0 ? st.nan_idx : st.idx;
}

// log p(x) = l_x - logsumexp(l).
template <typename acc_t>
LS_HOST_DEVICE acc_t final_logp(const RowState<acc_t>& st, acc_t lx) {
  return lx - (st.m + static_cast<acc_t>(std::log(st.s)));
}

}  // namespace latentseek
