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

  // Attention, FlashAttention style: the (Lq, Lk) score matrix is never stored.
  // q: (B, H, Lq, D); k, v: (B, Hkv, Lk, D), Hkv divides H (query head h reads key/value head
  // h / (H / Hkv)); all contiguous, one float dtype. key_padding_mask: (B, Lk) bool, True =
  // attend, or None. Query i may attend key j iff mask[b, j] and, when causal,
  // j <= i + causal_shift (0 aligns the diagonal top-left as SDPA's is_causal does, Lk - Lq
  // bottom-right). scores = scale * q.k. dropout_p in [0, 1): each attention probability is
  // kept, and scaled by 1 / (1 - dropout_p), iff philox4x32_10(key = seed, counter = (j, i,
  // b * H + h, 0))[0] >= min(floor(dropout_p * 2^32), 2^32 - 1), the rule of
  // dlfast.reference.dropout_keep_mask, so every backend draws the same mask. seed: a 0-dim
  // int64 tensor on q's device (low 32 bits key word 0, high 32 bits key word 1), or None when
  // dropout_p == 0.
  // Returns out (B, H, Lq, D) in q's dtype and lse (B, H, Lq), float32 (float64 for float64
  // input): the natural-log log-sum-exp of the row's allowed scores, +inf for a row with no
  // allowed key (whose output is zeros).
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, bool causal,"
      " int causal_shift, float scale, float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  // dout, out: (B, H, Lq, D) contiguous; lse from attention_fwd. Returns dq (B, H, Lq, D) and
  // dk, dv (B, Hkv, Lk, D), in q's dtype. deterministic: bitwise-repeatable results (a
  // backend whose backward is always deterministic ignores it).
  m.def(
      "attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse,"
      " Tensor? key_padding_mask, bool causal, int causal_shift, float scale, float dropout_p,"
      " Tensor? seed, bool deterministic) -> (Tensor, Tensor, Tensor)");
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
