// CPU kernels of l1_prune: unit distances along chains (an item's frames over one row of
// units, so each input value is read from memory once), the rule per frame, then the kept
// patches compacted.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "../common/cpu_memory.h"
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

// x86-64 builds also carry AVX2 copies of the distance loops, picked at load time (the
// wheel stays portable; the baseline x86-64 target has only SSE2).
#if defined(__x86_64__) && defined(__GNUC__)
#define OMNIVMED_X86_AVX2 1
#define OMNIVMED_CPU_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define OMNIVMED_CPU_CLONES
#endif

#ifdef OMNIVMED_X86_AVX2
// Initialised before main: the CPU model must be read first in a static initialiser.
const bool kHaveAvx2 = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
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

#ifdef OMNIVMED_X86_AVX2
// fp32 with AVX2: four independent accumulators of 8 lanes keep four loads of each input
// in flight per iteration; lanes and the tail are added in a fixed order (deterministic).
__attribute__((target("avx2"))) float abs_diff_sum_f32_avx2(const float* a, const float* b,
                                                             int64_t n) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                   _mm256_setzero_ps()};
  int64_t p = 0;
  for (; p + 32 <= n; p += 32) {
    for (int k = 0; k < 4; ++k) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(a + p + 8 * k), _mm256_loadu_ps(b + p + 8 * k));
      acc[k] = _mm256_add_ps(acc[k], _mm256_andnot_ps(sign, d));
    }
  }
  for (; p + 8 <= n; p += 8) {
    acc[0] = _mm256_add_ps(acc[0], _mm256_andnot_ps(sign, _mm256_sub_ps(_mm256_loadu_ps(a + p),
                                                                        _mm256_loadu_ps(b + p))));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
  float tail = 0.0f;
  for (; p < n; ++p) tail += std::fabs(a[p] - b[p]);
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
         ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}
#endif

float abs_diff_sum(const float* a, const float* b, int64_t n) {
#ifdef OMNIVMED_X86_AVX2
  if (kHaveAvx2) return abs_diff_sum_f32_avx2(a, b, n);
#endif
  return abs_diff_sum_lanes(a, b, n);
}
float abs_diff_sum(const c10::Half* a, const c10::Half* b, int64_t n) {
  return abs_diff_sum_lanes(a, b, n);
}

#ifdef OMNIVMED_X86_AVX2
// bf16 with AVX2: interleaving zero half-words below 16 bf16 values gives two vectors of 8
// fp32s in two instructions (the compiler's widening took four and ran slower than SSE2).
// Lanes are summed in a fixed order, so the result is deterministic.
__attribute__((target("avx2"))) float abs_diff_sum_bf16_avx2(const c10::BFloat16* a,
                                                              const c10::BFloat16* b,
                                                              int64_t n) {
  const __m256i zero = _mm256_setzero_si256();
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 low = _mm256_setzero_ps(), high = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) {
    const __m256i va = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + p));
    const __m256i vb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + p));
    const __m256 d_low = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, va)),
                                       _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, vb)));
    const __m256 d_high = _mm256_sub_ps(_mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, va)),
                                        _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, vb)));
    low = _mm256_add_ps(low, _mm256_andnot_ps(sign, d_low));
    high = _mm256_add_ps(high, _mm256_andnot_ps(sign, d_high));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(low, high));
  float tail = 0.0f;
  for (; p < n; ++p) tail += std::fabs(to_float(a[p]) - to_float(b[p]));
  return ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
         ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7])) + tail;
}

#endif

float abs_diff_sum(const c10::BFloat16* a, const c10::BFloat16* b, int64_t n) {
#ifdef OMNIVMED_X86_AVX2
  if (kHaveAvx2) return abs_diff_sum_bf16_avx2(a, b, n);
#endif
  return abs_diff_sum_lanes(a, b, n);
}

// uint8: exact integer sums (any order gives the reference's result), written as one
// running sum so that the compiler turns it into psadbw. A patch has at most 2^23 - 1
// values (checked), so an int32 sum of |differences| <= 255 cannot overflow.
OMNIVMED_CPU_CLONES int64_t abs_diff_sum(const uint8_t* a, const uint8_t* b, int64_t n) {
  int32_t total = 0;
  for (int64_t p = 0; p < n; ++p) {
    const int32_t d = static_cast<int32_t>(a[p]) - static_cast<int32_t>(b[p]);
    total += d < 0 ? -d : d;
  }
  return total;
}

// The first patch of every unit, computed once per call: the loops below then index
// patches with additions only (the divisions of unit_patch, per unit and frame, took a
// tenth of the uint8 op's time).
std::vector<int64_t> unit_origins(const Geometry& g) {
  std::vector<int64_t> origin(g.units);
  for (int64_t u = 0; u < g.units; ++u) origin[u] = unit_patch(u, 0, g.unit, g.units_per_row, g.grid_w);
  return origin;
}

// Sum of |frame - reference| over the unit whose first patch is `origin`.
template <typename scalar_t>
typename DiffAcc<scalar_t>::type unit_sum(const scalar_t* frame, const scalar_t* reference,
                                          int64_t origin, const Geometry& g) {
  using acc_t = typename DiffAcc<scalar_t>::type;
  acc_t sum = 0;
  for (int64_t eh = 0; eh < g.unit; ++eh) {
    for (int64_t ew = 0; ew < g.unit; ++ew) {
      const int64_t offset = (origin + eh * g.grid_w + ew) * g.values;
      sum += abs_diff_sum(frame + offset, reference + offset, g.values);
    }
  }
  return sum;
}

// keep[u] for one frame from its unit sums.
template <typename acc_t>
void decide_units(const acc_t* sums, int64_t units, double threshold_count, int64_t min_keep,
                  char* keep) {
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

void mark_units(const char* unit_keep, const int64_t* origin, const Geometry& g, bool* keep_row,
                int64_t* count) {
  int64_t kept = 0;
  for (int64_t u = 0; u < g.units; ++u) {
    for (int64_t eh = 0; eh < g.unit; ++eh) {
      std::fill_n(keep_row + origin[u] + eh * g.grid_w, g.unit, unit_keep[u] != 0);
    }
    kept += unit_keep[u] ? g.unit * g.unit : 0;
  }
  *count = kept;
}

// The distance pass walks chains: one item's frames, in order, over one strip of unit rows.
// The strip a chain reads for frame f is still in cache when frame f + 1 compares with it,
// so every input value comes from memory once; reading whole frames as "current" and again
// as "previous" streamed the input twice. Chains are independent, which also spreads one
// long item over every thread.
struct Chains {
  int64_t items, strips, units_per_strip, units;
  int64_t count() const { return items * strips; }
  int64_t first_unit(int64_t chain) const { return (chain % strips) * units_per_strip; }
  int64_t end_unit(int64_t chain) const {
    return std::min(first_unit(chain) + units_per_strip, units);
  }
};

// A strip is as many unit rows as keep two strips (the frame read and its reference) well
// inside a core's L2: long enough that hardware prefetching streams each strip at full
// speed, short enough that the reference strip is still cached when it is compared with.
constexpr int64_t kStripBytes = int64_t{256} << 10;

Chains make_chains(const std::vector<int64_t>& cu, const Geometry& g, int64_t element_size) {
  const int64_t row_bytes = g.units_per_row * g.values_per_unit * element_size;
  const int64_t unit_rows = g.units / g.units_per_row;
  const int64_t rows = std::clamp<int64_t>(kStripBytes / row_bytes, 1, unit_rows);
  Chains c;
  c.items = static_cast<int64_t>(cu.size()) - 1;
  c.strips = (unit_rows + rows - 1) / rows;
  c.units_per_strip = rows * g.units_per_row;
  c.units = g.units;
  return c;
}

// Asks for a unit's bytes in the chain's next frame while this frame's are summed: a chain
// jumps a frame ahead at the end of every strip, and the hardware prefetcher would find
// the new stream only after its first misses.
template <typename scalar_t>
inline void prefetch_unit(const scalar_t* frame, int64_t origin, const Geometry& g) {
  const int64_t bytes = g.unit * g.values * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t eh = 0; eh < g.unit; ++eh) {
    const char* row = reinterpret_cast<const char*>(frame + (origin + eh * g.grid_w) * g.values);
    for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b, 0, 2);
  }
}

// Mode "previous": sums[f * units + u] for every frame that is not an item's first.
template <typename scalar_t>
void previous_sums(const scalar_t* x, const std::vector<int64_t>& cu, const Geometry& g,
                   const int64_t* origin, typename DiffAcc<scalar_t>::type* sums) {
  const Chains chains = make_chains(cu, g, sizeof(scalar_t));
  const int64_t frame_stride = g.patches * g.values;
  at::parallel_for(0, chains.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chains.strips;
      for (int64_t f = cu[b] + 1; f < cu[b + 1]; ++f) {
        const bool ahead = f + 1 < cu[b + 1];
        for (int64_t u = chains.first_unit(c); u < chains.end_unit(c); ++u) {
          if (ahead) prefetch_unit(x + (f + 1) * frame_stride, origin[u], g);
          sums[f * g.units + u] =
              unit_sum<scalar_t>(x + f * frame_stride, x + (f - 1) * frame_stride, origin[u], g);
        }
      }
    }
  });
}

// Mode "last_kept" without a per-frame minimum: a unit's decisions depend only on its own
// history, so chains decide on their own: unit_keep[f * units + u].
template <typename scalar_t>
void last_kept_chains(const scalar_t* x, const std::vector<int64_t>& cu, const Geometry& g,
                      const int64_t* origin, double threshold_count, char* unit_keep) {
  using acc_t = typename DiffAcc<scalar_t>::type;
  const Chains chains = make_chains(cu, g, sizeof(scalar_t));
  const int64_t frame_stride = g.patches * g.values;
  at::parallel_for(0, chains.count(), 1, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> reference(chains.units_per_strip);
    for (int64_t c = begin; c < end; ++c) {
      const int64_t b = c / chains.strips;
      const int64_t first_unit = chains.first_unit(c);
      std::fill(reference.begin(), reference.end(), cu[b]);
      for (int64_t f = cu[b] + 1; f < cu[b + 1]; ++f) {
        for (int64_t i = 0; i < chains.end_unit(c) - first_unit; ++i) {
          const int64_t u = first_unit + i;
          const acc_t sum =
              unit_sum<scalar_t>(x + f * frame_stride, x + reference[i] * frame_stride, origin[u], g);
          const bool k = passes_threshold<acc_t>(sum, threshold_count);
          unit_keep[f * g.units + u] = k;
          if (k) reference[i] = f;
        }
      }
    }
  });
}

// Mode "last_kept" with a per-frame minimum: the minimum ranks all units of a frame, so an
// item's frames are decided one after another (items in parallel).
template <typename scalar_t>
void last_kept_ranked(const scalar_t* x, const std::vector<int64_t>& cu, const Geometry& g,
                      const int64_t* origin, double threshold_count, int64_t min_keep,
                      char* unit_keep) {
  using acc_t = typename DiffAcc<scalar_t>::type;
  const int64_t frame_stride = g.patches * g.values;
  const int64_t items = static_cast<int64_t>(cu.size()) - 1;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> sums(g.units);
    std::vector<int64_t> reference(g.units);
    for (int64_t b = begin; b < end; ++b) {
      std::fill(reference.begin(), reference.end(), cu[b]);
      for (int64_t f = cu[b] + 1; f < cu[b + 1]; ++f) {
        for (int64_t u = 0; u < g.units; ++u) {
          sums[u] = unit_sum<scalar_t>(x + f * frame_stride, x + reference[u] * frame_stride,
                                       origin[u], g);
        }
        char* row = unit_keep + f * g.units;
        decide_units<acc_t>(sums.data(), g.units, threshold_count, min_keep, row);
        for (int64_t u = 0; u < g.units; ++u) {
          if (row[u]) reference[u] = f;
        }
      }
    }
  });
}

template <typename scalar_t>
void decide(const at::Tensor& patches, const std::vector<int64_t>& cu, const Geometry& g,
            double threshold, Mode mode, int64_t min_keep, bool* keep, int64_t* counts) {
  using acc_t = typename DiffAcc<scalar_t>::type;
  const scalar_t* x = patches.const_data_ptr<scalar_t>();
  const double threshold_count = threshold * static_cast<double>(g.values_per_unit);
  const int64_t items = static_cast<int64_t>(cu.size()) - 1;
  std::vector<char> first(g.frames, 0);
  for (int64_t b = 0; b < items; ++b) first[cu[b]] = 1;
  const std::vector<int64_t> origin = unit_origins(g);

  // Unit decisions of every frame that is not an item's first, [F, units].
  std::vector<char> unit_keep(g.frames * g.units, 0);
  if (mode == Mode::kPrevious) {
    std::vector<acc_t> sums(g.frames * g.units);
    previous_sums<scalar_t>(x, cu, g, origin.data(), sums.data());
    at::parallel_for(0, g.frames, 16, [&](int64_t begin, int64_t end) {
      for (int64_t f = begin; f < end; ++f) {
        if (first[f]) continue;
        decide_units<acc_t>(sums.data() + f * g.units, g.units, threshold_count, min_keep,
                            unit_keep.data() + f * g.units);
      }
    });
  } else if (min_keep == 0) {
    last_kept_chains<scalar_t>(x, cu, g, origin.data(), threshold_count, unit_keep.data());
  } else {
    last_kept_ranked<scalar_t>(x, cu, g, origin.data(), threshold_count, min_keep,
                               unit_keep.data());
  }
  at::parallel_for(0, g.frames, 16, [&](int64_t begin, int64_t end) {
    for (int64_t f = begin; f < end; ++f) {
      if (first[f]) {
        std::fill_n(keep + f * g.patches, g.patches, true);
        counts[f] = g.patches;
      } else {
        mark_units(unit_keep.data() + f * g.units, origin.data(), g, keep + f * g.patches,
                   &counts[f]);
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
  at::Tensor values = empty_huge_pages({total, d.g.values}, patches.options());
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
  // Rows past the true count: index and positions -1, values 0. Only those rows are
  // filled (the kept rows are written once, by the compaction).
  at::Tensor index = at::empty({rows}, patches.options().dtype(at::kLong));
  at::Tensor positions = at::empty({rows, 3}, patches.options().dtype(at::kInt));
  at::Tensor values = empty_huge_pages({rows, d.g.values}, patches.options());
  fill_rows(patches, d, index, positions, values);
  index.narrow(0, total, rows - total).fill_(-1);
  positions.narrow(0, total, rows - total).fill_(-1);
  values.narrow(0, total, rows - total).zero_();
  at::Tensor count = at::full({}, total, patches.options().dtype(at::kLong));
  return {d.keep, index, positions, new_cu_seqlens(d, patches.options()), values, count};
}

TORCH_LIBRARY_IMPL(omnivmed, CPU, m) {
  m.impl("l1_prune", &l1_prune_cpu);
  m.impl("l1_prune_padded", &l1_prune_padded_cpu);
}

}  // namespace prune
}  // namespace omnivmed
