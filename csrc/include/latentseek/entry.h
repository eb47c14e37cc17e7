// The entry points of the ops, written once for every device: the shared checks, the outputs, the dtype switch, the
// reshape to the leading dims, the float-reward overload and lm_head_logprob as the policy gradient with reward -1.
// A device contributes a class (CpuDevice in csrc/cpu, CudaDevice in csrc/cuda) with
//   static void check(const char* op, const LmHeadProblem& p);  // its own checks, after the shared ones
//   struct Guard { explicit Guard(const at::Tensor& hidden); };  // held for the call (e.g. the CUDA device guard)
//   template <typename scalar_t, typename acc_t>
//   static void run(const LmHeadProblem& p, LmHeadOutputs& out);  // fills out; called only when N > 0
// and registers lm_head_policy_grad_entry<Device> and friends in its TORCH_LIBRARY_IMPL.
//
// The options (temperature, sample, entropy, top-k; issue 14) come through the .options overloads only:
// lm_head_policy_grad_options_entry<Device> and lm_head_logprob_options_entry<Device>. A device registers those
// once its run() implements p.opt (checks.h, LmHeadOptions): it then must fill out.entropy / out.topk_logp /
// out.topk_tokens when asked and apply 1 / T to grad. The plain entries never set p.opt, so a device's plain path
// is untouched by the options. A device that does not register the overloads has no kernel for them, and the
// Python wrapper falls back to the reference (impl="auto") or raises (impl="ext").
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <utility>
#include <vector>

#include "latentseek/checks.h"

namespace latentseek {

using LmHeadResult = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
// (tokens / logp / grad in the op's order, entropy, topk_logp, topk_tokens)
using LmHeadOptionsResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The flat outputs a device's run<>() fills.
struct LmHeadOutputs {
  at::Tensor tokens;  // [N] int64
  at::Tensor logp;    // [N], accumulation dtype
  at::Tensor grad;    // [N, H] in the accumulation dtype with the gradient, else [0, 0]
  bool with_grad;
  // Only with options: [N] (accumulation dtype) when p.opt.entropy, else [0]; [N, k] and [N, k] int64 (k = topk,
  // possibly 0). Undefined in the plain ops.
  at::Tensor entropy, topk_logp, topk_tokens;
};

// The options as the schemas pass them.
struct LmHeadOptionArgs {
  double temperature;
  c10::optional<int64_t> seed;
  c10::optional<at::Tensor> offsets;
  bool entropy;
  int64_t topk;
};

// Checks, allocates and runs one call: grad = -reward_scale * reward * d logp / d hidden, or an empty grad without
// it; the options only where `options` is given. Returns the problem (for its leading dims) and the flat outputs.
template <typename Device>
std::pair<LmHeadProblem, LmHeadOutputs> lm_head_compute(const char* op, const at::Tensor& hidden,
                                                        const at::Tensor& weight,
                                                        const c10::optional<at::Tensor>& reward,
                                                        const c10::optional<at::Tensor>& tokens,
                                                        const c10::optional<at::Tensor>& bias, double reward_scale,
                                                        bool with_grad, const LmHeadOptionArgs* options) {
  // The op is a leaf of autograd (lm_head_logprob's backward is registered in Python), but the dispatcher runs the
  // kernel below the autograd key with grad mode as the caller left it. Nothing in here may record a graph: the
  // out= products refuse inputs that require grad, and worker threads (at::parallel_for) do not see this thread's
  // grad mode, hence detached inputs as well as the guard.
  const at::NoGradGuard no_grad;
  const auto detached = [](const c10::optional<at::Tensor>& t) {
    return t.has_value() ? c10::optional<at::Tensor>(t->detach()) : c10::optional<at::Tensor>();
  };
  // The shared checks name the argument on the wrong device; they run before the device's own checks so that every
  // device gives the same message for the same mistake.
  LmHeadProblem p =
      check_lm_head_inputs(op, hidden.detach(), weight.detach(), detached(reward), detached(tokens), detached(bias));
  p.reward_scale = reward_scale;
  if (options) {
    check_lm_head_options(op, p, options->temperature, options->seed, options->offsets, options->entropy,
                          options->topk);
  }
  Device::check(op, p);
  const typename Device::Guard guard(hidden);

  const auto acc = acc_dtype(hidden.scalar_type());
  LmHeadOutputs out{at::empty({p.N}, hidden.options().dtype(at::kLong)),
                    at::empty({p.N}, hidden.options().dtype(acc)),
                    at::empty({with_grad ? p.N : 0, with_grad ? p.H : 0}, hidden.options().dtype(acc)), with_grad};
  if (options) {
    out.entropy = at::empty({p.opt.entropy ? p.N : 0}, hidden.options().dtype(acc));
    out.topk_logp = at::empty({p.N, p.opt.topk}, hidden.options().dtype(acc));
    out.topk_tokens = at::empty({p.N, p.opt.topk}, hidden.options().dtype(at::kLong));
  }
  if (p.N > 0) {
    switch (hidden.scalar_type()) {
      case at::kBFloat16: Device::template run<at::BFloat16, float>(p, out); break;
      case at::kHalf: Device::template run<at::Half, float>(p, out); break;
      case at::kFloat: Device::template run<float, float>(p, out); break;
      case at::kDouble: Device::template run<double, double>(p, out); break;
      default: LS_CHECK(false, op, ": unsupported dtype ", hidden.scalar_type());
    }
  }
  return {std::move(p), std::move(out)};
}

// The outputs in the shape of the leading dims: tokens, logp, grad (or an empty [0] grad), and with options entropy
// ([*] or an empty [0]), topk_logp and topk_tokens ([*, k]).
inline LmHeadOptionsResult shaped_outputs(const LmHeadProblem& p, const LmHeadOutputs& out) {
  std::vector<int64_t> grad_shape = p.lead;
  grad_shape.push_back(p.H);
  at::Tensor grad = out.with_grad ? out.grad.view(grad_shape) : out.grad.view({0});
  if (!out.entropy.defined()) return {out.tokens.view(p.lead), out.logp.view(p.lead), grad, {}, {}, {}};
  std::vector<int64_t> topk_shape = p.lead;
  topk_shape.push_back(p.opt.topk);
  return {out.tokens.view(p.lead),
          out.logp.view(p.lead),
          grad,
          p.opt.entropy ? out.entropy.view(p.lead) : out.entropy,
          out.topk_logp.view(topk_shape),
          out.topk_tokens.view(topk_shape)};
}

// (tokens, logp, grad) with grad = -reward_scale * reward * d logp / d hidden, or an empty [0] grad without it.
template <typename Device>
LmHeadResult lm_head_entry(const char* op, const at::Tensor& hidden, const at::Tensor& weight,
                           const c10::optional<at::Tensor>& reward, const c10::optional<at::Tensor>& tokens,
                           const c10::optional<at::Tensor>& bias, double reward_scale, bool with_grad) {
  auto [p, out] = lm_head_compute<Device>(op, hidden, weight, reward, tokens, bias, reward_scale, with_grad, nullptr);
  auto [x, logp, grad, e, tl, tt] = shaped_outputs(p, out);
  return {x, logp, grad};
}

// lm_head_policy_grad(hidden, weight, reward=None, tokens=None, bias=None)
template <typename Device>
LmHeadResult lm_head_policy_grad_entry(const at::Tensor& hidden, const at::Tensor& weight,
                                       const c10::optional<at::Tensor>& reward,
                                       const c10::optional<at::Tensor>& tokens,
                                       const c10::optional<at::Tensor>& bias) {
  return lm_head_entry<Device>("lm_head_policy_grad", hidden, weight, reward, tokens, bias, 1.0, /*with_grad=*/true);
}

// lm_head_policy_grad.float_reward(hidden, weight, float reward, tokens=None, bias=None): the reward as a number
// (a Python float), which reaches the kernels as a scale: no tensor, no host-to-device copy per call.
template <typename Device>
LmHeadResult lm_head_policy_grad_float_reward_entry(const at::Tensor& hidden, const at::Tensor& weight, double reward,
                                                    const c10::optional<at::Tensor>& tokens,
                                                    const c10::optional<at::Tensor>& bias) {
  return lm_head_entry<Device>("lm_head_policy_grad", hidden, weight, c10::nullopt, tokens, bias, reward,
                               /*with_grad=*/true);
}

// lm_head_logprob(hidden, weight, tokens=None, bias=None, with_grad=True) -> (logp, tokens, dlogp_dhidden):
// d logp / d hidden is the policy gradient with reward -1.
template <typename Device>
LmHeadResult lm_head_logprob_entry(const at::Tensor& hidden, const at::Tensor& weight,
                                   const c10::optional<at::Tensor>& tokens, const c10::optional<at::Tensor>& bias,
                                   bool with_grad) {
  auto [x, logp, dlogp] =
      lm_head_entry<Device>("lm_head_logprob", hidden, weight, c10::nullopt, tokens, bias, -1.0, with_grad);
  return {logp, x, dlogp};  // the schema's order: logp leads
}

// lm_head_policy_grad.options(hidden, weight, reward=None, reward_scale=1., tokens=None, bias=None,
//                             temperature=1., seed=None, offsets=None, entropy=False, topk=0)
//   -> (tokens, logp, grad, entropy, topk_logp, topk_tokens)
template <typename Device>
LmHeadOptionsResult lm_head_policy_grad_options_entry(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& reward, double reward_scale,
    const c10::optional<at::Tensor>& tokens, const c10::optional<at::Tensor>& bias, double temperature,
    c10::optional<int64_t> seed, const c10::optional<at::Tensor>& offsets, bool entropy, int64_t topk) {
  const LmHeadOptionArgs options{temperature, seed, offsets, entropy, topk};
  auto [p, out] = lm_head_compute<Device>("lm_head_policy_grad", hidden, weight, reward, tokens, bias, reward_scale,
                                          /*with_grad=*/true, &options);
  return shaped_outputs(p, out);
}

// lm_head_logprob.options(hidden, weight, tokens=None, bias=None, with_grad=True, temperature=1., seed=None,
//                         offsets=None, entropy=False, topk=0)
//   -> (logp, tokens, dlogp_dhidden, entropy, topk_logp, topk_tokens)
template <typename Device>
LmHeadOptionsResult lm_head_logprob_options_entry(const at::Tensor& hidden, const at::Tensor& weight,
                                                  const c10::optional<at::Tensor>& tokens,
                                                  const c10::optional<at::Tensor>& bias, bool with_grad,
                                                  double temperature, c10::optional<int64_t> seed,
                                                  const c10::optional<at::Tensor>& offsets, bool entropy,
                                                  int64_t topk) {
  const LmHeadOptionArgs options{temperature, seed, offsets, entropy, topk};
  auto [p, out] = lm_head_compute<Device>("lm_head_logprob", hidden, weight, c10::nullopt, tokens, bias, -1.0,
                                          with_grad, &options);
  auto [x, logp, dlogp, e, tl, tt] = shaped_outputs(p, out);
  return {logp, x, dlogp, e, tl, tt};
}

}  // namespace latentseek
