// scaled_dot_product_attention: softmax(scale * Q K^T + mask) V per batch item, in fp32 / fp64.
// See attention_core.h for the per-element math both backends share.
#pragma once

#include <ATen/ATen.h>

namespace fastprune {

// Canonical form of one call: q (B, H, L, E), k (B, H, S, E), v (B, H, S, Ev), every last stride 1;
// mask (B, H, L, S) additive, same dtype, strides 0 where broadcast, last stride 1, or undefined.
struct AttentionInputs {
  at::Tensor q, k, v, mask;
  std::vector<int64_t> out_shape;  // the caller's leading dims + (L, Ev)
  double scale;
};

// Validates (query, key, value, attn_mask, scale) for every backend and returns the canonical form:
// value errors -> ValueError, dtype errors -> TypeError.
AttentionInputs check_attention_inputs(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                                       const std::optional<at::Tensor>& attn_mask, std::optional<double> scale);

}  // namespace fastprune
