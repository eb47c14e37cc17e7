// C++ test of the CPU kernel through the dispatcher (the registration Python uses, built by CMake without Python).
//
//   test_lm_head CASES_FILE
//
// Runs the op on cases of every dtype (odd sizes, bias, per-row and scalar rewards, given tokens) and writes each
// case's inputs and outputs to CASES_FILE (torch::pickle_save of a list of dicts). The accuracy verdict is not
// taken here: `python tests/checking.py CASES_FILE` judges the file with the one checker of the project (a float64
// truth and the element-wise bound of tests/checking.py), so the C++ and Python tests cannot drift apart. ctest runs
// the two in order (CMakeLists.txt). This program checks what needs no tolerance: output shapes and dtypes, and
// that bad input gets an error that names the problem.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/serialize.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

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

const c10::TypedOperatorHandle<Op>& op() {
  static auto handle = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("latentseek_ext::lm_head_policy_grad", "")
                           .typed<Op>();
  return handle;
}

enum class Reward { kNone, kScalar, kRows };

struct Case {
  int64_t N, H, V;
  at::ScalarType dtype;
  bool bias, given_tokens;
  Reward reward;
};

c10::IValue optional_value(const std::optional<at::Tensor>& t) { return t ? c10::IValue(*t) : c10::IValue(); }

// Runs one case and returns the record tests/checking.py reads: name, the inputs (reward and tokens None when not
// passed) and the outputs.
c10::impl::GenericDict run_case(const Case& c) {
  at::manual_seed(c.N * 131 + c.V);
  const auto acc = c.dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto hidden = at::randn({c.N, c.H}, at::kDouble).to(c.dtype);
  auto weight = (at::randn({c.V, c.H}, at::kDouble) / std::sqrt(double(c.H)) * 2).to(c.dtype);
  std::optional<at::Tensor> bias, reward, tokens;
  if (c.bias) bias = at::randn({c.V}, at::kDouble).to(c.dtype);
  if (c.reward == Reward::kRows) reward = at::randn({c.N}, acc);
  if (c.reward == Reward::kScalar) reward = at::full({}, -0.75, acc);
  if (c.given_tokens) tokens = at::randint(c.V, {c.N}, at::kLong);
  auto [x, logp, grad] = op().call(hidden, weight, reward, tokens, bias);

  const std::string name = "N=" + std::to_string(c.N) + " H=" + std::to_string(c.H) + " V=" + std::to_string(c.V) +
                           " " + c10::toString(c.dtype) + (c.bias ? " bias" : "") +
                           (c.given_tokens ? " tokens" : "") +
                           (c.reward == Reward::kRows ? " reward[N]" : c.reward == Reward::kScalar ? " reward" : "");
  expect(x.scalar_type() == at::kLong && x.sizes() == at::IntArrayRef{c.N} && logp.scalar_type() == acc &&
             logp.sizes() == at::IntArrayRef{c.N} && grad.scalar_type() == acc && grad.sizes() == hidden.sizes(),
         name + ": output shapes and dtypes");

  c10::impl::GenericDict record(c10::StringType::get(), c10::AnyType::get());
  record.insert("name", c10::IValue(name));
  record.insert("hidden", hidden);
  record.insert("weight", weight);
  record.insert("bias", optional_value(bias));
  record.insert("reward", optional_value(reward));
  record.insert("tokens", optional_value(tokens));
  record.insert("out_tokens", x);
  record.insert("logp", logp);
  record.insert("grad", grad);
  return record;
}

void check_error(const std::string& what, const std::string& needle) {
  try {
    if (what == "H mismatch")
      op().call(at::randn({2, 3}), at::randn({5, 4}), std::nullopt, std::nullopt, std::nullopt);
    if (what == "token range")
      op().call(at::randn({2, 3}), at::randn({5, 3}), std::nullopt, at::tensor({0, 5}, at::kLong), std::nullopt);
    expect(false, what + ": expected an error");
  } catch (const c10::Error& e) {
    expect(std::string(e.what()).find(needle) != std::string::npos, what + ": message names the problem");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s CASES_FILE (the file `python tests/checking.py CASES_FILE` judges)\n", argv[0]);
    return 2;
  }
  const std::vector<Case> cases = {
      {1, 8, 5, at::kFloat, false, false, Reward::kNone},
      {7, 127, 1000, at::kFloat, true, false, Reward::kRows},
      {300, 64, 5003, at::kFloat, true, false, Reward::kRows},
      {9, 896, 3001, at::kBFloat16, true, false, Reward::kRows},
      {9, 896, 3001, at::kHalf, true, false, Reward::kRows},
      {33, 64, 4099, at::kBFloat16, true, true, Reward::kScalar},
      {5, 16, 777, at::kDouble, true, false, Reward::kRows},
  };
  c10::impl::GenericList records(c10::AnyType::get());
  for (const Case& c : cases) records.push_back(run_case(c));
  check_error("H mismatch", "H = hidden.shape[-1] = 3");
  check_error("token range", "tokens must lie in [0, V) = [0, 5)");

  const std::vector<char> bytes = torch::pickle_save(c10::IValue(records));
  std::ofstream out(argv[1], std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  expect(out.good(), std::string("wrote ") + std::to_string(cases.size()) + " cases to " + argv[1]);
  std::printf("%s\n", failures ? "FAILED" : "all passed (the accuracy verdict is tests/checking.py's)");
  return failures ? 1 : 0;
}
