// dsk's CPU kernels: the routed experts of a DeepSeekMoE layer and RMSNorm, forward and backward.
//
// Routed experts. The experts of a fine-grained MoE are many small GEMMs (64 experts, ~100 rows each). ATen runs
// them one after another and splits each small GEMM over the threads, which is where CPU BLAS is least efficient
// (measured: ~60-110 GFLOP/s on 2 cores against ~200 for one large GEMM). Here the threads split the *experts*
// instead: each thread owns a contiguous run of experts holding about the same number of rows and runs their
// GEMMs single-threaded back to back, with the SwiGLU element-wise work fused between them while the expert's
// rows are still in cache. Each thread gathers its experts' token rows itself and writes each output row to its
// (token, k) slot, so the layer needs no index_select / index_add passes over N * K rows of width D.
//
// Inputs (row-major, contiguous): x [N, D] tokens; order [R] the routed slots (slot = token * K + k) sorted by
// expert, expert e owning order[starts[e] .. starts[e+1]); weight [N * K] routing weights by slot, or empty for
// none; w_gate, w_up [E, H, D] and w_down [E, D, H] (nn.Linear layout [out, in]).
// Forward: y[n] = sum over the slots s of token n of (silu(x_n Wg^T) * (x_n Wu^T) * weight[s]) Wd^T, for the
// expert owning s. It also returns the pre-activations gu = [g | u] [R, 2H] (rows in expert order) for the
// backward, which recomputes a = silu(g) * u * weight rather than storing it. Gate and up run as one GEMM over
// the expert's two weights stacked (copied into the thread's scratch: 2 H D values against the m H D
// multiply-adds of the product).
//
// RMSNorm. y = w * x / sqrt(mean(x^2) + eps) over rows of width D: one pass forward (saving 1/rms per row) and one
// backward, where ATen's composition takes ~8 element-wise kernels forward and ~12 backward, each a full pass over
// the activations plus its dispatch.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// Fortran BLAS entry points (column-major), resolved from the process by the Python side; null when absent.
using sgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using dgemm_t = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*, const int*);
using set_local_threads_t = int (*)(int);

sgemm_t g_sgemm = nullptr;
dgemm_t g_dgemm = nullptr;
set_local_threads_t g_set_local_threads = nullptr;

void set_blas(int64_t sgemm, int64_t dgemm, int64_t set_local_threads) {
  g_sgemm = reinterpret_cast<sgemm_t>(sgemm);
  g_dgemm = reinterpret_cast<dgemm_t>(dgemm);
  g_set_local_threads = reinterpret_cast<set_local_threads_t>(set_local_threads);
}

bool has_blas() { return g_sgemm != nullptr && g_dgemm != nullptr; }

// Row-major C[m, n] = op(A) op(B) + beta * C, with op(A) [m, k] and op(B) [k, n]; ta / tb say whether A / B are
// stored transposed. A row-major product is the column-major product of the transposes with the operands
// swapped: C^T = op(B)^T op(A)^T, so the flags pass through unchanged.
template <typename T>
void gemm_rm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* B, int64_t ldb,
             T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  if (has_blas()) {
    const char cta = ta ? 'T' : 'N', ctb = tb ? 'T' : 'N';
    const int im = static_cast<int>(m), in = static_cast<int>(n), ik = static_cast<int>(k);
    const int ilda = static_cast<int>(lda), ildb = static_cast<int>(ldb), ildc = static_cast<int>(ldc);
    const T one = 1;
    if constexpr (std::is_same_v<T, float>) {
      g_sgemm(&ctb, &cta, &in, &im, &ik, &one, B, &ildb, A, &ilda, &beta, C, &ildc);
    } else {
      g_dgemm(&ctb, &cta, &in, &im, &ik, &one, B, &ildb, A, &ilda, &beta, C, &ildc);
    }
    return;
  }
  // No BLAS symbol in this build of torch: ATen's mm on views of the same memory (slower per call, same result).
  auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  auto a = ta ? at::from_blob(const_cast<T*>(A), {k, m}, {lda, 1}, opts).t()
              : at::from_blob(const_cast<T*>(A), {m, k}, {lda, 1}, opts);
  auto b = tb ? at::from_blob(const_cast<T*>(B), {n, k}, {ldb, 1}, opts).t()
              : at::from_blob(const_cast<T*>(B), {k, n}, {ldb, 1}, opts);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, opts);
  if (beta == T(0)) {
    at::mm_out(c, a, b);
  } else {
    c.addmm_(a, b, beta, 1);
  }
}

// Split experts into `parts` contiguous runs of about equal rows (the cost of an expert is linear in its rows).
std::vector<int64_t> partition(const int64_t* starts, int64_t n_experts, int64_t parts) {
  std::vector<int64_t> bounds(parts + 1, n_experts);
  bounds[0] = 0;
  const int64_t total = starts[n_experts];
  int64_t e = 0;
  for (int64_t p = 1; p < parts; ++p) {
    const int64_t target = (total * p + parts - 1) / parts;
    while (e < n_experts && starts[e + 1] <= target) ++e;
    bounds[p] = e;
  }
  return bounds;
}

// Run fn(e, scratch) for every expert, the threads taking balanced contiguous runs, each with its own scratch
// buffer (small and reused from expert to expert, so it stays in cache); BLAS single-threaded inside.
template <typename T, typename Fn>
void for_each_expert(const int64_t* starts, int64_t n_experts, const Fn& fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_experts));
  const auto bounds = partition(starts, n_experts, parts);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    const int saved = g_set_local_threads ? g_set_local_threads(1) : 0;
    std::vector<T> scratch;
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t e = bounds[p]; e < bounds[p + 1]; ++e) fn(e, scratch);
    }
    if (g_set_local_threads) g_set_local_threads(saved);
  });
}

// Sigmoid over a row of n values. float32 uses a Cephes-style exp (range reduction to [-ln2/2, ln2/2], degree-6
// polynomial, 2^n by exponent bits; relative error ~1e-7, i.e. float32 rounding) written so that the compiler
// vectorises it, compiled for AVX-512, AVX2 and baseline x86-64 and picked at load time (target_clones); libm's
// scalar expf was ~20 % of the expert forward. float64 keeps std::exp for float64-exact tests.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DSK_VECTOR_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DSK_VECTOR_CLONES
#endif

// exp(v) for v in float32's range (clamped to [-87, 88]); inlined into each vectorised clone below.
inline float exp_approx(float v) {
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

DSK_VECTOR_CLONES void sigmoid_row(const float* x, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0f / (1.0f + exp_approx(-x[i]));
}

// x[i] = exp(x[i] * a - b), returning the sum (softmax numerators).
DSK_VECTOR_CLONES float exp_scaled_row(float* x, int64_t n, float a, float b) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    x[i] = exp_approx(x[i] * a - b);
    sum += x[i];
  }
  return sum;
}

double exp_scaled_row(double* x, int64_t n, double a, double b) {
  double sum = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = std::exp(x[i] * a - b);
    sum += x[i];
  }
  return sum;
}

void sigmoid_row(const double* x, int64_t n, double* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0 / (1.0 + std::exp(-x[i]));
}

struct Problem {
  int64_t N, D, E, H, K, R;
};

Problem check_inputs(const at::Tensor& x, const at::Tensor& order, const at::Tensor& starts, int64_t K,
                     const at::Tensor& weight, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CPU [N, D] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  TORCH_CHECK(K >= 1, "K must be at least 1");
  const int64_t N = x.size(0), D = x.size(1);
  TORCH_CHECK(wg.dim() == 3, "w_gate must be [E, H, D]");
  const int64_t E = wg.size(0), H = wg.size(1);
  TORCH_CHECK(wg.size(2) == D, "x and the expert weights disagree on D");
  for (const auto* w : {&wg, &wu, &wd}) {
    TORCH_CHECK(w->is_contiguous() && w->scalar_type() == x.scalar_type() && w->device().is_cpu(),
                "expert weights must be contiguous CPU tensors of x's dtype");
  }
  TORCH_CHECK(wu.sizes() == wg.sizes(), "w_up must have w_gate's shape [E, H, D]");
  TORCH_CHECK(wd.dim() == 3 && wd.size(0) == E && wd.size(1) == D && wd.size(2) == H, "w_down must be [E, D, H]");
  TORCH_CHECK(starts.scalar_type() == at::kLong && starts.dim() == 1 && starts.is_contiguous(),
              "starts must be a contiguous int64 [E + 1] tensor");
  TORCH_CHECK(starts.numel() == E + 1, "starts must hold E + 1 offsets");
  TORCH_CHECK(order.scalar_type() == at::kLong && order.dim() == 1 && order.is_contiguous(),
              "order must be a contiguous int64 [R] tensor");
  const int64_t R = order.numel();
  const int64_t* st = starts.data_ptr<int64_t>();
  TORCH_CHECK(st[0] == 0 && st[E] == R, "starts must run from 0 to R = order.numel()");
  for (int64_t e = 0; e < E; ++e) TORCH_CHECK(st[e] <= st[e + 1], "starts must be non-decreasing");
  const int64_t* od = order.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(od[r] >= 0 && od[r] < N * K, "order holds a slot outside [0, N * K)");
  if (weight.numel() > 0) {
    TORCH_CHECK(weight.is_contiguous() && weight.scalar_type() == x.scalar_type() && weight.numel() == N * K,
                "weight must be a contiguous [N * K] tensor of x's dtype");
  }
  return {N, D, E, H, K, R};
}

// Copy the rows `rows[i] / K` of src [*, D] into dst [m, D].
template <typename T>
void gather_rows(const T* src, const int64_t* slots, int64_t K, int64_t m, int64_t D, T* dst) {
  for (int64_t i = 0; i < m; ++i) std::copy_n(src + (slots[i] / K) * D, D, dst + i * D);
}

// out[n] = sum_k slots_out[n * K + k] for every token, when K > 1 (the slot buffer is then N * K rows).
template <typename T>
void sum_slots(const T* slots_out, int64_t N, int64_t K, int64_t D, T* out) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      T* o = out + n * D;
      const T* s = slots_out + n * K * D;
      std::copy_n(s, D, o);
      for (int64_t k = 1; k < K; ++k) {
        const T* sk = s + k * D;
        for (int64_t d = 0; d < D; ++d) o[d] += sk[d];
      }
    }
  });
}

// Expert e's gate and up weights stacked into one [2H, D] operand (rows 0..H-1 gate, H..2H-1 up), so that both
// projections are one GEMM of width 2H forward and the input gradient one GEMM of depth 2H backward.
template <typename T>
void stack_gate_up(const T* WG, const T* WU, int64_t e, int64_t H, int64_t D, T* wgu) {
  std::copy_n(WG + e * H * D, H * D, wgu);
  std::copy_n(WU + e * H * D, H * D, wgu + H * D);
}

template <typename T>
void forward_impl(const Problem& p, const at::Tensor& x, const at::Tensor& order_t, const at::Tensor& starts_t,
                  const at::Tensor& weight, const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd,
                  at::Tensor& y, at::Tensor& gu) {
  const int64_t D = p.D, H = p.H, K = p.K;
  const int64_t *starts = starts_t.data_ptr<int64_t>(), *order = order_t.data_ptr<int64_t>();
  const T* X = x.data_ptr<T>();
  const T* W = weight.numel() > 0 ? weight.data_ptr<T>() : nullptr;
  const T *WG = wg.data_ptr<T>(), *WU = wu.data_ptr<T>(), *WD = wd.data_ptr<T>();
  T* GU = gu.data_ptr<T>();
  // K == 1: each token has one slot, written straight into y; else into a slot buffer summed per token after.
  at::Tensor slots_out = K == 1 ? y : at::empty({p.N * K, D}, x.options());
  T* SO = slots_out.data_ptr<T>();
  if (K == 1 && p.R < p.N) y.zero_();  // tokens without a slot (none in a MoE layer) get zero
  for_each_expert<T>(starts, p.E, [&](int64_t e, std::vector<T>& scratch) {
    const int64_t r0 = starts[e], m = starts[e + 1] - r0;
    if (m <= 0) return;
    const int64_t* slots = order + r0;
    const int64_t need = m * (2 * D + H) + 2 * H * D;
    if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
    T *xe = scratch.data(), *ye = xe + m * D, *ae = ye + m * D, *wgu = ae + m * H;
    gather_rows(X, slots, K, m, D, xe);
    stack_gate_up(WG, WU, e, H, D, wgu);
    T* gue = GU + r0 * 2 * H;  // [m, 2H]: gate pre-activation | up
    gemm_rm<T>(false, true, m, 2 * H, D, xe, D, wgu, D, T(0), gue, 2 * H);
    for (int64_t i = 0; i < m; ++i) sigmoid_row(gue + i * 2 * H, H, ae + i * H);
    for (int64_t i = 0; i < m; ++i) {
      const T s = W ? W[slots[i]] : T(1);
      const T *g = gue + i * 2 * H, *u = g + H;
      T* a = ae + i * H;
      for (int64_t h = 0; h < H; ++h) a[h] *= g[h] * u[h] * s;
    }
    gemm_rm<T>(false, true, m, D, H, ae, H, WD + e * D * H, H, T(0), ye, D);
    for (int64_t i = 0; i < m; ++i) std::copy_n(ye + i * D, D, SO + slots[i] * D);
  });
  if (K > 1) {
    // Slots no expert wrote (none in a MoE layer, where every slot is routed) must not add garbage.
    if (p.R < p.N * K) {
      std::vector<char> seen(p.N * K, 0);
      for (int64_t r = 0; r < p.R; ++r) seen[order[r]] = 1;
      for (int64_t s = 0; s < p.N * K; ++s)
        if (!seen[s]) std::fill_n(SO + s * D, D, T(0));
    }
    sum_slots(SO, p.N, K, D, y.data_ptr<T>());
  }
}

std::vector<at::Tensor> experts_forward(const at::Tensor& x, const at::Tensor& order, const at::Tensor& starts,
                                        int64_t K, const at::Tensor& weight, const at::Tensor& w_gate,
                                        const at::Tensor& w_up, const at::Tensor& w_down) {
  const Problem p = check_inputs(x, order, starts, K, weight, w_gate, w_up, w_down);
  auto y = at::empty({p.N, p.D}, x.options());
  auto gu = at::empty({p.R, 2 * p.H}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dsk_experts_forward", [&] {
    forward_impl<scalar_t>(p, x, order, starts, weight, w_gate, w_up, w_down, y, gu);
  });
  return {y, gu};
}

template <typename T>
void backward_impl(const Problem& p, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gu,
                   const at::Tensor& order_t, const at::Tensor& starts_t, const at::Tensor& weight,
                   const at::Tensor& wg, const at::Tensor& wu, const at::Tensor& wd, at::Tensor& dx, at::Tensor& dwg,
                   at::Tensor& dwu, at::Tensor& dwd, at::Tensor& dweight) {
  const int64_t D = p.D, H = p.H, K = p.K;
  const int64_t *starts = starts_t.data_ptr<int64_t>(), *order = order_t.data_ptr<int64_t>();
  const T *DY = dy.data_ptr<T>(), *X = x.data_ptr<T>(), *GU = gu.data_ptr<T>();
  const T* W = weight.numel() > 0 ? weight.data_ptr<T>() : nullptr;
  const T *WG = wg.data_ptr<T>(), *WU = wu.data_ptr<T>(), *WD = wd.data_ptr<T>();
  T *DWG = dwg.data_ptr<T>(), *DWU = dwu.data_ptr<T>(), *DWD = dwd.data_ptr<T>();
  T* DW = dweight.numel() > 0 ? dweight.data_ptr<T>() : nullptr;
  at::Tensor slots_dx = K == 1                ? dx
                        : p.R == p.N * K ? at::empty({p.N * K, D}, x.options())
                                         : at::zeros({p.N * K, D}, x.options());
  if (K == 1 && p.R < p.N) dx.zero_();
  if (DW && p.R < p.N * K) dweight.zero_();  // unrouted slots (none in a MoE layer) have zero gradient
  T* SDX = slots_dx.data_ptr<T>();
  for_each_expert<T>(starts, p.E, [&](int64_t e, std::vector<T>& scratch) {
    const int64_t r0 = starts[e], m = starts[e + 1] - r0;
    T *dwg_e = DWG + e * H * D, *dwu_e = DWU + e * H * D, *dwd_e = DWD + e * D * H;
    if (m <= 0) {  // an expert without tokens has zero gradient
      std::fill_n(dwg_e, H * D, T(0));
      std::fill_n(dwu_e, H * D, T(0));
      std::fill_n(dwd_e, D * H, T(0));
      return;
    }
    const int64_t* slots = order + r0;
    const int64_t need = m * (3 * D + 4 * H) + 4 * H * D;
    if (static_cast<int64_t>(scratch.size()) < need) scratch.resize(need);
    T *xe = scratch.data(), *dye = xe + m * D, *dxe = dye + m * D;
    T *ae = dxe + m * D, *dae = ae + m * H, *dgue = dae + m * H;  // dgue: [m, 2H], dG | dU
    T *wgu = dgue + m * 2 * H, *dwgu = wgu + 2 * H * D;
    gather_rows(X, slots, K, m, D, xe);
    gather_rows(DY, slots, K, m, D, dye);  // every slot of token n receives dy[n]
    const T* gue = GU + r0 * 2 * H;
    // dA = dY Wd  [m, H]
    gemm_rm<T>(false, false, m, H, D, dye, D, WD + e * D * H, H, T(0), dae, H);
    // a = silu(g) * u * w, and the gradients of the SwiGLU product
    for (int64_t i = 0; i < m; ++i) sigmoid_row(gue + i * 2 * H, H, dgue + i * 2 * H);  // sigmoid(g) in dG's place
    for (int64_t i = 0; i < m; ++i) {
      const T s = W ? W[slots[i]] : T(1);
      const T *g = gue + i * 2 * H, *u = g + H, *da = dae + i * H;
      T *a = ae + i * H, *dg = dgue + i * 2 * H, *du = dg + H;
      T ds = 0;
#pragma omp simd reduction(+ : ds)
      for (int64_t h = 0; h < H; ++h) {
        const T gv = g[h], sg = dg[h], silu = gv * sg, uv = u[h], dav = da[h];
        a[h] = silu * uv * s;
        ds += dav * silu * uv;
        du[h] = dav * silu * s;
        dg[h] = dav * uv * s * sg * (T(1) + gv * (T(1) - sg));
      }
      if (DW) DW[slots[i]] = ds;
    }
    // dWd = dY^T a  [D, H]
    gemm_rm<T>(true, false, D, H, m, dye, D, ae, H, T(0), dwd_e, H);
    // dX = [dG dU] [Wg; Wu]  [m, D]
    stack_gate_up(WG, WU, e, H, D, wgu);
    gemm_rm<T>(false, false, m, D, 2 * H, dgue, 2 * H, wgu, D, T(0), dxe, D);
    for (int64_t i = 0; i < m; ++i) std::copy_n(dxe + i * D, D, SDX + slots[i] * D);
    // [dWg; dWu] = [dG dU]^T X  [2H, D]
    gemm_rm<T>(true, false, 2 * H, D, m, dgue, 2 * H, xe, D, T(0), dwgu, D);
    std::copy_n(dwgu, H * D, dwg_e);
    std::copy_n(dwgu + H * D, H * D, dwu_e);
  });
  if (K > 1) sum_slots(SDX, p.N, K, D, dx.data_ptr<T>());
}

std::vector<at::Tensor> experts_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& gu,
                                         const at::Tensor& order, const at::Tensor& starts, int64_t K,
                                         const at::Tensor& weight, const at::Tensor& w_gate, const at::Tensor& w_up,
                                         const at::Tensor& w_down) {
  const Problem p = check_inputs(x, order, starts, K, weight, w_gate, w_up, w_down);
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "dy must be a contiguous tensor shaped like x");
  TORCH_CHECK(gu.is_contiguous() && gu.dim() == 2 && gu.size(0) == p.R && gu.size(1) == 2 * p.H,
              "gu must be the [R, 2H] tensor returned by experts_forward");
  auto dx = at::empty_like(x);
  auto dwg = at::empty_like(w_gate), dwu = at::empty_like(w_up), dwd = at::empty_like(w_down);
  auto dweight = weight.numel() > 0 ? at::empty_like(weight) : at::empty({0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dsk_experts_backward", [&] {
    backward_impl<scalar_t>(p, dy, x, gu, order, starts, weight, w_gate, w_up, w_down, dx, dwg, dwu, dwd, dweight);
  });
  return {dx, dwg, dwu, dwd, dweight};
}

template <typename T>
void rms_norm_forward_impl(const T* X, const T* W, int64_t rows, int64_t D, double eps, T* Y, T* RSTD) {
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(D, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T* x = X + r * D;
      T* y = Y + r * D;
      double ss = 0;  // double accumulation: exact enough for any D in float32
#pragma omp simd reduction(+ : ss)
      for (int64_t d = 0; d < D; ++d) ss += static_cast<double>(x[d]) * x[d];
      const T rstd = static_cast<T>(1.0 / std::sqrt(ss / static_cast<double>(D) + eps));
      RSTD[r] = rstd;
      for (int64_t d = 0; d < D; ++d) y[d] = W[d] * (x[d] * rstd);
    }
  });
}

std::vector<at::Tensor> rms_norm_forward(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() == 2, "x must be a contiguous CPU [rows, D] tensor");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1) &&
                  weight.scalar_type() == x.scalar_type() && weight.device().is_cpu(),
              "weight must be a contiguous CPU [D] tensor of x's dtype");
  auto y = at::empty_like(x);
  auto rstd = at::empty({x.size(0)}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dsk_rms_norm_forward", [&] {
    rms_norm_forward_impl<scalar_t>(x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), x.size(0), x.size(1), eps,
                                    y.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>());
  });
  return {y, rstd};
}

// With xh = x * rstd: dw = sum_rows dy * xh; dx = rstd * (dy * w - xh * mean(dy * w * xh)).
template <typename T>
void rms_norm_backward_impl(const T* DY, const T* X, const T* W, const T* RSTD, int64_t rows, int64_t D, T* DX,
                            T* DW) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), rows));
  // per-part sums of dw in double, added in a fixed order: deterministic for a given thread count
  std::vector<double> partial(parts * D, 0.0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      double* dw = partial.data() + p * D;
      for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; ++r) {
        const T *x = X + r * D, *dy = DY + r * D;
        const T rstd = RSTD[r];
        double dot = 0;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < D; ++d) {
          const T xh = x[d] * rstd;
          dw[d] += static_cast<double>(dy[d]) * xh;
          dot += static_cast<double>(dy[d]) * W[d] * xh;
        }
        const T mean = static_cast<T>(dot / static_cast<double>(D));
        T* dx = DX + r * D;
        for (int64_t d = 0; d < D; ++d) dx[d] = rstd * (dy[d] * W[d] - x[d] * rstd * mean);
      }
    }
  });
  for (int64_t d = 0; d < D; ++d) {
    double sum = 0;
    for (int64_t p = 0; p < parts; ++p) sum += partial[p * D + d];
    DW[d] = static_cast<T>(sum);
  }
}

std::vector<at::Tensor> rms_norm_backward(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& weight,
                                          const at::Tensor& rstd) {
  TORCH_CHECK(dy.sizes() == x.sizes() && dy.is_contiguous() && dy.scalar_type() == x.scalar_type(),
              "dy must be a contiguous tensor shaped like x");
  TORCH_CHECK(rstd.numel() == x.size(0) && rstd.is_contiguous(), "rstd must be the [rows] tensor of the forward");
  auto dx = at::empty_like(x);
  auto dw = at::empty_like(weight);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "dsk_rms_norm_backward", [&] {
    rms_norm_backward_impl<scalar_t>(dy.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(),
                                     rstd.data_ptr<scalar_t>(), x.size(0), x.size(1), dx.data_ptr<scalar_t>(),
                                     dw.data_ptr<scalar_t>());
  });
  return {dx, dw};
}

// ---- routing: group-limited top-k selection and the counting sort of the slots by expert -------------------

// Per token: c = scores + bias; with n_groups > 1 keep the topk_groups groups of highest score (sum of the group's
// two best c, or its best), then the top_k experts of highest c among the kept groups, best first (ties: lower
// index first). Returns idx [N, K], the slots (n * K + k) sorted by expert, stable [N * K], and the load [E].
template <typename T>
void route_impl(const T* S, const float* bias, int64_t N, int64_t E, int64_t G, int64_t M, int64_t K,
                bool top2_sum, int64_t* IDX) {
  const int64_t P = E / G;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    std::vector<T> c(E), group(G), best(K);
    std::vector<char> keep(G);
    for (int64_t n = n0; n < n1; ++n) {
      const T* s = S + n * E;
      for (int64_t e = 0; e < E; ++e) c[e] = bias ? s[e] + static_cast<T>(bias[e]) : s[e];
      if (G > 1) {
        for (int64_t g = 0; g < G; ++g) {
          T first = -std::numeric_limits<T>::infinity(), second = first;
          for (int64_t e = g * P; e < (g + 1) * P; ++e) {
            if (c[e] > first) {
              second = first;
              first = c[e];
            } else if (c[e] > second) {
              second = c[e];
            }
          }
          group[g] = top2_sum ? first + second : first;
          keep[g] = 0;
        }
        for (int64_t m = 0; m < M; ++m) {  // M passes of "best group not kept yet"; G is small (V3: 8)
          int64_t arg = -1;
          for (int64_t g = 0; g < G; ++g)
            if (!keep[g] && (arg < 0 || group[g] > group[arg])) arg = g;
          keep[arg] = 1;
        }
      }
      int64_t* idx = IDX + n * K;
      int64_t filled = 0;
      for (int64_t e = 0; e < E; ++e) {  // insertion into the sorted top-K list
        if (G > 1 && !keep[e / P]) continue;
        const T v = c[e];
        if (filled == K && !(v > best[K - 1])) continue;
        int64_t pos = filled < K ? filled++ : K - 1;
        while (pos > 0 && v > best[pos - 1]) {
          best[pos] = best[pos - 1];
          idx[pos] = idx[pos - 1];
          --pos;
        }
        best[pos] = v;
        idx[pos] = e;
      }
      // NaN scores (a diverged step) never compare greater: fill what is left with the lowest unused experts,
      // so that every id stays valid and the NaN reaches the loss, where the trainer skips the step
      for (int64_t e = 0; filled < K && e < E; ++e) {
        if (G > 1 && !keep[e / P]) continue;
        if (std::find(idx, idx + filled, e) == idx + filled) idx[filled++] = e;
      }
      for (int64_t e = 0; filled < K && e < E; ++e)
        if (std::find(idx, idx + filled, e) == idx + filled) idx[filled++] = e;
    }
  });
}

std::vector<at::Tensor> route_topk(const at::Tensor& scores, const at::Tensor& bias, int64_t n_groups,
                                   int64_t topk_groups, int64_t top_k, bool top2_sum) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 2 && scores.is_contiguous(),
              "scores must be a contiguous CPU [N, E] tensor");
  TORCH_CHECK(scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble,
              "scores must be float32 or float64");
  const int64_t N = scores.size(0), E = scores.size(1), G = n_groups, M = topk_groups, K = top_k;
  TORCH_CHECK(G >= 1 && E % G == 0, "n_groups must divide the expert count");
  TORCH_CHECK(M >= 1 && M <= G, "topk_groups must be in [1, n_groups]");
  TORCH_CHECK(K >= 1 && K <= M * (E / G), "top_k must be in [1, topk_groups * experts per group]");
  TORCH_CHECK(!(G > 1 && top2_sum && E / G < 2), "top2_sum needs at least 2 experts per group");
  if (bias.numel() > 0) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == E,
                "bias must be a contiguous float32 [E] tensor");
  }
  auto idx = at::empty({N, K}, scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "dsk_route_topk", [&] {
    route_impl<scalar_t>(scores.data_ptr<scalar_t>(), bias.numel() > 0 ? bias.data_ptr<float>() : nullptr, N, E, G,
                         M, K, top2_sum, idx.data_ptr<int64_t>());
  });
  // counting sort of the N * K slots by expert, stable (a slot's rank within its expert follows slot order)
  auto load = at::zeros({E}, idx.options());
  auto order = at::empty({N * K}, idx.options());
  const int64_t* I = idx.data_ptr<int64_t>();
  int64_t* L = load.data_ptr<int64_t>();
  int64_t* O = order.data_ptr<int64_t>();
  for (int64_t r = 0; r < N * K; ++r) ++L[I[r]];
  std::vector<int64_t> next(E, 0);
  for (int64_t e = 1; e < E; ++e) next[e] = next[e - 1] + L[e - 1];
  for (int64_t r = 0; r < N * K; ++r) O[next[I[r]]++] = r;
  return {idx, order, load};
}

// ---- MLA attention core, causal, short sequences ---------------------------------------------------------
//
// o[b, t, h] = softmax_s(scale * (q_nope[b,t,h] . k_nope[b,s,h] + q_pe[b,t,h] . k_pe[b,s]), s <= t) @ v[b, :, h].
// One (batch, head) pair per task, its T x T scores in the thread's cache: two GEMMs for the scores (the rope key
// is shared by the heads, so no per-head copy of it and no concatenation of the nope and rope parts), the causal
// softmax in place, one GEMM for the output, written straight into the [B, T, H, dv] layout the output projection
// reads. Operands are read through their strides (last dim contiguous), so the views of the projections need no
// transposes or copies. The probabilities are kept for the backward ([B, H, T, T]).
struct AttnView {
  int64_t sb, st, sh;  // strides of batch, position, head (elements); sh unused for k_pe
};

AttnView view_of(const at::Tensor& t, bool has_head) {
  TORCH_CHECK(t.stride(-1) == 1, "attention operands must have a contiguous last dim");
  return {t.stride(0), t.stride(1), has_head ? t.stride(2) : 0};
}

// Query rows r0 .. r0 + rows of a [*, ld] score block: row i sees keys 0 .. r0 + i; the rest of the row is zeroed.
constexpr int64_t kCausalBlock = 64;

template <typename T>
void softmax_causal_rows(T* S, int64_t rows, int64_t ld, int64_t r0, T scale) {
  for (int64_t ii = 0; ii < rows; ++ii) {
    const int64_t i = r0 + ii, Tn = ld;
    T* row = S + ii * ld;
    T mx = -std::numeric_limits<T>::infinity();
    for (int64_t j = 0; j <= i; ++j) mx = std::max(mx, row[j] * scale);
    const T inv = T(1) / exp_scaled_row(row, i + 1, scale, mx);
    for (int64_t j = 0; j <= i; ++j) row[j] *= inv;
    std::fill(row + i + 1, row + Tn, T(0));
  }
}

template <typename T>
void mla_attention_forward_impl(const at::Tensor& qn, const at::Tensor& qp, const at::Tensor& kn, const at::Tensor& kp,
                                const at::Tensor& v, double scale, at::Tensor& o, at::Tensor& P) {
  const int64_t B = qn.size(0), Tn = qn.size(1), H = qn.size(2), dn = qn.size(3), dr = qp.size(3), dv = v.size(3);
  const AttnView vqn = view_of(qn, true), vqp = view_of(qp, true), vkn = view_of(kn, true), vkp = view_of(kp, false),
                 vv = view_of(v, true);
  const T *QN = qn.data_ptr<T>(), *QP = qp.data_ptr<T>(), *KN = kn.data_ptr<T>(), *KP = kp.data_ptr<T>(),
          *V = v.data_ptr<T>();
  T *O = o.data_ptr<T>(), *PP = P.data_ptr<T>();
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    const int saved = g_set_local_threads ? g_set_local_threads(1) : 0;
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      T* S = PP + task * Tn * Tn;
      const T *qn_bh = QN + b * vqn.sb + h * vqn.sh, *qp_bh = QP + b * vqp.sb + h * vqp.sh;
      const T *kn_bh = KN + b * vkn.sb + h * vkn.sh, *kp_b = KP + b * vkp.sb, *v_bh = V + b * vv.sb + h * vv.sh;
      // causal blocks: query rows [r0, r1) only see keys [0, r1), so the products skip the masked upper blocks
      for (int64_t r0 = 0; r0 < Tn; r0 += kCausalBlock) {
        const int64_t rows = std::min(kCausalBlock, Tn - r0), keys = r0 + rows;
        T* Sb = S + r0 * Tn;
        gemm_rm<T>(false, true, rows, keys, dn, qn_bh + r0 * vqn.st, vqn.st, kn_bh, vkn.st, T(0), Sb, Tn);
        gemm_rm<T>(false, true, rows, keys, dr, qp_bh + r0 * vqp.st, vqp.st, kp_b, vkp.st, T(1), Sb, Tn);
        softmax_causal_rows<T>(Sb, rows, Tn, r0, static_cast<T>(scale));
        gemm_rm<T>(false, false, rows, dv, keys, Sb, Tn, v_bh, vv.st, T(0), O + ((b * Tn + r0) * H + h) * dv, H * dv);
      }
    }
    if (g_set_local_threads) g_set_local_threads(saved);
  });
}

void check_attention(const at::Tensor& qn, const at::Tensor& qp, const at::Tensor& kn, const at::Tensor& kp,
                     const at::Tensor& v) {
  TORCH_CHECK(qn.dim() == 4 && qp.dim() == 4 && kn.dim() == 4 && kp.dim() == 3 && v.dim() == 4,
              "expected q_nope, q_pe, k_nope, v [B, T, H, d] and k_pe [B, T, dr]");
  TORCH_CHECK(qn.scalar_type() == at::kFloat || qn.scalar_type() == at::kDouble, "float32 or float64 only");
  for (const auto* t : {&qp, &kn, &kp, &v}) {
    TORCH_CHECK(t->scalar_type() == qn.scalar_type() && t->device().is_cpu(), "operands must share dtype, on CPU");
  }
  const int64_t B = qn.size(0), Tn = qn.size(1), H = qn.size(2);
  TORCH_CHECK(qp.size(0) == B && qp.size(1) == Tn && qp.size(2) == H, "q_pe must be [B, T, H, dr]");
  TORCH_CHECK(kn.size(0) == B && kn.size(1) == Tn && kn.size(2) == H && kn.size(3) == qn.size(3),
              "k_nope must be [B, T, H, dn] (causal self-attention: as many keys as queries)");
  TORCH_CHECK(kp.size(0) == B && kp.size(1) == Tn && kp.size(2) == qp.size(3), "k_pe must be [B, T, dr]");
  TORCH_CHECK(v.size(0) == B && v.size(1) == Tn && v.size(2) == H, "v must be [B, T, H, dv]");
}

std::vector<at::Tensor> mla_attention_forward(const at::Tensor& q_nope, const at::Tensor& q_pe,
                                              const at::Tensor& k_nope, const at::Tensor& k_pe, const at::Tensor& v,
                                              double scale) {
  check_attention(q_nope, q_pe, k_nope, k_pe, v);
  const int64_t B = q_nope.size(0), Tn = q_nope.size(1), H = q_nope.size(2);
  auto o = at::empty({B, Tn, H, v.size(3)}, q_nope.options());
  auto P = at::empty({B, H, Tn, Tn}, q_nope.options());
  AT_DISPATCH_FLOATING_TYPES(q_nope.scalar_type(), "dsk_mla_attention_forward", [&] {
    mla_attention_forward_impl<scalar_t>(q_nope, q_pe, k_nope, k_pe, v, scale, o, P);
  });
  return {o, P};
}

// With S = scale * (q k^T), P = softmax(S), o = P v:  dP = do v^T, dS = P * (dP - rowsum(dP * P)) * scale,
// dq = dS k, dk = dS^T q, dv = P^T do. The rope key is shared by the heads: each head's dk_pe goes to its own
// slice of a [B, H, T, dr] buffer, summed over heads after the parallel region (no two threads write one row).
template <typename T>
void mla_attention_backward_impl(const at::Tensor& dO, const at::Tensor& qn, const at::Tensor& qp,
                                 const at::Tensor& kn, const at::Tensor& kp, const at::Tensor& v, const at::Tensor& P,
                                 double scale, at::Tensor& dqn, at::Tensor& dqp, at::Tensor& dkn,
                                 at::Tensor& dkp_heads, at::Tensor& dv) {
  const int64_t B = qn.size(0), Tn = qn.size(1), H = qn.size(2), dn = qn.size(3), dr = qp.size(3), Dv = v.size(3);
  const AttnView vqn = view_of(qn, true), vqp = view_of(qp, true), vkn = view_of(kn, true), vkp = view_of(kp, false),
                 vv = view_of(v, true);
  const T *QN = qn.data_ptr<T>(), *QP = qp.data_ptr<T>(), *KN = kn.data_ptr<T>(), *KP = kp.data_ptr<T>(),
          *V = v.data_ptr<T>(), *PP = P.data_ptr<T>(), *DO = dO.data_ptr<T>();
  T *DQN = dqn.data_ptr<T>(), *DQP = dqp.data_ptr<T>(), *DKN = dkn.data_ptr<T>(), *DKPH = dkp_heads.data_ptr<T>(),
    *DV = dv.data_ptr<T>();
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, B * H, 1, [&](int64_t t0, int64_t t1) {
    const int saved = g_set_local_threads ? g_set_local_threads(1) : 0;
    std::vector<T> dS(Tn * Tn);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      const T* Pm = PP + task * Tn * Tn;
      const T* dOb = DO + (b * Tn * H + h) * Dv;  // dO is contiguous [B, T, H, dv]
      const T *qn_bh = QN + b * vqn.sb + h * vqn.sh, *qp_bh = QP + b * vqp.sb + h * vqp.sh;
      const T *kn_bh = KN + b * vkn.sb + h * vkn.sh, *kp_b = KP + b * vkp.sb, *v_bh = V + b * vv.sb + h * vv.sh;
      T *dv_bh = DV + (b * Tn * H + h) * Dv, *dkn_bh = DKN + (b * Tn * H + h) * dn, *dkp_bh = DKPH + task * Tn * dr;
      // causal blocks as in the forward; dk and dv of keys [0, r1) gather every later block's share (beta = 1)
      for (int64_t r0 = 0; r0 < Tn; r0 += kCausalBlock) {
        const int64_t rows = std::min(kCausalBlock, Tn - r0), keys = r0 + rows;
        const T* Pb = Pm + r0 * Tn;
        T* dSb = dS.data();
        // dP = dO v^T
        gemm_rm<T>(false, true, rows, keys, Dv, dOb + r0 * H * Dv, H * Dv, v_bh, vv.st, T(0), dSb, Tn);
        for (int64_t ii = 0; ii < rows; ++ii) {
          const int64_t i = r0 + ii;
          T* row = dSb + ii * Tn;
          const T* p = Pb + ii * Tn;
          T dot = 0;
#pragma omp simd reduction(+ : dot)
          for (int64_t j = 0; j <= i; ++j) dot += row[j] * p[j];
          for (int64_t j = 0; j <= i; ++j) row[j] = p[j] * (row[j] - dot) * sc;
          std::fill(row + i + 1, row + keys, T(0));
        }
        // blocks past the first add to the dk / dv rows the earlier blocks wrote; rows [r0, keys) are new
        auto accumulate = [&](int64_t m, int64_t n, int64_t k, const T* A, int64_t lda, const T* Bm, int64_t ldb,
                              T* C, int64_t ldc) {
          if (r0 > 0) gemm_rm<T>(true, false, r0, n, k, A, lda, Bm, ldb, T(1), C, ldc);  // old rows
          gemm_rm<T>(true, false, m - r0, n, k, A + r0, lda, Bm, ldb, T(0), C + r0 * ldc, ldc);  // new rows
        };
        // dv[:keys] += P^T dO, dk[:keys] += dS^T q (contiguous [B, T, H, d] outputs)
        accumulate(keys, Dv, rows, Pb, Tn, dOb + r0 * H * Dv, H * Dv, dv_bh, H * Dv);
        accumulate(keys, dn, rows, dSb, Tn, qn_bh + r0 * vqn.st, vqn.st, dkn_bh, H * dn);
        accumulate(keys, dr, rows, dSb, Tn, qp_bh + r0 * vqp.st, vqp.st, dkp_bh, dr);
        // dq = dS k
        gemm_rm<T>(false, false, rows, dn, keys, dSb, Tn, kn_bh, vkn.st, T(0), DQN + ((b * Tn + r0) * H + h) * dn,
                   H * dn);
        gemm_rm<T>(false, false, rows, dr, keys, dSb, Tn, kp_b, vkp.st, T(0), DQP + ((b * Tn + r0) * H + h) * dr,
                   H * dr);
      }
    }
    if (g_set_local_threads) g_set_local_threads(saved);
  });
}

std::vector<at::Tensor> mla_attention_backward(const at::Tensor& dO, const at::Tensor& q_nope, const at::Tensor& q_pe,
                                               const at::Tensor& k_nope, const at::Tensor& k_pe, const at::Tensor& v,
                                               const at::Tensor& P, double scale) {
  check_attention(q_nope, q_pe, k_nope, k_pe, v);
  const int64_t B = q_nope.size(0), Tn = q_nope.size(1), H = q_nope.size(2);
  TORCH_CHECK(dO.is_contiguous() && dO.size(0) == B && dO.size(1) == Tn && dO.size(2) == H && dO.size(3) == v.size(3),
              "dO must be a contiguous [B, T, H, dv] tensor");
  TORCH_CHECK(P.is_contiguous() && P.numel() == B * H * Tn * Tn, "P must be the probabilities of the forward");
  auto opts = q_nope.options();
  auto dqn = at::empty({B, Tn, H, q_nope.size(3)}, opts), dqp = at::empty({B, Tn, H, q_pe.size(3)}, opts);
  auto dkn = at::empty({B, Tn, H, k_nope.size(3)}, opts), dv = at::empty({B, Tn, H, v.size(3)}, opts);
  auto dkp_heads = at::empty({B, H, Tn, q_pe.size(3)}, opts);
  AT_DISPATCH_FLOATING_TYPES(q_nope.scalar_type(), "dsk_mla_attention_backward", [&] {
    mla_attention_backward_impl<scalar_t>(dO, q_nope, q_pe, k_nope, k_pe, v, P, scale, dqn, dqp, dkn, dkp_heads, dv);
  });
  return {dqn, dqp, dkn, dkp_heads.sum(1), dv};
}

// ---- routing weights and the sequence-wise balance loss --------------------------------------------------
//
// w[n, k] = scale * s[n, idx[n, k]] (/ (sum_k s[n, idx[n, k]] + 1e-20) when norm), and, when alpha > 0, the
// complementary sequence-wise balance loss of DeepSeek-V3 over B sequences of T tokens:
//   f[b, e] = E / (K T) * #{tokens of b that selected e},  P[b, e] = mean_t s[n, e] / sum_e' s[n, e'],
//   loss = alpha / B * sum_b sum_e f[b, e] P[b, e] = alpha / (B T) * sum_n sum_e f[b(n), e] s[n, e] / S_n.
// One pass over the tokens each way, where PyTorch takes ~10 kernels forward and ~12 backward.
template <typename T>
void route_weights_forward_impl(const T* S, const int64_t* IDX, int64_t N, int64_t E, int64_t K, bool norm,
                                double scale, double alpha, int64_t B, int64_t Tn, T* W, T* DEN, T* INVS, T* F,
                                double* loss) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T* s = S + n * E;
      const int64_t* idx = IDX + n * K;
      T den = 1;
      if (norm) {
        T sum = 0;
        for (int64_t k = 0; k < K; ++k) sum += s[idx[k]];
        den = sum + T(1e-20);
      }
      DEN[n] = den;
      for (int64_t k = 0; k < K; ++k) W[n * K + k] = norm ? s[idx[k]] / den * T(scale) : s[idx[k]] * T(scale);
      if (alpha > 0) {
        T total = 0;
        for (int64_t e = 0; e < E; ++e) total += s[e];
        INVS[n] = T(1) / total;
      }
    }
  });
  *loss = 0;
  if (alpha <= 0) return;
  std::fill_n(F, B * E, T(0));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) F[(n / Tn) * E + IDX[n * K + k]] += T(1);
  const T fscale = T(E) / T(K * Tn);
  for (int64_t i = 0; i < B * E; ++i) F[i] *= fscale;
  // per-token terms summed in token order: deterministic
  double acc = 0;
  for (int64_t n = 0; n < N; ++n) {
    const T *s = S + n * E, *f = F + (n / Tn) * E;
    double term = 0;
    for (int64_t e = 0; e < E; ++e) term += static_cast<double>(f[e]) * s[e];
    acc += term * INVS[n];
  }
  *loss = alpha * acc / static_cast<double>(B * Tn);
}

std::vector<at::Tensor> route_weights_forward(const at::Tensor& scores, const at::Tensor& idx, bool norm, double scale,
                                              double alpha, int64_t n_seqs, int64_t seq_len) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 2 && scores.is_contiguous() &&
                  (scores.scalar_type() == at::kFloat || scores.scalar_type() == at::kDouble),
              "scores must be a contiguous CPU float32/float64 [N, E] tensor");
  TORCH_CHECK(idx.scalar_type() == at::kLong && idx.dim() == 2 && idx.is_contiguous() && idx.size(0) == scores.size(0),
              "idx must be a contiguous int64 [N, K] tensor");
  const int64_t N = scores.size(0), E = scores.size(1), K = idx.size(1);
  TORCH_CHECK(alpha <= 0 || (n_seqs * seq_len == N && seq_len > 0), "n_seqs * seq_len must equal N");
  const int64_t* I = idx.data_ptr<int64_t>();
  for (int64_t i = 0; i < N * K; ++i) TORCH_CHECK(I[i] >= 0 && I[i] < E, "idx holds an expert outside [0, E)");
  auto opts = scores.options();
  auto w = at::empty({N, K}, opts), den = at::empty({N}, opts), invs = at::empty({alpha > 0 ? N : 0}, opts);
  auto f = at::empty({alpha > 0 ? n_seqs : 0, E}, opts);
  double loss = 0;
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "dsk_route_weights_forward", [&] {
    route_weights_forward_impl<scalar_t>(scores.data_ptr<scalar_t>(), I, N, E, K, norm, scale, alpha, n_seqs, seq_len,
                                         w.data_ptr<scalar_t>(), den.data_ptr<scalar_t>(),
                                         alpha > 0 ? invs.data_ptr<scalar_t>() : nullptr,
                                         alpha > 0 ? f.data_ptr<scalar_t>() : nullptr, &loss);
  });
  return {w, at::scalar_tensor(loss, opts), den, invs, f};
}

template <typename T>
void route_weights_backward_impl(const T* DW, T dloss, const T* S, const int64_t* IDX, const T* DEN, const T* INVS,
                                 const T* F, int64_t N, int64_t E, int64_t K, bool norm, double scale, double alpha,
                                 int64_t B, int64_t Tn, T* DS) {
  const T g = alpha > 0 ? dloss * T(alpha / static_cast<double>(B * Tn)) : T(0);
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const T *s = S + n * E, *dw = DW + n * K;
      const int64_t* idx = IDX + n * K;
      T* ds = DS + n * E;
      if (alpha > 0) {
        const T *f = F + (n / Tn) * E, inv = INVS[n];
        T term = 0;
        for (int64_t e = 0; e < E; ++e) term += f[e] * s[e];
        for (int64_t e = 0; e < E; ++e) ds[e] = g * (f[e] * inv - term * inv * inv);
      } else {
        std::fill_n(ds, E, T(0));
      }
      if (norm) {
        const T den = DEN[n];
        T dot = 0;
        for (int64_t k = 0; k < K; ++k) dot += dw[k] * s[idx[k]];
        for (int64_t k = 0; k < K; ++k) ds[idx[k]] += T(scale) * (dw[k] / den - dot / (den * den));
      } else {
        for (int64_t k = 0; k < K; ++k) ds[idx[k]] += T(scale) * dw[k];
      }
    }
  });
}

at::Tensor route_weights_backward(const at::Tensor& dw, const at::Tensor& dloss, const at::Tensor& scores,
                                  const at::Tensor& idx, const at::Tensor& den, const at::Tensor& invs,
                                  const at::Tensor& f, bool norm, double scale, double alpha, int64_t n_seqs,
                                  int64_t seq_len) {
  TORCH_CHECK(dw.is_contiguous() && dw.sizes() == idx.sizes() && dw.scalar_type() == scores.scalar_type(),
              "dw must be a contiguous [N, K] tensor of the scores' dtype");
  const int64_t N = scores.size(0), E = scores.size(1), K = idx.size(1);
  auto ds = at::empty_like(scores);
  AT_DISPATCH_FLOATING_TYPES(scores.scalar_type(), "dsk_route_weights_backward", [&] {
    route_weights_backward_impl<scalar_t>(
        dw.data_ptr<scalar_t>(), dloss.item<scalar_t>(), scores.data_ptr<scalar_t>(), idx.data_ptr<int64_t>(),
        den.data_ptr<scalar_t>(), alpha > 0 ? invs.data_ptr<scalar_t>() : nullptr,
        alpha > 0 ? f.data_ptr<scalar_t>() : nullptr, N, E, K, norm, scale, alpha, n_seqs, seq_len,
        ds.data_ptr<scalar_t>());
  });
  return ds;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_blas", &set_blas, "Function pointers of sgemm_, dgemm_ and the per-thread BLAS thread setter (0: none)");
  m.def("has_blas", &has_blas, "Whether the BLAS entry points are set");
  m.def("experts_forward", &experts_forward,
        "experts_forward(x, order, starts, K, weight, w_gate, w_up, w_down) -> (y, gu)");
  m.def("experts_backward", &experts_backward,
        "experts_backward(dy, x, gu, order, starts, K, weight, w_gate, w_up, w_down) -> "
        "(dx, dw_gate, dw_up, dw_down, dweight)");
  m.def("route_topk", &route_topk,
        "route_topk(scores [N, E], bias [E] or empty, n_groups, topk_groups, top_k, top2_sum) -> (idx, order, load)");
  m.def("mla_attention_forward", &mla_attention_forward,
        "mla_attention_forward(q_nope, q_pe, k_nope, k_pe, v, scale) -> (o [B, T, H, dv], probs [B, H, T, T])");
  m.def("mla_attention_backward", &mla_attention_backward,
        "mla_attention_backward(do, q_nope, q_pe, k_nope, k_pe, v, probs, scale) -> (dq_nope, dq_pe, dk_nope, dk_pe, "
        "dv)");
  m.def("route_weights_forward", &route_weights_forward,
        "route_weights_forward(scores, idx, norm, scale, alpha, n_seqs, seq_len) -> (w, loss, den, inv_sum, f)");
  m.def("route_weights_backward", &route_weights_backward,
        "route_weights_backward(dw, dloss, scores, idx, den, inv_sum, f, norm, scale, alpha, n_seqs, seq_len) -> ds");
  m.def("rms_norm_forward", &rms_norm_forward, "rms_norm_forward(x [rows, D], weight [D], eps) -> (y, rstd)");
  m.def("rms_norm_backward", &rms_norm_backward, "rms_norm_backward(dy, x, weight, rstd) -> (dx, dweight)");
}
