// CPU kernel of rope_nd: one pass over x, tokens split across threads with
// at::parallel_for. cos/sin are computed once per token and reused for every head; the
// rotation itself runs on at::vec vectors in the accumulation type.
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include "rope_math.h"
#include "rope_nd.h"

namespace omnivmed {
namespace rope {
namespace {

template <typename scalar_t, typename pos_t>
void rope_nd_cpu_kernel(const at::Tensor& x, const at::Tensor& positions, at::Tensor& out,
                        const RopeTable<at::opmath_type<scalar_t>>& table, bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int kVec = Vec::size();

  const int64_t num_tokens = x.size(0);
  const int64_t num_heads = x.size(1);
  const int half = table.num_pairs;
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

  // Aim for >= 32k elements per task so small inputs do not pay thread start-up.
  const int64_t per_token = std::max<int64_t>(1, num_heads * 2 * half);
  const int64_t grain = std::max<int64_t>(1, 32768 / per_token);

  at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
    alignas(64) acc_t cos_buf[kMaxPairs + kVec];
    alignas(64) acc_t sin_buf[kMaxPairs + kVec];
    alignas(64) acc_t x1_buf[kMaxPairs + kVec];
    alignas(64) acc_t x2_buf[kMaxPairs + kVec];
    for (int64_t token = begin; token < end; ++token) {
      const pos_t* pos_row = pos_ptr + token * pos_stride_token;
      for (int p = 0; p < half; ++p) {
        const acc_t position = static_cast<acc_t>(pos_row[table.axis[p] * pos_stride_axis]);
        pair_cos_sin<acc_t>(position, table.inv_freq[p], inverse, &cos_buf[p], &sin_buf[p]);
      }
      for (int64_t head = 0; head < num_heads; ++head) {
        const scalar_t* xr = x_ptr + token * x_stride_token + head * x_stride_head;
        scalar_t* orow = out_ptr + token * out_stride_token + head * out_stride_head;
        // Gather both halves into the accumulation type (handles any stride and dtype).
        if (x_stride_dim == 1) {
          for (int p = 0; p < half; ++p) {
            x1_buf[p] = static_cast<acc_t>(xr[p]);
            x2_buf[p] = static_cast<acc_t>(xr[p + half]);
          }
        } else {
          for (int p = 0; p < half; ++p) {
            x1_buf[p] = static_cast<acc_t>(xr[p * x_stride_dim]);
            x2_buf[p] = static_cast<acc_t>(xr[(p + half) * x_stride_dim]);
          }
        }
        int p = 0;
        for (; p + kVec <= half; p += kVec) {
          const Vec x1 = Vec::loadu(x1_buf + p);
          const Vec x2 = Vec::loadu(x2_buf + p);
          const Vec c = Vec::loadu(cos_buf + p);
          const Vec s = Vec::loadu(sin_buf + p);
          (x1 * c - x2 * s).store(x1_buf + p);
          (x2 * c + x1 * s).store(x2_buf + p);
        }
        for (; p < half; ++p) {
          acc_t y1, y2;
          rotate_pair<acc_t>(x1_buf[p], x2_buf[p], cos_buf[p], sin_buf[p], &y1, &y2);
          x1_buf[p] = y1;
          x2_buf[p] = y2;
        }
        for (int q = 0; q < half; ++q) {
          orow[q] = static_cast<scalar_t>(x1_buf[q]);
          orow[q + half] = static_cast<scalar_t>(x2_buf[q]);
        }
      }
    }
  });
}

}  // namespace

at::Tensor rope_nd_cpu(const at::Tensor& x, const at::Tensor& positions,
                       c10::IntArrayRef sections, double theta, bool inverse) {
  check_rope_nd_args(x, positions, sections, theta);
  TORCH_CHECK(x.device().is_cpu(), "rope_nd_cpu: expected CPU tensors, got ", x.device());
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;

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
