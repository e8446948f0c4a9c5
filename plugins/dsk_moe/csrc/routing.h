// MoE routing kernels (routing.cpp), declared for the module bindings in experts.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace dsk_moe {

// Group-limited top-k of scores + bias and the stable counting sort of the slots by expert -> (idx, order, load).
std::vector<at::Tensor> route_topk(const at::Tensor& scores, const at::Tensor& bias, int64_t n_groups,
                                   int64_t topk_groups, int64_t top_k, bool top2_sum);

// Routing weights and the sequence-wise balance loss -> (w, loss, den, inv_sum, f); the last three for the backward.
std::vector<at::Tensor> route_weights_forward(const at::Tensor& scores, const at::Tensor& idx, bool norm, double scale,
                                              double alpha, int64_t n_seqs, int64_t seq_len);

// Gradient of the scores from those of the weights and of the loss.
at::Tensor route_weights_backward(const at::Tensor& dw, const at::Tensor& dloss, const at::Tensor& scores,
                                  const at::Tensor& idx, const at::Tensor& den, const at::Tensor& invs,
                                  const at::Tensor& f, bool norm, double scale, double alpha, int64_t n_seqs,
                                  int64_t seq_len);

}  // namespace dsk_moe
