// Conv2d + bias + ReLU on the CPU, through oneDNN: its convolution with ReLU as a fused post-op
// (mkldnn::_convolution_pointwise, the op inductor's CPU backend uses for the same fusion), in the
// layout the input comes in, so the output is written once, already rectified. Measured against
// every other route on the course and ResNet shapes (conv2d_relu.json in
// benchmarks/results/cpu-epyc-2core-avx512/), it was the fastest or within noise of it everywhere:
// faster than ATen's convolution + in-place ReLU by the ReLU's pass, than a direct kernel of our own
// for 1-3 input channels (which had looked faster only while fresh buffers were page-faulted in on
// every call), and than converting to channels_last for oneDNN and back.
//   - float16 is computed in float32 and rounded once: oneDNN's float16 convolution needs
//     AVX512-FP16 or AVX-NE-CONVERT, and without them ATen's float16 convolution is a scalar loop
//     (169 ms against 5 ms in float32 for 64 x 32 x 28 x 28 -> 64);
//   - float64, float32 where ATen itself would not call oneDNN (a single small image; see
//     aten_prefers_native_fp32), and any dtype in a torch built without oneDNN: ATen's
//     convolution, then an in-place ReLU.
// The backward, with 1-4 input channels per group (first layers, depthwise), is the direct kernel
// of conv2d_relu_kernel.h, which forms the masked gradient dy * (y > 0) on the fly; otherwise it
// masks dy in one pass (threshold_backward; float16 in float32, as the forward) and hands the
// masked gradient to ATen's convolution_backward (oneDNN), which computes dx, dweight and dbias.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/threshold_backward.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace dlfast::cpu {
namespace {

// Input channels per group up to which the backward takes the direct kernel: measured faster
// than oneDNN's backward on the course's first layers (1 and 3 channels); see conv2d_relu.json.
constexpr int64_t kConv2dDirectBwdMaxCg = 4;

struct ConvShape {
  int64_t N, C, H, W, K, R, S, P, Q;
};

ConvShape check_conv(const at::Tensor& x, const at::Tensor& weight,
                     const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "dlfast::conv2d_relu: x must be 4-D (N, C, H, W), got ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, "dlfast::conv2d_relu: weight must be 4-D (K, C / groups, R, S), got ",
              weight.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "dlfast::conv2d_relu: x must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(weight.scalar_type() == dtype, "dlfast::conv2d_relu: weight is ",
              weight.scalar_type(), " but x is ", dtype);
  TORCH_CHECK(weight.device() == x.device(), "dlfast::conv2d_relu: weight is on ", weight.device(),
              " but x is on ", x.device());
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "dlfast::conv2d_relu: stride, padding and dilation must be (h, w) pairs");
  TORCH_CHECK(stride[0] >= 1 && stride[1] >= 1 && dilation[0] >= 1 && dilation[1] >= 1 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "dlfast::conv2d_relu: stride and dilation must be >= 1 and padding >= 0, got stride ",
              stride, ", padding ", padding, ", dilation ", dilation);
  ConvShape s{x.size(0), x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2),
              weight.size(3), 0, 0};
  TORCH_CHECK(groups >= 1 && s.C % groups == 0 && s.K % groups == 0,
              "dlfast::conv2d_relu: groups (", groups, ") must divide the ", s.C,
              " input and ", s.K, " output channels");
  TORCH_CHECK(weight.size(1) * groups == s.C, "dlfast::conv2d_relu: weight has ", weight.size(1),
              " input channels per group but x has ", s.C, " channels in ", groups, " groups");
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == s.K, "dlfast::conv2d_relu: bias must have shape (",
                s.K, ",), got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == dtype && bias->device() == x.device(),
                "dlfast::conv2d_relu: bias must be ", dtype, " on ", x.device());
  }
  s.P = (s.H + 2 * padding[0] - dilation[0] * (s.R - 1) - 1) / stride[0] + 1;
  s.Q = (s.W + 2 * padding[1] - dilation[1] * (s.S - 1) - 1) / stride[1] + 1;
  TORCH_CHECK(s.H + 2 * padding[0] >= dilation[0] * (s.R - 1) + 1 &&
                  s.W + 2 * padding[1] >= dilation[1] * (s.S - 1) + 1,
              "dlfast::conv2d_relu: the (dilated) kernel ", weight.sizes().slice(2),
              " is larger than the padded input ", x.sizes().slice(2));
  return s;
}

// The conv's memory format, as F.conv2d picks it: channels_last if x or weight suggests it.
at::MemoryFormat conv_memory_format(const at::Tensor& x, const at::Tensor& weight) {
  const bool cl = x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                  weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast;
  return cl ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// oneDNN's convolution with a fused ReLU, called boxed (its C++ signature is internal to torch);
// an undefined tensor when this torch has no such op.
at::Tensor onednn_conv2d_relu(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                              at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  static const std::optional<c10::OperatorHandle> op =
      c10::Dispatcher::singleton().findSchema({"mkldnn::_convolution_pointwise", ""});
  if (!op.has_value()) return at::Tensor();
  auto vec = [](at::IntArrayRef a) { return std::vector<int64_t>(a.begin(), a.end()); };
  std::vector<c10::IValue> stack{x,
                                 weight,
                                 bias,
                                 vec(padding),
                                 vec(stride),
                                 vec(dilation),
                                 groups,
                                 std::string("relu"),
                                 c10::List<std::optional<at::Scalar>>(),
                                 c10::IValue()};
  op->callBoxed(&stack);
  return stack[0].toTensor();
}

// Whether ATen's own float32 convolution takes its native kernel rather than oneDNN here: the test
// of use_mkldnn in aten/src/ATen/native/Convolution.cpp (PyTorch 2.x), which keeps a single small
// image (up to 20480 input elements, groups 1, a kernel not larger than 3 in both dims) and
// single-threaded unstrided 1x1 filters off oneDNN. There a oneDNN call costs more than the work:
// on the 2-core VM 36 us against 3 us for 1 x 1 x 12 x 12 -> 4, 149 us against 52 us for
// 1 x 1 x 140 x 140 -> 8. dlfast then takes ATen's route too, and applies the ReLU in place.
bool aten_prefers_native_fp32(const ConvShape& s, at::IntArrayRef stride, at::IntArrayRef dilation,
                              int64_t groups) {
  const bool strided = stride[0] != 1 || stride[1] != 1;
  const bool dilated = dilation[0] != 1 || dilation[1] != 1;
  const bool one_by_one = s.R == 1 && s.S == 1;
  if (!(strided || dilated || s.N >= 16 || !one_by_one || at::get_num_threads() > 1)) return true;
  return !(groups > 1 || (s.R > 3 && s.S > 3) || s.N > 1 || s.N * s.C * s.H * s.W > 20480);
}

std::optional<at::Tensor> to_float(const std::optional<at::Tensor>& t) {
  return t.has_value() ? std::optional<at::Tensor>(t->to(at::kFloat)) : std::nullopt;
}

at::Tensor conv2d_relu_fwd(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  const ConvShape s = check_conv(x, weight, bias, stride, padding, dilation, groups);
  const auto dtype = x.scalar_type();
  if (dtype == at::kHalf) {
    return conv2d_relu_fwd(x.to(at::kFloat), weight.to(at::kFloat), to_float(bias), stride,
                           padding, dilation, groups)
        .to(at::kHalf);
  }
  const auto format = conv_memory_format(x, weight);
  // oneDNN's channels_last forward crashes (a segfault, ATen's own conv2d too: torch 2.13, 15 to
  // 22 of ~1000 random small cases, every one with padding past the dilated kernel's extent, so
  // that some output row or column sees only padding; none in NCHW, none in the backward). Such
  // padding is rare and cheap to serve: it runs in NCHW and the output is converted.
  const bool padding_past_kernel =
      padding[0] > dilation[0] * (s.R - 1) || padding[1] > dilation[1] * (s.S - 1);
  const auto compute_format = padding_past_kernel ? at::MemoryFormat::Contiguous : format;
  const at::Tensor xf = x.contiguous(compute_format), wf = weight.contiguous(compute_format);
  at::Tensor y;
  const bool onednn = dtype == at::kBFloat16 ||
                      (dtype == at::kFloat && !aten_prefers_native_fp32(s, stride, dilation, groups));
  if (onednn && s.N > 0) {
    y = onednn_conv2d_relu(xf, wf, bias, stride, padding, dilation, groups);
  }
  if (!y.defined()) {
    y = at::convolution(xf, wf, bias, stride, padding, dilation, false, {0, 0}, groups).relu_();
  }
  return y.contiguous(format);
}

// Each unwanted output of the backward is its own empty tensor: outputs of a custom op must not
// alias.
at::Tensor unwanted(const at::Tensor& x) { return at::empty({0}, x.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor> direct_conv2d_relu_bwd(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
    const ConvShape& s, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
    int64_t groups, std::array<bool, 3> output_mask, at::MemoryFormat format) {
  const auto xc = x.contiguous(), dyc = dy.contiguous(), yc = y.contiguous();
  const auto w32 = weight.to(at::kFloat).contiguous();
  const auto f32 = x.options().dtype(at::kFloat);
  auto dx = output_mask[0] ? at::empty(x.sizes(), x.options()) : unwanted(x);
  auto dweight = output_mask[1] ? at::empty(weight.sizes(), f32) : unwanted(x);
  auto dbias = output_mask[2] ? at::empty({s.K}, f32) : unwanted(x);
  const Conv2dReluBwdArgs args{xc.data_ptr(), dyc.data_ptr(), yc.data_ptr(), w32.data_ptr<float>(),
                               output_mask[0] ? dx.data_ptr() : nullptr,
                               output_mask[1] ? dweight.data_ptr<float>() : nullptr,
                               output_mask[2] ? dbias.data_ptr<float>() : nullptr,
                               s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.P, s.Q, groups,
                               stride[0], stride[1], padding[0], padding[1], dilation[0],
                               dilation[1], x.scalar_type()};
  DLFAST_CPU_DISPATCH(conv2d_relu_direct_bwd, args);
  const auto dtype = x.scalar_type();
  return {output_mask[0] ? dx.contiguous(format) : dx,
          output_mask[1] ? dweight.to(dtype).contiguous(format) : dweight,
          output_mask[2] ? dbias.to(dtype) : dbias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv2d_relu_bwd(
    const at::Tensor& dy, const at::Tensor& y, const at::Tensor& x, const at::Tensor& weight,
    at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
  const ConvShape s = check_conv(x, weight, std::nullopt, stride, padding, dilation, groups);
  const std::vector<int64_t> out_shape{s.N, s.K, s.P, s.Q};
  TORCH_CHECK(dy.sizes() == out_shape && y.sizes() == out_shape,
              "dlfast::conv2d_relu: dy and y must have the output's shape ", at::IntArrayRef(out_shape),
              ", got ", dy.sizes(), " and ", y.sizes());
  TORCH_CHECK(dy.scalar_type() == x.scalar_type() && y.scalar_type() == x.scalar_type(),
              "dlfast::conv2d_relu: dy and y must be ", x.scalar_type());
  const auto format = conv_memory_format(x, weight);
  if (x.scalar_type() != at::kDouble && s.C / groups <= kConv2dDirectBwdMaxCg) {
    return direct_conv2d_relu_bwd(dy, y, x, weight, s, stride, padding, dilation, groups,
                                  output_mask, format);
  }
  if (x.scalar_type() == at::kHalf) {  // in float32, as the forward (see the top of the file)
    const auto to_half = [](const at::Tensor& t) { return t.to(at::kHalf); };
    const auto [dx, dweight, dbias] =
        conv2d_relu_bwd(dy.to(at::kFloat), y.to(at::kFloat), x.to(at::kFloat),
                        weight.to(at::kFloat), stride, padding, dilation, groups, output_mask);
    return {to_half(dx), to_half(dweight), to_half(dbias)};
  }
  const auto g = at::threshold_backward(dy, y, 0);
  const std::vector<int64_t> bias_sizes{s.K};
  auto [dx, dweight, dbias] =
      at::convolution_backward(g, x, weight, bias_sizes, stride, padding, dilation, false, {0, 0},
                               groups, output_mask);
  return {output_mask[0] ? dx.contiguous(format) : unwanted(x),
          output_mask[1] ? dweight.contiguous(format) : unwanted(x),
          output_mask[2] ? dbias : unwanted(x)};
}

}  // namespace

TORCH_LIBRARY_IMPL(dlfast, CPU, m) {
  m.impl("conv2d_relu_fwd", &conv2d_relu_fwd);
  m.impl("conv2d_relu_bwd", &conv2d_relu_bwd);
}

}  // namespace dlfast::cpu
