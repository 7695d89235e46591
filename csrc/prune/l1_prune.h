// Host-side entry points of the l1_prune op family.
#pragma once

#include <string>
#include <tuple>

#include <ATen/core/Tensor.h>

namespace omnivmed {
namespace prune {

using PruneOutputs = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
using PaddedPruneOutputs =
    std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Validates shapes, dtypes, devices and scalar arguments (never reads tensor values, so it
// does not synchronise with a GPU). Returns the mode.
int check_l1_prune_args(const at::Tensor& patches, const at::Tensor& cu_frames, int64_t grid_h,
                        int64_t grid_w, double threshold, const std::string& mode, int64_t unit,
                        int64_t min_keep_per_frame);

// Validates the values of cu_frames (starts at 0, strictly increasing, ends at F). Reads
// them, so on a GPU it synchronises.
void check_cu_frames_values(const at::Tensor& cu_frames, int64_t num_frames);

PruneOutputs l1_prune_cpu(const at::Tensor& patches, const at::Tensor& cu_frames, int64_t grid_h,
                          int64_t grid_w, double threshold, std::string mode, int64_t unit,
                          int64_t min_keep_per_frame);
PaddedPruneOutputs l1_prune_padded_cpu(const at::Tensor& patches, const at::Tensor& cu_frames,
                                       int64_t grid_h, int64_t grid_w, double threshold,
                                       std::string mode, int64_t unit,
                                       int64_t min_keep_per_frame);

#ifdef OMNIVMED_WITH_CUDA
PruneOutputs l1_prune_cuda(const at::Tensor& patches, const at::Tensor& cu_frames,
                           int64_t grid_h, int64_t grid_w, double threshold, std::string mode,
                           int64_t unit, int64_t min_keep_per_frame);
PaddedPruneOutputs l1_prune_padded_cuda(const at::Tensor& patches, const at::Tensor& cu_frames,
                                        int64_t grid_h, int64_t grid_w, double threshold,
                                        std::string mode, int64_t unit,
                                        int64_t min_keep_per_frame);
#endif

}  // namespace prune
}  // namespace omnivmed
