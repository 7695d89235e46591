// Argument checks of the rope_attention ops, shared by the CPU and CUDA kernels so that
// every backend rejects the same inputs with the same messages (the Python wrapper's
// messages, omnivmed_ext.attention).
#include <algorithm>
#include <cmath>
#include <sstream>

#include <ATen/ATen.h>

#include "../rope/rope_nd.h"
#include "rope_attention.h"

namespace omnivmed {
namespace attention {

void check_rope_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& positions,
                               const at::Tensor& cu_seqlens, int64_t max_seqlen,
                               c10::IntArrayRef sections, double theta) {
  TORCH_CHECK_VALUE(q.dim() == 3, op, ": q must be [L, H, D], got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes() && v.sizes() == q.sizes(), op,
                    ": q, k and v must have the same shape, got ", q.sizes(), ", ", k.sizes(),
                    ", ", v.sizes());
  const auto dtype = q.scalar_type();
  TORCH_CHECK_TYPE((dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16) &&
                       k.scalar_type() == dtype && v.scalar_type() == dtype,
                   op, ": q, k, v must share one dtype of float32/float16/bfloat16, got ", dtype,
                   ", ", k.scalar_type(), ", ", v.scalar_type());
  const int64_t head_dim = q.size(2);
  TORCH_CHECK_VALUE(std::find(std::begin(kSupportedHeadDims), std::end(kSupportedHeadDims),
                              head_dim) != std::end(kSupportedHeadDims),
                    op, ": head dim ", head_dim, " is not supported (64, 72, 80, 96, 128)");
  for (const at::Tensor* t : {&k, &v, &positions, &cu_seqlens}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), op,
                      ": q, k, v, positions and cu_seqlens must be on one device, got ",
                      q.device(), " and ", t->device());
  }
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 2 &&
                        cu_seqlens.scalar_type() == at::kInt,
                    op, ": cu_seqlens must be int32 [B+1] with B >= 1, got ",
                    cu_seqlens.scalar_type(), " ", cu_seqlens.sizes());
  TORCH_CHECK_VALUE(max_seqlen >= 0, op, ": max_seqlen must be >= 0, got ", max_seqlen);
  // k has q's shape, dtype and device, so q's rope_nd arguments stand for both.
  rope::check_rope_nd_args(q, positions, sections, theta);
}

void check_rope_attention_backward_args(const char* op, const at::Tensor& grad,
                                        const at::Tensor& q, const at::Tensor& out,
                                        const at::Tensor& lse) {
  TORCH_CHECK_VALUE(grad.sizes() == q.sizes() && out.sizes() == q.sizes() &&
                        grad.scalar_type() == q.scalar_type() &&
                        out.scalar_type() == q.scalar_type(),
                    op, ": grad and out must match q (", q.sizes(), ", ", q.scalar_type(),
                    "), got ", grad.sizes(), " ", grad.scalar_type(), " and ", out.sizes(), " ",
                    out.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0) &&
                        lse.scalar_type() == at::kFloat,
                    op, ": lse must be float32 [H, L] = [", q.size(1), ", ", q.size(0), "], got ",
                    lse.scalar_type(), " ", lse.sizes());
  for (const at::Tensor* t : {&grad, &out, &lse}) {
    TORCH_CHECK_VALUE(t->device() == q.device(), op, ": grad, out and lse must be on q's device ",
                      q.device(), ", got ", t->device());
  }
}

std::vector<int64_t> item_bounds(const char* op, const at::Tensor& cu_seqlens, int64_t total,
                                 int64_t max_seqlen) {
  const at::Tensor host = cu_seqlens.to(at::kCPU, at::kLong).contiguous();
  const int64_t* data = host.const_data_ptr<int64_t>();
  std::vector<int64_t> bounds(data, data + host.numel());
  bool ordered = bounds.front() == 0 && bounds.back() == total;
  int64_t longest = 0;
  for (size_t i = 1; i < bounds.size(); ++i) {
    ordered = ordered && bounds[i] >= bounds[i - 1];
    longest = std::max(longest, bounds[i] - bounds[i - 1]);
  }
  if (!ordered) {
    // At most 12 offsets in the message, as the Python check prints them.
    std::ostringstream shown;
    const size_t n = bounds.size();
    for (size_t i = 0; i < n; ++i) {
      if (n > 12 && i == 6) {
        shown << "..., ";
        i = n - 3;
      }
      shown << bounds[i] << (i + 1 < n ? ", " : "");
    }
    TORCH_CHECK_VALUE(false, op,
                      ": cu_seqlens must start at 0, never decrease and end at L = ", total,
                      ", got [", shown.str(), "]");
  }
  TORCH_CHECK_VALUE(longest <= max_seqlen, op, ": an item has ", longest,
                    " tokens but max_seqlen = ", max_seqlen);
  return bounds;
}

double resolve_scale(std::optional<double> softmax_scale, int64_t head_dim) {
  return softmax_scale.has_value() ? *softmax_scale : 1.0 / std::sqrt(double(head_dim));
}

}  // namespace attention
}  // namespace omnivmed
