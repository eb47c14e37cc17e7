// Input validation shared by the CPU and CUDA kernels. Every message names the argument, what was expected and what
// came, so that a user who passes the wrong thing learns which thing and why without reading this file.
#pragma once

#include <ATen/ATen.h>

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
