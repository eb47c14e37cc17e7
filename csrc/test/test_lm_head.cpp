// C++ test of the CPU kernel through the dispatcher (the same registration Python uses), against a
// materialised float64 computation with ATen.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cmath>
#include <cstdio>
#include <string>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

using Op = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                         const std::optional<at::Tensor>&,
                                                         const std::optional<at::Tensor>&,
                                                         const std::optional<at::Tensor>&);

void check_case(int64_t N, int64_t H, int64_t V, at::ScalarType dtype, double tol) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("latentseek_ext::lm_head_policy_grad", "")
                       .typed<Op>();
  at::manual_seed(N * 131 + V);
  auto hidden = at::randn({N, H}, at::kDouble).to(dtype);
  auto weight = (at::randn({V, H}, at::kDouble) / std::sqrt(double(H)) * 2).to(dtype);
  auto bias = at::randn({V}, at::kDouble).to(dtype);
  auto reward = at::randn({N}, at::kFloat);
  auto [tokens, logp, grad] = op.call(hidden, weight, reward, std::nullopt, bias);

  auto z = hidden.to(at::kDouble), w = weight.to(at::kDouble);
  auto logits = at::addmm(bias.to(at::kDouble), z, w.t());
  auto x = logits.argmax(-1);
  auto want_logp = logits.gather(1, x.unsqueeze(1)).squeeze(1) - logits.logsumexp(-1);
  auto want_grad = -reward.to(at::kDouble).unsqueeze(1) * (w.index_select(0, x) - at::softmax(logits, -1).mm(w));

  const std::string name = "N=" + std::to_string(N) + " H=" + std::to_string(H) + " V=" + std::to_string(V) + " " +
                           std::string(c10::toString(dtype));
  expect(at::equal(tokens, x), name + ": tokens are the argmax");
  expect((logp.to(at::kDouble) - want_logp).abs().max().item<double>() < tol, name + ": logp");
  expect((grad.to(at::kDouble) - want_grad).abs().max().item<double>() < tol, name + ": grad");
}

void check_error(const std::string& what, const std::string& needle) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("latentseek_ext::lm_head_policy_grad", "")
                       .typed<Op>();
  try {
    if (what == "H mismatch") op.call(at::randn({2, 3}), at::randn({5, 4}), std::nullopt, std::nullopt, std::nullopt);
    if (what == "token range")
      op.call(at::randn({2, 3}), at::randn({5, 3}), std::nullopt, at::tensor({0, 5}, at::kLong), std::nullopt);
    expect(false, what + ": expected an error");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos, what + ": message names the problem");
  }
}

}  // namespace

int main() {
  check_case(1, 8, 5, at::kFloat, 1e-5);
  check_case(7, 127, 1000, at::kFloat, 1e-5);
  check_case(300, 64, 5003, at::kFloat, 1e-5);
  check_case(9, 64, 3001, at::kBFloat16, 1e-4);
  check_case(9, 64, 3001, at::kHalf, 1e-4);
  check_case(5, 16, 777, at::kDouble, 1e-12);
  check_error("H mismatch", "H = hidden.shape[-1] = 3");
  check_error("token range", "tokens must lie in [0, V) = [0, 5)");
  std::printf("%s\n", failures ? "FAILED" : "all passed");
  return failures ? 1 : 0;
}
