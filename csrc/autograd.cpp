// The autograd rules of the C++ ops (the cpu and cuda backends), registered at the dispatcher's
// Autograd key. Built in C++ rather than with torch.library.register_autograd because a Python
// autograd.Function costs about 0.1 ms a call on the host (measured: it made LayerNorm's
// fwd+bwd slower than PyTorch's on small inputs, see benchmarks/results/); here the graph node
// costs what PyTorch's own ops pay. The fake (meta) implementations stay in dlfast/ops/*.py, and
// the Triton pairs keep their Python autograd rules, which compute the same gradients.
#include <ATen/Context.h>
#include <ATen/TensorOperators.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/conv2d.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/zeros_like.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <limits>
#include <vector>

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

// Double backward. A backward runs with grad mode on only under create_graph=True, and there the
// kernels' gradients would be constants (the bwd ops have no derivative of their own): second-order
// gradients would silently come out zero. So there the first-order gradients are taken through
// PyTorch's own ops instead: `out`, recomputed from the saved inputs by differentiable ATen ops,
// differentiated with create_graph, gives gradients whose own gradients are exact.
// Returns one gradient per input, undefined where `wanted` is false.
variable_list grads_through(const Tensor& out, const Tensor& grad_out, const variable_list& inputs,
                            const std::vector<bool>& wanted) {
  variable_list targets;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (wanted[i]) targets.push_back(inputs[i]);
  }
  variable_list grads;
  if (!targets.empty()) {
    grads = torch::autograd::grad({out}, targets, {grad_out}, /*retain_graph=*/true,
                                  /*create_graph=*/true, /*allow_unused=*/true);
  }
  variable_list result(inputs.size());
  for (size_t i = 0, k = 0; i < inputs.size(); ++i) {
    if (!wanted[i]) continue;
    // An input the output does not depend on gets zeros, as the kernels give.
    result[i] = grads[k].defined() ? grads[k] : at::zeros_like(inputs[i]);
    ++k;
  }
  return result;
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
    ctx->saved_data["eps"] = eps;
    ctx->mark_non_differentiable({mean, rstd});
    return {y, mean, rstd};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const bool has_weight = saved[1].defined(), has_bias = ctx->saved_data["has_bias"].toBool();
    // needs_input_grad counts tensor inputs only: an absent weight has no edge.
    const bool weight_grad = has_weight && ctx->needs_input_grad(1);
    const bool bias_grad = has_bias && ctx->needs_input_grad(has_weight ? 2 : 1);
    if (at::GradMode::is_enabled()) {  // create_graph: see grads_through
      const Tensor& x = saved[0];
      // The bias shifts y and so never enters dx or dweight; its gradient is the sum of dy.
      const Tensor y = at::layer_norm(x, {x.size(-1)}, optional_of(saved[1]), std::nullopt,
                                      ctx->saved_data["eps"].toDouble());
      auto g = grads_through(y, grads[0], {x, saved[1]}, {ctx->needs_input_grad(0), weight_grad});
      const Tensor dbias = bias_grad ? grads[0].reshape({-1, x.size(-1)}).sum(0) : Tensor();
      return {g[0], g[1], dbias, Tensor()};
    }
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

// The gradients of attention for create_graph (grads_through), from the composite
// out = softmax(scale q k^T, masked) v, computed as dlfast/reference.py computes it: in float32
// for half inputs, query head h reading key head h / (H / Hkv), and a row that may attend no key
// giving zeros (its scores left finite, its probabilities zeroed), so no NaN reaches a gradient.
// Dropout's mask is drawn inside the kernels, which this composite cannot redraw, so double
// backward with dropout is refused.
variable_list grads_through_attention(AutogradContext* ctx, const variable_list& s, const Tensor& dout) {
  const Tensor &q = s[0], &k = s[1], &v = s[2], &key_padding_mask = s[5];
  TORCH_CHECK(ctx->saved_data["dropout_p"].toDouble() == 0.0,
              "dlfast.attention: double backward (create_graph=True) with dropout_p > 0 is not supported "
              "by the cpu and cuda backends; the triton and reference backends support it");
  const int64_t B = q.size(0), Lq = q.size(2), Lk = k.size(2), group = q.size(1) / k.size(1);
  const auto acc = q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const Tensor keys = k.to(acc).repeat_interleave(group, 1), values = v.to(acc).repeat_interleave(group, 1);
  Tensor scores = q.to(acc).matmul(keys.transpose(-1, -2)) * ctx->saved_data["scale"].toDouble();
  std::optional<Tensor> allowed;  // (B or 1, 1, Lq, Lk): query i may attend key j
  if (ctx->saved_data["causal"].toBool()) {
    const auto index = q.options().dtype(at::kLong);
    allowed = at::arange(Lk, index).view({1, 1, 1, Lk}) <=
              at::arange(Lq, index).view({1, 1, Lq, 1}) + ctx->saved_data["causal_shift"].toInt();
  }
  if (key_padding_mask.defined()) {
    const Tensor keep = key_padding_mask.view({B, 1, 1, Lk});
    allowed = allowed ? allowed->logical_and(keep) : keep;
  }
  Tensor probs;
  if (allowed) {
    scores = scores.masked_fill(allowed->logical_not().logical_and(allowed->any(-1, true)),
                                -std::numeric_limits<double>::infinity());
    probs = scores.softmax(-1) * *allowed;
  } else {
    probs = scores.softmax(-1);
  }
  const Tensor out = probs.matmul(values).to(q.scalar_type());
  auto g = grads_through(out, dout, {q, k, v},
                         {ctx->needs_input_grad(0), ctx->needs_input_grad(1), ctx->needs_input_grad(2)});
  return {g[0], g[1], g[2], Tensor(), Tensor(), Tensor(), Tensor(), Tensor(), Tensor()};
}

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
    if (at::GradMode::is_enabled()) return grads_through_attention(ctx, s, grads[0]);  // see grads_through
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
    if (at::GradMode::is_enabled()) {  // create_graph: see grads_through
      // The ReLU's mask (y > 0) is constant almost everywhere: dy masked by it, taken through
      // the convolution alone (whose bias adds the sum of the masked dy).
      const Tensor dy = grads[0] * (s[2] > 0);
      const Tensor conv = at::conv2d(s[0], s[1], std::nullopt, ctx->saved_data["stride"].toIntVector(),
                                     ctx->saved_data["padding"].toIntVector(),
                                     ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt());
      auto g = grads_through(conv, dy, {s[0], s[1]}, {mask[0], mask[1]});
      const Tensor dbias = mask[2] ? dy.sum({0, 2, 3}) : Tensor();
      return {g[0], g[1], dbias, Tensor(), Tensor(), Tensor(), Tensor()};
    }
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
