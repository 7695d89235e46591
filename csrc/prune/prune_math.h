// The decision rule of l1_prune, shared by the CPU and CUDA kernels.
//
// A frame's patch grid (gh x gw patches of P values) is cut into units of k x k patches.
// A unit of a later frame is kept iff its mean absolute difference to the reference unit
// (the previous frame's, or the last kept version's) is >= threshold. With
// min_keep_per_frame = m, the m units of largest difference are kept as well (ties go to
// the lower unit index).
//
// The rule is evaluated on sums, not means: keep iff sum >= threshold * values_per_unit,
// in double. For uint8 inputs the sum is an exact integer, so every backend and the
// reference take bit-identical decisions.
#pragma once

#include <cstdint>

#include "../common/hd.h"

namespace omnivmed {
namespace prune {

enum class Mode : int { kPrevious = 0, kLastKept = 1 };

// Accumulator of |a - b|: exact int64 for uint8, fp32 otherwise.
template <typename scalar_t>
struct DiffAcc {
  using type = float;
};
template <>
struct DiffAcc<uint8_t> {
  using type = int64_t;
};

template <typename scalar_t>
OMNIVMED_HD typename DiffAcc<scalar_t>::type abs_diff(scalar_t a, scalar_t b) {
  using acc_t = typename DiffAcc<scalar_t>::type;
  const acc_t d = static_cast<acc_t>(a) - static_cast<acc_t>(b);
  return d < acc_t(0) ? -d : d;
}

template <typename acc_t>
OMNIVMED_HD bool passes_threshold(acc_t sum, double threshold_times_count) {
  return static_cast<double>(sum) >= threshold_times_count;
}

// True when unit u outranks unit v: larger difference first, then lower index.
template <typename acc_t>
OMNIVMED_HD bool outranks(acc_t sum_u, int64_t u, acc_t sum_v, int64_t v) {
  return sum_u > sum_v || (sum_u == sum_v && u < v);
}

// Sizes of one l1_prune call, shared by the CPU and CUDA kernels.
struct PruneGeometry {
  int64_t frames, patches, values;  // F, N, P
  int64_t grid_w, unit, units, units_per_row, values_per_unit;
  int64_t items;  // B
};

inline PruneGeometry make_geometry(int64_t frames, int64_t patches, int64_t values, int64_t grid_h,
                                   int64_t grid_w, int64_t unit, int64_t items) {
  PruneGeometry g;
  g.frames = frames;
  g.patches = patches;
  g.values = values;
  g.grid_w = grid_w;
  g.unit = unit;
  g.units_per_row = grid_w / unit;
  g.units = (grid_h / unit) * g.units_per_row;
  g.values_per_unit = unit * unit * values;
  g.items = items;
  return g;
}

// Patch index of element e (0 <= e < k*k) of unit u, on a grid of gw patches per row.
OMNIVMED_HD int64_t unit_patch(int64_t u, int64_t e, int64_t unit, int64_t units_per_row,
                               int64_t grid_w) {
  const int64_t uh = u / units_per_row, uw = u - uh * units_per_row;
  const int64_t eh = e / unit, ew = e - eh * unit;
  return (uh * unit + eh) * grid_w + (uw * unit + ew);
}

}  // namespace prune
}  // namespace omnivmed

// The dtypes l1_prune accepts (the checks reject the rest), so no other kernels are built.
#define OMNIVMED_DISPATCH_PRUNE_TYPES(TYPE, NAME, ...)              \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)              \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)          \
                     AT_DISPATCH_CASE(at::kByte, __VA_ARGS__))
