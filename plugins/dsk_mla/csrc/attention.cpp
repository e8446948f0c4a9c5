// MLA's causal attention core on CPU for short sequences, forward and backward (float32/float64).
//
// o[b, t, h] = softmax_s(scale * (q_nope[b,t,h] . k_nope[b,s,h] + q_pe[b,t,h] . k_pe[b,s]), s <= t) @ v[b, :, h].
// One (batch, head) pair per task, its T x T scores in the thread's cache: two GEMMs for the scores (the rope key
// is shared by the heads, so no per-head copy of it and no concatenation of the nope and rope parts), the causal
// softmax in place, one GEMM for the output, written straight into the [B, T, H, dv] layout the output projection
// reads; its GEMMs are small (e.g. 64 x 64 x 16), so up to dsk::kSmallGemmFlops they run in dsk_gemm.h's
// register-blocked kernel rather than through ATen, whose per-call cost would exceed the product's. Operands are read through their strides (last dim contiguous), so the views of the projections need no
// transposes or copies. The probabilities are kept for the backward ([B, H, T, T]).
//
// mla_absorbed_decode, further down: the absorbed path over a latent cache for a few new tokens per row (decoding),
// forward only, one call per layer and step in place of the PyTorch path's dozen dispatches.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "dsk_gemm.h"
#include "dsk_vec_math.h"

namespace {

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
    const T inv = T(1) / dsk::exp_scaled_row(row, i + 1, scale, mx);
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
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / H, h = task % H;
      T* S = PP + task * Tn * Tn;
      const T *qn_bh = QN + b * vqn.sb + h * vqn.sh, *qp_bh = QP + b * vqp.sb + h * vqp.sh;
      const T *kn_bh = KN + b * vkn.sb + h * vkn.sh, *kp_b = KP + b * vkp.sb, *v_bh = V + b * vv.sb + h * vv.sh;
      // causal blocks: query rows [r0, r1) only see keys [0, r1), so the products skip the masked upper blocks
      for (int64_t r0 = 0; r0 < Tn; r0 += kCausalBlock) {
        const int64_t rows = std::min(kCausalBlock, Tn - r0), keys = r0 + rows;
        T* Sb = S + r0 * Tn;
        dsk::gemm_rm_auto<T>(false, true, rows, keys, dn, qn_bh + r0 * vqn.st, vqn.st, kn_bh, vkn.st, T(0), Sb, Tn);
        dsk::gemm_rm_auto<T>(false, true, rows, keys, dr, qp_bh + r0 * vqp.st, vqp.st, kp_b, vkp.st, T(1), Sb, Tn);
        softmax_causal_rows<T>(Sb, rows, Tn, r0, static_cast<T>(scale));
        dsk::gemm_rm_auto<T>(false, false, rows, dv, keys, Sb, Tn, v_bh, vv.st, T(0), O + ((b * Tn + r0) * H + h) * dv, H * dv);
      }
    }
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
        dsk::gemm_rm_auto<T>(false, true, rows, keys, Dv, dOb + r0 * H * Dv, H * Dv, v_bh, vv.st, T(0), dSb, Tn);
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
          if (r0 > 0) dsk::gemm_rm_auto<T>(true, false, r0, n, k, A, lda, Bm, ldb, T(1), C, ldc);  // old rows
          dsk::gemm_rm_auto<T>(true, false, m - r0, n, k, A + r0, lda, Bm, ldb, T(0), C + r0 * ldc, ldc);  // new rows
        };
        // dv[:keys] += P^T dO, dk[:keys] += dS^T q (contiguous [B, T, H, d] outputs)
        accumulate(keys, Dv, rows, Pb, Tn, dOb + r0 * H * Dv, H * Dv, dv_bh, H * Dv);
        accumulate(keys, dn, rows, dSb, Tn, qn_bh + r0 * vqn.st, vqn.st, dkn_bh, H * dn);
        accumulate(keys, dr, rows, dSb, Tn, qp_bh + r0 * vqp.st, vqp.st, dkp_bh, dr);
        // dq = dS k
        dsk::gemm_rm_auto<T>(false, false, rows, dn, keys, dSb, Tn, kn_bh, vkn.st, T(0), DQN + ((b * Tn + r0) * H + h) * dn,
                   H * dn);
        dsk::gemm_rm_auto<T>(false, false, rows, dr, keys, dSb, Tn, kp_b, vkp.st, T(0), DQP + ((b * Tn + r0) * H + h) * dr,
                   H * dr);
      }
    }
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

// MLA's absorbed attention over a latent cache for a few new tokens per row (decoding, a speculative verify), no
// autograd: for query t of row b and head h,
//   q_c = q_nope[b,t,h] W_UK[h]                                      (W_UK folded into the query, c values)
//   p_s = softmax_s(scale * (q_c . kv[b,s,:c] + q_pe[b,t,h] . kv[b,s,c:]))   over the keys the query may see
//   o[b,t,h] = W_UV[h] (sum_s p_s kv[b,s,:c])                         (W_UV folded into the output, dv values)
// with W_UK[h], W_UV[h] the rows h*(dn+dv) .. of kv_b_proj's weight [H*(dn+dv), c]. Key s is visible to query t
// of row b where mask[b,t,s] (a bool mask [B, T, S]) or, without a mask, where s <= offset + t (causal by slot).
// The PyTorch path is five batched GEMMs, a concatenation, transposes, a bias and a softmax, each a dispatch that
// costs more than the products at these sizes; here one task per (row, query) does it for every head, its products
// in dsk_gemm.h's small GEMM and its softmax with the vectorised exp, in the operands' dtype (float32's softmax in
// float32, as the PyTorch path's).
template <typename T>
void mla_absorbed_decode_impl(const at::Tensor& qn, const at::Tensor& qp, const at::Tensor& kv, const at::Tensor& w,
                              const at::Tensor& mask, int64_t offset, double scale, at::Tensor& o) {
  const int64_t B = qn.size(0), Tq = qn.size(1), H = qn.size(2), dn = qn.size(3), dr = qp.size(3);
  const int64_t S = kv.size(1), c = kv.size(2) - dr, dv = w.size(0) / H - dn;
  const T *QN = qn.data_ptr<T>(), *QP = qp.data_ptr<T>(), *KV = kv.data_ptr<T>(), *W = w.data_ptr<T>();
  const bool* M = mask.defined() ? mask.data_ptr<bool>() : nullptr;
  const int64_t qn_b = qn.stride(0), qn_t = qn.stride(1), qn_h = qn.stride(2);
  const int64_t qp_b = qp.stride(0), qp_t = qp.stride(1), qp_h = qp.stride(2);
  const int64_t kv_b = kv.stride(0), kv_s = kv.stride(1);
  const int64_t m_b = M ? mask.stride(0) : 0, m_t = M ? mask.stride(1) : 0, m_s = M ? mask.stride(2) : 0;
  T* O = o.data_ptr<T>();
  const T sc = static_cast<T>(scale);
  const int64_t work = H * ((dn + dv) * c + S * (2 * c + dr));  // multiply-adds per (row, query)
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(work, 1));
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  // W_UV[h]^T [c, dv] per head, once per call: the output products then read their B operand as stored (the small
  // GEMM packs a transposed B on every call)
  std::vector<T> w_uv_t(H * c * dv);
  for (int64_t h = 0; h < H; ++h) {
    const T* w_uv = W + (h * (dn + dv) + dn) * c;  // [dv, c]
    for (int64_t e = 0; e < dv; ++e)
      for (int64_t j = 0; j < c; ++j) w_uv_t[(h * c + j) * dv + e] = w_uv[e * c + j];
  }
  at::parallel_for(0, B * Tq, grain, [&](int64_t t0, int64_t t1) {
    // every head of one query at once: [q_c | q_pe] per head (the cache's row layout), scores, latent outputs
    std::vector<T> q_abs(H * (c + dr)), P(H * S), o_c(H * c);
    for (int64_t task = t0; task < t1; ++task) {
      const int64_t b = task / Tq, t = task % Tq;
      const T* kv_bv = KV + b * kv_b;
      const bool* see = M ? M + b * m_b + t * m_t : nullptr;
      const int64_t keys = M ? S : std::min<int64_t>(S, offset + t + 1);  // causal by slot: keys 0 .. offset + t
      T* out = O + (b * Tq + t) * H * dv;
      bool visible = !see;
      for (int64_t s = 0; s < keys && !visible; ++s) visible = see[s * m_s];
      if (!visible) {  // a query that may see nothing (padding): zeros, not NaN
        std::fill(out, out + H * dv, T(0));
        continue;
      }
      for (int64_t h = 0; h < H; ++h) {
        const T* w_uk = W + h * (dn + dv) * c;  // [dn, c]
        dsk::gemm_rm_auto<T>(false, false, 1, c, dn, QN + b * qn_b + t * qn_t + h * qn_h, dn, w_uk, c, T(0),
                             q_abs.data() + h * (c + dr), c + dr);
        std::copy_n(QP + b * qp_b + t * qp_t + h * qp_h, dr, q_abs.data() + h * (c + dr) + c);
      }
      // scores of every head over the keys: [H, c + dr] x [keys, c + dr]^T, then a softmax per row
      dsk::gemm_rm_auto<T>(false, true, H, keys, c + dr, q_abs.data(), c + dr, kv_bv, kv_s, T(0), P.data(), S);
      for (int64_t h = 0; h < H; ++h) {
        T* row = P.data() + h * S;
        T mx = kNegInf;
        for (int64_t s = 0; s < keys; ++s) {
          if (see && !see[s * m_s]) row[s] = kNegInf;  // hidden: a finite exp input below, zeroed after it
          mx = std::max(mx, row[s]);
        }
        dsk::exp_scaled_row(row, keys, sc, sc * mx);  // softmax numerators exp(scale * (score - max))
        T sum = 0;
        for (int64_t s = 0; s < keys; ++s) {
          if (see && !see[s * m_s]) row[s] = T(0);
          sum += row[s];
        }
        const T inv = T(1) / sum;
        for (int64_t s = 0; s < keys; ++s) row[s] *= inv;
      }
      // latent outputs [H, keys] x [keys, c], then W_UV per head: o[h] = o_c[h] W_UV[h]^T
      dsk::gemm_rm_auto<T>(false, false, H, c, keys, P.data(), S, kv_bv, kv_s, T(0), o_c.data(), c);
      for (int64_t h = 0; h < H; ++h) {
        dsk::gemm_rm_auto<T>(false, false, 1, dv, c, o_c.data() + h * c, c, w_uv_t.data() + h * c * dv, dv, T(0),
                             out + h * dv, dv);
      }
    }
  });
}

at::Tensor mla_absorbed_decode(const at::Tensor& q_nope, const at::Tensor& q_pe, const at::Tensor& kv,
                               const at::Tensor& w_kv_b, const c10::optional<at::Tensor>& mask, int64_t offset,
                               double scale) {
  TORCH_CHECK(q_nope.dim() == 4 && q_pe.dim() == 4 && kv.dim() == 3 && w_kv_b.dim() == 2,
              "expected q_nope [B, T, H, dn], q_pe [B, T, H, dr], kv [B, S, c + dr], w_kv_b [H * (dn + dv), c]");
  TORCH_CHECK(q_nope.scalar_type() == at::kFloat || q_nope.scalar_type() == at::kDouble, "float32 or float64 only");
  for (const auto* t : {&q_pe, &kv, &w_kv_b}) {
    TORCH_CHECK(t->scalar_type() == q_nope.scalar_type() && t->device().is_cpu(), "operands must share dtype, on CPU");
  }
  const int64_t B = q_nope.size(0), Tq = q_nope.size(1), H = q_nope.size(2), dn = q_nope.size(3), dr = q_pe.size(3);
  TORCH_CHECK(q_pe.size(0) == B && q_pe.size(1) == Tq && q_pe.size(2) == H, "q_pe must be [B, T, H, dr]");
  TORCH_CHECK(q_nope.stride(3) == 1 && q_pe.stride(3) == 1 && kv.stride(2) == 1, "contiguous last dims");
  TORCH_CHECK(w_kv_b.is_contiguous(), "w_kv_b must be contiguous");
  TORCH_CHECK(kv.size(0) == B && kv.size(2) > dr, "kv must be [B, S, c + dr]");
  const int64_t c = kv.size(2) - dr;
  TORCH_CHECK(w_kv_b.size(1) == c && w_kv_b.size(0) % H == 0 && w_kv_b.size(0) / H > dn,
              "w_kv_b must be [H * (dn + dv), c]");
  at::Tensor m;
  if (mask.has_value() && mask->defined()) {
    m = *mask;
    TORCH_CHECK(m.scalar_type() == at::kBool && m.dim() == 3 && m.size(0) == B && m.size(1) == Tq &&
                    m.size(2) == kv.size(1),
                "mask must be a bool [B, T, S] tensor");
  }
  auto o = at::empty({B, Tq, H, w_kv_b.size(0) / H - dn}, q_nope.options());
  AT_DISPATCH_FLOATING_TYPES(q_nope.scalar_type(), "dsk_mla_absorbed_decode", [&] {
    mla_absorbed_decode_impl<scalar_t>(q_nope, q_pe, kv, w_kv_b, m, offset, scale, o);
  });
  return o;
}

// The kernel's small GEMM on stored 2-D operands (rows ld apart, last dim contiguous), exposed for its tests.
at::Tensor small_gemm(const at::Tensor& a, const at::Tensor& b, at::Tensor c, bool ta, bool tb, bool accumulate) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && c.dim() == 2 && a.stride(1) == 1 && b.stride(1) == 1 && c.stride(1) == 1,
              "2-D operands with a contiguous last dim");
  TORCH_CHECK(a.scalar_type() == c.scalar_type() && b.scalar_type() == c.scalar_type(), "one dtype");
  const int64_t m = ta ? a.size(1) : a.size(0), k = ta ? a.size(0) : a.size(1), n = tb ? b.size(0) : b.size(1);
  TORCH_CHECK((tb ? b.size(1) : b.size(0)) == k && c.size(0) == m && c.size(1) == n, "shapes do not match");
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "dsk_small_gemm", [&] {
    dsk::small_gemm::gemm<scalar_t>(ta, tb, m, n, k, a.data_ptr<scalar_t>(), a.stride(0), b.data_ptr<scalar_t>(),
                                    b.stride(0), accumulate, c.data_ptr<scalar_t>(), c.stride(0));
  });
  return c;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("mla_attention_forward", &mla_attention_forward,
        "mla_attention_forward(q_nope, q_pe, k_nope, k_pe, v, scale) -> (o [B, T, H, dv], probs [B, H, T, T])");
  m.def("mla_attention_backward", &mla_attention_backward,
        "mla_attention_backward(do, q_nope, q_pe, k_nope, k_pe, v, probs, scale) -> (dq_nope, dq_pe, dk_nope, dk_pe, "
        "dv)");
  m.def("mla_absorbed_decode", &mla_absorbed_decode,
        "mla_absorbed_decode(q_nope, q_pe, kv, w_kv_b, mask | None, offset, scale) -> o [B, T, H, dv] (no autograd)");
  m.def("small_gemm", &small_gemm, "small_gemm(a, b, c, ta, tb, accumulate) -> c = op(a) op(b) (+ c), for tests");
}
