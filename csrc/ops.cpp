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
  // The CPU kernel's paths for 16-bit inputs (latentseek/cpu_paths.h): those this machine can run (widen, bf16,
  // fp16), and the one a call in `dtype` takes now (LATENTSEEK_CPU_PATH or the automatic choice; fp32 / fp64 for
  // those dtypes). For tests and benchmarks.
  m.def("cpu_paths() -> str[]");
  m.def("cpu_path(ScalarType dtype) -> str");
}
