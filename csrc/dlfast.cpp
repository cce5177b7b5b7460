// Every dlfast op schema, declared once. Kernels register against these names from
// csrc/cpu/*.cpp (CPU) and csrc/cuda_ops.cpp (CUDA); dlfast/ops/*.py adds the fake
// (meta) and autograd rules, and the Triton and reference backends.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_kernels.h"

TORCH_LIBRARY(dlfast, m) {
  // x: (M, N) contiguous rows; weight, bias: (N,) or None.
  // Returns y (M, N) in x's dtype and mean, rstd (M,) in the accumulation dtype
  // (float32, or float64 for float64 input), saved for the backward.
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  // Returns dx (M, N), dweight (N,) and dbias (N,); a gradient that is not asked
  // for comes back as an empty (0,) tensor so its reduction is skipped.
  m.def(
      "layer_norm_bwd(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd,"
      " bool weight_grad, bool bias_grad) -> (Tensor, Tensor, Tensor)");
}

// `import dlfast._C` loads this library, which runs the registrations above. The module
// carries no functions (everything is reached through torch.ops.dlfast), only `cpu_isa`:
// the CPU kernel variant chosen for this machine.
static struct PyModuleDef dlfast_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&dlfast_module);
  if (module != nullptr &&
      PyModule_AddStringConstant(module, "cpu_isa",
                                 dlfast::cpu::isa_name(dlfast::cpu::cpu_isa())) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
