// The math of the multi-axis rotary embedding, shared by the CPU and CUDA kernels.
//
// Layout ("rotate_half", as in HF Llama/Qwen): for a head of D channels, channel p pairs
// with channel p + D/2 (p < D/2). The D/2 pairs are handed to the axes in order: axis a
// owns sections[a] consecutive pairs, and pair j of axis a turns by
//     angle = position[a] * theta^(-j / sections[a]).
// Rotation of a pair (x1, x2) by angle t:  (x1 cos t - x2 sin t,  x2 cos t + x1 sin t).
// The inverse (used by the backward) turns by -t.
#pragma once

#include <cmath>
#include <cstdint>

#include "../common/hd.h"

namespace omnivmed {
namespace rope {

constexpr int kMaxHeadDim = 256;
constexpr int kMaxPairs = kMaxHeadDim / 2;
constexpr int kMaxAxes = 4;

// Per-pair frequency and axis, computed once on the host (in double, then rounded to the
// kernel's accumulation type) and passed to the kernels by value, so the CPU and CUDA
// paths use bit-identical frequencies and no device allocation is needed.
template <typename acc_t>
struct RopeTable {
  acc_t inv_freq[kMaxPairs];
  int8_t axis[kMaxPairs];
  int num_pairs;  // D / 2
  int num_axes;
};

// Fills `table` for the given sections. Returns false (and leaves the table partially
// written) when the sections are not a valid split of at most kMaxPairs pairs: callers
// validate with clear messages first; this is the last line of defence.
template <typename acc_t>
inline bool make_rope_table(const int64_t* sections, int num_axes, double theta,
                            RopeTable<acc_t>* table) {
  if (num_axes < 1 || num_axes > kMaxAxes || !(theta > 0.0)) return false;
  int pair = 0;
  for (int a = 0; a < num_axes; ++a) {
    if (sections[a] < 0 || pair + sections[a] > kMaxPairs) return false;
    for (int64_t j = 0; j < sections[a]; ++j) {
      const double exponent = -static_cast<double>(j) / static_cast<double>(sections[a]);
      table->inv_freq[pair] = static_cast<acc_t>(std::pow(theta, exponent));
      table->axis[pair] = static_cast<int8_t>(a);
      ++pair;
    }
  }
  table->num_pairs = pair;
  table->num_axes = num_axes;
  return true;
}

OMNIVMED_HD void sincos_acc(float angle, float* s, float* c) {
#if OMNIVMED_DEVICE_COMPILE && defined(__CUDA_ARCH__)
  ::sincosf(angle, s, c);  // full-range accurate version, not the __sinf intrinsic
#else
  *s = std::sin(angle);
  *c = std::cos(angle);
#endif
}

OMNIVMED_HD void sincos_acc(double angle, double* s, double* c) {
#if OMNIVMED_DEVICE_COMPILE && defined(__CUDA_ARCH__)
  ::sincos(angle, s, c);
#else
  *s = std::sin(angle);
  *c = std::cos(angle);
#endif
}

// cos and sin of the angle of one pair; `inverse` negates the angle.
template <typename acc_t>
OMNIVMED_HD void pair_cos_sin(acc_t position, acc_t inv_freq, bool inverse, acc_t* c, acc_t* s) {
  const acc_t angle = position * inv_freq;
  sincos_acc(angle, s, c);
  if (inverse) *s = -*s;
}

template <typename acc_t>
OMNIVMED_HD void rotate_pair(acc_t x1, acc_t x2, acc_t c, acc_t s, acc_t* y1, acc_t* y2) {
  *y1 = x1 * c - x2 * s;
  *y2 = x2 * c + x1 * s;
}

}  // namespace rope
}  // namespace omnivmed
