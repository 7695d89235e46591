// CUDA kernels of rope_nd. Both make one pass over x and compute cos/sin once per token
// and pair (not once per head) into shared memory.
//
// rope_nd_tile_kernel (the usual case: each token's heads are one contiguous run of
// H*D elements, 16-byte aligned): a block copies the rows of a few tokens into shared
// memory with asynchronous 16-byte copies, rotates them there and writes them out with
// 16-byte stores.
// Every global access is a full, aligned 16 bytes whatever D is (72 and 80 included, whose
// half-rows are not 16-byte multiples in 16-bit types), and each thread has several loads
// in flight, issued before the cos/sin pass so that pass hides behind them.
//
// rope_nd_direct_kernel (any other layout with a unit channel stride): work items
// (token, head, chunk) in memory order, VEC elements of each half per access.
#include <algorithm>
#include <limits>

#include <cuda_pipeline.h>

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
constexpr int kDirectItemsPerBlock = 4 * kThreads;
constexpr int kMaxTokensPerBlock = 64;
constexpr size_t kTileBytes = 24 * 1024;   // x tile in shared memory
constexpr size_t kAngleBytes = 16 * 1024;  // cos/sin in shared memory

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};
using Vec16 = uint4;

// cos/sin of the block's tokens into shared memory: [tokens][half] each.
template <typename acc_t, typename pos_t>
__device__ __forceinline__ void fill_angles(const pos_t* __restrict__ positions, int64_t token0,
                                            int block_tokens, int64_t pos_stride_token,
                                            int64_t pos_stride_axis,
                                            const RopeTable<acc_t>& table, bool inverse,
                                            acc_t* cos_s, acc_t* sin_s) {
  const int half = table.num_pairs;
  for (int i = threadIdx.x; i < block_tokens * half; i += blockDim.x) {
    const int t = i / half;
    const int p = i - t * half;
    const acc_t position = static_cast<acc_t>(
        positions[(token0 + t) * pos_stride_token + table.axis[p] * pos_stride_axis]);
    acc_t c, s;
    pair_cos_sin<acc_t>(position, table.inv_freq[p], inverse, &c, &s);
    cos_s[i] = c;
    sin_s[i] = s;
  }
}

template <typename scalar_t, typename pos_t>
__global__ void __launch_bounds__(kThreads)
rope_nd_tile_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                    const pos_t* __restrict__ positions, int64_t num_tokens, int num_heads,
                    int64_t x_stride_token, int64_t pos_stride_token, int64_t pos_stride_axis,
                    int tokens_per_block, const RopeTable<at::opmath_type<scalar_t>> table,
                    bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kPerVec = sizeof(Vec16) / sizeof(scalar_t);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int half = table.num_pairs;
  const int row_elems = num_heads * 2 * half;  // one token, all heads
  const int row_vecs = row_elems / kPerVec;
  scalar_t* tile = reinterpret_cast<scalar_t*>(smem_raw);
  acc_t* cos_s = reinterpret_cast<acc_t*>(smem_raw + static_cast<size_t>(tokens_per_block) *
                                                          row_elems * sizeof(scalar_t));
  acc_t* sin_s = cos_s + tokens_per_block * half;

  const int64_t token0 = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int block_tokens =
      static_cast<int>(min(static_cast<int64_t>(tokens_per_block), num_tokens - token0));
  const int vecs = block_tokens * row_vecs;

  // 1. Tile in: asynchronous 16-byte copies global -> shared (cp.async), all in flight at
  //    once without holding registers.
  Vec16* tile_v = reinterpret_cast<Vec16*>(tile);
  for (int v = threadIdx.x; v < vecs; v += kThreads) {
    const int t = v / row_vecs;
    const int r = v - t * row_vecs;
    __pipeline_memcpy_async(&tile_v[v],
                            x + (token0 + t) * x_stride_token + static_cast<int64_t>(r) * kPerVec,
                            sizeof(Vec16));
  }
  __pipeline_commit();
  // 2. cos/sin while the copies are in flight.
  fill_angles<acc_t, pos_t>(positions, token0, block_tokens, pos_stride_token, pos_stride_axis,
                            table, inverse, cos_s, sin_s);
  __pipeline_wait_prior(0);
  __syncthreads();

  // 3. Rotate in place; each pair belongs to one thread.
  const int pairs_per_token = num_heads * half;
  for (int i = threadIdx.x; i < block_tokens * pairs_per_token; i += kThreads) {
    const int t = i / pairs_per_token;
    const int rest = i - t * pairs_per_token;
    const int head = rest / half;
    const int p = rest - head * half;
    scalar_t* row = tile + t * row_elems + head * 2 * half;
    acc_t y1, y2;
    rotate_pair<acc_t>(static_cast<acc_t>(row[p]), static_cast<acc_t>(row[p + half]),
                       cos_s[t * half + p], sin_s[t * half + p], &y1, &y2);
    row[p] = static_cast<scalar_t>(y1);
    row[p + half] = static_cast<scalar_t>(y2);
  }
  __syncthreads();

  // 4. Tile out: the output is contiguous, so the block's rows are one run.
  Vec16* out_v = reinterpret_cast<Vec16*>(out + token0 * row_elems);
  for (int v = threadIdx.x; v < vecs; v += kThreads) out_v[v] = tile_v[v];
}

template <typename scalar_t, typename pos_t, int VEC>
__global__ void __launch_bounds__(kThreads)
rope_nd_direct_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out,
                      const pos_t* __restrict__ positions, int64_t num_tokens, int num_heads,
                      int64_t x_stride_token, int64_t x_stride_head, int64_t pos_stride_token,
                      int64_t pos_stride_axis, int tokens_per_block,
                      const RopeTable<at::opmath_type<scalar_t>> table, bool inverse) {
  using acc_t = at::opmath_type<scalar_t>;
  using PackT = Pack<scalar_t, VEC>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  acc_t* cos_s = reinterpret_cast<acc_t*>(smem_raw);
  const int half = table.num_pairs;
  acc_t* sin_s = cos_s + tokens_per_block * half;

  const int64_t token0 = static_cast<int64_t>(blockIdx.x) * tokens_per_block;
  const int block_tokens =
      static_cast<int>(min(static_cast<int64_t>(tokens_per_block), num_tokens - token0));
  fill_angles<acc_t, pos_t>(positions, token0, block_tokens, pos_stride_token, pos_stride_axis,
                            table, inverse, cos_s, sin_s);
  __syncthreads();

  const int chunks = half / VEC;
  const int items_per_token = num_heads * chunks;
  const int items = block_tokens * items_per_token;
  const int64_t out_stride_token = static_cast<int64_t>(num_heads) * 2 * half;
  for (int item = threadIdx.x; item < items; item += kThreads) {
    const int t = item / items_per_token;
    const int rest = item - t * items_per_token;
    const int head = rest / chunks;
    const int chunk = rest - head * chunks;
    const int64_t token = token0 + t;
    const scalar_t* src = x + token * x_stride_token + head * x_stride_head + chunk * VEC;
    scalar_t* dst = out + token * out_stride_token + head * 2 * half + chunk * VEC;
    const PackT a = *reinterpret_cast<const PackT*>(src);
    const PackT b = *reinterpret_cast<const PackT*>(src + half);
    const acc_t* cs = cos_s + t * half + chunk * VEC;
    const acc_t* sn = sin_s + t * half + chunk * VEC;
    PackT ya, yb;
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

bool aligned(const void* ptr, size_t bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % bytes == 0;
}

// Largest vector width (elements, at most 16 bytes) every access of the direct kernel can use.
template <typename scalar_t>
int pick_direct_vec(const at::Tensor& x, int half) {
  for (int vec = 16 / static_cast<int>(sizeof(scalar_t)); vec > 1; vec /= 2) {
    if (half % vec == 0 && x.stride(0) % vec == 0 && x.stride(1) % vec == 0 &&
        aligned(x.const_data_ptr(), vec * sizeof(scalar_t))) {
      return vec;
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
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const size_t angle_bytes_per_token = 2 * static_cast<size_t>(half) * sizeof(acc_t);
  const size_t row_bytes = static_cast<size_t>(num_heads) * 2 * half * sizeof(scalar_t);

  const bool tile_layout = x.stride(1) == 2 * half && row_bytes % 16 == 0 &&
                           (x.stride(0) * sizeof(scalar_t)) % 16 == 0 &&
                           aligned(x.const_data_ptr(), 16) && row_bytes <= kTileBytes;
  if (tile_layout) {
    const int tokens_per_block = static_cast<int>(
        std::clamp<size_t>(std::min(kTileBytes / row_bytes, kAngleBytes / angle_bytes_per_token),
                           1, kMaxTokensPerBlock));
    const size_t smem = tokens_per_block * (row_bytes + angle_bytes_per_token);
    const int64_t blocks = (num_tokens + tokens_per_block - 1) / tokens_per_block;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "rope_nd: too many tokens (",
                num_tokens, ")");
    rope_nd_tile_kernel<scalar_t, pos_t>
        <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
            x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
            positions.const_data_ptr<pos_t>(), num_tokens, num_heads, x.stride(0),
            positions.stride(0), positions.stride(1), tokens_per_block, table, inverse);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }

  const int vec = pick_direct_vec<scalar_t>(x, half);
  const int items_per_token = std::max(1, num_heads * (half / vec));
  const int smem_token_cap = std::max(1, static_cast<int>(kAngleBytes / angle_bytes_per_token));
  const int tokens_per_block = std::clamp(kDirectItemsPerBlock / items_per_token, 1,
                                          std::min(kMaxTokensPerBlock, smem_token_cap));
  const size_t smem = tokens_per_block * angle_bytes_per_token;
  const int64_t blocks = (num_tokens + tokens_per_block - 1) / tokens_per_block;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "rope_nd: too many tokens (",
              num_tokens, ")");

#define OMNIVMED_LAUNCH_ROPE_DIRECT(V)                                                        \
  rope_nd_direct_kernel<scalar_t, pos_t, V>                                                  \
      <<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(                           \
          x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),                    \
          positions.const_data_ptr<pos_t>(), num_tokens, num_heads, x.stride(0), x.stride(1), \
          positions.stride(0), positions.stride(1), tokens_per_block, table, inverse)

  switch (vec) {
    case 8:
      if constexpr (sizeof(scalar_t) <= 2) {
        OMNIVMED_LAUNCH_ROPE_DIRECT(8);
        break;
      }
      [[fallthrough]];
    case 4:
      if constexpr (sizeof(scalar_t) <= 4) {
        OMNIVMED_LAUNCH_ROPE_DIRECT(4);
        break;
      }
      [[fallthrough]];
    case 2:
      OMNIVMED_LAUNCH_ROPE_DIRECT(2);
      break;
    default:
      OMNIVMED_LAUNCH_ROPE_DIRECT(1);
      break;
  }
#undef OMNIVMED_LAUNCH_ROPE_DIRECT
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor rope_nd_cuda(const at::Tensor& x_in, const at::Tensor& positions,
                        c10::IntArrayRef sections, double theta, bool inverse) {
  check_rope_nd_args(x_in, positions, sections, theta);
  TORCH_CHECK(x_in.is_cuda(), "rope_nd_cuda: expected CUDA tensors, got ", x_in.device());
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  // The kernels read rows with a unit channel stride; anything else is copied once.
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
