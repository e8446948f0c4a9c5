// Vectorised exp, sigmoid and softmax numerators over a row, for dsk's C++ kernels.
//
// float32 uses a Cephes-style exp (range reduction to [-ln2/2, ln2/2], degree-6 polynomial, 2^n by exponent bits;
// relative error ~1e-7, i.e. float32 rounding) written so that the compiler vectorises it, compiled for AVX-512,
// AVX2 and baseline x86-64 and picked at load time (target_clones); libm's scalar expf was ~20 % of the routed
// expert forward. float64 keeps std::exp, so that float64 tests compare exactly against PyTorch.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSK_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSK_VECTOR_CLONES
#endif

namespace dsk {
// internal linkage: each translation unit gets its own clones and their load-time resolver
namespace {

// exp(v) for v in float32's range (clamped to [-87, 88]); inlined into each vectorised clone below.
[[maybe_unused]] inline float exp_approx(float v) {
  v = std::min(std::max(v, -87.0f), 88.0f);
  const float k = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln2), |.| < 2^22
  const float r = (v - k * 0.693359375f) + k * 2.12194440e-4f;            // v - k ln2 in two parts (Cody-Waite)
  float q = 1.9875691500e-4f;
  q = q * r + 1.3981999507e-3f;
  q = q * r + 8.3334519073e-3f;
  q = q * r + 4.1665795894e-2f;
  q = q * r + 1.6666665459e-1f;
  q = q * r + 5.0000001201e-1f;
  const float e_r = q * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;  // 2^k
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return e_r * two_k;
}

// out[i] = 1 / (1 + exp(-x[i])).
[[maybe_unused]] DSK_VECTOR_CLONES void sigmoid_row(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0f / (1.0f + exp_approx(-x[i]));
}

[[maybe_unused]] void sigmoid_row(const double* x, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0 / (1.0 + std::exp(-x[i]));
}

// x[i] = exp(x[i] * a - b), returning the sum (softmax numerators).
[[maybe_unused]] DSK_VECTOR_CLONES float exp_scaled_row(float* x, int64_t n, float a, float b) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    x[i] = exp_approx(x[i] * a - b);
    sum += x[i];
  }
  return sum;
}

[[maybe_unused]] double exp_scaled_row(double* x, int64_t n, double a, double b) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] * a - b);
    sum += x[i];
  }
  return sum;
}

}  // namespace
}  // namespace dsk
