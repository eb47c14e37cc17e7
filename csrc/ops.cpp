// Every schema of latentseek_ext in one place. The kernels register themselves per device in csrc/cpu and
// csrc/cuda; the Python side (latentseek_ext/ops.py) adds fake (meta) kernels and autograd.
#include <torch/library.h>

#ifndef LATENTSEEK_NO_PYTHON
#include <Python.h>

extern "C" {
// Importing latentseek_ext._C runs the static TORCH_LIBRARY registrations below; the module itself is empty.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
#endif  // LATENTSEEK_NO_PYTHON (the C++ tests link the kernels without Python)

TORCH_LIBRARY(latentseek_ext, m) {
  // tokens: given or argmax(l); logp = l[tokens] - logsumexp(l); grad = -reward * d logp / d hidden.
  m.def(
      "lm_head_policy_grad(Tensor hidden, Tensor weight, Tensor? reward=None, Tensor? tokens=None, "
      "Tensor? bias=None) -> (Tensor tokens, Tensor logp, Tensor grad)");
  // The same with the reward as a number (a Python float): it reaches the kernels as a scale, so a call costs no
  // reward tensor and no host-to-device copy.
  m.def(
      "lm_head_policy_grad.float_reward(Tensor hidden, Tensor weight, float reward, Tensor? tokens=None, "
      "Tensor? bias=None) -> (Tensor tokens, Tensor logp, Tensor grad)");
  // The same forward; dlogp_dhidden = d logp / d hidden when with_grad, else an empty [0] tensor. Its autograd
  // backward (latentseek_ext/ops.py) scales dlogp_dhidden by the incoming gradient: no second vocabulary pass.
  // logp comes first: the one differentiable output leads (torch.library.opcheck sums the outputs in order).
  m.def(
      "lm_head_logprob(Tensor hidden, Tensor weight, Tensor? tokens=None, Tensor? bias=None, "
      "bool with_grad=True) -> (Tensor logp, Tensor tokens, Tensor dlogp_dhidden)");
  // The options of issue 14 (latentseek_ext/ops.py has the math): temperature T (softmax of logits / T, grad / T),
  // sampling by Gumbel-max when a seed is given (noise of latentseek/sampling.h from seed and offsets, default the
  // row index), the entropy of softmax(logits / T) and the top-k log-probabilities with their tokens. entropy is an
  // empty [0] when not asked; topk_logp / topk_tokens have shape [*, topk]. reward_scale multiplies reward (a Python
  // float reward travels as reward_scale with reward None). Not differentiable except logprob's logp, as above.
  m.def(
      "lm_head_policy_grad.options(Tensor hidden, Tensor weight, Tensor? reward=None, float reward_scale=1., "
      "Tensor? tokens=None, Tensor? bias=None, float temperature=1., int? seed=None, Tensor? offsets=None, "
      "bool entropy=False, int topk=0) -> (Tensor tokens, Tensor logp, Tensor grad, Tensor entropy, "
      "Tensor topk_logp, Tensor topk_tokens)");
  m.def(
      "lm_head_logprob.options(Tensor hidden, Tensor weight, Tensor? tokens=None, Tensor? bias=None, "
      "bool with_grad=True, float temperature=1., int? seed=None, Tensor? offsets=None, bool entropy=False, "
      "int topk=0) -> (Tensor logp, Tensor tokens, Tensor dlogp_dhidden, Tensor entropy, Tensor topk_logp, "
      "Tensor topk_tokens)");
  // The sampler's uniforms u [N, V] float32 of rows with these offsets (latentseek/sampling.h): the test that the
  // reference's Philox gives bitwise the same numbers.
  m.def("gumbel_uniform(int seed, Tensor offsets, int V) -> Tensor");
  // The CPU kernel's paths for 16-bit inputs (latentseek/cpu_paths.h): those this machine can run (widen, bf16,
  // fp16), and the one a call in `dtype` takes now (LATENTSEEK_CPU_PATH or the automatic choice; fp32 / fp64 for
  // those dtypes). For tests and benchmarks.
  m.def("cpu_paths() -> str[]");
  m.def("cpu_path(ScalarType dtype) -> str");
}
