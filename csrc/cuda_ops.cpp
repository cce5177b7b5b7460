// CUDA implementations of dlfast's operators: check the tensors, select their device and stream,
// allocate outputs and scratch through ATen (so the caching allocator serves them) and call the
// raw-pointer launchers of csrc/cuda. Built only when torch has CUDA and nvcc is present.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include <array>
#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>
#include <vector>

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
  TORCH_CHECK(x.dim() >= 1, op, ": x must have a last dim to normalise, got a 0-dim tensor");
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(x.size(-1) <= dlfast::cuda::kLayerNormMaxN, op, ": x rows may have at most ",
              dlfast::cuda::kLayerNormMaxN, " elements, got ", x.size(-1));
}

// The rows of x, (..., N), each normalised over the last dim.
int64_t rows_of(const at::Tensor& x) {
  return c10::multiply_integers(x.sizes().begin(), x.sizes().end() - 1);
}

// A tensor of `shape` on x's device, contiguous, of `type`.
void check_like(const at::Tensor& t, const char* op, const char* name, const at::Tensor& x,
                at::ScalarType type, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
              " like x, got ", t.device());
  TORCH_CHECK(t.scalar_type() == type, op, ": ", name, " must be ", type, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

const at::Tensor* defined_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? &*t : nullptr;
}

TensorTriple layer_norm_fwd_cuda(const at::Tensor& x, const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, double eps) {
  constexpr const char* op = "dlfast::layer_norm_fwd";
  check_x(x, op);
  const int64_t M = rows_of(x);
  const int64_t N = x.size(-1);
  const at::Tensor* w = defined_or_null(weight);
  const at::Tensor* b = defined_or_null(bias);
  if (w != nullptr) check_like(*w, op, "weight", x, x.scalar_type(), {N});
  if (b != nullptr) check_like(*b, op, "bias", x, x.scalar_type(), {N});

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty(x.sizes(), x.options());
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
  const int64_t M = rows_of(x);
  const int64_t N = x.size(-1);
  check_like(dy, op, "dy", x, x.scalar_type(), x.sizes());
  const at::Tensor* w = defined_or_null(weight);
  if (w != nullptr) check_like(*w, op, "weight", x, x.scalar_type(), {N});
  check_like(mean, op, "mean", x, at::kFloat, {M});
  check_like(rstd, op, "rstd", x, at::kFloat, {M});

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dx = at::empty(x.sizes(), x.options());
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

// ---------------------------------------------------------------------------------------------
// Attention

using TensorPair = std::tuple<at::Tensor, at::Tensor>;

void check_attention_tensor(const at::Tensor& t, const char* op, const char* name,
                            const at::Tensor& q, at::ScalarType type, at::IntArrayRef shape) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on ", q.device(),
              " like q, got ", t.device());
  TORCH_CHECK(t.scalar_type() == type, op, ": ", name, " must be ", type, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

// Checks the arguments the forward and backward share and returns the launchers' config. q sets
// the device and dtype that every other tensor is checked against.
dlfast::cuda::AttentionConfig check_attention_args(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& key_padding_mask, bool causal, int64_t causal_shift,
    double scale, double dropout_p, const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(q.is_cuda(), op, ": q must be a CUDA tensor, got device ", q.device());
  TORCH_CHECK(q.scalar_type() != at::kFloat, op,
              ": the CUDA kernel takes float16 or bfloat16 q, k, v; for float32 use "
              "backend=\"triton\"");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(q.dim() == 4, op, ": q must be 4-D (B, H, Lq, D), got shape ", q.sizes());
  const int64_t B = q.size(0);
  const int64_t H = q.size(1);
  const int64_t Lq = q.size(2);
  const int64_t D = q.size(3);
  TORCH_CHECK(k.dim() == 4 && k.size(0) == B && k.size(3) == D, op,
              ": k must have shape (B, Hkv, Lk, D) with B = ", B, " and D = ", D, ", got ",
              k.sizes());
  const int64_t Hkv = k.size(1);
  const int64_t Lk = k.size(2);
  check_attention_tensor(q, op, "q", q, q.scalar_type(), q.sizes());
  check_attention_tensor(k, op, "k", q, q.scalar_type(), k.sizes());
  check_attention_tensor(v, op, "v", q, q.scalar_type(), k.sizes());
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": the key/value heads (", Hkv,
              ") must divide the query heads (", H, ")");
  TORCH_CHECK(D % 8 == 0 && D >= 16 && D <= 256, op,
              ": head dim must be a multiple of 8 in [16, 256] (dlfast.attention pads other "
              "head dims), got ",
              D);
  TORCH_CHECK(Lq <= dlfast::cuda::kAttentionMaxSeqLen && Lk <= dlfast::cuda::kAttentionMaxSeqLen,
              op, ": sequence lengths may be at most ", dlfast::cuda::kAttentionMaxSeqLen,
              ", got Lq = ", Lq, " and Lk = ", Lk);
  TORCH_CHECK(B * H <= INT_MAX, op, ": B * H must be at most ", INT_MAX, ", got ", B * H);
  const at::Tensor* mask = defined_or_null(key_padding_mask);
  if (mask != nullptr) check_attention_tensor(*mask, op, "key_padding_mask", q, at::kBool, {B, Lk});
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, op, ": dropout_p must be in [0, 1), got ",
              dropout_p);
  const at::Tensor* s = defined_or_null(seed);
  TORCH_CHECK((s != nullptr) == (dropout_p > 0.0), op,
              ": seed must be given when dropout_p > 0 and only then; dropout_p = ", dropout_p,
              ", seed ", s != nullptr ? "given" : "None");
  if (s != nullptr) {
    TORCH_CHECK(s->dim() == 0 && s->scalar_type() == at::kLong && s->device() == q.device(), op,
                ": seed must be a 0-dim int64 tensor on ", q.device(), ", got a ",
                s->scalar_type(), " tensor of shape ", s->sizes(), " on ", s->device());
  }
  int smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        q.device().index()));
  const size_t smem = dlfast::cuda::attention_smem_bytes(D);
  TORCH_CHECK(smem <= static_cast<size_t>(smem_optin), op, ": head dim ", D, " needs ", smem,
              " bytes of shared memory per block, this GPU allows ", smem_optin,
              "; use backend=\"triton\"");
  return {B, H, Hkv, Lq, Lk, D, causal, causal_shift, scale, dropout_p};
}

// The kernels copy rows in 16-byte chunks. A contiguous tensor can still start off that
// alignment (a view at an odd offset); such an input is copied, which realigns it.
at::Tensor aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0 ? t : t.clone();
}

const uint8_t* mask_ptr(const std::optional<at::Tensor>& key_padding_mask) {
  const at::Tensor* mask = defined_or_null(key_padding_mask);
  return mask != nullptr ? static_cast<const uint8_t*>(mask->const_data_ptr()) : nullptr;
}

const int64_t* seed_ptr(const std::optional<at::Tensor>& seed) {
  const at::Tensor* s = defined_or_null(seed);
  return s != nullptr ? s->const_data_ptr<int64_t>() : nullptr;
}

TensorPair attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const std::optional<at::Tensor>& key_padding_mask, bool causal,
                              int64_t causal_shift, double scale, double dropout_p,
                              const std::optional<at::Tensor>& seed) {
  constexpr const char* op = "dlfast::attention_fwd";
  const dlfast::cuda::AttentionConfig config = check_attention_args(
      op, q, k, v, key_padding_mask, causal, causal_shift, scale, dropout_p, seed);
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor q16 = aligned16(q);
  const at::Tensor k16 = aligned16(k);
  const at::Tensor v16 = aligned16(v);
  at::Tensor out = at::empty_like(q);
  at::Tensor lse = at::empty({config.batch, config.heads, config.q_len},
                             q.options().dtype(at::kFloat));
  const cudaError_t err = dlfast::cuda::attention_fwd(
      q16.const_data_ptr(), k16.const_data_ptr(), v16.const_data_ptr(),
      mask_ptr(key_padding_mask), seed_ptr(seed), out.mutable_data_ptr(),
      lse.mutable_data_ptr<float>(), config,
      launcher_dtype(q.scalar_type()),
      c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  return {out, lse};
}

// The backward is always deterministic (no atomics), so `deterministic` changes nothing.
TensorTriple attention_bwd_cuda(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                const at::Tensor& v, const at::Tensor& out,
                                const at::Tensor& lse,
                                const std::optional<at::Tensor>& key_padding_mask, bool causal,
                                int64_t causal_shift, double scale, double dropout_p,
                                const std::optional<at::Tensor>& seed,
                                bool /*deterministic*/) {
  constexpr const char* op = "dlfast::attention_bwd";
  const dlfast::cuda::AttentionConfig config = check_attention_args(
      op, q, k, v, key_padding_mask, causal, causal_shift, scale, dropout_p, seed);
  check_attention_tensor(dout, op, "dout", q, q.scalar_type(), q.sizes());
  check_attention_tensor(out, op, "out", q, q.scalar_type(), q.sizes());
  check_attention_tensor(lse, op, "lse", q, at::kFloat,
                         {config.batch, config.heads, config.q_len});
  const c10::cuda::CUDAGuard guard(q.device());
  const at::Tensor dout16 = aligned16(dout);
  const at::Tensor q16 = aligned16(q);
  const at::Tensor k16 = aligned16(k);
  const at::Tensor v16 = aligned16(v);
  const at::Tensor out16 = aligned16(out);
  at::Tensor dq = at::empty_like(q);
  at::Tensor dk = at::empty_like(k);
  at::Tensor dv = at::empty_like(v);
  at::Tensor delta = at::empty_like(lse);
  const cudaError_t err = dlfast::cuda::attention_bwd(
      dout16.const_data_ptr(), q16.const_data_ptr(), k16.const_data_ptr(), v16.const_data_ptr(),
      out16.const_data_ptr(), lse.const_data_ptr<float>(), mask_ptr(key_padding_mask),
      seed_ptr(seed), dq.mutable_data_ptr(), dk.mutable_data_ptr(), dv.mutable_data_ptr(),
      delta.mutable_data_ptr<float>(), config, launcher_dtype(q.scalar_type()),
      c10::cuda::getCurrentCUDAStream(q.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  return {dq, dk, dv};
}

// ---------------------------------------------------------------------------------------------
// N-gram counting

at::Tensor ngram_counts_cuda(at::Tensor& counts, const at::Tensor& tokens, int64_t vocab_size,
                             int64_t n, std::optional<int64_t> ignore_index) {
  constexpr const char* op = "dlfast::ngram_counts_";
  TORCH_CHECK(tokens.is_cuda(), op, ": tokens must be a CUDA tensor, got device ",
              tokens.device());
  dlfast::cuda::TokenDType dtype;
  switch (tokens.scalar_type()) {
    case at::kByte:
      dtype = dlfast::cuda::TokenDType::UInt8;
      break;
    case at::kShort:
      dtype = dlfast::cuda::TokenDType::Int16;
      break;
    case at::kInt:
      dtype = dlfast::cuda::TokenDType::Int32;
      break;
    case at::kLong:
      dtype = dlfast::cuda::TokenDType::Int64;
      break;
    default:
      TORCH_CHECK(false, op, ": tokens must be uint8, int16, int32 or int64, got ",
                  tokens.scalar_type());
  }
  TORCH_CHECK(tokens.dim() == 2, op, ": tokens must be 2-D (rows, L), got shape ",
              tokens.sizes());
  TORCH_CHECK(tokens.is_contiguous(), op, ": tokens must be contiguous");
  TORCH_CHECK(n >= 1 && n <= 3, op, ": n must be 1, 2 or 3, got ", n);
  TORCH_CHECK(vocab_size >= 1, op, ": vocab_size must be >= 1, got ", vocab_size);
  int64_t bins = 1;
  for (int64_t k = 0; k < n; ++k) {
    TORCH_CHECK(bins <= INT64_MAX / vocab_size, op,
                ": vocab_size ** n overflows int64 (vocab_size ", vocab_size, ", n ", n, ")");
    bins *= vocab_size;
  }
  TORCH_CHECK(counts.device() == tokens.device(), op, ": counts must be on ", tokens.device(),
              " like tokens, got ", counts.device());
  TORCH_CHECK(counts.scalar_type() == at::kLong, op, ": counts must be int64, got ",
              counts.scalar_type());
  TORCH_CHECK(counts.dim() == 1 && counts.size(0) == bins, op, ": counts must have shape (", bins,
              ",) (vocab_size ** n), got ", counts.sizes());
  TORCH_CHECK(counts.is_contiguous(), op, ": counts must be contiguous");

  const c10::cuda::CUDAGuard guard(tokens.device());
  counts.zero_();  // the op fills counts; the launcher adds into it
  // Written by the launcher on the stream (-1 when no token is out of range): no host sync.
  at::Tensor bad_position = at::empty({}, tokens.options().dtype(at::kLong));
  const cudaError_t err = dlfast::cuda::ngram_counts(
      tokens.const_data_ptr(), dtype, tokens.size(0), tokens.size(1), vocab_size,
      static_cast<int>(n), ignore_index.has_value(), ignore_index.value_or(0),
      counts.mutable_data_ptr<int64_t>(), bad_position.mutable_data_ptr<int64_t>(),
      c10::cuda::getCurrentCUDAStream(tokens.device().index()).stream());
  TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  return bad_position;
}

// ---------------------------------------------------------------------------------------------
// Conv2d + bias + ReLU

// The conv's memory format, as F.conv2d picks it: channels_last iff x or weight suggests it.
at::MemoryFormat conv_memory_format(const at::Tensor& x, const at::Tensor& weight) {
  return x.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                 weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

// A (h, w) pair whose entries are all at least `min`.
void check_pair(const char* op, const char* name, at::IntArrayRef v, int64_t min) {
  TORCH_CHECK(v.size() == 2, op, ": ", name, " must be an (h, w) pair, got ", v);
  TORCH_CHECK(v[0] >= min && v[1] >= min, op, ": ", name, " must be >= ", min, ", got ", v);
}

// Checks x, weight and the conv arguments that the forward and the backward share, and returns
// the launchers' config. x sets the device and dtype every other tensor is checked against.
dlfast::cuda::Conv2dConfig check_conv2d_args(const char* op, const at::Tensor& x,
                                             const at::Tensor& weight, at::IntArrayRef stride,
                                             at::IntArrayRef padding, at::IntArrayRef dilation,
                                             int64_t groups) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK(x.scalar_type() != at::kDouble, op,
              ": the CUDA kernels take float32, float16 or bfloat16; for float64 use "
              "backend=\"reference\" (plain PyTorch)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (N, C, H, W), got shape ", x.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be 4-D (K, C / groups, R, S), got shape ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on ", x.device(),
              " like x, got ", weight.device());
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), op, ": weight must be ", x.scalar_type(),
              " like x, got ", weight.scalar_type());
  check_pair(op, "stride", stride, 1);
  check_pair(op, "padding", padding, 0);
  check_pair(op, "dilation", dilation, 1);
  TORCH_CHECK(groups >= 1, op, ": groups must be >= 1, got ", groups);
  const int64_t C = x.size(1);
  const int64_t K = weight.size(0);
  TORCH_CHECK(C >= 1 && C % groups == 0, op, ": groups (", groups,
              ") must divide the input channels, got C = ", C);
  TORCH_CHECK(K >= 1 && K % groups == 0, op, ": groups (", groups,
              ") must divide the output channels, got K = ", K);
  TORCH_CHECK(weight.size(1) * groups == C && weight.size(2) >= 1 && weight.size(3) >= 1, op,
              ": weight must have shape (K, C / groups, R, S) with C / groups = ", C / groups,
              ", got ", weight.sizes());
  const dlfast::cuda::Conv2dConfig config{
      x.size(0), C,         x.size(2),  x.size(3),  K,           weight.size(2), weight.size(3),
      stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],    groups};
  const int64_t P = dlfast::cuda::conv2d_out_size(config.height, config.kernel_h,
                                                  config.stride_h, config.pad_h, config.dil_h);
  const int64_t Q = dlfast::cuda::conv2d_out_size(config.width, config.kernel_w,
                                                  config.stride_w, config.pad_w, config.dil_w);
  TORCH_CHECK(P >= 1 && Q >= 1, op, ": the dilated kernel (", weight.size(2), ", ",
              weight.size(3), ") with dilation ", dilation, " does not fit the padded input (",
              x.size(2), ", ", x.size(3), ") + 2 * ", padding, ": output size (", P, ", ", Q,
              ")");
  // The kernels index within an image and a filter in 32 bits (launchers.h).
  constexpr int64_t kMaxDim = dlfast::cuda::kConv2dMaxDim;
  const int64_t RS = config.kernel_h * config.kernel_w;
  TORCH_CHECK(config.height + 2 * config.pad_h <= kMaxDim &&
                  config.width + 2 * config.pad_w <= kMaxDim &&
                  config.height * config.width <= kMaxDim && P * Q <= kMaxDim &&
                  RS * (C / groups) <= kMaxDim && RS * (K / groups) <= kMaxDim &&
                  stride[0] <= kMaxDim && stride[1] <= kMaxDim && dilation[0] <= kMaxDim &&
                  dilation[1] <= kMaxDim,
              op, ": per-image sizes (H, W, P, Q, padded extents) and R * S * channels per "
              "group must be at most ", kMaxDim);
  TORCH_CHECK(x.numel() < dlfast::cuda::kConv2dMaxElements &&
                  weight.numel() < dlfast::cuda::kConv2dMaxElements &&
                  x.size(0) * K * P * Q < dlfast::cuda::kConv2dMaxElements,
              op, ": x, weight and y must have fewer than ", dlfast::cuda::kConv2dMaxElements,
              " elements");
  return config;
}

at::Tensor conv2d_relu_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                const std::optional<at::Tensor>& bias, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                int64_t groups) {
  constexpr const char* op = "dlfast::conv2d_relu_fwd";
  const dlfast::cuda::Conv2dConfig config =
      check_conv2d_args(op, x, weight, stride, padding, dilation, groups);
  const at::Tensor* b = defined_or_null(bias);
  if (b != nullptr) {
    TORCH_CHECK(b->device() == x.device(), op, ": bias must be on ", x.device(), " like x, got ",
                b->device());
    TORCH_CHECK(b->scalar_type() == x.scalar_type(), op, ": bias must be ", x.scalar_type(),
                " like x, got ", b->scalar_type());
    TORCH_CHECK(b->dim() == 1 && b->size(0) == config.out_channels, op,
                ": bias must have shape (", config.out_channels, ",), got ", b->sizes());
  }
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t P = dlfast::cuda::conv2d_out_size(config.height, config.kernel_h,
                                                  config.stride_h, config.pad_h, config.dil_h);
  const int64_t Q = dlfast::cuda::conv2d_out_size(config.width, config.kernel_w,
                                                  config.stride_w, config.pad_w, config.dil_w);
  // The kernels work in NHWC / KRSC, which is channels_last for both.
  at::Tensor y = at::empty({config.batch, config.out_channels, P, Q},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() > 0) {
    const at::Tensor x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor w_krsc = weight.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor b_contig = b != nullptr ? b->contiguous() : at::Tensor();
    const cudaError_t err = dlfast::cuda::conv2d_relu_fwd(
        x_nhwc.const_data_ptr(), w_krsc.const_data_ptr(),
        b != nullptr ? b_contig.const_data_ptr() : nullptr, y.mutable_data_ptr(), config,
        launcher_dtype(x.scalar_type()),
        c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  }
  return y.contiguous(conv_memory_format(x, weight));
}

TensorTriple conv2d_relu_bwd_cuda(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& x,
                                  const at::Tensor& weight, at::IntArrayRef stride,
                                  at::IntArrayRef padding, at::IntArrayRef dilation,
                                  int64_t groups, std::array<bool, 3> output_mask) {
  constexpr const char* op = "dlfast::conv2d_relu_bwd";
  const dlfast::cuda::Conv2dConfig config =
      check_conv2d_args(op, x, weight, stride, padding, dilation, groups);
  const int64_t P = dlfast::cuda::conv2d_out_size(config.height, config.kernel_h,
                                                  config.stride_h, config.pad_h, config.dil_h);
  const int64_t Q = dlfast::cuda::conv2d_out_size(config.width, config.kernel_w,
                                                  config.stride_w, config.pad_w, config.dil_w);
  const std::vector<int64_t> y_shape{config.batch, config.out_channels, P, Q};
  for (const auto& [t, name] : {std::pair<const at::Tensor&, const char*>{dy, "dy"},
                                std::pair<const at::Tensor&, const char*>{y, "y"}}) {
    TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on ", x.device(),
                " like x, got ", t.device());
    TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must be ",
                x.scalar_type(), " like x, got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(y_shape), op, ": ", name,
                " must have the forward output's shape ", at::IntArrayRef(y_shape), ", got ",
                t.sizes());
  }
  const bool want_dx = output_mask[0];
  const bool want_dweight = output_mask[1];
  const bool want_dbias = output_mask[2];

  const c10::cuda::CUDAGuard guard(x.device());
  const auto channels_last = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  // Gradients that are not wanted come back as (0,) tensors and are not computed.
  at::Tensor dx = want_dx ? at::empty(x.sizes(), channels_last) : at::empty({0}, x.options());
  at::Tensor dweight =
      want_dweight ? at::empty(weight.sizes(), channels_last) : at::empty({0}, x.options());
  at::Tensor dbias = at::empty({want_dbias ? config.out_channels : 0}, x.options());
  if (want_dx || want_dweight || want_dbias) {
    const at::Tensor dy_nhwc = dy.contiguous(at::MemoryFormat::ChannelsLast);
    const at::Tensor y_nhwc = y.contiguous(at::MemoryFormat::ChannelsLast);
    // Only dweight reads x and only dx reads the weight.
    const at::Tensor x_nhwc =
        want_dweight ? x.contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
    const at::Tensor w_krsc =
        want_dx ? weight.contiguous(at::MemoryFormat::ChannelsLast) : at::Tensor();
    const dlfast::cuda::DType dtype = launcher_dtype(x.scalar_type());
    const size_t ws_bytes = dlfast::cuda::conv2d_relu_bwd_workspace_bytes(
        config, dtype, want_dx, want_dweight, want_dbias);
    at::Tensor workspace =
        at::empty({static_cast<int64_t>(ws_bytes)}, x.options().dtype(at::kByte));
    const cudaError_t err = dlfast::cuda::conv2d_relu_bwd(
        dy_nhwc.const_data_ptr(), y_nhwc.const_data_ptr(),
        want_dweight ? x_nhwc.const_data_ptr() : nullptr,
        want_dx ? w_krsc.const_data_ptr() : nullptr, want_dx ? dx.mutable_data_ptr() : nullptr,
        want_dweight ? dweight.mutable_data_ptr() : nullptr,
        want_dbias ? dbias.mutable_data_ptr() : nullptr,
        ws_bytes > 0 ? workspace.mutable_data_ptr() : nullptr, ws_bytes, config, dtype,
        c10::cuda::getCurrentCUDAStream(x.device().index()).stream());
    TORCH_CHECK(err == cudaSuccess, op, ": ", cudaGetErrorString(err));
  }
  const at::MemoryFormat fmt = conv_memory_format(x, weight);
  return {want_dx ? dx.contiguous(fmt) : dx, want_dweight ? dweight.contiguous(fmt) : dweight,
          dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(dlfast, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd_cuda);
  m.impl("layer_norm_bwd", &layer_norm_bwd_cuda);
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("conv2d_relu_fwd", &conv2d_relu_fwd_cuda);
  m.impl("conv2d_relu_bwd", &conv2d_relu_bwd_cuda);
  m.impl("ngram_counts_", &ngram_counts_cuda);
}
