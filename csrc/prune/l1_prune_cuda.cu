// CUDA kernels of l1_prune, two launches and no host synchronisation:
//
// 1. decide: one block per frame (mode "previous") or per item (mode "last_kept", whose
//    frames depend on each other and run in order). A warp sums |frame - reference| over
//    one unit's patches and values (fixed reduction order: deterministic), then a thread
//    per unit applies the rule of prune_math.h and writes the keep mask and the frame's
//    kept count.
// 2. compact: one block per frame. It finds how many patches earlier frames kept, scans
//    its own keep row (cub::BlockScan) to place its kept patches in original order, copies
//    their values a warp per patch, and fills its share of the padding rows past the true
//    count. Block 0 writes the count; the first frame of each item its cu_seqlens entry.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "l1_prune.h"
#include "prune_math.h"

namespace omnivmed {
namespace prune {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

using Geo = PruneGeometry;

// The item holding frame f: the largest b with cu[b] <= f (bounded even if cu is bad).
__device__ __forceinline__ int64_t item_of(const int32_t* cu, int64_t items, int64_t f) {
  int64_t lo = 0, hi = items - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (cu[mid] <= f) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;
}

// sums[u] = sum |x[f] - x[reference frame of u]| over unit u. `reference` is null for
// mode "previous" (the reference is frame f - 1).
template <typename scalar_t>
__device__ void frame_sums(const scalar_t* __restrict__ x, int64_t f,
                           const int32_t* __restrict__ reference, const Geo& g,
                           typename DiffAcc<scalar_t>::type* sums) {
  using acc_t = typename DiffAcc<scalar_t>::type;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t u = warp; u < g.units; u += kWarps) {
    const int64_t rf = reference ? reference[u] : f - 1;
    acc_t acc = 0;
    for (int64_t e = 0; e < g.unit * g.unit; ++e) {
      const int64_t n = unit_patch(u, e, g.unit, g.units_per_row, g.grid_w);
      const scalar_t* a = x + (f * g.patches + n) * g.values;
      const scalar_t* b = x + (rf * g.patches + n) * g.values;
      for (int64_t p = lane; p < g.values; p += 32) acc += abs_diff<scalar_t>(a[p], b[p]);
    }
    acc = warp_sum(acc);
    if (lane == 0) sums[u] = acc;
  }
}

// Applies the rule to one frame's unit sums; returns the frame's kept patch count (valid in
// thread 0). Updates `reference` for kept units when given.
template <typename acc_t>
__device__ int64_t frame_decide(const acc_t* sums, const Geo& g, double threshold_count,
                                int64_t min_keep, bool* keep_row, int32_t* reference,
                                int64_t f) {
  using BlockReduce = cub::BlockReduce<int64_t, kThreads>;
  __shared__ typename BlockReduce::TempStorage reduce_storage;
  int64_t kept = 0;
  for (int64_t u = threadIdx.x; u < g.units; u += kThreads) {
    const acc_t s = sums[u];
    bool k = passes_threshold<acc_t>(s, threshold_count);
    if (!k && min_keep > 0) {
      int64_t better = 0;
      for (int64_t v = 0; v < g.units && better < min_keep; ++v) {
        better += outranks<acc_t>(sums[v], v, s, u);
      }
      k = better < min_keep;
    }
    for (int64_t e = 0; e < g.unit * g.unit; ++e) {
      keep_row[unit_patch(u, e, g.unit, g.units_per_row, g.grid_w)] = k;
    }
    if (k) {
      kept += g.unit * g.unit;
      if (reference) reference[u] = static_cast<int32_t>(f);
    }
  }
  return BlockReduce(reduce_storage).Sum(kept);
}

__device__ void keep_whole_frame(int64_t f, const Geo& g, bool* keep, int64_t* counts) {
  for (int64_t n = threadIdx.x; n < g.patches; n += kThreads) keep[f * g.patches + n] = true;
  if (threadIdx.x == 0) counts[f] = g.patches;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
decide_previous_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ cu, Geo g,
                       double threshold_count, int64_t min_keep, bool* __restrict__ keep,
                       int64_t* __restrict__ counts,
                       typename DiffAcc<scalar_t>::type* __restrict__ scratch) {
  const int64_t f = blockIdx.x;
  const int64_t b = item_of(cu, g.items, f);
  if (f == 0 || cu[b] == f) {
    keep_whole_frame(f, g, keep, counts);
    return;
  }
  auto* sums = scratch + f * g.units;
  frame_sums<scalar_t>(x, f, nullptr, g, sums);
  __syncthreads();
  const int64_t kept = frame_decide(sums, g, threshold_count, min_keep, keep + f * g.patches,
                                    nullptr, f);
  if (threadIdx.x == 0) counts[f] = kept;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
decide_last_kept_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ cu, Geo g,
                        double threshold_count, int64_t min_keep, bool* __restrict__ keep,
                        int64_t* __restrict__ counts,
                        typename DiffAcc<scalar_t>::type* __restrict__ scratch,
                        int32_t* __restrict__ references) {
  const int64_t b = blockIdx.x;
  const int64_t begin = min(max(static_cast<int64_t>(cu[b]), int64_t{0}), g.frames);
  const int64_t end = min(max(static_cast<int64_t>(cu[b + 1]), begin), g.frames);
  if (begin >= end) return;
  auto* sums = scratch + b * g.units;
  int32_t* reference = references + b * g.units;
  keep_whole_frame(begin, g, keep, counts);
  for (int64_t u = threadIdx.x; u < g.units; u += kThreads) reference[u] = static_cast<int32_t>(begin);
  __syncthreads();
  for (int64_t f = begin + 1; f < end; ++f) {
    frame_sums<scalar_t>(x, f, reference, g, sums);
    __syncthreads();
    const int64_t kept = frame_decide(sums, g, threshold_count, min_keep, keep + f * g.patches,
                                      reference, f);
    if (threadIdx.x == 0) counts[f] = kept;
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
compact_kernel(const scalar_t* __restrict__ x, const int32_t* __restrict__ cu, Geo g,
               const bool* __restrict__ keep, const int64_t* __restrict__ counts,
               int32_t* __restrict__ row_of, int64_t* __restrict__ index,
               int32_t* __restrict__ positions, scalar_t* __restrict__ values,
               int32_t* __restrict__ cu_seqlens, int64_t* __restrict__ count) {
  using BlockReduce = cub::BlockReduce<int64_t, kThreads>;
  using BlockScan = cub::BlockScan<int32_t, kThreads>;
  __shared__ union {
    typename BlockReduce::TempStorage reduce;
    typename BlockScan::TempStorage scan;
  } storage;
  __shared__ int64_t before_s, total_s;
  const int64_t f = blockIdx.x;

  // Kept patches in earlier frames, and in all frames.
  int64_t before = 0, total = 0;
  for (int64_t i = threadIdx.x; i < g.frames; i += kThreads) {
    total += counts[i];
    if (i < f) before += counts[i];
  }
  before = BlockReduce(storage.reduce).Sum(before);
  __syncthreads();
  total = BlockReduce(storage.reduce).Sum(total);
  if (threadIdx.x == 0) {
    before_s = before;
    total_s = total;
  }
  __syncthreads();
  before = before_s;
  total = total_s;

  const int64_t b = item_of(cu, g.items, f);
  const int32_t t = static_cast<int32_t>(f - min(static_cast<int64_t>(cu[b]), f));
  if (threadIdx.x == 0) {
    if (f == 0) {
      *count = total;
      cu_seqlens[g.items] = static_cast<int32_t>(total);
      cu_seqlens[0] = 0;
    } else if (cu[b] == f) {
      cu_seqlens[b] = static_cast<int32_t>(before);
    }
  }

  // Place this frame's kept patches in original order.
  int64_t running = before;
  for (int64_t base = 0; base < g.patches; base += kThreads) {
    const int64_t n = base + threadIdx.x;
    const int32_t flag = n < g.patches && keep[f * g.patches + n] ? 1 : 0;
    int32_t offset, chunk_total;
    BlockScan(storage.scan).ExclusiveSum(flag, offset, chunk_total);
    __syncthreads();
    if (n < g.patches) {
      const int64_t row = flag ? running + offset : -1;
      row_of[f * g.patches + n] = static_cast<int32_t>(row);
      if (flag) {
        index[row] = f * g.patches + n;
        positions[3 * row + 0] = t;
        positions[3 * row + 1] = static_cast<int32_t>(n / g.grid_w);
        positions[3 * row + 2] = static_cast<int32_t>(n % g.grid_w);
      }
    }
    running += chunk_total;
  }
  __syncthreads();

  // Values, a warp per patch (coalesced over P).
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  for (int64_t n = warp; n < g.patches; n += kWarps) {
    const int64_t row = row_of[f * g.patches + n];
    if (row < 0) continue;
    const scalar_t* src = x + (f * g.patches + n) * g.values;
    scalar_t* dst = values + row * g.values;
    for (int64_t p = lane; p < g.values; p += 32) dst[p] = src[p];
  }

  // This frame's share of the padding rows past the true count.
  const int64_t pruned_before = f * g.patches - before;
  const int64_t pad_begin = total + pruned_before;
  const int64_t pad_end = pad_begin + (g.patches - (running - before));
  for (int64_t row = pad_begin + threadIdx.x; row < pad_end; row += kThreads) {
    index[row] = -1;
    positions[3 * row + 0] = -1;
    positions[3 * row + 1] = -1;
    positions[3 * row + 2] = -1;
  }
  for (int64_t row = pad_begin + warp; row < pad_end; row += kWarps) {
    for (int64_t p = lane; p < g.values; p += 32) values[row * g.values + p] = scalar_t(0);
  }
}

}  // namespace

PaddedPruneOutputs l1_prune_padded_cuda(const at::Tensor& patches_in, const at::Tensor& cu_frames_in,
                                        int64_t grid_h, int64_t grid_w, double threshold,
                                        std::string mode, int64_t unit,
                                        int64_t min_keep_per_frame) {
  const Mode m = static_cast<Mode>(check_l1_prune_args(patches_in, cu_frames_in, grid_h, grid_w,
                                                       threshold, mode, unit, min_keep_per_frame));
  TORCH_CHECK(patches_in.is_cuda(), "l1_prune_cuda: expected CUDA tensors");
  const c10::cuda::CUDAGuard device_guard(patches_in.device());
  const at::Tensor patches = patches_in.contiguous();
  const at::Tensor cu = cu_frames_in.contiguous();
  const Geo g = make_geometry(patches.size(0), patches.size(1), patches.size(2), grid_h, grid_w,
                              unit, cu.numel() - 1);
  TORCH_CHECK(g.frames * g.patches < std::numeric_limits<int32_t>::max(),
              "l1_prune: F*N = ", g.frames * g.patches, " patches exceed the int32 row range");
  const int64_t rows = g.frames * g.patches;
  const auto opts = patches.options();
  at::Tensor keep = at::empty({g.frames, g.patches}, opts.dtype(at::kBool));
  at::Tensor index = at::empty({rows}, opts.dtype(at::kLong));
  at::Tensor positions = at::empty({rows, 3}, opts.dtype(at::kInt));
  at::Tensor values = at::empty({rows, g.values}, opts);
  at::Tensor cu_seqlens = at::empty({g.items + 1}, opts.dtype(at::kInt));
  at::Tensor count = at::empty({}, opts.dtype(at::kLong));
  if (g.frames == 0) return {keep, index, positions, cu_seqlens, values, count};

  at::Tensor counts = at::empty({g.frames}, opts.dtype(at::kLong));
  at::Tensor row_of = at::empty({rows}, opts.dtype(at::kInt));
  const double threshold_count = threshold * static_cast<double>(unit * unit * g.values);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool is_byte = patches.scalar_type() == at::kByte;
  const int64_t scratch_rows = m == Mode::kPrevious ? g.frames : g.items;
  at::Tensor scratch = at::empty({scratch_rows, g.units}, opts.dtype(is_byte ? at::kLong : at::kFloat));

  OMNIVMED_DISPATCH_PRUNE_TYPES(patches.scalar_type(),
                                  "l1_prune_cuda", [&] {
    using acc_t = typename DiffAcc<scalar_t>::type;
    const scalar_t* x = patches.const_data_ptr<scalar_t>();
    acc_t* sums = reinterpret_cast<acc_t*>(scratch.data_ptr());
    if (m == Mode::kPrevious) {
      decide_previous_kernel<scalar_t><<<static_cast<unsigned>(g.frames), kThreads, 0, stream>>>(
          x, cu.const_data_ptr<int32_t>(), g, threshold_count, min_keep_per_frame,
          keep.data_ptr<bool>(), counts.data_ptr<int64_t>(), sums);
    } else {
      at::Tensor references = at::empty({g.items, g.units}, opts.dtype(at::kInt));
      decide_last_kept_kernel<scalar_t><<<static_cast<unsigned>(g.items), kThreads, 0, stream>>>(
          x, cu.const_data_ptr<int32_t>(), g, threshold_count, min_keep_per_frame,
          keep.data_ptr<bool>(), counts.data_ptr<int64_t>(), sums, references.data_ptr<int32_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    compact_kernel<scalar_t><<<static_cast<unsigned>(g.frames), kThreads, 0, stream>>>(
        x, cu.const_data_ptr<int32_t>(), g, keep.const_data_ptr<bool>(),
        counts.const_data_ptr<int64_t>(), row_of.data_ptr<int32_t>(), index.data_ptr<int64_t>(),
        positions.data_ptr<int32_t>(), values.data_ptr<scalar_t>(), cu_seqlens.data_ptr<int32_t>(),
        count.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {keep, index, positions, cu_seqlens, values, count};
}

PruneOutputs l1_prune_cuda(const at::Tensor& patches, const at::Tensor& cu_frames, int64_t grid_h,
                           int64_t grid_w, double threshold, std::string mode, int64_t unit,
                           int64_t min_keep_per_frame) {
  check_l1_prune_args(patches, cu_frames, grid_h, grid_w, threshold, mode, unit,
                      min_keep_per_frame);
  // The convenience form validates cu_frames' values and trims to the true size: it
  // synchronises once (l1_prune_padded does not).
  check_cu_frames_values(cu_frames, patches.size(0));
  auto [keep, index, positions, cu_seqlens, values, count] = l1_prune_padded_cuda(
      patches, cu_frames, grid_h, grid_w, threshold, mode, unit, min_keep_per_frame);
  const int64_t total = count.item<int64_t>();
  return {keep, index.narrow(0, 0, total), positions.narrow(0, 0, total), cu_seqlens,
          values.narrow(0, 0, total)};
}

TORCH_LIBRARY_IMPL(omnivmed, CUDA, m) {
  m.impl("l1_prune", &l1_prune_cuda);
  m.impl("l1_prune_padded", &l1_prune_padded_cuda);
}

}  // namespace prune
}  // namespace omnivmed
