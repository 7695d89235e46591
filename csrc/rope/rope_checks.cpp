#include <cmath>

#include <ATen/ATen.h>

#include "rope_math.h"
#include "rope_nd.h"

namespace omnivmed {
namespace rope {

void check_rope_nd_args(const at::Tensor& x, const at::Tensor& positions,
                        c10::IntArrayRef sections, double theta) {
  TORCH_CHECK_VALUE(x.dim() == 3, "rope_nd: x must be [L, H, D], got a tensor of shape ",
                    x.sizes());
  const auto dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kDouble,
                   "rope_nd: x must be float32, float16, bfloat16 or float64, got ", dtype);
  const int64_t head_dim = x.size(2);
  TORCH_CHECK_VALUE(head_dim > 0 && head_dim % 2 == 0 && head_dim <= kMaxHeadDim,
                    "rope_nd: head dim D = x.size(2) must be even and in [2, ", kMaxHeadDim,
                    "], got ", head_dim);
  const int64_t num_axes = static_cast<int64_t>(sections.size());
  TORCH_CHECK_VALUE(num_axes >= 1 && num_axes <= kMaxAxes, "rope_nd: sections must list 1 to ",
                    kMaxAxes, " axes, got ", num_axes, " (", sections, ")");
  int64_t total = 0;
  for (const int64_t s : sections) {
    TORCH_CHECK_VALUE(s >= 0, "rope_nd: sections must be non-negative, got ", sections);
    total += s;
  }
  TORCH_CHECK_VALUE(total == head_dim / 2, "rope_nd: sections ", sections, " sum to ", total,
                    " but must sum to D/2 = ", head_dim / 2, " (D = ", head_dim, ")");
  TORCH_CHECK_VALUE(std::isfinite(theta) && theta > 0.0,
                    "rope_nd: theta must be a positive finite number, got ", theta);
  TORCH_CHECK_VALUE(positions.dim() == 2 && positions.size(0) == x.size(0) &&
                        positions.size(1) == num_axes,
                    "rope_nd: positions must be [L, A] = [", x.size(0), ", ", num_axes,
                    "] (one row per token, one column per section), got ", positions.sizes());
  TORCH_CHECK_TYPE(positions.scalar_type() == at::kInt || positions.scalar_type() == at::kLong,
                   "rope_nd: positions must be int32 or int64, got ", positions.scalar_type());
  TORCH_CHECK_VALUE(positions.device() == x.device(), "rope_nd: positions are on ",
                    positions.device(), " but x is on ", x.device(),
                    "; both must be on the same device");
}

}  // namespace rope
}  // namespace omnivmed
