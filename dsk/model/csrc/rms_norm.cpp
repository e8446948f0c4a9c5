// RMSNorm forward and backward for CPU float32/float64: y = w * x / sqrt(mean(x^2) + eps) over rows of width D.
//
// One pass forward (saving 1/rms per row) and one backward, where ATen's composition takes ~8 element-wise kernels
// forward and ~12 backward, each a full pass over the activations plus its dispatch. Rows are split over the
// threads; the weight gradient is summed per thread in double and added in a fixed order, so the result depends on
// the thread count only through that order.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

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

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward, "rms_norm_forward(x [rows, D], weight [D], eps) -> (y, rstd)");
  m.def("rms_norm_backward", &rms_norm_backward, "rms_norm_backward(dy, x, weight, rstd) -> (dx, dweight)");
}
