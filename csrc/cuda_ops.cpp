// CUDA implementations of dlfast's operators: check the tensors, select their device and stream,
// allocate outputs and scratch through ATen (so the caching allocator serves them) and call the
// raw-pointer launchers of csrc/cuda. Built only when torch has CUDA and nvcc is present.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "cuda/launchers.h"

namespace {

using TensorTriple = std::tuple<at::Tensor, at::Tensor, at::Tensor>;

dlfast::cuda::DType launcher_dtype(at::ScalarType type) {
  switch (type) {
    case at::kHalf:
      return dlfast::cuda::DType::Float16;
    case at::kBFloat16:
      return dlfast::cuda::DType::BFloat16;
    default:
      return dlfast::cuda::DType::Float32;
  }
}

// x: the tensor every other argument is checked against.
void check_x(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D (M, N), got shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(x.size(1) <= dlfast::cuda::kLayerNormMaxN, op, ": x rows may have at most ",
              dlfast::cuda::kLayerNormMaxN, " elements, got ", x.size(1));
}

// A tensor of shape (rows, cols) (or (rows,) when cols < 0) on x's device, contiguous, of `type`.
void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& x,
                at::ScalarType type, int64_t rows, int64_t cols = -1) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == type, op, ": ", name, " must be ", type, ", got ",
              t.scalar_type());
  const bool shape_ok = cols < 0 ? (t.dim() == 1 && t.size(0) == rows)
                                 : (t.dim() == 2 && t.size(0) == rows && t.size(1) == cols);
  if (cols < 0) {
    TORCH_CHECK(shape_ok, op, ": ", name, " must have shape (", rows, ",), got ", t.sizes());
  } else {
    TORCH_CHECK(shape_ok, op, ": ", name, " must have shape (", rows, ", ", cols, "), got ",
                t.sizes());
  }
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

const at::Tensor* defined_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

TensorTriple layer_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "dlfast::layer_norm_fwd";
  check_x(x, op);
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  const at::Tensor* w = defined_or_null(weight);
  const at::Tensor* b = defined_or_null(bias);
  if (w != nullptr) check_like(*w, op, "weight", x, x.scalar_type(), N);
  if (b != nullptr) check_like(*b, op, "bias", x, x.scalar_type(), N);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({M, N}, x.options());
  at::Tensor mean = at::empty({M}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({M}, x.options().dtype(at::kFloat));
  if (M == 0) return {y, mean, rstd};

  const cudaError_t err = dlfast::cuda::layer_norm_fwd(
      x.const_data_ptr(), w != nullptr ? w->const_data_ptr() : nullptr,
      b != nullptr ? b->const_data_ptr() : nullptr, y.mutable_data_ptr(),
      mean.mutable_data_ptr<float>(), rstd.mutable_data_ptr<float>(), M, N,
      static_cast<float>(eps), launcher_dtype(x.scalar_type()),
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  return {y, mean, rstd};
}

TensorTriple layer_norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& x,
                                 const std::optional<at::Tensor>& weight, const at::Tensor& mean,
                                 const at::Tensor& rstd, bool weight_grad, bool bias_grad) {
  constexpr const char* op = "dlfast::layer_norm_bwd";
  check_x(x, op);
  const int64_t M = x.size(0);
  const int64_t N = x.size(1);
  check_like(dy, op, "dy", x, x.scalar_type(), M, N);
  const at::Tensor* w = defined_or_null(weight);
  if (w != nullptr) check_like(*w, op, "weight", x, x.scalar_type(), N);
  check_like(mean, op, "mean", x, at::kFloat, M);
  check_like(rstd, op, "rstd", x, at::kFloat, M);

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty({M, N}, x.options());
  // Gradients that are not wanted come back as (0,) tensors, as the schema's callers expect.
  at::Tensor dweight = at::empty({weight_grad ? N : 0}, x.options());
  at::Tensor dbias = at::empty({bias_grad ? N : 0}, x.options());
  if (M == 0 || N == 0) {
    dweight.zero_();  // a sum over no rows
    dbias.zero_();
    return {dx, dweight, dbias};
  }

  const size_t ws_bytes =
      dlfast::cuda::layer_norm_bwd_workspace_bytes(M, N, weight_grad, bias_grad);
  at::Tensor workspace = at::empty({static_cast<int64_t>((ws_bytes + 15) / 16 * 4)},
                                   x.options().dtype(at::kFloat));
  const cudaError_t err = dlfast::cuda::layer_norm_bwd(
      dy.const_data_ptr(), x.const_data_ptr(), w != nullptr ? w->const_data_ptr() : nullptr,
      mean.const_data_ptr<float>(), rstd.const_data_ptr<float>(), dx.mutable_data_ptr(),
      weight_grad ? dweight.mutable_data_ptr() : nullptr,
      bias_grad ? dbias.mutable_data_ptr() : nullptr, workspace.mutable_data_ptr(),
      static_cast<size_t>(workspace.numel()) * sizeof(float), M, N,
      launcher_dtype(x.scalar_type()),
      c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dlfast, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
}
