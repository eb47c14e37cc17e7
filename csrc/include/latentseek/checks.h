// Input validation shared by the CPU and CUDA kernels. Every message names the argument, what was expected and what
// came, so that a user who passes the wrong thing learns which thing and why without reading this file.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#define LS_CHECK(cond, ...) TORCH_CHECK(cond, "latentseek_ext: ", __VA_ARGS__)

namespace latentseek {

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline bool supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// Accumulation / output dtype: float32 for every input dtype except float64, which stays float64 (so that
// gradcheck in double precision is meaningful).
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The largest k of the top-k option.
constexpr int64_t kMaxTopK = 32;

// The options of the .options overloads (issue 14), all off for the plain ops. A device's run() applies them:
//   l' = l / T (the softmax, logp, entropy and top-k use l'; the greedy token stays argmax l; grad gains 1 / T),
//   sample: tokens = argmax_v (l'_v + g_v) with g of latentseek/sampling.h (seed, offsets[n] or n, v),
//   entropy: -sum p log p of softmax(l') into LmHeadOutputs::entropy,
//   topk: the k largest l' - logsumexp(l') and their tokens (ties: lower index first) into topk_logp / topk_tokens.
// A row with a NaN or +inf logit gets NaN entropy and topk_logp, topk_tokens 0..k-1 and the plain token rule.
struct LmHeadOptions {
  double temperature = 1;
  bool sample = false;
  uint64_t seed = 0;   // in [0, 2^63)
  at::Tensor offsets;  // [N] int64 contiguous (values >= 0), or undefined: row n uses offset n
  bool entropy = false;
  int64_t topk = 0;  // 0, or 1..min(kMaxTopK, V)

  bool any() const { return temperature != 1 || sample || entropy || topk > 0; }
};

// The validated, flattened view of one call: hidden as [N, H], reward and tokens per row (or undefined).
struct LmHeadProblem {
  at::Tensor hidden;   // [N, H], stride(-1) == 1
  at::Tensor weight;   // [V, H], contiguous
  at::Tensor bias;     // [V] contiguous, or undefined
  at::Tensor reward;   // [N] contiguous or 0-d (one for every row), in the accumulation dtype; or undefined (1)
  double reward_scale = 1;  // multiplies reward: a float reward passed as a number, -1 for lm_head_logprob
  at::Tensor tokens;   // [N] int64 contiguous, or undefined (argmax); its range is checked by check_token_range
  std::vector<int64_t> lead;  // hidden.shape[:-1]
  int64_t N = 0, H = 0, V = 0;
  LmHeadOptions opt;  // set by check_lm_head_options (the .options overloads); all off otherwise
};

// Checks every argument of lm_head_policy_grad / lm_head_logprob and flattens the leading dimensions.
inline LmHeadProblem check_lm_head_inputs(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                                          const c10::optional<at::Tensor>& reward,
                                          const c10::optional<at::Tensor>& tokens,
                                          const c10::optional<at::Tensor>& bias) {
  LmHeadProblem p;
  LS_CHECK(hidden.defined() && weight.defined(), op, ": hidden and weight are required");
  LS_CHECK(hidden.dim() >= 1, op, ": hidden must have shape [*, H] (at least 1 dimension), got a 0-d tensor");
  LS_CHECK(weight.dim() == 2, op, ": weight must have shape [V, H] (2 dimensions), got shape ",
           shape_str(weight.sizes()));
  LS_CHECK(supported_float(hidden.scalar_type()), op,
           ": hidden must be float32, bfloat16, float16 or float64, got ", hidden.scalar_type());
  LS_CHECK(weight.scalar_type() == hidden.scalar_type(), op, ": weight must have hidden's dtype (",
           hidden.scalar_type(), "), got ", weight.scalar_type());
  LS_CHECK(weight.device() == hidden.device(), op, ": weight must be on hidden's device (", hidden.device(),
           "), got ", weight.device());
  p.H = hidden.size(-1);
  p.V = weight.size(0);
  LS_CHECK(weight.size(1) == p.H, op, ": weight must have shape [V, H] with H = hidden.shape[-1] = ", p.H,
           ", got shape ", shape_str(weight.sizes()));
  LS_CHECK(p.V > 0, op, ": weight must have at least one row (V > 0), got shape ", shape_str(weight.sizes()));
  auto lead = hidden.sizes().slice(0, hidden.dim() - 1);
  p.lead.assign(lead.begin(), lead.end());
  p.N = c10::multiply_integers(lead);

  p.hidden = hidden.reshape({p.N, p.H});
  if (p.hidden.stride(-1) != 1 || (p.N > 1 && p.hidden.stride(0) < p.H)) p.hidden = p.hidden.contiguous();
  p.weight = weight.contiguous();

  if (bias.has_value() && bias->defined()) {
    const auto& b = *bias;
    LS_CHECK(b.dim() == 1 && b.size(0) == p.V, op, ": bias must have shape [V] = [", p.V, "], got shape ",
             shape_str(b.sizes()));
    LS_CHECK(b.scalar_type() == hidden.scalar_type(), op, ": bias must have hidden's dtype (", hidden.scalar_type(),
             "), got ", b.scalar_type());
    LS_CHECK(b.device() == hidden.device(), op, ": bias must be on hidden's device (", hidden.device(), "), got ",
             b.device());
    p.bias = b.contiguous();
  }

  if (reward.has_value() && reward->defined()) {
    const auto& r = *reward;
    LS_CHECK(at::isFloatingType(r.scalar_type()), op, ": reward must be a floating-point tensor, got ",
             r.scalar_type());
    LS_CHECK(r.device() == hidden.device(), op, ": reward must be on hidden's device (", hidden.device(), "), got ",
             r.device());
    LS_CHECK(r.dim() == 0 || r.sizes() == lead, op, ": reward must be a scalar or have shape hidden.shape[:-1] = ",
             shape_str(lead), ", got shape ", shape_str(r.sizes()));
    // A 0-d reward stays 0-d: the kernels read it for every row, so no per-call expand-and-copy.
    p.reward = r.to(acc_dtype(hidden.scalar_type()));
    if (p.reward.dim() > 0) p.reward = p.reward.reshape({p.N}).contiguous();
  }

  if (tokens.has_value() && tokens->defined()) {
    const auto& t = *tokens;
    LS_CHECK(t.scalar_type() == at::kLong, op, ": tokens must be int64, got ", t.scalar_type());
    LS_CHECK(t.device() == hidden.device(), op, ": tokens must be on hidden's device (", hidden.device(), "), got ",
             t.device());
    LS_CHECK(t.sizes() == lead, op, ": tokens must have shape hidden.shape[:-1] = ", shape_str(lead),
             ", got shape ", shape_str(t.sizes()));
    p.tokens = t.reshape({p.N}).contiguous();
  }
  return p;
}

// Checks the options of the .options overloads (after check_lm_head_inputs) and stores them in p.opt. A seed means
// sample=True (the Python wrapper passes one only then).
inline void check_lm_head_options(const char* op, LmHeadProblem& p, double temperature,
                                  const c10::optional<int64_t>& seed, const c10::optional<at::Tensor>& offsets,
                                  bool entropy, int64_t topk) {
  LS_CHECK(std::isfinite(temperature) && temperature > 0, op, ": temperature must be finite and > 0, got ",
           temperature);
  const int64_t kmax = std::min(kMaxTopK, p.V);
  LS_CHECK(topk >= 0 && topk <= kmax, op, ": topk must lie in [0, min(", kMaxTopK, ", V)] = [0, ", kmax, "], got ",
           topk);
  p.opt.temperature = temperature;
  p.opt.entropy = entropy;
  p.opt.topk = topk;
  if (seed.has_value()) {
    LS_CHECK(*seed >= 0, op, ": seed must lie in [0, 2**63), got ", *seed);
    LS_CHECK(!p.tokens.defined(), op, ": sampling (a seed) draws the tokens, so tokens must be None, got a tensor");
    p.opt.sample = true;
    p.opt.seed = static_cast<uint64_t>(*seed);
  }
  if (offsets.has_value() && offsets->defined()) {
    const auto& o = *offsets;
    LS_CHECK(p.opt.sample, op, ": offsets are only used when sampling (with a seed), got offsets without a seed");
    LS_CHECK(o.scalar_type() == at::kLong, op, ": offsets must be int64, got ", o.scalar_type());
    LS_CHECK(o.device() == p.hidden.device(), op, ": offsets must be on hidden's device (", p.hidden.device(),
             "), got ", o.device());
    LS_CHECK(o.sizes() == at::IntArrayRef(p.lead), op, ": offsets must have shape hidden.shape[:-1] = ",
             shape_str(p.lead), ", got shape ", shape_str(o.sizes()));
    p.opt.offsets = o.detach().reshape({p.N}).contiguous();
  }
}

// offsets >= 0, read on the host (free on the CPU; a device would check on the device instead).
inline void check_offsets_range(const char* op, const LmHeadProblem& p) {
  if (!p.opt.offsets.defined() || p.N == 0) return;
  const int64_t lo = p.opt.offsets.min().item<int64_t>();
  LS_CHECK(lo >= 0, op, ": offsets must be >= 0, got a minimum of ", lo);
}

// The range of the given tokens, read on the host: free on the CPU, a device sync elsewhere (the CUDA kernels check
// each token on the device instead, csrc/cuda/common.cuh). An out-of-range token would read outside W.
inline void check_token_range(const char* op, const LmHeadProblem& p) {
  if (!p.tokens.defined() || p.N == 0) return;
  auto mm = at::aminmax(p.tokens);
  const int64_t lo = std::get<0>(mm).item<int64_t>(), hi = std::get<1>(mm).item<int64_t>();
  LS_CHECK(lo >= 0 && hi < p.V, op, ": tokens must lie in [0, V) = [0, ", p.V, "), got values in [", lo, ", ", hi,
           "]");
}

// reward_scale * reward, one value per row ([N] contiguous), for kernels that read reward[n]; undefined when every
// row's factor is 1.
inline at::Tensor reward_per_row(const LmHeadProblem& p) {
  if (!p.reward.defined()) {
    if (p.reward_scale == 1) return at::Tensor();
    return at::full({p.N}, p.reward_scale, p.hidden.options().dtype(acc_dtype(p.hidden.scalar_type())));
  }
  at::Tensor r = p.reward_scale == 1 ? p.reward : p.reward * p.reward_scale;
  return r.expand({p.N}).contiguous();
}

}  // namespace latentseek
