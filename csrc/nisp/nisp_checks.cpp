// Input validation of nisp_propagate (used by every backend): value errors -> ValueError, type -> TypeError.
#include "nisp/nisp.h"

namespace fastprune {

NispShape check_nisp_propagate_inputs(const at::Tensor& weight, const at::Tensor& scores, int64_t groups) {
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kDouble,
                   "weight must be a float32 or float64 tensor, got ", weight.scalar_type());
  TORCH_CHECK_TYPE(scores.scalar_type() == weight.scalar_type(), "scores and weight must have the same dtype, got ",
                   scores.scalar_type(), " and ", weight.scalar_type());
  TORCH_CHECK_VALUE(weight.device() == scores.device(), "weight and scores must be on the same device, got ",
                    weight.device(), " and ", scores.device());
  TORCH_CHECK_VALUE(weight.dim() >= 2, "weight must be (out, in/groups, *kernel), got shape ", weight.sizes());
  TORCH_CHECK_VALUE(scores.dim() == 1 || scores.dim() == 2, "scores must be (out,) or (m, out), got shape ",
                    scores.sizes());
  TORCH_CHECK_VALUE(groups >= 1, "groups must be >= 1, got ", groups);
  const int64_t out = weight.size(0);
  TORCH_CHECK_VALUE(out % groups == 0, "the weight's ", out, " output channels do not split into ", groups,
                    " groups");
  TORCH_CHECK_VALUE(scores.size(-1) == out, "scores have ", scores.size(-1), " entries per vector, the weight ", out,
                    " outputs");
  int64_t taps = 1;
  for (int64_t d = 2; d < weight.dim(); ++d) taps *= weight.size(d);
  return NispShape{out, weight.size(1), taps, groups, scores.dim() == 2 ? scores.size(0) : 1};
}

}  // namespace fastprune
