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

#include <algorithm>
#include <cstdint>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
// x86: the small-GEMM kernel is compiled for AVX-512, AVX2+FMA and the baseline, picked once by the CPU's features
// (target_clones' "arch=" resolvers match CPU models, not features, and miss e.g. AMD's AVX2 CPUs)
#define DSK_GEMM_X86_CLONES 1
#endif

namespace dsk {

// Row-major C[m, n] = op(A) op(B) + beta * C, with op(A) [m, k], op(B) [k, n]; ta / tb say whether A / B are stored
// transposed (A as [k, m] rows of length lda). beta is 0 (C is only written) or 1 (C accumulates).
// ---- small GEMMs on the calling thread, no ATen call ----------------------------------------------------------
//
// A product of a few tens of thousands of multiply-adds costs BLAS ~1-2 us, and ATen's mm_out adds ~3-5 us of
// tensor wrapping and checks around it: the MLA attention kernel makes hundreds of such products per layer. Below
// kSmallGemmFlops the product runs here instead: a register-blocked kernel (kMR rows x kNR columns of C held in
// registers, the columns vectorised) over B laid out as [k, n] rows, packed into a thread-local zero-padded panel
// where it is stored transposed or its width is not a whole number of column blocks.
namespace small_gemm {

// kNR columns: two AVX2 registers (or one AVX-512 register) of T; kMR rows: 6 x 2 accumulators fill 12 of AVX2's
// 16 vector registers, leaving room for the B row and the broadcast A element.
template <typename T>
constexpr int kNR = 64 / static_cast<int>(sizeof(T));
constexpr int kMR = 6;

// C[MR, kNR] block: acc[r][c] = sum_p a(r, p) * Bp[p * ldbp + c], then written (beta 0) or added (beta 1) to the
// first `cols` columns of C. a(r, p) is A[r * lda + p] (as_ = 1) or A[p * lda + r] (transposed A).
template <typename T, int MR>
__attribute__((always_inline)) inline void block(int64_t k, const T* A, int64_t a_row, int64_t a_col, const T* Bp,
                                                 int64_t ldbp, bool accumulate, T* C, int64_t ldc, int64_t cols) {
  constexpr int NR = kNR<T>;
  T acc[MR][NR] = {};
  for (int64_t p = 0; p < k; ++p) {
    const T* b = Bp + p * ldbp;
    const T* a = A + p * a_col;
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      const T ar = a[r * a_row];
#pragma omp simd
      for (int c = 0; c < NR; ++c) acc[r][c] += ar * b[c];
    }
  }
  if (cols == NR) {
#pragma GCC unroll 8
    for (int r = 0; r < MR; ++r) {
      T* crow = C + r * ldc;
      if (accumulate) {
#pragma omp simd
        for (int c = 0; c < NR; ++c) crow[c] += acc[r][c];
      } else {
#pragma omp simd
        for (int c = 0; c < NR; ++c) crow[c] = acc[r][c];
      }
    }
  } else {
    for (int r = 0; r < MR; ++r) {
      T* crow = C + r * ldc;
      for (int64_t c = 0; c < cols; ++c) crow[c] = accumulate ? crow[c] + acc[r][c] : acc[r][c];
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void run(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A,
                                               int64_t lda, const T* B, int64_t ldb, bool accumulate, T* C,
                                               int64_t ldc) {
  constexpr int NR = kNR<T>;
  // column block jb of B: kNR columns at Bp + jb * bstep, rows ldbp apart
  const T* Bp = B;
  int64_t ldbp = ldb, bstep = NR;
  if (tb || n % NR != 0) {
    // packed panel: column block after column block, each [k, kNR] contiguous (zeros past n), so that the kernel
    // reads it sequentially and the transposing copy writes whole rows of kNR (no large-stride stores)
    thread_local std::vector<T> panel;
    const int64_t blocks = (n + NR - 1) / NR;
    panel.resize(static_cast<size_t>(blocks * k * NR));
    T* P = panel.data();
    for (int64_t jb = 0; jb < blocks; ++jb) {
      const int64_t j0 = jb * NR, cols = std::min<int64_t>(NR, n - j0);
      T* Pb = P + jb * k * NR;
      if (tb) {
        // B's rows j0 .. j0 + cols are the block's columns: read along them, write the block's rows
        for (int64_t c = 0; c < cols; ++c) {
          const T* brow = B + (j0 + c) * ldb;
          for (int64_t p = 0; p < k; ++p) Pb[p * NR + c] = brow[p];
        }
      } else {
        for (int64_t p = 0; p < k; ++p) std::copy(B + p * ldb + j0, B + p * ldb + j0 + cols, Pb + p * NR);
      }
      if (cols < NR) {
        for (int64_t p = 0; p < k; ++p) std::fill(Pb + p * NR + cols, Pb + (p + 1) * NR, T(0));
      }
    }
    Bp = P;
    ldbp = NR;
    bstep = k * NR;
  }
  const int64_t a_row = ta ? 1 : lda, a_col = ta ? lda : 1;  // A(i, p) = A[i * a_row + p * a_col]
  for (int64_t j0 = 0; j0 < n; j0 += NR) {
    const int64_t cols = std::min<int64_t>(NR, n - j0);
    const T* Bj = Bp + (j0 / NR) * bstep;
    int64_t i0 = 0;
    for (; i0 + kMR <= m; i0 += kMR) {
      block<T, kMR>(k, A + i0 * a_row, a_row, a_col, Bj, ldbp, accumulate, C + i0 * ldc + j0, ldc, cols);
    }
    const T* Ai = A + i0 * a_row;
    T* Ci = C + i0 * ldc + j0;
    switch (m - i0) {
      case 5: block<T, 5>(k, Ai, a_row, a_col, Bj, ldbp, accumulate, Ci, ldc, cols); break;
      case 4: block<T, 4>(k, Ai, a_row, a_col, Bj, ldbp, accumulate, Ci, ldc, cols); break;
      case 3: block<T, 3>(k, Ai, a_row, a_col, Bj, ldbp, accumulate, Ci, ldc, cols); break;
      case 2: block<T, 2>(k, Ai, a_row, a_col, Bj, ldbp, accumulate, Ci, ldc, cols); break;
      case 1: block<T, 1>(k, Ai, a_row, a_col, Bj, ldbp, accumulate, Ci, ldc, cols); break;
      default: break;
    }
  }
}

#ifdef DSK_GEMM_X86_CLONES
template <typename T>
__attribute__((target("avx512f,avx512vl,fma"))) void run_avx512(bool ta, bool tb, int64_t m, int64_t n, int64_t k,
                                                                 const T* A, int64_t lda, const T* B, int64_t ldb,
                                                                 bool accumulate, T* C, int64_t ldc) {
  run<T>(ta, tb, m, n, k, A, lda, B, ldb, accumulate, C, ldc);
}
template <typename T>
__attribute__((target("avx2,fma"))) void run_avx2(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A,
                                                  int64_t lda, const T* B, int64_t ldb, bool accumulate, T* C,
                                                  int64_t ldc) {
  run<T>(ta, tb, m, n, k, A, lda, B, ldb, accumulate, C, ldc);
}
// 2: AVX-512, 1: AVX2 with FMA, 0: baseline
inline int isa_level() {
  static const int level = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
    return 0;
  }();
  return level;
}
#endif

// Row-major C[m, n] = op(A) op(B) (+ C where accumulate), as gemm_rm below, computed on the calling thread.
template <typename T>
void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
          bool accumulate, T* C, int64_t ldc) {
#ifdef DSK_GEMM_X86_CLONES
  switch (isa_level()) {
    case 2: return run_avx512<T>(ta, tb, m, n, k, A, lda, B, ldb, accumulate, C, ldc);
    case 1: return run_avx2<T>(ta, tb, m, n, k, A, lda, B, ldb, accumulate, C, ldc);
    default: break;
  }
#endif
  run<T>(ta, tb, m, n, k, A, lda, B, ldb, accumulate, C, ldc);
}

}  // namespace small_gemm

// Products of at most this many multiply-adds (m * n * k) run in small_gemm, larger ones in ATen (measured on
// AVX2 inside the MLA attention: above it BLAS is faster than this kernel by more than ATen's per-call cost).
constexpr int64_t kSmallGemmFlops = 1 << 18;

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

// gemm_rm, with products of at most kSmallGemmFlops multiply-adds run by small_gemm (no ATen call, no BLAS).
template <typename T>
inline void gemm_rm_auto(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B,
                         int64_t ldb, T beta, T* C, int64_t ldc, int64_t small_limit = kSmallGemmFlops) {
  if (m == 0 || n == 0) return;
  if (m * n * k <= small_limit) {
    small_gemm::gemm(ta, tb, m, n, k, A, lda, B, ldb, beta != T(0), C, ldc);
  } else {
    gemm_rm<T>(ta, tb, m, n, k, A, lda, B, ldb, beta, C, ldc);
  }
}

}  // namespace dsk
