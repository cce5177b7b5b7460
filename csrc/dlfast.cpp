// Every dlfast op schema, declared once. Kernels register against these names from
// csrc/cpu/*.cpp (CPU) and csrc/cuda_ops.cpp (CUDA), their autograd rules from
// csrc/autograd.cpp; dlfast/ops/*.py adds the fake (meta) implementations, and the Triton and
// reference backends.
#include <Python.h>
#include <torch/library.h>

#include "cpu/cpu_kernels.h"

TORCH_LIBRARY(dlfast, m) {
  // x: (..., N) contiguous, normalised over its last dim: M = numel / N rows (any leading dims,
  // so that callers need no reshape, which under autograd would cost two view nodes a call);
  // weight, bias: (N,) or None. Returns y of x's shape and dtype and mean, rstd (M,) in the
  // accumulation dtype (float32, or float64 for float64 input), saved for the backward.
  m.def(
      "layer_norm_fwd(Tensor x, Tensor? weight, Tensor? bias, float eps)"
      " -> (Tensor, Tensor, Tensor)");
  // dy: of x's shape. Returns dx of x's shape, dweight (N,) and dbias (N,); a gradient that is
  // not asked for comes back as an empty (0,) tensor so its reduction is skipped.
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
  // Conv2d + bias + ReLU: y = relu(conv2d(x, weight, bias, stride, padding, dilation, groups)).
  // x: (N, C, H, W); weight: (K, C / groups, R, S); bias: (K,) or None; one float dtype, any
  // strides. stride, dilation >= 1 and padding >= 0 are (h, w) pairs, the padding symmetric
  // (dlfast/ops/conv2d_relu.py turns 'same' into this, padding x first where 'same' is
  // asymmetric). groups divides C and K. P = (H + 2 pad_h - dil_h (R - 1) - 1) / stride_h + 1,
  // Q likewise, both >= 1. The conv's memory format is channels_last iff x or weight suggests
  // it (Tensor::suggest_memory_format), as for F.conv2d; y (N, K, P, Q) is in x's dtype and
  // that memory format. Accumulation in float32 (float64 for float64).
  m.def(
      "conv2d_relu_fwd(Tensor x, Tensor weight, Tensor? bias, int[2] stride, int[2] padding,"
      " int[2] dilation, int groups) -> Tensor");
  // dy: (N, K, P, Q), any strides; y: the forward's output, whose positives are the ReLU mask:
  // the kernels read g = (y > 0 ? dy : 0) as they load dy, never storing g. Returns dx (shape of
  // x), dweight (shape of weight), dbias (K,), all in x's dtype and dx, dweight in the conv's
  // memory format; an output whose output_mask entry is false comes back as an empty (0,)
  // tensor and is not computed.
  m.def(
      "conv2d_relu_bwd(Tensor dy, Tensor y, Tensor x, Tensor weight, int[2] stride,"
      " int[2] padding, int[2] dilation, int groups, bool[3] output_mask)"
      " -> (Tensor, Tensor, Tensor)");
  // N-gram counting: fills `counts` with how often each n-gram of adjacent tokens occurs (its
  // contents before the call do not matter: each bin is written once, not read and added to).
  // tokens: (rows, L) contiguous, uint8, int16, int32 or int64; n-grams never cross rows.
  // counts: (vocab_size ** n,) int64 contiguous, on tokens' device; the n-gram (t0, ..., tn-1)
  // is counted in bin ((t0 * V + t1) * V + ...) + tn-1 (n = 1: unigram, 2: bigram, 3: trigram). An
  // n-gram containing a token equal to ignore_index is skipped. A token outside
  // [0, vocab_size) that is not ignore_index is never used as an index: the n-grams that
  // contain it are skipped. Returns a 0-dim int64 tensor on tokens' device: the smallest flat
  // position (row * L + col) of such a token, or -1 when there is none (the caller raises).
  m.def(
      "ngram_counts_(Tensor(a!) counts, Tensor tokens, int vocab_size, int n,"
      " int? ignore_index) -> Tensor");
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
