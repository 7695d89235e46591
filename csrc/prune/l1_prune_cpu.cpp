// CPU kernels of l1_prune: decide per unit (frames in parallel, or items in parallel for
// mode "last_kept", whose frames depend on each other), then compact the kept patches.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "l1_prune.h"
#include "prune_math.h"

namespace omnivmed {
namespace prune {
namespace {

using Geometry = PruneGeometry;

// Sums of |a - b| over n values in kLanes partial sums, combined pairwise in a fixed
// order: deterministic run to run, and the lanes vectorise (a single running float sum
// cannot be reordered by the compiler, which kept the loop scalar at ~4 GB/s).
constexpr int kLanes = 16;

template <typename scalar_t>
inline float to_float(scalar_t v) {
  return static_cast<float>(v);
}
template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 v) {
  // bf16 is the top half of an fp32: a shift, which vectorises (the generic conversion
  // did not, and ran at a tenth of fp32's speed).
  const uint32_t bits = static_cast<uint32_t>(v.x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// x86-64 builds also carry AVX2 copies of the fp32 and uint8 distance loops, picked at
// load time (the wheel stays portable; the baseline x86-64 target has only SSE2).
#if defined(__x86_64__) && defined(__GNUC__)
#define OMNIVMED_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OMNIVMED_CPU_CLONES
#endif

template <typename scalar_t>
inline float abs_diff_sum_lanes(const scalar_t* a, const scalar_t* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int l = 0; l < kLanes; ++l) lanes[l] += std::fabs(to_float(a[p + l]) - to_float(b[p + l]));
  }
  for (int l = 0; p < n; ++p, ++l) lanes[l] += std::fabs(to_float(a[p]) - to_float(b[p]));
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int l = 0; l < width; ++l) lanes[l] += lanes[l + width];
  }
  return lanes[0];
}

OMNIVMED_CPU_CLONES float abs_diff_sum(const float* a, const float* b, int64_t n) {
  return abs_diff_sum_lanes(a, b, n);
}
// bf16 and fp16 keep the baseline build: the AVX2 copy of the bf16 loop measured slower
// (77 vs 55 ms on the 4x32-frame benchmark).
float abs_diff_sum(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) {
  return abs_diff_sum_lanes(a, b, n);
}
float abs_diff_sum(const c10::Half* a, const c10::Half* b, int64_t n) {
  return abs_diff_sum_lanes(a, b, n);
}

// uint8: exact integer sums (any order gives the reference's result). A patch's values
// are few (C * ps * ps), so int32 lanes cannot overflow; the kernel checks P < 2^23.
OMNIVMED_CPU_CLONES int64_t abs_diff_sum(const uint8_t* a, const uint8_t* b, int64_t n) {
  int32_t lanes[kLanes] = {};
  int64_t p = 0;
  for (; p + kLanes <= n; p += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const int32_t d = static_cast<int32_t>(a[p + l]) - static_cast<int32_t>(b[p + l]);
      lanes[l] += d < 0 ? -d : d;
    }
  }
  int64_t total = 0;
  for (; p < n; ++p) {
    const int32_t d = static_cast<int32_t>(a[p]) - static_cast<int32_t>(b[p]);
    total += d < 0 ? -d : d;
  }
  for (int l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
}

// Sum of |frame - reference| over unit u's patches and values.
template <typename scalar_t>
typename DiffAcc<scalar_t>::type unit_sum(const scalar_t* frame, const scalar_t* reference,
                                          int64_t u, const Geometry& g) {
  using acc_t = typename DiffAcc<scalar_t>::type;
  acc_t sum = 0;
  for (int64_t e = 0; e < g.unit * g.unit; ++e) {
    const int64_t n = unit_patch(u, e, g.unit, g.units_per_row, g.grid_w);
    sum += abs_diff_sum(frame + n * g.values, reference + n * g.values, g.values);
  }
  return sum;
}

// keep[u] for one frame from its unit sums.
template <typename acc_t>
void decide_units(const std::vector<acc_t>& sums, double threshold_count, int64_t min_keep,
                  std::vector<char>& keep) {
  const int64_t units = static_cast<int64_t>(sums.size());
  for (int64_t u = 0; u < units; ++u) {
    bool k = passes_threshold<acc_t>(sums[u], threshold_count);
    if (!k && min_keep > 0) {
      int64_t better = 0;
      for (int64_t v = 0; v < units && better < min_keep; ++v) {
        better += outranks<acc_t>(sums[v], v, sums[u], u);
      }
      k = better < min_keep;
    }
    keep[u] = k;
  }
}

void mark_units(const std::vector<char>& unit_keep, const Geometry& g, bool* keep_row,
                int64_t* count) {
  int64_t kept = 0;
  for (int64_t u = 0; u < g.units; ++u) {
    for (int64_t e = 0; e < g.unit * g.unit; ++e) {
      keep_row[unit_patch(u, e, g.unit, g.units_per_row, g.grid_w)] = unit_keep[u];
    }
    kept += unit_keep[u] ? g.unit * g.unit : 0;
  }
  *count = kept;
}

template <typename scalar_t>
void decide(const at::Tensor& patches, const std::vector<int64_t>& cu, const Geometry& g,
            double threshold, Mode mode, int64_t min_keep, bool* keep, int64_t* counts) {
  using acc_t = typename DiffAcc<scalar_t>::type;
  const scalar_t* x = patches.const_data_ptr<scalar_t>();
  const int64_t frame_stride = g.patches * g.values;
  const double threshold_count = threshold * static_cast<double>(g.values_per_unit);
  const int64_t items = static_cast<int64_t>(cu.size()) - 1;

  auto keep_whole = [&](int64_t f) {
    std::fill_n(keep + f * g.patches, g.patches, true);
    counts[f] = g.patches;
  };

  if (mode == Mode::kPrevious) {
    std::vector<char> first(g.frames, 0);
    for (int64_t b = 0; b < items; ++b) first[cu[b]] = 1;
    at::parallel_for(0, g.frames, 1, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(g.units);
      std::vector<char> unit_keep(g.units);
      for (int64_t f = begin; f < end; ++f) {
        if (first[f]) {
          keep_whole(f);
          continue;
        }
        for (int64_t u = 0; u < g.units; ++u) {
          sums[u] = unit_sum<scalar_t>(x + f * frame_stride, x + (f - 1) * frame_stride, u, g);
        }
        decide_units<acc_t>(sums, threshold_count, min_keep, unit_keep);
        mark_units(unit_keep, g, keep + f * g.patches, &counts[f]);
      }
    });
    return;
  }
  // last_kept: each unit compares with the frame it was last kept in.
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(g.units);
    std::vector<char> unit_keep(g.units);
    std::vector<int64_t> reference(g.units);
    for (int64_t b = begin; b < end; ++b) {
      keep_whole(cu[b]);
      std::fill(reference.begin(), reference.end(), cu[b]);
      for (int64_t f = cu[b] + 1; f < cu[b + 1]; ++f) {
        for (int64_t u = 0; u < g.units; ++u) {
          sums[u] = unit_sum<scalar_t>(x + f * frame_stride, x + reference[u] * frame_stride, u, g);
        }
        decide_units<acc_t>(sums, threshold_count, min_keep, unit_keep);
        mark_units(unit_keep, g, keep + f * g.patches, &counts[f]);
        for (int64_t u = 0; u < g.units; ++u) {
          if (unit_keep[u]) reference[u] = f;
        }
      }
    }
  });
}

// Writes the kept patches' index, positions and values, in original order, from row 0.
template <typename scalar_t>
void compact(const at::Tensor& patches, const std::vector<int64_t>& cu, const Geometry& g,
             const bool* keep, const std::vector<int64_t>& offsets, int64_t* index,
             int32_t* positions, scalar_t* values) {
  const scalar_t* x = patches.const_data_ptr<scalar_t>();
  std::vector<int64_t> item_start(g.frames);
  for (size_t b = 0; b + 1 < cu.size(); ++b) {
    std::fill(item_start.begin() + cu[b], item_start.begin() + cu[b + 1], cu[b]);
  }
  at::parallel_for(0, g.frames, 1, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      int64_t row = offsets[f];
      for (int64_t n = 0; n < g.patches; ++n) {
        if (!keep[f * g.patches + n]) continue;
        index[row] = f * g.patches + n;
        positions[3 * row + 0] = static_cast<int32_t>(f - item_start[f]);
        positions[3 * row + 1] = static_cast<int32_t>(n / g.grid_w);
        positions[3 * row + 2] = static_cast<int32_t>(n % g.grid_w);
        std::copy_n(x + (f * g.patches + n) * g.values, g.values, values + row * g.values);
        ++row;
      }
    }
  });
}

struct Decision {
  at::Tensor keep;
  std::vector<int64_t> cu, offsets;  // offsets: kept rows before each frame, F+1 entries
  Geometry g;
};

Decision run_decide(const at::Tensor& patches, const at::Tensor& cu_frames, int64_t grid_h,
                    int64_t grid_w, double threshold, const std::string& mode, int64_t unit,
                    int64_t min_keep) {
  const Mode m = static_cast<Mode>(
      check_l1_prune_args(patches, cu_frames, grid_h, grid_w, threshold, mode, unit, min_keep));
  TORCH_CHECK(patches.device().is_cpu(), "l1_prune_cpu: expected CPU tensors");
  check_cu_frames_values(cu_frames, patches.size(0));
  Decision d;
  d.g = make_geometry(patches.size(0), patches.size(1), patches.size(2), grid_h, grid_w, unit,
                      cu_frames.numel() - 1);
  const at::Tensor cu64 = cu_frames.to(at::kLong).contiguous();
  d.cu.assign(cu64.const_data_ptr<int64_t>(), cu64.const_data_ptr<int64_t>() + cu64.numel());
  d.keep = at::empty({d.g.frames, d.g.patches}, patches.options().dtype(at::kBool));
  std::vector<int64_t> counts(d.g.frames);
  OMNIVMED_DISPATCH_PRUNE_TYPES(patches.scalar_type(),
                                  "l1_prune_cpu", [&] {
    decide<scalar_t>(patches, d.cu, d.g, threshold, m, min_keep, d.keep.data_ptr<bool>(),
                     counts.data());
  });
  d.offsets.assign(d.g.frames + 1, 0);
  for (int64_t f = 0; f < d.g.frames; ++f) d.offsets[f + 1] = d.offsets[f] + counts[f];
  return d;
}

at::Tensor new_cu_seqlens(const Decision& d, const at::TensorOptions& options) {
  at::Tensor cu = at::empty({static_cast<int64_t>(d.cu.size())}, options.dtype(at::kInt));
  int32_t* out = cu.data_ptr<int32_t>();
  for (size_t b = 0; b < d.cu.size(); ++b) out[b] = static_cast<int32_t>(d.offsets[d.cu[b]]);
  return cu;
}

// Fills rows [0, total) of the given outputs.
void fill_rows(const at::Tensor& patches, const Decision& d, at::Tensor& index,
               at::Tensor& positions, at::Tensor& values) {
  OMNIVMED_DISPATCH_PRUNE_TYPES(patches.scalar_type(),
                                  "l1_prune_cpu_compact", [&] {
    compact<scalar_t>(patches, d.cu, d.g, d.keep.const_data_ptr<bool>(), d.offsets,
                      index.data_ptr<int64_t>(), positions.data_ptr<int32_t>(),
                      values.data_ptr<scalar_t>());
  });
}

}  // namespace

PruneOutputs l1_prune_cpu(const at::Tensor& patches_in, const at::Tensor& cu_frames,
                          int64_t grid_h, int64_t grid_w, double threshold, std::string mode,
                          int64_t unit, int64_t min_keep_per_frame) {
  const at::Tensor patches = patches_in.contiguous();
  const Decision d = run_decide(patches, cu_frames, grid_h, grid_w, threshold, mode, unit,
                                min_keep_per_frame);
  const int64_t total = d.offsets.back();
  at::Tensor index = at::empty({total}, patches.options().dtype(at::kLong));
  at::Tensor positions = at::empty({total, 3}, patches.options().dtype(at::kInt));
  at::Tensor values = at::empty({total, d.g.values}, patches.options());
  fill_rows(patches, d, index, positions, values);
  return {d.keep, index, positions, new_cu_seqlens(d, patches.options()), values};
}

PaddedPruneOutputs l1_prune_padded_cpu(const at::Tensor& patches_in, const at::Tensor& cu_frames,
                                       int64_t grid_h, int64_t grid_w, double threshold,
                                       std::string mode, int64_t unit,
                                       int64_t min_keep_per_frame) {
  const at::Tensor patches = patches_in.contiguous();
  const Decision d = run_decide(patches, cu_frames, grid_h, grid_w, threshold, mode, unit,
                                min_keep_per_frame);
  const int64_t rows = d.g.frames * d.g.patches;
  const int64_t total = d.offsets.back();
  // Rows past the true count: index and positions -1, values 0.
  at::Tensor index = at::full({rows}, -1, patches.options().dtype(at::kLong));
  at::Tensor positions = at::full({rows, 3}, -1, patches.options().dtype(at::kInt));
  at::Tensor values = at::zeros({rows, d.g.values}, patches.options());
  fill_rows(patches, d, index, positions, values);
  at::Tensor count = at::full({}, total, patches.options().dtype(at::kLong));
  return {d.keep, index, positions, new_cu_seqlens(d, patches.options()), values, count};
}

TORCH_LIBRARY_IMPL(omnivmed, CPU, m) {
  m.impl("l1_prune", &l1_prune_cpu);
  m.impl("l1_prune_padded", &l1_prune_padded_cpu);
}

}  // namespace prune
}  // namespace omnivmed
