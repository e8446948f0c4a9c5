// dsk's GEMM for C++ kernels: a row-major product on raw pointers, computed by ATen's CPU matmul.
//
// at::cpu::mm_out / addmm_out are ATen's CPU kernels called directly (no dispatcher, no autograd): they run the
// BLAS torch was built with (MKL, OpenBLAS, Accelerate) with the integer width torch uses for it, and ATen's own
// GEMM where torch has no BLAS, so a kernel never assumes a BLAS symbol or ABI of its own. The operands are
// from_blob views of the caller's memory with its leading dimensions, which BLAS reads as they are (no copy).
//
// Called inside at::parallel_for (an OpenMP parallel region), each call runs on its calling thread: ATen does not
// nest its parallel regions, and MKL and OpenBLAS run single-threaded when called from an active OpenMP region
// (checked for MKL: no thread is created and each thread's product runs at the single-thread speed). The kernels
// rely on it: their threads split the work, one GEMM per thread at a time.
#pragma once

#include <ATen/ATen.h>
#include <ATen/ops/addmm_cpu_dispatch.h>
#include <ATen/ops/mm_cpu_dispatch.h>

#include <cstdint>

namespace dsk {

// Row-major C[m, n] = op(A) op(B) + beta * C, with op(A) [m, k], op(B) [k, n]; ta / tb say whether A / B are stored
// transposed (A as [k, m] rows of length lda). beta is 0 (C is only written) or 1 (C accumulates).
template <typename T>
inline void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // a transposed operand is the same memory read with swapped strides
  const auto a = at::from_blob(const_cast<T*>(A), {m, k}, ta ? at::IntArrayRef{1, lda} : at::IntArrayRef{lda, 1}, opts);
  const auto b = at::from_blob(const_cast<T*>(B), {k, n}, tb ? at::IntArrayRef{1, ldb} : at::IntArrayRef{ldb, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) {
    at::cpu::mm_out(c, a, b);
  } else {
    at::cpu::addmm_out(c, c, a, b, beta, 1);
  }
}

}  // namespace dsk
