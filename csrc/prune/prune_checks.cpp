#include <cmath>

#include <ATen/ATen.h>

#include "l1_prune.h"
#include "prune_math.h"

namespace omnivmed {
namespace prune {

int check_l1_prune_args(const at::Tensor& patches, const at::Tensor& cu_frames, int64_t grid_h,
                        int64_t grid_w, double threshold, const std::string& mode, int64_t unit,
                        int64_t min_keep_per_frame) {
  TORCH_CHECK_VALUE(patches.dim() == 3,
                    "l1_prune: patches must be [F, N, P] (frames, patches per frame, values per "
                    "patch), got shape ",
                    patches.sizes());
  const auto dtype = patches.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16 ||
                       dtype == at::kByte,
                   "l1_prune: patches must be float32, float16, bfloat16 or uint8, got ", dtype);
  TORCH_CHECK_VALUE(patches.size(2) >= 1, "l1_prune: patches have no values (P = 0)");
  // The CPU kernel sums a patch's uint8 differences in int32 lanes.
  TORCH_CHECK_VALUE(patches.size(2) < (int64_t{1} << 23),
                    "l1_prune: at most 8388607 values per patch, got P = ", patches.size(2));
  TORCH_CHECK_VALUE(cu_frames.dim() == 1 && cu_frames.numel() >= 2,
                    "l1_prune: cu_frames must be 1-D with B+1 >= 2 offsets, got shape ",
                    cu_frames.sizes());
  TORCH_CHECK_TYPE(cu_frames.scalar_type() == at::kInt, "l1_prune: cu_frames must be int32, got ",
                   cu_frames.scalar_type());
  TORCH_CHECK_VALUE(cu_frames.device() == patches.device(), "l1_prune: cu_frames are on ",
                    cu_frames.device(), " but patches are on ", patches.device());
  TORCH_CHECK_VALUE(grid_h >= 1 && grid_w >= 1, "l1_prune: grid must be positive, got (", grid_h,
                    ", ", grid_w, ")");
  TORCH_CHECK_VALUE(grid_h * grid_w == patches.size(1), "l1_prune: grid (", grid_h, ", ", grid_w,
                    ") has ", grid_h * grid_w, " patches but patches.size(1) = N = ",
                    patches.size(1));
  TORCH_CHECK_VALUE(unit >= 1, "l1_prune: unit must be >= 1, got ", unit);
  TORCH_CHECK_VALUE(grid_h % unit == 0 && grid_w % unit == 0, "l1_prune: grid (", grid_h, ", ",
                    grid_w, ") is not divisible by unit = ", unit);
  TORCH_CHECK_VALUE(std::isfinite(threshold) && threshold >= 0.0,
                    "l1_prune: threshold must be finite and >= 0, got ", threshold);
  TORCH_CHECK_VALUE(dtype != at::kByte || threshold <= 255.0,
                    "l1_prune: for uint8 patches the threshold is in 0..255 units, got ",
                    threshold);
  TORCH_CHECK_VALUE(mode == "previous" || mode == "last_kept",
                    "l1_prune: mode must be 'previous' or 'last_kept', got '", mode, "'");
  const int64_t units = (grid_h / unit) * (grid_w / unit);
  TORCH_CHECK_VALUE(min_keep_per_frame >= 0 && min_keep_per_frame <= units,
                    "l1_prune: min_keep_per_frame must be in [0, ", units,
                    "] (units per frame), got ", min_keep_per_frame);
  return mode == "previous" ? static_cast<int>(Mode::kPrevious) : static_cast<int>(Mode::kLastKept);
}

void check_cu_frames_values(const at::Tensor& cu_frames, int64_t num_frames) {
  const at::Tensor host = cu_frames.to(at::kCPU, at::kLong).contiguous();
  const int64_t* v = host.const_data_ptr<int64_t>();
  const int64_t n = host.numel();
  TORCH_CHECK_VALUE(v[0] == 0, "l1_prune: cu_frames must start at 0, got ", v[0]);
  for (int64_t i = 1; i < n; ++i) {
    TORCH_CHECK_VALUE(v[i] > v[i - 1], "l1_prune: cu_frames must be strictly increasing (every "
                      "item has at least one frame), but cu_frames[", i, "] = ", v[i],
                      " after ", v[i - 1]);
  }
  TORCH_CHECK_VALUE(v[n - 1] == num_frames, "l1_prune: cu_frames ends at ", v[n - 1],
                    " but patches have F = ", num_frames, " frames");
}

}  // namespace prune
}  // namespace omnivmed
