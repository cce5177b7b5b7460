// The autograd rules of the C++ ops (the cpu and cuda backends), registered at the dispatcher's
// Autograd key. Built in C++ rather than with torch.library.register_autograd because a Python
// autograd.Function costs about 0.1 ms a call on the host (measured: it made LayerNorm's
// fwd+bwd slower than PyTorch's on small inputs, see benchmarks/results/); here the graph node
// costs what PyTorch's own ops pay. The fake (meta) implementations stay in dlfast/ops/*.py, and
// the Triton pairs keep their Python autograd rules, which compute the same gradients.
#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The typed handle of op dlfast::<name>, looked up once.
template <typename Signature>
const c10::TypedOperatorHandle<Signature>& op(const char* name) {
  static const auto handle = c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
  return handle;
}

std::optional<Tensor> optional_of(const Tensor& t) {
  return t.defined() ? std::optional<Tensor>(t) : std::nullopt;
}

// ---------------------------------------------------------------------------------------------
// layer_norm_fwd(x, weight?, bias?, eps) -> (y, mean, rstd)

using LayerNormFwd = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const std::optional<Tensor>&, const std::optional<Tensor>&, double);
using LayerNormBwd = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, const Tensor&, const Tensor&, bool, bool);

struct LayerNormFunction : public torch::autograd::Function<LayerNormFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const std::optional<Tensor>& weight,
      const std::optional<Tensor>& bias,
      double eps) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, rstd] = op<LayerNormFwd>("dlfast::layer_norm_fwd").call(x, weight, bias, eps);
    ctx->save_for_backward({x, weight.value_or(Tensor()), mean, rstd});
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = saved[1].defined(), has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts tensor inputs only: an absent weight has no edge.
    const bool weight_grad = has_weight && ctx->needs_input_grad(1);
    const bool bias_grad = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    auto [dx, dweight, dbias] = op<LayerNormBwd>("dlfast::layer_norm_bwd")
                                    .call(grads[0].contiguous(), saved[0], optional_of(saved[1]), saved[2],
                                          saved[3], weight_grad, bias_grad);
    return {dx, weight_grad ? dweight : Tensor(), bias_grad ? dbias : Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor, Tensor> layer_norm_fwd_autograd(
    const Tensor& x, const std::optional<Tensor>& weight, const std::optional<Tensor>& bias, double eps) {
  auto out = LayerNormFunction::apply(x, weight, bias, eps);
  return {out[0], out[1], out[2]};
}

// ---------------------------------------------------------------------------------------------
// attention_fwd(q, k, v, key_padding_mask?, causal, causal_shift, scale, dropout_p, seed?)
//   -> (out, lse)

using AttentionFwd = std::tuple<Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const std::optional<Tensor>&, bool, int64_t, double, double,
    const std::optional<Tensor>&);
using AttentionBwd = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
    const std::optional<Tensor>&, bool, int64_t, double, double, const std::optional<Tensor>&, bool);

struct AttentionFunction : public torch::autograd::Function<AttentionFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& q,
      const Tensor& k,
      const Tensor& v,
      const std::optional<Tensor>& key_padding_mask,
      bool causal,
      int64_t causal_shift,
      double scale,
      double dropout_p,
      const std::optional<Tensor>& seed) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, lse] = op<AttentionFwd>("dlfast::attention_fwd")
                          .call(q, k, v, key_padding_mask, causal, causal_shift, scale, dropout_p, seed);
    ctx->save_for_backward(
        {q, k, v, out, lse, key_padding_mask.value_or(Tensor()), seed.value_or(Tensor())});
    ctx->saved_data["causal"] = causal;
    ctx->saved_data["causal_shift"] = causal_shift;
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["dropout_p"] = dropout_p;
    ctx->mark_non_differentiable({lse});
    return {out, lse};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    // Every dlfast backward reduces in a fixed order (no atomics), so its gradients are bitwise
    // repeatable whatever this flag says; it is passed for kernels that may add an atomic path.
    const bool deterministic = at::globalContext().deterministicAlgorithms();
    auto [dq, dk, dv] = op<AttentionBwd>("dlfast::attention_bwd")
                            .call(grads[0].contiguous(), s[0], s[1], s[2], s[3], s[4], optional_of(s[5]),
                                  ctx->saved_data["causal"].toBool(), ctx->saved_data["causal_shift"].toInt(),
                                  ctx->saved_data["scale"].toDouble(), ctx->saved_data["dropout_p"].toDouble(),
                                  optional_of(s[6]), deterministic);
    return {dq, dk, dv, Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> attention_fwd_autograd(
    const Tensor& q,
    const Tensor& k,
    const Tensor& v,
    const std::optional<Tensor>& key_padding_mask,
    bool causal,
    int64_t causal_shift,
    double scale,
    double dropout_p,
    const std::optional<Tensor>& seed) {
  auto out = AttentionFunction::apply(q, k, v, key_padding_mask, causal, causal_shift, scale, dropout_p, seed);
  return {out[0], out[1]};
}

// ---------------------------------------------------------------------------------------------
// conv2d_relu_fwd(x, weight, bias?, stride, padding, dilation, groups) -> y

using ConvReluFwd = Tensor(
    const Tensor&, const Tensor&, const std::optional<Tensor>&, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t);
using ConvReluBwd = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor&, const Tensor&, const Tensor&, const Tensor&, at::IntArrayRef, at::IntArrayRef,
    at::IntArrayRef, int64_t, std::array<bool, 3>);

struct Conv2dReluFunction : public torch::autograd::Function<Conv2dReluFunction> {
  static variable_list forward(
      AutogradContext* ctx,
      const Tensor& x,
      const Tensor& weight,
      const std::optional<Tensor>& bias,
      at::IntArrayRef stride,
      at::IntArrayRef padding,
      at::IntArrayRef dilation,
      int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    Tensor y = op<ConvReluFwd>("dlfast::conv2d_relu_fwd").call(x, weight, bias, stride, padding, dilation, groups);
    ctx->save_for_backward({x, weight, y});  // y > 0 is the ReLU mask
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const std::array<bool, 3> mask = {
        ctx->needs_input_grad(0), ctx->needs_input_grad(1),
        ctx->saved_data["has_bias"].toBool() && ctx->needs_input_grad(2)};
    auto [dx, dweight, dbias] = op<ConvReluBwd>("dlfast::conv2d_relu_bwd")
                                    .call(grads[0], s[2], s[0], s[1], ctx->saved_data["stride"].toIntVector(),
                                          ctx->saved_data["padding"].toIntVector(),
                                          ctx->saved_data["dilation"].toIntVector(),
                                          ctx->saved_data["groups"].toInt(), mask);
    return {mask[0] ? dx : Tensor(), mask[1] ? dweight : Tensor(), mask[2] ? dbias : Tensor(),
            Tensor(), Tensor(), Tensor(), Tensor()};
  }
};

Tensor conv2d_relu_fwd_autograd(
    const Tensor& x,
    const Tensor& weight,
    const std::optional<Tensor>& bias,
    at::IntArrayRef stride,
    at::IntArrayRef padding,
    at::IntArrayRef dilation,
    int64_t groups) {
  return Conv2dReluFunction::apply(x, weight, bias, stride, padding, dilation, groups)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(dlfast, Autograd, m) {
  m.impl("layer_norm_fwd", TORCH_FN(layer_norm_fwd_autograd));
  m.impl("attention_fwd", TORCH_FN(attention_fwd_autograd));
  m.impl("conv2d_relu_fwd", TORCH_FN(conv2d_relu_fwd_autograd));
}
