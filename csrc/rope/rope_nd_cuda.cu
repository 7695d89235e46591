// CUDA kernel of rope_nd: one pass over x.
//
// A block owns a few consecutive tokens. It first computes cos/sin for its tokens' pairs
// into shared memory (once per token, not once per head), then walks (token, head, chunk)
// work items in memory order so that a warp reads and writes contiguous runs. Each item
// moves VEC elements of the first half and the matching VEC of the second half with one
// vector access each (16 bytes whenever alignment allows; VEC is picked on the host).
#include <algorithm>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "rope_math.h"
#include "rope_nd.h"

namespace omnivmed {
namespace rope {
namespace {

constexpr int kThreads = 256;
constexpr int kItemsPerBlock = 4 * kThreads;
constexpr int kMaxTokensPerBlock = 64;
constexpr size_t kSmemBudget = 32 * 1024;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename scalar_t, typename pos_t, int VEC>
__global__ void __launch_bounds__(kThreads)
rope_nd_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
               const pos_t* __restrict__ positions, int64_t num_tokens, int num_heads,
               int64_t x_stride_token, int64_t x_stride_head, int64_t pos_stride_token,
               int64_t pos_stride_axis, int tokens_per_block,
               const RopeTable<at::opmath_type<scalar_t>> table, bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ unsigned char smem_raw[];
  acc_t* cos_s = reinterpret_cast<acc_t*>(smem_raw);
  const int half = table.num_pairs;
  acc_t* sin_s = cos_s + tokens_per_block * half;

  const int64_t token0 = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int block_tokens =
      static_cast<int>(min(static_cast<int64_t>(tokens_per_block), num_tokens - token0));

  for (int i = threadIdx.x; i < block_tokens * half; i += blockDim.x) {
    const int t = i / half;
    const int p = i - t * half;
    const int64_t token = token0 + t;
    const acc_t position = static_cast<acc_t>(
        positions[token * pos_stride_token + table.axis[p] * pos_stride_axis]);
    acc_t c, s;
    pair_cos_sin<acc_t>(position, table.inv_freq[p], inverse, &c, &s);
    cos_s[i] = c;
    sin_s[i] = s;
  }
  __syncthreads();

  using PackT = Pack<scalar_t, VEC>;
  const int chunks = half / VEC;
  const int items_per_token = num_heads * chunks;
  const int items = block_tokens * items_per_token;
  const int64_t out_stride_token = static_cast<int64_t>(num_heads) * 2 * half;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int t = item / items_per_token;
    const int rest = item - t * items_per_token;
    const int head = rest / chunks;
    const int chunk = rest - head * chunks;
    const int64_t token = token0 + t;
    const scalar_t* src = x + token * x_stride_token + head * x_stride_head + chunk * VEC;
    scalar_t* dst = out + token * out_stride_token + head * 2 * half + chunk * VEC;
    const PackT a = *reinterpret_cast<const PackT*>(src);
    const PackT b = *reinterpret_cast<const PackT*>(src + half);
    PackT ya, yb;
    const acc_t* cs = cos_s + t * half + chunk * VEC;
    const acc_t* sn = sin_s + t * half + chunk * VEC;
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      acc_t y1, y2;
      rotate_pair<acc_t>(static_cast<acc_t>(a.v[e]), static_cast<acc_t>(b.v[e]), cs[e], sn[e],
                         &y1, &y2);
      ya.v[e] = static_cast<scalar_t>(y1);
      yb.v[e] = static_cast<scalar_t>(y2);
    }
    *reinterpret_cast<PackT*>(dst) = ya;
    *reinterpret_cast<PackT*>(dst + half) = yb;
  }
}

// Largest vector width (in elements, at most 16 bytes) that every access can use.
template <typename scalar_t>
int pick_vec(const at::Tensor& x, int half) {
  const int64_t candidates[] = {16 / static_cast<int64_t>(sizeof(scalar_t)), 8, 4, 2, 1};
  const auto address = reinterpret_cast<uintptr_t>(x.const_data_ptr());
  for (const int64_t vec : candidates) {
    if (vec > 16 / static_cast<int64_t>(sizeof(scalar_t))) continue;
    const int64_t bytes = vec * static_cast<int64_t>(sizeof(scalar_t));
    if (half % vec == 0 && x.stride(0) % vec == 0 && x.stride(1) % vec == 0 &&
        address % bytes == 0) {
      return static_cast<int>(vec);
    }
  }
  return 1;
}

template <typename scalar_t, typename pos_t>
void launch_rope_nd(const at::Tensor& x, const at::Tensor& positions, at::Tensor& out,
                    const RopeTable<at::opmath_type<scalar_t>>& table, bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  const int half = table.num_pairs;
  const int64_t num_tokens = x.size(0);
  const int num_heads = static_cast<int>(x.size(1));
  const int vec = pick_vec<scalar_t>(x, half);
  const int items_per_token = std::max(1, num_heads * (half / vec));
  // Bounded by the work wanted per block and by 32 KB of cos/sin in shared memory.
  const int smem_token_cap =
      std::max(1, static_cast<int>(kSmemBudget / (2 * half * sizeof(acc_t))));
  const int tokens_per_block = std::clamp(kItemsPerBlock / items_per_token, 1,
                                          std::min(kMaxTokensPerBlock, smem_token_cap));
  const size_t smem = 2 * static_cast<size_t>(tokens_per_block) * half * sizeof(acc_t);
  const int64_t blocks = (num_tokens + tokens_per_block - 1) / tokens_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "rope_nd: too many tokens (",
              num_tokens, ")");
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

#define OMNIVMED_LAUNCH_ROPE(V)                                                             \
  rope_nd_kernel<scalar_t, pos_t, V><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>( \
      x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),                        \
      positions.const_data_ptr<pos_t>(), num_tokens, num_heads, x.stride(0), x.stride(1),     \
      positions.stride(0), positions.stride(1), tokens_per_block, table, inverse)

  switch (vec) {
    case 8:
      if constexpr (sizeof(scalar_t) <= 2) {
        OMNIVMED_LAUNCH_ROPE(8);
        break;
      }
      [[fallthrough]];
    case 4:
      if constexpr (sizeof(scalar_t) <= 4) {
        OMNIVMED_LAUNCH_ROPE(4);
        break;
      }
      [[fallthrough]];
    case 2:
      OMNIVMED_LAUNCH_ROPE(2);
      break;
    default:
      OMNIVMED_LAUNCH_ROPE(1);
      break;
  }
#undef OMNIVMED_LAUNCH_ROPE
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor rope_nd_cuda(const at::Tensor& x_in, const at::Tensor& positions,
                        c10::IntArrayRef sections, double theta, bool inverse) {
  check_rope_nd_args(x_in, positions, sections, theta);
  TORCH_CHECK(x_in.is_cuda(), "rope_nd_cuda: expected CUDA tensors, got ", x_in.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // The kernel reads rows with a unit channel stride; anything else is copied once.
  const at::Tensor x = x_in.stride(2) == 1 ? x_in : x_in.contiguous();
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (x.numel() == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "rope_nd_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    RopeTable<acc_t> table;
    TORCH_CHECK(make_rope_table<acc_t>(sections.data(), static_cast<int>(sections.size()), theta,
                                       &table),
                "rope_nd: invalid sections ", sections);
    if (positions.scalar_type() == at::kInt) {
      launch_rope_nd<scalar_t, int32_t>(x, positions, out, table, inverse);
    } else {
      launch_rope_nd<scalar_t, int64_t>(x, positions, out, table, inverse);
    }
  });
  return out;
}

TORCH_LIBRARY_IMPL(omnivmed, CUDA, m) { m.impl("rope_nd", &rope_nd_cuda); }

}  // namespace rope
}  // namespace omnivmed
