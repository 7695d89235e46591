// CPU kernel of rope_nd: one pass over x, tokens split across threads with
// at::parallel_for. cos/sin are computed once per token and reused for every head; the
// rotation itself runs on at::vec vectors in the accumulation type.
#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/cpu_memory.h"
#include "rope_math.h"
#include "rope_nd.h"

namespace omnivmed {
namespace rope {
namespace {

// cos/sin of every (position value, pair) that occurs, per axis. Positions are small
// integers in practice (grid rows/columns, frame or slice indices), so tabulating the
// range of values each axis spans costs far fewer sin/cos than one per token and pair,
// and gives bit-identical values (the same fp32 angle goes into the same sin/cos).
template <typename acc_t>
struct AngleTable {
  std::vector<acc_t> cos_values, sin_values;
  int64_t base[kMaxAxes];     // first entry of each axis' block
  int64_t lowest[kMaxAxes];   // smallest position value of each axis
  int64_t section[kMaxAxes];  // pairs owned by each axis
  int64_t first_pair[kMaxAxes];
};

template <typename acc_t, typename pos_t>
bool build_angle_table(const pos_t* pos, int64_t num_tokens, int64_t stride_token,
                       int64_t stride_axis, const RopeTable<acc_t>& table, bool inverse,
                       AngleTable<acc_t>* out) {
  const int num_axes = table.num_axes;
  int64_t lo[kMaxAxes], hi[kMaxAxes];
  for (int a = 0; a < num_axes; ++a) {
    lo[a] = std::numeric_limits<int64_t>::max();
    hi[a] = std::numeric_limits<int64_t>::min();
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int a = 0; a < num_axes; ++a) {
      const int64_t v = static_cast<int64_t>(pos[t * stride_token + a * stride_axis]);
      lo[a] = std::min(lo[a], v);
      hi[a] = std::max(hi[a], v);
    }
  }
  int64_t entries = 0;
  int pair = 0;
  for (int a = 0; a < num_axes; ++a) {
    int64_t count = 0;
    while (pair + count < table.num_pairs && table.axis[pair + count] == a) ++count;
    out->section[a] = count;
    out->first_pair[a] = pair;
    out->lowest[a] = lo[a];
    out->base[a] = entries;
    // Guard the subtraction: a huge span means the table is not worth it anyway.
    const double span = static_cast<double>(hi[a]) - static_cast<double>(lo[a]) + 1.0;
    if (span * static_cast<double>(count) > 1e8) return false;
    entries += static_cast<int64_t>(span) * count;
    pair += static_cast<int>(count);
  }
  // Only when it saves work over one sin/cos per token and pair, and stays small.
  if (entries > num_tokens * table.num_pairs || entries > (int64_t{1} << 24)) return false;
  out->cos_values.resize(entries);
  out->sin_values.resize(entries);
  for (int a = 0; a < num_axes; ++a) {
    const int64_t count = out->section[a];
    if (count == 0) continue;
    const int64_t rows = (entries - out->base[a]);
    const int64_t span = a + 1 < num_axes ? (out->base[a + 1] - out->base[a]) / count
                                          : rows / count;
    at::parallel_for(0, span, 256, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const acc_t position = static_cast<acc_t>(out->lowest[a] + r);
        for (int64_t j = 0; j < count; ++j) {
          const int64_t e = out->base[a] + r * count + j;
          pair_cos_sin<acc_t>(position, table.inv_freq[out->first_pair[a] + j], inverse,
                              &out->cos_values[e], &out->sin_values[e]);
        }
      }
    });
  }
  return true;
}

// y = rotation of (x1, x2) by (c, s), pair by pair. A plain loop over restrict pointers:
// the compiler vectorizes it for whatever SIMD width the build targets, which measured
// faster here than at::vec's portable fallback. y may alias x (same index only).
template <typename acc_t>
inline void rotate_row(const acc_t* x1, const acc_t* x2, const acc_t* __restrict__ c,
                       const acc_t* __restrict__ s, acc_t* y1, acc_t* y2, int half) {
#pragma GCC ivdep
  for (int p = 0; p < half; ++p) {
    const acc_t a = x1[p];
    const acc_t b = x2[p];
    y1[p] = a * c[p] - b * s[p];
    y2[p] = b * c[p] + a * s[p];
  }
}

template <typename scalar_t, typename pos_t>
void rope_nd_cpu_kernel(const at::Tensor& x, const at::Tensor& positions, at::Tensor& out,
                        const RopeTable<at::opmath_type<scalar_t>>& table, bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kSameType = std::is_same_v<scalar_t, acc_t>;

  const int64_t num_tokens = x.size(0);
  const int64_t num_heads = x.size(1);
  const int half = table.num_pairs;
  const int num_axes = table.num_axes;
  const int64_t x_stride_token = x.stride(0);
  const int64_t x_stride_head = x.stride(1);
  const int64_t x_stride_dim = x.stride(2);
  const int64_t out_stride_token = out.stride(0);
  const int64_t out_stride_head = out.stride(1);
  const int64_t pos_stride_token = positions.stride(0);
  const int64_t pos_stride_axis = positions.stride(1);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  const pos_t* pos_ptr = positions.const_data_ptr<pos_t>();
  scalar_t* out_ptr = out.mutable_data_ptr<scalar_t>();

  AngleTable<acc_t> angles;
  const bool tabulated = build_angle_table<acc_t, pos_t>(
      pos_ptr, num_tokens, pos_stride_token, pos_stride_axis, table, inverse, &angles);

  // Aim for >= 32k elements per task so small inputs do not pay thread start-up.
  const int64_t per_token = std::max<int64_t>(1, num_heads * 2 * half);
  const int64_t grain = std::max<int64_t>(1, 32768 / per_token);

  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t cos_buf[kMaxPairs];
    alignas(64) acc_t sin_buf[kMaxPairs];
    alignas(64) acc_t x1_buf[kMaxPairs];
    alignas(64) acc_t x2_buf[kMaxPairs];
    for (int64_t token = begin; token < end; ++token) {
      const pos_t* pos_row = pos_ptr + token * pos_stride_token;
      if (tabulated) {
        for (int a = 0; a < num_axes; ++a) {
          const int64_t count = angles.section[a];
          if (count == 0) continue;
          const int64_t row =
              static_cast<int64_t>(pos_row[a * pos_stride_axis]) - angles.lowest[a];
          const int64_t e = angles.base[a] + row * count;
          std::copy_n(angles.cos_values.data() + e, count, cos_buf + angles.first_pair[a]);
          std::copy_n(angles.sin_values.data() + e, count, sin_buf + angles.first_pair[a]);
        }
      } else {
        for (int p = 0; p < half; ++p) {
          const acc_t position = static_cast<acc_t>(pos_row[table.axis[p] * pos_stride_axis]);
          pair_cos_sin<acc_t>(position, table.inv_freq[p], inverse, &cos_buf[p], &sin_buf[p]);
        }
      }
      for (int64_t head = 0; head < num_heads; ++head) {
        const scalar_t* xr = x_ptr + token * x_stride_token + head * x_stride_head;
        scalar_t* orow = out_ptr + token * out_stride_token + head * out_stride_head;
        const acc_t* in1;
        const acc_t* in2;
        acc_t* res1;
        acc_t* res2;
        if constexpr (kSameType) {
          if (x_stride_dim == 1) {  // rotate straight from x into the output row
            in1 = xr;
            in2 = xr + half;
            res1 = orow;
            res2 = orow + half;
          }
        }
        const bool direct = kSameType && x_stride_dim == 1;
        if (!direct) {  // gather both halves into the accumulation type
          for (int p = 0; p < half; ++p) {
            x1_buf[p] = static_cast<acc_t>(xr[p * x_stride_dim]);
            x2_buf[p] = static_cast<acc_t>(xr[(p + half) * x_stride_dim]);
          }
          in1 = res1 = x1_buf;
          in2 = res2 = x2_buf;
        }
        rotate_row<acc_t>(in1, in2, cos_buf, sin_buf, res1, res2, half);
        if (!direct) {
          for (int q = 0; q < half; ++q) {
            orow[q] = static_cast<scalar_t>(x1_buf[q]);
            orow[q + half] = static_cast<scalar_t>(x2_buf[q]);
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor rope_nd_cpu(const at::Tensor& x, const at::Tensor& positions,
                       c10::IntArrayRef sections, double theta, bool inverse) {
  check_rope_nd_args(x, positions, sections, theta);
  return rope_nd_cpu_unchecked(x, positions, sections, theta, inverse);
}

at::Tensor rope_nd_cpu_unchecked(const at::Tensor& x, const at::Tensor& positions,
                                 c10::IntArrayRef sections, double theta, bool inverse) {
  TORCH_CHECK(x.device().is_cpu(), "rope_nd_cpu: expected CPU tensors, got ", x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;
  advise_huge_pages(out.data_ptr(), out.nbytes());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_nd_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RopeTable<acc_t> table;
    TORCH_CHECK(make_rope_table<acc_t>(sections.data(), static_cast<int>(sections.size()), theta,
                                       &table),
                "rope_nd: invalid sections ", sections);
    if (positions.scalar_type() == at::kInt) {
      rope_nd_cpu_kernel<scalar_t, int32_t>(x, positions, out, table, inverse);
    } else {
      rope_nd_cpu_kernel<scalar_t, int64_t>(x, positions, out, table, inverse);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(omnivmed, CPU, m) { m.impl("rope_nd", &rope_nd_cpu); }

}  // namespace rope
}  // namespace omnivmed
