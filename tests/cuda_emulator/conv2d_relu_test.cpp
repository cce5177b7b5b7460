// The CUDA Conv2d + bias + ReLU kernels (csrc/cuda/conv2d_relu.cu) run in the block emulator of
// emu.h and compared with a float64 reference: y, dx, dweight, dbias for fp32 / fp16 / bf16 over
// shapes chosen to reach every kernel path (tensor-core implicit GEMM with 16-byte chunks and with
// the element gather, direct convolution, depthwise, groups, stride / padding / dilation, tile
// edges, several wgrad splits, unaligned pointers), plus gradient subsets and invalid configs.
// Built and run by `make cuda-emulate`; a case name as argument runs the cases containing it,
// ERR=1 prints every error.
#include "emu.h"
#include "emu_test.h"
#include "launchers.h"
#include <random>
#include <string>

using dlfast::cuda::Conv2dConfig;
using dlfast::cuda::DType;

struct Case {
  std::string name;
  DType dtype = DType::Float16;
  int N = 2, C = 16, H = 13, W = 17, K = 24, R = 3, S = 3;
  int sh = 1, sw = 1, ph = 1, pw = 1, dh = 1, dw = 1, G = 1;
  bool bias = true;
  bool want_dx = true, want_dw = true, want_db = true;
  bool unaligned = false;  // every tensor one element past a 16-byte boundary
};

// Max error relative to the largest reference magnitude (1e-30 floor: all-zero outputs).
void check(const Case& c, const char* what, const std::vector<float>& got, const std::vector<double>& ref, double tol) {
  if (ref.empty()) return;
  double maxref = 1e-30, maxerr = 0;
  size_t at = 0;
  int nonfinite = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) { ++nonfinite; continue; }
    maxref = std::max(maxref, std::abs(ref[i]));
    const double e = std::abs(got[i] - ref[i]);
    if (e > maxerr) { maxerr = e; at = i; }
  }
  const double rel = maxerr / maxref;
  if (getenv("ERR")) printf("    %-8s rel err %.2e (tol %.0e)\n", what, rel, tol);
  if (rel > tol || nonfinite) {
    ++failures;
    printf("  FAIL %s %s: max err %.3g (rel %.3g) at %zu (got %g ref %g), non-finite %d\n", c.name.c_str(), what, maxerr, rel, at, got[at], ref[at], nonfinite);
  }
}

size_t elem_bytes(DType t) { return t == DType::Float32 ? 4 : 2; }

// Values as the kernels see them: rounded to the dtype.
float round_to(float v, DType t) {
  if (t == DType::Float32) return v;
  return from_bits(to_bits(v, t == DType::BFloat16), t == DType::BFloat16);
}

void store(void* buf, size_t i, float v, DType t) {
  if (t == DType::Float32) { static_cast<float*>(buf)[i] = v; return; }
  static_cast<uint16_t*>(buf)[i] = to_bits(v, t == DType::BFloat16);
}

float load(const void* buf, size_t i, DType t) {
  if (t == DType::Float32) return static_cast<const float*>(buf)[i];
  return from_bits(static_cast<const uint16_t*>(buf)[i], t == DType::BFloat16);
}

// A buffer of n elements; with `unaligned`, the tensor starts one element into it.
struct Tensor {
  Buf buf;
  size_t offset;
  DType t;
  Tensor(size_t n, DType type, bool unaligned) : buf((n + 1) * elem_bytes(type)), offset(unaligned ? 1 : 0), t(type) {}
  void* ptr() { return static_cast<char*>(buf.ptr()) + offset * elem_bytes(t); }
  std::vector<float> floats(size_t n) { std::vector<float> r(n); for (size_t i = 0; i < n; ++i) r[i] = load(ptr(), i, t); return r; }
};

void run(const Case& c) {
  const DType t = c.dtype;
  const int Cg = c.C / c.G, Kg = c.K / c.G;
  const int P = (c.H + 2 * c.ph - c.dh * (c.R - 1) - 1) / c.sh + 1;
  const int Q = (c.W + 2 * c.pw - c.dw * (c.S - 1) - 1) / c.sw + 1;
  const size_t nx = size_t(c.N) * c.H * c.W * c.C, nw = size_t(c.K) * c.R * c.S * Cg, ny = size_t(c.N) * P * Q * c.K;
  std::mt19937 rng(17 + c.C * 31 + c.K * 7 + c.H);
  std::normal_distribution<float> nd(0.f, 1.f);
  const float wscale = 1.f / std::sqrt(float(c.R * c.S * Cg));
  std::vector<float> x(nx), w(nw), b(c.K), dy(ny);
  for (auto& v : x) v = round_to(nd(rng), t);
  for (auto& v : w) v = round_to(nd(rng) * wscale, t);
  for (auto& v : b) v = round_to(0.3f * nd(rng), t);
  for (auto& v : dy) v = round_to(nd(rng), t);

  Tensor bx(nx, t, c.unaligned), bw(nw, t, c.unaligned), bb(c.K, t, c.unaligned), by(ny, t, c.unaligned), bdy(ny, t, c.unaligned);
  for (size_t i = 0; i < nx; ++i) store(bx.ptr(), i, x[i], t);
  for (size_t i = 0; i < nw; ++i) store(bw.ptr(), i, w[i], t);
  for (int i = 0; i < c.K; ++i) store(bb.ptr(), i, b[i], t);
  for (size_t i = 0; i < ny; ++i) store(bdy.ptr(), i, dy[i], t);

  const Conv2dConfig cfg{c.N, c.C, c.H, c.W, c.K, c.R, c.S, c.sh, c.sw, c.ph, c.pw, c.dh, c.dw, c.G};
  cudaError_t e = dlfast::cuda::conv2d_relu_fwd(bx.ptr(), bw.ptr(), c.bias ? bb.ptr() : nullptr, by.ptr(), cfg, t, nullptr);
  if (e != cudaSuccess) { printf("  FAIL %s: fwd error %d\n", c.name.c_str(), e); ++failures; return; }

  // Reference, NHWC activations and KRSC weights like the kernels.
  std::vector<double> ry(ny), rdx(nx, 0), rdw(nw, 0), rdb(c.K, 0);
  const std::vector<float> y = by.floats(ny);
  for (int n = 0; n < c.N; ++n)
    for (int p = 0; p < P; ++p)
      for (int q = 0; q < Q; ++q)
        for (int k = 0; k < c.K; ++k) {
          const int g = k / Kg;
          const size_t yi = ((size_t(n) * P + p) * Q + q) * c.K + k;
          const double grad = y[yi] > 0 ? double(dy[yi]) : 0.0;
          double acc = c.bias ? b[k] : 0.0;
          rdb[k] += grad;
          for (int r = 0; r < c.R; ++r)
            for (int s = 0; s < c.S; ++s) {
              const int ih = p * c.sh - c.ph + r * c.dh, iw = q * c.sw - c.pw + s * c.dw;
              if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
              for (int ci = 0; ci < Cg; ++ci) {
                const size_t xi = ((size_t(n) * c.H + ih) * c.W + iw) * c.C + g * Cg + ci;
                const size_t wi = ((size_t(k) * c.R + r) * c.S + s) * Cg + ci;
                acc += double(x[xi]) * w[wi];
                rdx[xi] += grad * w[wi];
                rdw[wi] += grad * x[xi];
              }
            }
          ry[yi] = acc > 0 ? acc : 0;
        }
  const double tol = t == DType::Float32 ? 2e-5 : t == DType::Float16 ? 2e-3 : 1.6e-2;
  check(c, "y", y, ry, tol);

  const size_t ws_bytes = dlfast::cuda::conv2d_relu_bwd_workspace_bytes(cfg, t, c.want_dx, c.want_dw, c.want_db);
  Buf ws(std::max<size_t>(ws_bytes, 16));
  Tensor bdx(nx, t, c.unaligned), bdw(nw, t, c.unaligned), bdb(c.K, t, c.unaligned);
  const auto bwd = [&] {
    return dlfast::cuda::conv2d_relu_bwd(bdy.ptr(), by.ptr(), bx.ptr(), bw.ptr(), c.want_dx ? bdx.ptr() : nullptr,
                                         c.want_dw ? bdw.ptr() : nullptr, c.want_db ? bdb.ptr() : nullptr, ws.ptr(),
                                         ws_bytes, cfg, t, nullptr);
  };
  e = bwd();
  if (e != cudaSuccess) { printf("  FAIL %s: bwd error %d\n", c.name.c_str(), e); ++failures; return; }
  // fp16 / bf16 gradients: masked dy and the operands rounded to the dtype on the way in, and
  // the sum rounded on the way out, hence twice the forward's bound; fp32 keeps 2e-5.
  const double gtol = t == DType::Float32 ? tol : 2 * tol;
  if (c.want_dx) check(c, "dx", bdx.floats(nx), rdx, gtol);
  if (c.want_dw) check(c, "dweight", bdw.floats(nw), rdw, gtol);
  if (c.want_db) check(c, "dbias", bdb.floats(c.K), rdb, gtol);
  // Not wanted: never written (still the NaN fill).
  for (auto [wanted, tensor, n] : {std::tuple{c.want_dx, &bdx, nx}, std::tuple{c.want_dw, &bdw, nw}, std::tuple{c.want_db, &bdb, size_t(c.K)}}) {
    if (wanted) continue;
    for (float v : tensor->floats(n)) if (!std::isnan(v)) { printf("  FAIL %s: an unwanted gradient was written\n", c.name.c_str()); ++failures; break; }
  }
  // Deterministic: a second run gives the same bits.
  if (c.want_dw || c.want_db) {
    const std::vector<float> dw1 = bdw.floats(nw), db1 = bdb.floats(c.K);
    e = bwd();
    const std::vector<float> dw2 = bdw.floats(nw), db2 = bdb.floats(c.K);
    if (e != cudaSuccess || (c.want_dw && memcmp(dw1.data(), dw2.data(), nw * 4)) || (c.want_db && memcmp(db1.data(), db2.data(), c.K * 4))) {
      printf("  FAIL %s: backward not reproducible\n", c.name.c_str());
      ++failures;
    }
  }
  for (Tensor* b : {&by, &bdx, &bdw, &bdb}) if (!b->buf.guards_ok()) { printf("  FAIL %s: write outside a buffer\n", c.name.c_str()); ++failures; }
  if (!ws.guards_ok()) { printf("  FAIL %s: write outside the workspace\n", c.name.c_str()); ++failures; }
}

// Configs the launchers must refuse, and a workspace that is too small.
void run_invalid() {
  const Conv2dConfig ok{1, 4, 5, 5, 4, 3, 3, 1, 1, 0, 0, 1, 1, 1};
  std::vector<Conv2dConfig> bad;
  { Conv2dConfig c = ok; c.groups = 3; bad.push_back(c); }        // does not divide C, K
  { Conv2dConfig c = ok; c.kernel_h = 6; bad.push_back(c); }      // P < 1
  { Conv2dConfig c = ok; c.stride_w = 0; bad.push_back(c); }
  { Conv2dConfig c = ok; c.pad_h = -1; bad.push_back(c); }
  { Conv2dConfig c = ok; c.dil_h = 0; bad.push_back(c); }
  { Conv2dConfig c = ok; c.height = int64_t(1) << 32; bad.push_back(c); }
  Buf dummy(1024);
  for (const Conv2dConfig& c : bad) {
    if (dlfast::cuda::conv2d_relu_fwd(dummy.ptr(), dummy.ptr(), nullptr, dummy.ptr(), c, DType::Float16, nullptr) != cudaErrorInvalidValue) {
      printf("  FAIL invalid: a bad config was accepted by the forward\n");
      ++failures;
    }
  }
  const size_t need = dlfast::cuda::conv2d_relu_bwd_workspace_bytes(ok, DType::Float16, true, true, true);
  if (dlfast::cuda::conv2d_relu_bwd(dummy.ptr(), dummy.ptr(), dummy.ptr(), dummy.ptr(), dummy.ptr(), dummy.ptr(), dummy.ptr(), dummy.ptr(), need - 1, ok, DType::Float16, nullptr) != cudaErrorInvalidValue) {
    printf("  FAIL invalid: a short workspace was accepted\n");
    ++failures;
  }
}

int main(int argc, char** argv) {
  std::vector<Case> cases;
  const auto add = [&](Case c, const std::string& name) { c.name = name; cases.push_back(c); };
  const DType kF32 = DType::Float32, kF16 = DType::Float16, kBF16 = DType::BFloat16;
  const auto tag = [](DType t) { return t == DType::Float32 ? "_fp32" : t == DType::Float16 ? "_fp16" : "_bf16"; };
  // First layers (C / G <= 4): the direct dx; the forward by the GEMM's element gather where the
  // reduction R S C reaches 16 (3 x 3 x 3, 5 x 5 x 1), directly where it does not (3 x 3 x 1).
  for (DType t : {kF32, kF16, kBF16}) {
    { Case c; c.dtype = t; c.C = 3; c.K = 16; add(c, std::string("c3_k16_3x3_13x17") + tag(t)); }
    { Case c; c.dtype = t; c.N = 1; c.C = 1; c.K = 8; c.H = 7; c.W = 7; c.R = 5; c.S = 5; c.ph = c.pw = 2; c.bias = false; add(c, std::string("c1_k8_5x5_7x7_nobias") + tag(t)); }
    { Case c; c.dtype = t; c.C = 1; c.K = 32; c.H = 9; c.W = 10; add(c, std::string("c1_k32_3x3_direct") + tag(t)); }
  }
  // Depthwise, with and without a channel multiplier.
  for (DType t : {kF32, kF16, kBF16}) {
    { Case c; c.dtype = t; c.C = 8; c.K = 8; c.G = 8; add(c, std::string("depthwise_c8") + tag(t)); }
  }
  { Case c; c.dtype = kF16; c.C = 4; c.K = 8; c.G = 4; c.sh = c.sw = 2; add(c, "depthwise_mult2_s2_fp16"); }
  // Implicit GEMM: fp32 on the CUDA cores; fp16 / bf16 on tensor cores with 16-byte chunks
  // (C / G and K / G multiples of 8).
  for (DType t : {kF32, kF16, kBF16}) {
    { Case c; c.dtype = t; c.C = 16; c.K = 24; add(c, std::string("c16_k24_3x3_s1_p1") + tag(t)); }
    { Case c; c.dtype = t; c.N = 1; c.C = 8; c.K = 8; c.H = 7; c.W = 7; c.sh = c.sw = 2; add(c, std::string("c8_k8_7x7_s2_p1") + tag(t)); }
    { Case c; c.dtype = t; c.C = 16; c.K = 16; c.sh = c.sw = 2; c.ph = c.pw = 0; c.dh = c.dw = 2; add(c, std::string("c16_k16_s2_p0_dil2") + tag(t)); }
    { Case c; c.dtype = t; c.C = 32; c.K = 64; c.G = 2; c.H = 9; c.W = 11; add(c, std::string("g2_c32_k64") + tag(t)); }
  }
  { Case c; c.dtype = kF16; c.N = 1; c.C = 32; c.K = 72; c.H = 9; c.W = 9; add(c, "c32_k72_two_column_tiles_fp16"); }
  { Case c; c.dtype = kBF16; c.N = 1; c.C = 64; c.K = 64; c.H = 9; c.W = 9; add(c, "c64_k64_18_steps_bf16"); }
  { Case c; c.dtype = kBF16; c.N = 2; c.C = 8; c.K = 16; c.H = 16; c.W = 16; c.R = c.S = 1; c.ph = c.pw = 0; add(c, "c8_k16_1x1_16x16_splits_bf16"); }
  { Case c; c.dtype = kF16; c.N = 1; c.C = 16; c.K = 16; c.H = 12; c.W = 10; c.R = 3; c.S = 1; c.sh = 2; c.ph = 1; c.pw = 0; c.dw = 3; add(c, "c16_k16_3x1_rect_fp16"); }
  // One output pixel per image (tile rows span images); stride above the kernel extent (input
  // pixels that no output reads: dx must be exactly zero there).
  { Case c; c.dtype = kF16; c.N = 3; c.C = 16; c.K = 16; c.H = 3; c.W = 3; c.ph = c.pw = 0; add(c, "c16_k16_P1Q1_fp16"); }
  { Case c; c.dtype = kBF16; c.C = 8; c.K = 8; c.H = 11; c.W = 11; c.R = c.S = 2; c.sh = c.sw = 3; c.ph = c.pw = 0; add(c, "c8_k8_2x2_s3_bf16"); }
  // Tensor cores, element gather (C / G or K / G not a multiple of 8, or unaligned tensors).
  { Case c; c.dtype = kF16; c.C = 12; c.K = 20; add(c, "c12_k20_gather_fp16"); }
  { Case c; c.dtype = kF32; c.C = 12; c.K = 20; c.G = 2; c.unaligned = true; add(c, "g2_c12_k20_unaligned_fp32"); }
  { Case c; c.dtype = kBF16; c.C = 6; c.K = 10; c.R = c.S = 5; c.sh = c.sw = 2; c.ph = c.pw = 2; add(c, "c6_k10_5x5_s2_gather_bf16"); }
  { Case c; c.dtype = kF16; c.C = 16; c.K = 16; c.G = 2; c.sh = 2; c.dw = 2; c.pw = 2; c.unaligned = true; add(c, "g2_c16_unaligned_fp16"); }
  { Case c; c.dtype = kF16; c.C = 5; c.K = 40; c.N = 1; c.H = 7; c.W = 9; add(c, "c5_k40_gather_fwd_fp16"); }
  // fp32 direct kernels with groups, stride and dilation together.
  { Case c; c.dtype = kF32; c.C = 8; c.K = 12; c.G = 2; c.sh = c.sw = 2; c.dh = c.dw = 2; c.ph = c.pw = 1; add(c, "g2_s2_dil2_fp32"); }
  { Case c; c.dtype = kF32; c.N = 1; c.C = 16; c.K = 16; c.H = 7; c.W = 7; c.ph = c.pw = 0; add(c, "c16_k16_p0_fp32"); }
  { Case c; c.dtype = kF32; c.C = 4; c.K = 40; c.H = 16; c.W = 16; add(c, "c4_k40_16x16_splits_fp32"); }
  // Gradient subsets.
  { Case c; c.want_dw = c.want_db = false; add(c, "only_dx_fp16"); }
  { Case c; c.want_dx = false; c.dtype = kBF16; add(c, "dw_db_bf16"); }
  { Case c; c.want_dx = c.want_dw = false; c.dtype = kF32; c.C = 3; add(c, "only_db_fp32"); }
  { Case c; c.want_db = false; c.bias = false; add(c, "dx_dw_nobias_fp16"); }
  { Case c; c.N = 0; add(c, "empty_batch_fp16"); }
  return run_cases(argc, argv, cases, run, run_invalid);
}
