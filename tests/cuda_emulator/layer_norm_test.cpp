// The CUDA LayerNorm kernels (csrc/cuda/layer_norm.cu) run in the block emulator of emu.h and
// compared with a float64 reference: y, mean, rstd, dx, dweight, dbias for fp32 / fp16 / bf16,
// over row widths that reach every kernel configuration of the forward and backward dispatch
// (a warp per row, a block per row, the looped kernels past the register budget), packed and
// unpacked loads (N not a multiple of the pack, misaligned data), with and without weight and
// bias, each gradient alone, row counts that leave a partial row group and make the persistent
// backward blocks loop, and the empty shapes. Each case runs on one of three emulated devices:
// an H100's shared memory, none to opt in to (every backward takes the looped kernels), and
// 2 SMs. Built and run by `make cuda-emulate`; a case name as argument runs the cases
// containing it, ERR=1 prints the errors.
#include "emu.h"
#include "emu_test.h"
#include "launchers.h"

#include <random>
#include <string>

using dlfast::cuda::DType;

struct Case {
  std::string name;
  DType dtype = DType::Float32;
  int64_t M = 3, N = 64;
  bool weight = true, bias = true;  // forward inputs (the backward reads the weight only)
  bool dweight = true, dbias = true;
  int offset = 0;  // elements by which x, y, dy and dx start past a 16-byte boundary
  int device = 0;
};

size_t elem_bytes(DType t) { return t == DType::Float32 ? 4 : 2; }

// Values of one dtype in a device buffer, written and read as floats (rounded to the dtype).
struct Tensor {
  DType dtype;
  int64_t n;
  int offset;
  Buf buf;
  Tensor(DType t, int64_t n_, int offset_ = 0)
      : dtype(t), n(n_), offset(offset_), buf(size_t(n_ + offset_) * elem_bytes(t)) {}
  void* ptr() { return static_cast<char*>(buf.ptr()) + offset * elem_bytes(dtype); }
  void set(int64_t i, float v) {
    if (dtype == DType::Float32) static_cast<float*>(ptr())[i] = v;
    else static_cast<uint16_t*>(ptr())[i] = to_bits(v, dtype == DType::BFloat16);
  }
  float get(int64_t i) {
    if (dtype == DType::Float32) return static_cast<float*>(ptr())[i];
    return from_bits(static_cast<uint16_t*>(ptr())[i], dtype == DType::BFloat16);
  }
  std::vector<float> values() {
    std::vector<float> v(n);
    for (int64_t i = 0; i < n; ++i) v[i] = get(i);
    return v;
  }
};

// Largest error over max(1, largest reference magnitude); a non-finite value where the
// reference is finite fails.
void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref,
           double tol, const Case& c) {
  double maxref = 1e-30, maxerr = 0;
  size_t at = 0, non_finite = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (!std::isfinite(got[i])) { ++non_finite; continue; }
    maxref = std::max(maxref, std::abs(ref[i]));
    const double e = std::abs(got[i] - ref[i]);
    if (e > maxerr) { maxerr = e; at = i; }
  }
  const double rel = maxerr / std::max(1.0, maxref);
  if (getenv("ERR")) printf("    %-8s rel err %.2e (tol %.0e)\n", what.c_str(), rel, tol);
  if (rel > tol || non_finite > 0) {
    ++failures;
    printf("  FAIL %s %s: max err %.3g (rel %.3g) at %zu (got %g ref %g), %zu non-finite\n",
           c.name.c_str(), what.c_str(), maxerr, rel, at, at < got.size() ? got[at] : 0.f,
           at < ref.size() ? ref[at] : 0.0, non_finite);
  }
}

// Outputs are rounded to their dtype once; fp32 sums over up to 65536 elements, fp16 and bf16
// statistics in fp32 and one rounding of each output.
double tolerance(DType t) {
  switch (t) {
    case DType::Float32: return 2e-5;
    case DType::Float16: return 2e-3;
    default: return 1.6e-2;
  }
}

void expect(bool ok, const Case& c, const char* what) {
  if (!ok) {
    ++failures;
    printf("  FAIL %s: %s\n", c.name.c_str(), what);
  }
}

void run(const Case& c) {
  g_device = c.device;
  const int64_t M = c.M, N = c.N;
  const DType t = c.dtype;
  const float eps = 1e-5f;
  std::mt19937 rng(uint32_t(M * 131 + N));
  std::normal_distribution<float> nd(0.f, 1.f);
  Tensor x(t, M * N, c.offset), y(t, M * N, c.offset), dy(t, M * N, c.offset), dx(t, M * N, c.offset);
  Tensor w(t, N), b(t, N), dw(t, N), db(t, N);
  Buf mean(std::max<int64_t>(M, 1) * 4), rstd(std::max<int64_t>(M, 1) * 4);
  // Rows with a large common offset: a one-pass E[x^2] - E[x]^2 variance would lose it.
  for (int64_t i = 0; i < M * N; ++i) x.set(i, 3.f + nd(rng) * (1.f + float(i / std::max<int64_t>(N, 1) % 3)));
  for (int64_t i = 0; i < M * N; ++i) dy.set(i, nd(rng));
  for (int64_t j = 0; j < N; ++j) w.set(j, 1.f + 0.5f * nd(rng));
  for (int64_t j = 0; j < N; ++j) b.set(j, nd(rng));
  const std::vector<float> xv = x.values(), dyv = dy.values(), wv = w.values(), bv = b.values();

  float* mean_p = static_cast<float*>(mean.ptr());
  float* rstd_p = static_cast<float*>(rstd.ptr());
  const cudaError_t fwd = dlfast::cuda::layer_norm_fwd(x.ptr(), c.weight ? w.ptr() : nullptr, c.bias ? b.ptr() : nullptr,
                                                       y.ptr(), mean_p, rstd_p, M, N, eps, t, nullptr);
  expect(fwd == cudaSuccess, c, "layer_norm_fwd failed");

  const size_t ws_bytes = dlfast::cuda::layer_norm_bwd_workspace_bytes(M, N, c.dweight, c.dbias);
  Buf ws(std::max<size_t>(ws_bytes, 16));
  const cudaError_t bwd = dlfast::cuda::layer_norm_bwd(
      dy.ptr(), x.ptr(), c.weight ? w.ptr() : nullptr, mean_p, rstd_p, dx.ptr(), c.dweight ? dw.ptr() : nullptr,
      c.dbias ? db.ptr() : nullptr, ws.ptr(), ws_bytes, M, N, t, nullptr);
  expect(bwd == cudaSuccess, c, "layer_norm_bwd failed");

  // float64 reference from the rounded inputs.
  std::vector<double> y_ref(M * N), dx_ref(M * N), mean_ref(M), rstd_ref(M), dw_ref(N, 0.0), db_ref(N, 0.0);
  for (int64_t r = 0; r < M; ++r) {
    const float* xr = xv.data() + r * N;
    const float* dyr = dyv.data() + r * N;
    double mu = 0, var = 0;
    for (int64_t j = 0; j < N; ++j) mu += xr[j];
    mu /= double(N);
    for (int64_t j = 0; j < N; ++j) var += (xr[j] - mu) * (xr[j] - mu);
    var /= double(N);
    const double rs = 1.0 / std::sqrt(var + eps);
    mean_ref[r] = mu;
    rstd_ref[r] = rs;
    double mg = 0, mgx = 0;
    for (int64_t j = 0; j < N; ++j) {
      const double xh = (xr[j] - mu) * rs;
      y_ref[r * N + j] = xh * (c.weight ? wv[j] : 1.0) + (c.bias ? bv[j] : 0.0);
      const double g = dyr[j] * (c.weight ? wv[j] : 1.0);
      mg += g;
      mgx += g * xh;
      dw_ref[j] += dyr[j] * xh;
      db_ref[j] += dyr[j];
    }
    mg /= double(N);
    mgx /= double(N);
    for (int64_t j = 0; j < N; ++j) {
      const double xh = (xr[j] - mu) * rs;
      dx_ref[r * N + j] = rs * (dyr[j] * (c.weight ? wv[j] : 1.0) - mg - xh * mgx);
    }
  }
  const double tol = tolerance(t);
  check("y", y.values(), y_ref, tol, c);
  check("mean", std::vector<float>(mean_p, mean_p + M), mean_ref, 2e-5, c);
  // rstd relative to itself: it is about 1 / the row's spread, not O(1).
  std::vector<float> rstd_rel(M);
  std::vector<double> ones(M, 1.0);
  for (int64_t r = 0; r < M; ++r) rstd_rel[r] = float(rstd_p[r] / rstd_ref[r]);
  check("rstd", rstd_rel, ones, 2e-5, c);
  check("dx", dx.values(), dx_ref, tol, c);
  // Column sums over M rows: scaled by the largest sum.
  if (c.dweight) check("dweight", dw.values(), dw_ref, tol, c);
  if (c.dbias) check("dbias", db.values(), db_ref, tol, c);
  expect(x.buf.guards_ok() && y.buf.guards_ok() && dx.buf.guards_ok() && dw.buf.guards_ok() &&
             db.buf.guards_ok() && mean.guards_ok() && rstd.guards_ok() && ws.guards_ok(),
         c, "a write past a buffer's end");
}

// Empty shapes: M = 0 writes no row and zero gradients for weight and bias; N = 0 gives mean 0
// and rstd NaN, as PyTorch does.
void run_empty() {
  const Case c{"empty"};
  g_device = 0;
  Buf w(64 * 4), dw(64 * 4), db(64 * 4), mean(4 * 4), rstd(4 * 4);
  expect(dlfast::cuda::layer_norm_fwd(w.ptr(), nullptr, nullptr, w.ptr(), nullptr, nullptr, 0, 64, 1e-5f,
                                      DType::Float32, nullptr) == cudaSuccess, c, "fwd with M = 0");
  expect(dlfast::cuda::layer_norm_bwd(w.ptr(), w.ptr(), w.ptr(), nullptr, nullptr, w.ptr(), dw.ptr(), db.ptr(),
                                      nullptr, 0, 0, 64, DType::Float32, nullptr) == cudaSuccess,
         c, "bwd with M = 0");
  for (int j = 0; j < 64; ++j) {
    expect(static_cast<float*>(dw.ptr())[j] == 0.f && static_cast<float*>(db.ptr())[j] == 0.f, c,
           "dweight / dbias not zero for M = 0");
  }
  expect(dlfast::cuda::layer_norm_fwd(w.ptr(), nullptr, nullptr, w.ptr(), static_cast<float*>(mean.ptr()),
                                      static_cast<float*>(rstd.ptr()), 4, 0, 1e-5f, DType::Float32,
                                      nullptr) == cudaSuccess, c, "fwd with N = 0");
  for (int r = 0; r < 4; ++r) {
    expect(static_cast<float*>(mean.ptr())[r] == 0.f && std::isnan(static_cast<float*>(rstd.ptr())[r]), c,
           "mean 0 and rstd NaN for N = 0");
  }
}

// What the launchers refuse: rows past kLayerNormMaxN, negative sizes, a workspace that is too
// small or misaligned.
void run_invalid() {
  const Case c{"invalid"};
  g_device = 0;
  Buf a(4096 * 4), mean(16 * 4), rstd(16 * 4);
  float* m = static_cast<float*>(mean.ptr());
  float* r = static_cast<float*>(rstd.ptr());
  const auto fwd = [&](int64_t M, int64_t N) {
    return dlfast::cuda::layer_norm_fwd(a.ptr(), nullptr, nullptr, a.ptr(), m, r, M, N, 1e-5f, DType::Float32, nullptr);
  };
  expect(fwd(1, dlfast::cuda::kLayerNormMaxN + 1) == cudaErrorInvalidValue, c, "N past kLayerNormMaxN accepted");
  expect(fwd(-1, 8) == cudaErrorInvalidValue, c, "negative M accepted");
  const int64_t M = 16, N = 64;
  const size_t need = dlfast::cuda::layer_norm_bwd_workspace_bytes(M, N, true, true);
  Buf ws(need + 16);
  const auto bwd = [&](void* workspace, size_t bytes) {
    return dlfast::cuda::layer_norm_bwd(a.ptr(), a.ptr(), nullptr, m, r, a.ptr(), a.ptr(), a.ptr(), workspace, bytes,
                                        M, N, DType::Float32, nullptr);
  };
  expect(bwd(ws.ptr(), need - 4) == cudaErrorInvalidValue, c, "a small workspace accepted");
  expect(bwd(static_cast<char*>(ws.ptr()) + 4, need) == cudaErrorInvalidValue, c, "a misaligned workspace accepted");
}

std::vector<Case> cases() {
  std::vector<Case> out;
  const struct {
    DType t;
    const char* name;
  } dtypes[] = {{DType::Float32, "fp32"}, {DType::Float16, "fp16"}, {DType::BFloat16, "bf16"}};
  for (const auto& d : dtypes) {
    const int vec = int(16 / elem_bytes(d.t));
    // Packs per row reaching each configuration of fwd_dispatch (the last: the looped kernel)
    // and bwd_dispatch (past 2048: the looped kernels).
    for (const int nv : {1, 25, 50, 100, 200, 400, 1000, 2000, 4000, 8000, 8200}) {
      const int64_t N = int64_t(nv) * vec;
      if (N > 40000 && d.t != DType::BFloat16) continue;  // one dtype at the widest rows
      const int64_t M = N >= 8192 ? 2 : 37;  // 37: a partial group of 8 or 16 rows
      out.push_back({std::string(d.name) + " M" + std::to_string(M) + " N" + std::to_string(N), d.t, M, N});
    }
    // Not a multiple of the pack, and misaligned: unpacked loads.
    out.push_back({std::string(d.name) + " N7", d.t, 5, 7});
    out.push_back({std::string(d.name) + " N1", d.t, 3, 1});
    out.push_back({std::string(d.name) + " N1000 misaligned", d.t, 9, 1000, true, true, true, true, 1});
    out.push_back({std::string(d.name) + " N4100 misaligned", d.t, 2, 4100, true, true, true, true, 3});
  }
  // Weight and bias absent, each gradient alone.
  out.push_back({"fp32 N256 no weight no bias", DType::Float32, 20, 256, false, false});
  out.push_back({"bf16 N512 no bias dweight only", DType::BFloat16, 20, 512, true, false, true, false});
  out.push_back({"fp16 N96 dbias only", DType::Float16, 20, 96, true, true, false, true});
  out.push_back({"fp32 N40000 no gradients of weight and bias", DType::Float32, 2, 40000, true, true, false, false});
  // Many rows per persistent backward block (2 SMs), and the looped backward everywhere.
  out.push_back({"fp32 M300 N128 2 SMs", DType::Float32, 300, 128, true, true, true, true, 0, 2});
  out.push_back({"bf16 M70 N2048 2 SMs", DType::BFloat16, 70, 2048, true, true, true, true, 0, 2});
  out.push_back({"fp32 M37 N100 no opt-in smem", DType::Float32, 37, 100, true, true, true, true, 0, 1});
  out.push_back({"bf16 M9 N1000 misaligned no opt-in smem", DType::BFloat16, 9, 1000, true, true, true, true, 1, 1});
  return out;
}

int main(int argc, char** argv) {
  const std::string only = argc > 1 ? argv[1] : "";
  if (only.empty() || std::string("empty").find(only) != std::string::npos) {
    const int before = failures;
    run_empty();
    printf("%s empty\n", failures == before ? "ok  " : "FAIL");
  }
  return run_cases(argc, argv, cases(), run, run_invalid);
}
