// C++ test of the CPU kernel through the dispatcher (the registration Python uses, built by CMake without Python).
//
//   test_lm_head CASES_FILE
//
// Runs the op on cases of every dtype (odd sizes, bias, per-row and scalar rewards, given tokens) and writes each
// case's inputs and outputs to CASES_FILE (torch::pickle_save of a list of dicts). The accuracy verdict is not
// taken here: `python tests/checking.py CASES_FILE` judges the file with the one checker of the project (a float64
// truth and the element-wise bound of tests/checking.py), so the C++ and Python tests cannot drift apart. ctest runs
// the two in order (CMakeLists.txt). This program checks what needs no tolerance: output shapes and dtypes, and
// that bad input gets an error that names the problem; and for the options (issue 14) the Philox known answers, the
// gumbel_uniform op against latentseek/sampling.h, the .options overload's shapes and its errors.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/serialize.h>

#include <cmath>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include "latentseek/sampling.h"

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

// The options (issue 14), checks that need no tolerance (their accuracy is judged by tests/test_op_options.py):
// Random123's known answers of the one Philox definition (latentseek/sampling.h), the gumbel_uniform op against it,
// the .options overload's output shapes and dtypes, and its errors.
void check_options() {
  const uint32_t m = 0xffffffffu;
  const uint32_t kat[3][10] = {
      {0, 0, 0, 0, 0, 0, 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
      {m, m, m, m, m, m, 0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
      {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u, 0xd16cfe09u, 0x94fdccebu,
       0x5001e420u, 0x24126ea1u},
  };
  for (const auto& k : kat) {
    uint32_t c[4] = {k[0], k[1], k[2], k[3]};
    latentseek::philox4x32_10(c, k[4], k[5]);
    expect(c[0] == k[6] && c[1] == k[7] && c[2] == k[8] && c[3] == k[9], "Philox4x32-10 known answer");
  }

  const uint64_t seed = (uint64_t(1) << 40) + 17;
  const auto offsets = at::tensor({int64_t(0), int64_t(3), (int64_t(1) << 45) + 1}, at::kLong);
  const auto uniform = c10::Dispatcher::singleton().findSchemaOrThrow("latentseek_ext::gumbel_uniform", "")
                           .typed<at::Tensor(int64_t, const at::Tensor&, int64_t)>();
  const at::Tensor u = uniform.call(static_cast<int64_t>(seed), offsets, 11);
  bool same = u.scalar_type() == at::kFloat && u.sizes() == at::IntArrayRef{3, 11};
  for (int64_t n = 0; same && n < 3; ++n)
    for (int64_t v = 0; v < 11; ++v) {
      const float want = latentseek::uniform_from_bits(
          latentseek::philox_bits(seed, static_cast<uint64_t>(offsets[n].item<int64_t>()), static_cast<uint64_t>(v)));
      const float got = u[n][v].item<float>();
      same = same && got == want && got > 0.0f && got < 1.0f;
    }
  expect(same, "gumbel_uniform op = sampling.h's uniforms, in (0, 1)");

  using OptionsOp = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
      const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, double, const std::optional<at::Tensor>&,
      const std::optional<at::Tensor>&, double, std::optional<int64_t>, const std::optional<at::Tensor>&, bool,
      int64_t);
  const auto options = c10::Dispatcher::singleton()
                           .findSchemaOrThrow("latentseek_ext::lm_head_policy_grad", "options")
                           .typed<OptionsOp>();
  const auto hidden = at::randn({2, 3, 16}), weight = at::randn({50, 16});
  auto [x, logp, grad, entropy, topk_logp, topk_tokens] =
      options.call(hidden, weight, std::nullopt, 0.5, std::nullopt, std::nullopt, 0.7, int64_t(9), std::nullopt,
                   true, 4);
  expect(x.sizes() == at::IntArrayRef{2, 3} && x.scalar_type() == at::kLong && grad.sizes() == hidden.sizes() &&
             entropy.sizes() == at::IntArrayRef{2, 3} && entropy.scalar_type() == at::kFloat &&
             topk_logp.sizes() == at::IntArrayRef{2, 3, 4} && topk_tokens.scalar_type() == at::kLong &&
             topk_tokens.sizes() == at::IntArrayRef{2, 3, 4},
         "options: output shapes and dtypes");
  expect(at::isfinite(entropy).all().item<bool>() && (entropy >= 0).all().item<bool>() &&
             (topk_logp.select(-1, 0) >= topk_logp.select(-1, 3)).all().item<bool>(),
         "options: entropy finite and >= 0, top-k descending");
  const auto error_of = [&](double temperature, std::optional<int64_t> seed_arg, int64_t topk) -> std::string {
    try {
      options.call(hidden, weight, std::nullopt, 1.0, std::nullopt, std::nullopt, temperature, seed_arg,
                   std::nullopt, false, topk);
    } catch (const c10::Error& e) {
      return e.what();
    }
    return "";
  };
  expect(error_of(0.0, std::nullopt, 0).find("temperature must be finite and > 0, got 0") != std::string::npos,
         "options: temperature 0 is an error that says so");
  expect(error_of(1.0, std::nullopt, 33).find("topk must lie in [0, min(32, V)] = [0, 32], got 33") !=
             std::string::npos,
         "options: topk 33 is an error that says so");
  expect(error_of(1.0, int64_t(-1), 0).find("seed must lie in [0, 2**63), got -1") != std::string::npos,
         "options: a negative seed is an error that says so");
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
  check_options();

  const std::vector<char> bytes = torch::pickle_save(c10::IValue(records));
  std::ofstream out(argv[1], std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  expect(out.good(), std::string("wrote ") + std::to_string(cases.size()) + " cases to " + argv[1]);
  std::printf("%s\n", failures ? "FAILED" : "all passed (the accuracy verdict is tests/checking.py's)");
  return failures ? 1 : 0;
}
