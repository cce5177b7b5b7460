// The CUDA attention kernels (csrc/cuda/attention.cu) run in the block emulator of emu.h and
// compared with a float64 reference: out, lse, dq, dk, dv over every head-dim bucket, causal
// shifts on tile edges, GQA, padding masks, dropout, empty shapes. Built and run by
// `make cuda-emulate`; a case name as argument runs the cases containing it, ERR=1 prints errors.
#include "emu.h"
#include "emu_test.h"
#include "launchers.h"
#include "../philox.h"
#include <random>
#include <string>

using dlfast::cuda::AttentionConfig;
using dlfast::cuda::DType;

struct Case {
  std::string name;
  bool bf16 = false;
  int B = 1, H = 2, Hkv = 2, Lq = 64, Lk = 64, D = 64;
  bool causal = false;
  int64_t shift = 0;
  double scale = 0;  // 0: D^-0.5
  double p = 0;
  int mask = 0;  // 0 none, 1 random, 2 right padding, 3 left padding, 4 interior padded block + an all-padded batch
};

void check(const std::string& what, const std::vector<float>& got, const std::vector<double>& ref, double tol, const Case& c) {
  double maxref = 1e-30, maxerr = 0; size_t at = 0; int bad_special = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    if (std::isinf(ref[i])) { if (!(std::isinf(got[i]) && got[i] > 0)) ++bad_special; continue; }
    if (!std::isfinite(got[i])) { ++bad_special; continue; }
    maxref = std::max(maxref, std::abs(ref[i]));
    const double e = std::abs(got[i] - ref[i]);
    if (e > maxerr) { maxerr = e; at = i; }
  }
  const double rel = maxerr / std::max(1.0, maxref);
  const bool ok = rel <= tol && bad_special == 0;
  if (getenv("ERR")) printf("    %-6s rel err %.2e (tol %.0e)\n", what.c_str(), rel, tol);
  if (!ok) {
    ++failures;
    printf("  FAIL %s %s: max err %.3g (rel %.3g) at %zu (got %g ref %g), non-finite mismatches %d\n", c.name.c_str(), what.c_str(), maxerr, rel, at, at < got.size() ? got[at] : 0.f, at < ref.size() ? ref[at] : 0.0, bad_special);
  }
}

void run(const Case& c) {
  const bool bf = c.bf16;
  const int B = c.B, H = c.H, Hkv = c.Hkv, Lq = c.Lq, Lk = c.Lk, D = c.D, G = H / Hkv;
  const double scale = c.scale != 0 ? c.scale : 1.0 / std::sqrt(double(D));
  std::mt19937 rng(1234 + Lq * 7 + Lk * 13 + D);
  std::normal_distribution<float> nd(0.f, 1.f);
  const size_t nq = size_t(B) * H * Lq * D, nk = size_t(B) * Hkv * Lk * D;
  std::vector<uint16_t> q(nq), k(nk), v(nk), dout(nq);
  for (auto& x : q) x = to_bits(nd(rng), bf);
  for (auto& x : k) x = to_bits(nd(rng), bf);
  for (auto& x : v) x = to_bits(nd(rng), bf);
  for (auto& x : dout) x = to_bits(nd(rng), bf);
  std::vector<uint8_t> mask(size_t(B) * Lk, 1);
  std::uniform_real_distribution<float> ud(0.f, 1.f);
  for (int b = 0; b < B; ++b)
    for (int j = 0; j < Lk; ++j) {
      uint8_t& m = mask[size_t(b) * Lk + j];
      switch (c.mask) {
        case 1: m = ud(rng) < 0.7f; break;
        case 2: m = j < std::max(1, Lk - 37 * (b + 1)); break;
        case 3: m = j >= std::min(Lk - 1, 45 * (b + 1)); break;
        case 4: m = b == 1 ? 0 : !(j >= 64 && j < 160); break;
      }
    }
  const int64_t seed = 0x123456789abcLL;
  const uint32_t thr = dlfast::dropout_threshold(c.p);

  // Reference in double.
  std::vector<double> rout(nq, 0), rlse(size_t(B) * H * Lq), rdq(nq, 0), rdk(nk, 0), rdv(nk, 0);
  const auto Q = [&](int b, int h, int i, int d) { return double(from_bits(q[((size_t(b) * H + h) * Lq + i) * D + d], bf)); };
  const auto K = [&](int b, int h, int j, int d) { return double(from_bits(k[((size_t(b) * Hkv + h) * Lk + j) * D + d], bf)); };
  const auto V = [&](int b, int h, int j, int d) { return double(from_bits(v[((size_t(b) * Hkv + h) * Lk + j) * D + d], bf)); };
  const auto dO = [&](int b, int h, int i, int d) { return double(from_bits(dout[((size_t(b) * H + h) * Lq + i) * D + d], bf)); };
  std::vector<double> P(Lk), Z(Lk), dP(Lk);
  for (int b = 0; b < B; ++b)
    for (int h = 0; h < H; ++h) {
      const int hk = h / G;
      for (int i = 0; i < Lq; ++i) {
        double m = -INFINITY;
        std::vector<char> ok(Lk);
        for (int j = 0; j < Lk; ++j) {
          ok[j] = mask[size_t(b) * Lk + j] && (!c.causal || j <= i + c.shift);
          if (!ok[j]) continue;
          double s = 0;
          for (int d = 0; d < D; ++d) s += Q(b, h, i, d) * K(b, hk, j, d);
          P[j] = s * scale;
          m = std::max(m, P[j]);
        }
        double sum = 0;
        for (int j = 0; j < Lk; ++j) { P[j] = ok[j] ? std::exp(P[j] - m) : 0; sum += P[j]; }
        const size_t row = (size_t(b) * H + h) * Lq + i;
        rlse[row] = sum > 0 ? m + std::log(sum) : INFINITY;
        for (int j = 0; j < Lk; ++j) {
          if (sum > 0) P[j] /= sum;
          Z[j] = c.p > 0 ? (dlfast::dropout_keep(uint64_t(seed), thr, uint32_t(b * H + h), i, j) ? 1.0 / (1.0 - c.p) : 0.0) : 1.0;
        }
        double Di = 0;
        for (int j = 0; j < Lk; ++j) {
          if (P[j] == 0) { dP[j] = 0; continue; }
          double dpv = 0;
          for (int d = 0; d < D; ++d) {
            rout[row * D + d] += P[j] * Z[j] * V(b, hk, j, d);
            dpv += dO(b, h, i, d) * V(b, hk, j, d);
          }
          dP[j] = dpv * Z[j];
          Di += P[j] * dP[j];
        }
        for (int j = 0; j < Lk; ++j) {
          if (P[j] == 0) continue;
          const double ds = P[j] * (dP[j] - Di);
          const size_t kr = ((size_t(b) * Hkv + hk) * Lk + j) * D;
          for (int d = 0; d < D; ++d) {
            rdq[row * D + d] += scale * ds * K(b, hk, j, d);
            rdk[kr + d] += scale * ds * Q(b, h, i, d);
            rdv[kr + d] += P[j] * Z[j] * dO(b, h, i, d);
          }
        }
      }
    }

  // Kernels.
  Buf bq(nq * 2), bk(nk * 2), bv(nk * 2), bdo(nq * 2), bout(nq * 2), blse(size_t(B) * H * Lq * 4),
      bmask(size_t(B) * Lk), bseed(8), bdq(nq * 2), bdk(nk * 2), bdv(nk * 2), bdelta(size_t(B) * H * Lq * 4);
  memcpy(bq.ptr(), q.data(), nq * 2);
  memcpy(bk.ptr(), k.data(), nk * 2);
  memcpy(bv.ptr(), v.data(), nk * 2);
  memcpy(bdo.ptr(), dout.data(), nq * 2);
  memcpy(bmask.ptr(), mask.data(), mask.size());
  memcpy(bseed.ptr(), &seed, 8);
  AttentionConfig cfg{B, H, Hkv, Lq, Lk, D, c.causal, c.shift, scale, c.p};
  const DType dt = bf ? DType::BFloat16 : DType::Float16;
  const uint8_t* mp = c.mask ? static_cast<const uint8_t*>(bmask.ptr()) : nullptr;
  const int64_t* sp = c.p > 0 ? static_cast<const int64_t*>(bseed.ptr()) : nullptr;
  cudaError_t e = dlfast::cuda::attention_fwd(bq.ptr(), bk.ptr(), bv.ptr(), mp, sp, bout.ptr(), static_cast<float*>(blse.ptr()), cfg, dt, nullptr);
  if (e != cudaSuccess) { printf("  FAIL %s: fwd error %d\n", c.name.c_str(), e); ++failures; return; }
  e = dlfast::cuda::attention_bwd(bdo.ptr(), bq.ptr(), bk.ptr(), bv.ptr(), bout.ptr(), static_cast<const float*>(blse.ptr()), mp, sp, bdq.ptr(), bdk.ptr(), bdv.ptr(), static_cast<float*>(bdelta.ptr()), cfg, dt, nullptr);
  if (e != cudaSuccess) { printf("  FAIL %s: bwd error %d\n", c.name.c_str(), e); ++failures; return; }
  for (Buf* b : {&bout, &blse, &bdq, &bdk, &bdv, &bdelta}) if (!b->guards_ok()) { printf("  FAIL %s: write outside a buffer\n", c.name.c_str()); ++failures; }

  if (getenv("DBG")) {
    std::vector<float> dl(size_t(B) * H * Lq); memcpy(dl.data(), bdelta.ptr(), dl.size() * 4);
    for (size_t r = 0; r < std::min<size_t>(4, dl.size()); ++r) { double s = 0; for (int d = 0; d < D; ++d) s += rout[r * D + d] * dO(0, 0, 0, 0) * 0 + rout[r*D+d] * double(from_bits(dout[r * D + d], bf)); printf("delta[%zu] kernel %g ref %g\n", r, dl[r], s); }
  }
  const auto floats = [&](Buf& b, size_t n) { std::vector<float> r(n); const uint16_t* u = static_cast<const uint16_t*>(b.ptr()); for (size_t i = 0; i < n; ++i) r[i] = from_bits(u[i], bf); return r; };
  std::vector<float> lse(size_t(B) * H * Lq);
  memcpy(lse.data(), blse.ptr(), lse.size() * 4);
  const double tol = bf ? 1.6e-2 : 2e-3;
  check("out", floats(bout, nq), rout, tol, c);
  check("lse", lse, rlse, 1e-4, c);
  check("dq", floats(bdq, nq), rdq, 2 * tol, c);
  check("dk", floats(bdk, nk), rdk, 2 * tol, c);
  check("dv", floats(bdv, nk), rdv, 2 * tol, c);
}

int main(int argc, char** argv) {
  std::vector<Case> cases;
  const auto add = [&](Case c) { cases.push_back(c); };
  // One case per head-dim bucket, exact and padded D, both dtypes.
  int n = 0;
  for (int D : {16, 32, 40, 64, 72, 96, 128, 136, 160, 176, 192, 200, 224, 248, 256}) {
    Case c; c.D = D; c.bf16 = n++ % 2; c.Lq = 70; c.Lk = 90; c.name = "D" + std::to_string(D) + (c.bf16 ? "bf16" : "fp16"); add(c);
  }
  { Case c; c.name = "tiny1x1"; c.Lq = 1; c.Lk = 1; c.D = 24; add(c); }
  { Case c; c.name = "Lq1"; c.Lq = 1; c.Lk = 150; add(c); }
  { Case c; c.name = "Lk1"; c.Lq = 150; c.Lk = 1; c.causal = true; add(c); }
  for (int64_t shift : {0LL, 40LL, -30LL, 7LL, -1000LL, 1000LL, -69LL}) {
    Case c; c.name = "causal_shift" + std::to_string(shift); c.causal = true; c.shift = shift; c.Lq = 130; c.Lk = 100; c.D = 64; add(c);
  }
  // Shifts = 1 (mod 16, 32, 64) put a causal tile bound exactly on a block or warp edge.
  for (int64_t shift : {1LL, 33LL, -63LL, 65LL, -15LL}) {
    for (int D : {64, 160}) {
      Case c; c.name = "causal_edge_shift" + std::to_string(shift) + "_D" + std::to_string(D); c.causal = true; c.shift = shift; c.Lq = 192; c.Lk = 200; c.D = D; c.bf16 = D > 128; add(c);
    }
  }
  { Case c; c.name = "causal_square128"; c.causal = true; c.Lq = 128; c.Lk = 128; c.D = 128; add(c); }
  { Case c; c.name = "causal_bottomright"; c.causal = true; c.Lq = 65; c.Lk = 200; c.shift = 200 - 65; c.D = 192; c.bf16 = true; add(c); }
  { Case c; c.name = "causal_D256"; c.causal = true; c.Lq = 140; c.Lk = 140; c.D = 256; add(c); }
  { Case c; c.name = "gqa4to1"; c.H = 4; c.Hkv = 1; c.Lq = 90; c.Lk = 77; c.D = 96; add(c); }
  { Case c; c.name = "gqa4to2_causal_mask"; c.H = 4; c.Hkv = 2; c.B = 2; c.causal = true; c.shift = 10; c.mask = 1; c.Lq = 100; c.Lk = 120; c.D = 32; add(c); }
  for (int m : {1, 2, 3, 4}) { Case c; c.name = "mask" + std::to_string(m); c.mask = m; c.B = 2; c.Lq = 80; c.Lk = 230; c.D = 64; c.bf16 = m % 2; add(c); }
  { Case c; c.name = "mask4_causal_D160"; c.mask = 4; c.B = 2; c.causal = true; c.shift = 100; c.Lq = 80; c.Lk = 230; c.D = 160; add(c); }
  { Case c; c.name = "dropout"; c.p = 0.3; c.Lq = 70; c.Lk = 130; c.D = 64; add(c); }
  { Case c; c.name = "dropout_causal_gqa_bf16"; c.p = 0.25; c.bf16 = true; c.H = 4; c.Hkv = 2; c.causal = true; c.Lq = 96; c.Lk = 96; c.D = 128; add(c); }
  { Case c; c.name = "dropout_mask_D224"; c.p = 0.5; c.mask = 2; c.B = 2; c.Lq = 50; c.Lk = 140; c.D = 224; add(c); }
  { Case c; c.name = "negative_scale"; c.scale = -0.3; c.Lq = 33; c.Lk = 47; c.D = 48; add(c); }
  { Case c; c.name = "zero_scale"; c.scale = 1e-30; c.Lq = 20; c.Lk = 30; c.D = 16; add(c); }
  { Case c; c.name = "empty_Lk0"; c.Lq = 20; c.Lk = 0; c.D = 32; add(c); }
  { Case c; c.name = "empty_Lq0"; c.Lq = 0; c.Lk = 20; c.D = 32; add(c); }
  { Case c; c.name = "big_mixed"; c.B = 2; c.H = 4; c.Hkv = 2; c.Lq = 257; c.Lk = 300; c.D = 128; c.causal = true; c.shift = 43; c.mask = 1; c.p = 0.1; c.bf16 = true; add(c); }
  return run_cases(argc, argv, cases, run);
}
