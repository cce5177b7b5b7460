// Attention on the CPU: tensor checks and allocation here, the kernels in attention_kernel.h (one
// build per ISA, chosen at run time).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cpu_kernels.h"

namespace dlfast::cpu {
namespace {

at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A 4-D (B, heads, L, D) input, contiguous, in q's dtype and on q's device (q itself included).
void check_input(const at::Tensor& t, const at::Tensor& q, const char* name) {
  TORCH_CHECK(t.dim() == 4, "dlfast::attention: ", name, " must be 4-D (B, heads, L, D), got ",
              t.sizes());
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "dlfast::attention: ", name, " must be float32, float64, float16 or bfloat16, got ",
              dtype);
  TORCH_CHECK(dtype == q.scalar_type(), "dlfast::attention: ", name, " is ", dtype, " but q is ",
              q.scalar_type());
  TORCH_CHECK(t.device() == q.device(), "dlfast::attention: ", name, " is on ", t.device(),
              " but q is on ", q.device());
  TORCH_CHECK(t.is_contiguous(), "dlfast::attention: ", name, " must be contiguous");
}

// Checks q, k, v, the mask and the options; returns the parameters the kernels take.
AttentionParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& key_padding_mask, bool causal,
                            int64_t causal_shift, double scale, double dropout_p,
                            const std::optional<at::Tensor>& seed) {
  check_input(q, q, "q");
  check_input(k, q, "k");
  check_input(v, q, "v");
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D, "dlfast::attention: k must have shape (", B,
              ", Hkv, Lk, ", D, ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "dlfast::attention: v must have k's shape ", k.sizes(),
              ", got ", v.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, "dlfast::attention: k and v have ", Hkv,
              " heads, which must divide q's ", H, " heads");
  const bool* mask = nullptr;
  if (key_padding_mask.has_value()) {
    const at::Tensor& m = *key_padding_mask;
    TORCH_CHECK(m.scalar_type() == at::kBool,
                "dlfast::attention: key_padding_mask must be bool, got ", m.scalar_type());
    TORCH_CHECK(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk,
                "dlfast::attention: key_padding_mask must have shape (", B, ", ", Lk, "), got ",
                m.sizes());
    TORCH_CHECK(m.device() == q.device(), "dlfast::attention: key_padding_mask is on ", m.device(),
                " but q is on ", q.device());
    TORCH_CHECK(m.is_contiguous(), "dlfast::attention: key_padding_mask must be contiguous");
    mask = m.data_ptr<bool>();
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0,
              "dlfast::attention: dropout_p must be in [0, 1), got ", dropout_p);
  uint64_t seed_value = 0;
  if (dropout_p > 0.0) {
    TORCH_CHECK(seed.has_value(), "dlfast::attention: seed is required when dropout_p > 0");
    TORCH_CHECK(seed->dim() == 0 && seed->scalar_type() == at::kLong,
                "dlfast::attention: seed must be a 0-dim int64 tensor, got ", seed->scalar_type(),
                " of shape ", seed->sizes());
    TORCH_CHECK(seed->device() == q.device(), "dlfast::attention: seed is on ", seed->device(),
                " but q is on ", q.device());
    seed_value = static_cast<uint64_t>(seed->item<int64_t>());
  }
  return AttentionParams{B, H, Hkv, Lq, Lk, D, mask, causal, causal_shift, scale, dropout_p,
                         seed_value};
}

std::tuple<at::Tensor, at::Tensor> attention_fwd(const at::Tensor& q, const at::Tensor& k,
                                                 const at::Tensor& v,
                                                 const std::optional<at::Tensor>& key_padding_mask,
                                                 bool causal, int64_t causal_shift, double scale,
                                                 double dropout_p,
                                                 const std::optional<at::Tensor>& seed) {
  const AttentionParams params =
      make_params(q, k, v, key_padding_mask, causal, causal_shift, scale, dropout_p, seed);
  auto out = at::empty(q.sizes(), q.options());
  auto lse = at::empty({params.B, params.H, params.Lq}, q.options().dtype(lse_dtype(q)));
  const AttentionFwdArgs args{params,         q.data_ptr(),   k.data_ptr(), v.data_ptr(),
                              out.data_ptr(), lse.data_ptr(), q.scalar_type()};
  if (out.numel() > 0) {
    DLFAST_CPU_DISPATCH(attention_fwd, args);
  }
  return {out, lse};
}

// `deterministic` is not read: this backward always reduces in a fixed order (see
// attention_kernel.h), so it is bitwise repeatable whatever the flag says.
std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& key_padding_mask,
    bool causal, int64_t causal_shift, double scale, double dropout_p,
    const std::optional<at::Tensor>& seed, bool /*deterministic*/) {
  const AttentionParams params =
      make_params(q, k, v, key_padding_mask, causal, causal_shift, scale, dropout_p, seed);
  check_input(dout, q, "dout");
  check_input(out, q, "out");
  TORCH_CHECK(dout.sizes() == q.sizes(), "dlfast::attention: dout must have q's shape ", q.sizes(),
              ", got ", dout.sizes());
  TORCH_CHECK(out.sizes() == q.sizes(), "dlfast::attention: out must have q's shape ", q.sizes(),
              ", got ", out.sizes());
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == params.B && lse.size(1) == params.H &&
                  lse.size(2) == params.Lq && lse.scalar_type() == lse_dtype(q) &&
                  lse.device() == q.device() && lse.is_contiguous(),
              "dlfast::attention: lse must be a contiguous (", params.B, ", ", params.H, ", ",
              params.Lq, ") ", lse_dtype(q), " tensor on ", q.device(),
              " from attention_fwd, got ", lse.scalar_type(), " of shape ", lse.sizes());
  auto dq = at::empty(q.sizes(), q.options());
  auto dk = at::empty(k.sizes(), k.options());
  auto dv = at::empty(v.sizes(), v.options());
  const AttentionBwdArgs args{params,       dout.data_ptr(), q.data_ptr(),  k.data_ptr(),
                              v.data_ptr(), out.data_ptr(),  lse.data_ptr(), dq.data_ptr(),
                              dk.data_ptr(), dv.data_ptr(),  q.scalar_type()};
  if (dq.numel() > 0 || dk.numel() > 0) {
    DLFAST_CPU_DISPATCH(attention_bwd, args);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(dlfast, CPU, m) {
  m.impl("attention_fwd", &attention_fwd);
  m.impl("attention_bwd", &attention_bwd);
}

}  // namespace dlfast::cpu
