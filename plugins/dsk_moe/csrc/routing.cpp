// MoE routing on CPU: the group-limited top-k selection with the counting sort of the routed slots by expert, and
// the routing weights with DeepSeek-V3's sequence-wise balance loss (float32/float64). Each is one pass over the
// tokens where the PyTorch path takes ~10-15 small kernels. Bound into the module by experts.cpp.
#include "routing.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

namespace dsk_moe {
namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

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

namespace {

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

}  // namespace

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

}  // namespace dsk_moe
