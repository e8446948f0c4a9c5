// The routed experts of a DeepSeekMoE layer on CPU, forward and backward (float32/float64).
//
// The experts of a fine-grained MoE are many small GEMMs (64 experts, ~100 rows each). ATen runs them one after
// another and splits each small GEMM over the threads, which is where CPU BLAS is least efficient (measured:
// ~60-110 GFLOP/s on 2 cores against ~200 for one large GEMM). Here the threads split the *experts* instead: each
// thread owns a contiguous run of experts holding about the same number of rows and runs their GEMMs on its own
// thread back to back (dsk_gemm.h), with the SwiGLU element-wise work fused between them while the expert's rows
// are still in cache. Each thread gathers its experts' token rows itself and writes each output row to its
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
// The routing kernels (routing.cpp) are bound into the same module below.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "dsk_gemm.h"
#include "dsk_vec_math.h"
#include "routing.h"

namespace {

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
// buffer (small and reused from expert to expert, so it stays in cache); each GEMM runs on its thread (dsk_gemm.h).
template <typename T, typename Fn>
void for_each_expert(const int64_t* starts, int64_t n_experts, const Fn& fn) {
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_experts));
  const auto bounds = partition(starts, n_experts, parts);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    std::vector<T> scratch;
    for (int64_t p = p0; p < p1; ++p) {
      for (int64_t e = bounds[p]; e < bounds[p + 1]; ++e) fn(e, scratch);
    }
  });
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

// The SwiGLU product a = silu(g) * u * s of one row of H and its gradients: with sigmoid(g) already in dg's place,
// writes dg and du from da (and a itself when kWriteA, for a backward that needs the activation again) and returns
// the gradient of the row's scale s.
template <typename T, bool kWriteA>
inline T swiglu_row_backward(const T* g, const T* u, const T* da, T s, int64_t H, T* dg, T* du, T* a) {
  T ds = 0;
#pragma omp simd reduction(+ : ds)
  for (int64_t h = 0; h < H; ++h) {
    const T gv = g[h], sg = dg[h], silu = gv * sg, uv = u[h], dav = da[h];
    if constexpr (kWriteA) a[h] = silu * uv * s;
    ds += dav * silu * uv;
    du[h] = dav * silu * s;
    dg[h] = dav * uv * s * sg * (T(1) + gv * (T(1) - sg));
  }
  return ds;
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
    dsk::gemm_rm<T>(false, true, m, 2 * H, D, xe, D, wgu, D, T(0), gue, 2 * H);
    for (int64_t i = 0; i < m; ++i) dsk::sigmoid_row(gue + i * 2 * H, H, ae + i * H);
    for (int64_t i = 0; i < m; ++i) {
      const T s = W ? W[slots[i]] : T(1);
      const T *g = gue + i * 2 * H, *u = g + H;
      T* a = ae + i * H;
      for (int64_t h = 0; h < H; ++h) a[h] *= g[h] * u[h] * s;
    }
    dsk::gemm_rm<T>(false, true, m, D, H, ae, H, WD + e * D * H, H, T(0), ye, D);
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
    dsk::gemm_rm<T>(false, false, m, H, D, dye, D, WD + e * D * H, H, T(0), dae, H);
    // a = silu(g) * u * w, and the gradients of the SwiGLU product
    for (int64_t i = 0; i < m; ++i) dsk::sigmoid_row(gue + i * 2 * H, H, dgue + i * 2 * H);  // sigmoid(g) in dG's place
    for (int64_t i = 0; i < m; ++i) {
      const T s = W ? W[slots[i]] : T(1);
      const T* g = gue + i * 2 * H;
      T* dg = dgue + i * 2 * H;
      const T ds = swiglu_row_backward<T, true>(g, g + H, dae + i * H, s, H, dg, dg + H, ae + i * H);
      if (DW) DW[slots[i]] = ds;
    }
    // dWd = dY^T a  [D, H]
    dsk::gemm_rm<T>(true, false, D, H, m, dye, D, ae, H, T(0), dwd_e, H);
    // dX = [dG dU] [Wg; Wu]  [m, D]
    stack_gate_up(WG, WU, e, H, D, wgu);
    dsk::gemm_rm<T>(false, false, m, D, 2 * H, dgue, 2 * H, wgu, D, T(0), dxe, D);
    for (int64_t i = 0; i < m; ++i) std::copy_n(dxe + i * D, D, SDX + slots[i] * D);
    // [dWg; dWu] = [dG dU]^T X  [2H, D]
    dsk::gemm_rm<T>(true, false, 2 * H, D, m, dgue, 2 * H, xe, D, T(0), dwgu, D);
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

// The SwiGLU activation alone, for the dense FFN, the shared experts and the grouped-GEMM expert path: a = silu(g)
// * u * s over rows of H, g and u 2-D [R, H] with unit stride along a row and any row stride (the two halves of one
// stacked GEMM's output [R, 2H] are such views), s [R] a routing weight per row or empty for none. The backward
// writes dg and du through the same kind of views (into one [R, 2H] tensor for stacked inputs, so nothing splits or
// concatenates the halves). ATen's composition takes 3 kernels forward and ~10 backward, each a pass over [R, H]
// values that no longer fit in cache at a few thousand rows. Rows split over the threads.
int64_t swiglu_grain(int64_t H) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H)); }

void check_rows(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.dim() == 2 && t.sizes() == like.sizes() && t.stride(1) == 1 && (t.size(0) <= 1 || t.stride(0) >= t.size(1)) &&
                  t.scalar_type() == like.scalar_type() && t.device().is_cpu(),
              what, " must be a CPU tensor [R, H] like the gate, with unit stride along a row");
}

void check_swiglu(const at::Tensor& g, const at::Tensor& u, const at::Tensor& scale) {
  TORCH_CHECK(g.dim() == 2 && g.stride(1) == 1 && (g.size(0) <= 1 || g.stride(0) >= g.size(1)) && g.device().is_cpu(),
              "gate must be a CPU tensor [R, H] with unit stride along a row");
  check_rows(u, g, "up");
  TORCH_CHECK(scale.numel() == 0 || (scale.dim() == 1 && scale.numel() == g.size(0) && scale.is_contiguous() &&
                                     scale.scalar_type() == g.scalar_type()),
              "scale must be empty or a contiguous [R] tensor of the gate's dtype");
}

template <typename T>
void swiglu_forward_impl(const T* G, int64_t ldg, const T* U, int64_t ldu, const T* S, int64_t R, int64_t H, T* A) {
  at::parallel_for(0, R, swiglu_grain(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T *g = G + r * ldg, *u = U + r * ldu, s = S ? S[r] : T(1);
      T* out = A + r * H;
      dsk::sigmoid_row(g, H, out);
#pragma omp simd
      for (int64_t h = 0; h < H; ++h) out[h] = g[h] * out[h] * (u[h] * s);
    }
  });
}

template <typename T>
void swiglu_backward_impl(const T* DA, const T* G, int64_t ldg, const T* U, int64_t ldu, const T* S, int64_t R,
                          int64_t H, T* DG, int64_t lddg, T* DU, int64_t lddu, T* DS) {
  at::parallel_for(0, R, swiglu_grain(H), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T *g = G + r * ldg, *u = U + r * ldu;
      T* dg = DG + r * lddg;
      dsk::sigmoid_row(g, H, dg);  // sigmoid(g) in dg's place
      const T ds = swiglu_row_backward<T, false>(g, u, DA + r * H, S ? S[r] : T(1), H, dg, DU + r * lddu, nullptr);
      if (DS) DS[r] = ds;
    }
  });
}

at::Tensor swiglu_forward(const at::Tensor& g, const at::Tensor& u, const at::Tensor& scale) {
  check_swiglu(g, u, scale);
  const int64_t R = g.size(0), H = g.size(1);
  auto a = at::empty({R, H}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "dsk_swiglu_forward", [&] {
    swiglu_forward_impl<scalar_t>(g.data_ptr<scalar_t>(), g.stride(0), u.data_ptr<scalar_t>(), u.stride(0),
                                  scale.numel() ? scale.data_ptr<scalar_t>() : nullptr, R, H, a.data_ptr<scalar_t>());
  });
  return a;
}

// Writes dg and du (views [R, H] as the inputs may be); returns dscale [R], or an empty tensor when scale is.
at::Tensor swiglu_backward(const at::Tensor& da, const at::Tensor& g, const at::Tensor& u, const at::Tensor& scale,
                           at::Tensor dg, at::Tensor du) {
  check_swiglu(g, u, scale);
  const int64_t R = g.size(0), H = g.size(1);
  TORCH_CHECK(da.is_contiguous(), "da must be contiguous");
  check_rows(da, g, "da");
  check_rows(dg, g, "dg");
  check_rows(du, g, "du");
  auto dscale = scale.numel() ? at::empty_like(scale) : at::empty({0}, g.options());
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "dsk_swiglu_backward", [&] {
    const bool scaled = scale.numel() > 0;
    swiglu_backward_impl<scalar_t>(da.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), g.stride(0),
                                   u.data_ptr<scalar_t>(), u.stride(0), scaled ? scale.data_ptr<scalar_t>() : nullptr,
                                   R, H, dg.data_ptr<scalar_t>(), dg.stride(0), du.data_ptr<scalar_t>(), du.stride(0),
                                   scaled ? dscale.data_ptr<scalar_t>() : nullptr);
  });
  return dscale;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("experts_forward", &experts_forward,
        "experts_forward(x, order, starts, K, weight, w_gate, w_up, w_down) -> (y, gu)");
  m.def("experts_backward", &experts_backward,
        "experts_backward(dy, x, gu, order, starts, K, weight, w_gate, w_up, w_down) -> "
        "(dx, dw_gate, dw_up, dw_down, dweight)");
  m.def("swiglu_forward", &swiglu_forward, "swiglu_forward(g [R, H], u [R, H], scale [R] or empty) -> a [R, H]");
  m.def("swiglu_backward", &swiglu_backward, "swiglu_backward(da, g, u, scale, dg, du) -> dscale (writes dg, du)");
  m.def("route_topk", &dsk_moe::route_topk,
        "route_topk(scores [N, E], bias [E] or empty, n_groups, topk_groups, top_k, top2_sum) -> (idx, order, load)");
  m.def("route_weights_forward", &dsk_moe::route_weights_forward,
        "route_weights_forward(scores, idx, norm, scale, alpha, n_seqs, seq_len) -> (w, loss, den, inv_sum, f)");
  m.def("route_weights_backward", &dsk_moe::route_weights_backward,
        "route_weights_backward(dw, dloss, scores, idx, den, inv_sum, f, norm, scale, alpha, n_seqs, seq_len) -> ds");
}
