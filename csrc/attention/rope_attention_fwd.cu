// Forward of the fused rope_attention: one block per (query tile, head, item), 16 query
// rows per warp. Each key/value tile is copied into shared memory with cp.async, K is
// rotated there (Q once per query tile), S = Q K^T and O += P V run on tensor cores with
// the online softmax in registers, and the log-sum-exp is kept for the backward.
#include <cmath>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "rope_attention_cuda.h"
#include "tile_ops.cuh"

namespace omnivmed {
namespace attention {
namespace {

template <int D>
struct FwdTile {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockM = 16 * kWarps;  // query rows per block
  static constexpr int kBlockN = 64;           // keys per tile
  static constexpr int kStride = smem_stride(D);
  static constexpr size_t kSmemBytes = size_t(kBlockM + 2 * kBlockN) * kStride * 2;
};

template <typename T, int D>
__global__ void __launch_bounds__(FwdTile<D>::kThreads, 1)
    rope_attention_fwd_kernel(const FwdParams p) {
  using Tile = FwdTile<D>;
  constexpr int BM = Tile::kBlockM, BN = Tile::kBlockN, S = Tile::kStride;
  constexpr int NT = BN / 8;  // score tiles per warp row block
  constexpr int DT = D / 8;   // output tiles
  const BlockTask task = block_task(p.cu_seqlens);
  const int64_t start = task.start;
  const int len = task.len, head = task.head;
  const int warp = task.warp, lane = task.lane, g = task.g, c = task.c;

  extern __shared__ __align__(16) unsigned char smem[];
  T* q_s = reinterpret_cast<T*>(smem);
  T* k_s = q_s + BM * S;
  T* v_s = k_s + BN * S;

  const T* q = static_cast<const T*>(p.q) + head * D;
  const T* k = static_cast<const T*>(p.k) + head * D;
  const T* v = static_cast<const T*>(p.v) + head * D;
  const int n_tiles = (len + BN - 1) / BN;

  for (int m0 = blockIdx.x * BM; m0 < len; m0 += gridDim.x * BM) {
    const int valid_m = min(BM, len - m0);
    load_tile_async<T, D, S, BM, Tile::kThreads>(q_s, q, p.row_stride, start + m0, valid_m);
    load_tile_async<T, D, S, BN, Tile::kThreads>(k_s, k, p.row_stride, start,
                                                  min(BN, len));
    commit_async();

    float o[DT][4] = {};
    float row_max[2] = {-INFINITY, -INFINITY};
    float row_sum[2] = {0.f, 0.f};

    for (int j = 0; j < n_tiles; ++j) {
      const int n0 = j * BN;
      const int valid_n = min(BN, len - n0);
      load_tile_async<T, D, S, BN, Tile::kThreads>(v_s, v, p.row_stride, start + n0, valid_n);
      commit_async();
      wait_async<1>();  // Q (first tile) and K_j have landed
      __syncthreads();
      if (j == 0) rotate_tile<T, D, S, Tile::kThreads>(q_s, p.cos_sin, start + m0, valid_m);
      rotate_tile<T, D, S, Tile::kThreads>(k_s, p.cos_sin, start + n0, valid_n);
      __syncthreads();

      // Warps whose 16 query rows all lie past the item only help load and rotate.
      const bool rows_active = warp * 16 < valid_m;
      float s[NT][4] = {};
      if (rows_active) {
        mma_rows_by_rows<T, D, NT, S, S>(s, q_s + warp * 16 * S, k_s, lane);

        // Keys past the item take no weight; scores go to the log2 domain.
        float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int col = nt * 8 + 2 * c + (e & 1);
            s[nt][e] = col < valid_n ? s[nt][e] * p.scale_log2 : -INFINITY;
            tile_max[e >> 1] = fmaxf(tile_max[e >> 1], s[nt][e]);
          }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const float new_max = fmaxf(row_max[r], quad_max(tile_max[r]));
          // Every row sees at least one valid key in the first tile, so new_max is finite.
          const float alpha = exp2f(row_max[r] - new_max);
          row_max[r] = new_max;
          row_sum[r] *= alpha;
#pragma unroll
          for (int dt = 0; dt < DT; ++dt) {
            o[dt][2 * r] *= alpha;
            o[dt][2 * r + 1] *= alpha;
          }
        }
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[nt][e] = exp2f(s[nt][e] - row_max[e >> 1]);
            row_sum[e >> 1] += s[nt][e];
          }
        }
      }

      wait_async<0>();  // V_j
      __syncthreads();  // also: every warp is done reading K_j
      if (j + 1 < n_tiles) {
        load_tile_async<T, D, S, BN, Tile::kThreads>(k_s, k, p.row_stride, start + n0 + BN,
                                                      min(BN, len - n0 - BN));
      }
      commit_async();  // possibly empty: keeps the group count uniform

      if (rows_active) {
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[4];
          pack_a_fragment<T, NT>(s, kk, a);
          mma_a_by_tile<T, D, S>(o, a, v_s + kk * 16 * S, lane);
        }
      }
      __syncthreads();  // V_j is read by every warp before the next tile overwrites it
    }
    wait_async<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
      if (warp * 16 >= valid_m) break;  // warp-uniform: nothing of this warp's to store
      const float total = quad_sum(row_sum[r]);
      const float inv = 1.f / total;
      const int row = warp * 16 + g + 8 * r;
      if (row < valid_m) {
        const int64_t token = start + m0 + row;
        T* out = static_cast<T*>(p.out) + token * p.row_stride + head * D;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          *reinterpret_cast<uint32_t*>(out + dt * 8 + 2 * c) =
              Mma<T>::pack(o[dt][2 * r] * inv, o[dt][2 * r + 1] * inv);
        }
        if (c == 0) {
          p.lse[head * p.total + token] = (row_max[r] + log2f(total)) * float(M_LN2);
        }
      }
    }
    __syncthreads();  // the next query tile reuses q_s and k_s
  }
}

}  // namespace

void launch_rope_attention_forward(const FwdParams& params, at::ScalarType dtype, int head_dim,
                                   int num_items, int64_t max_seqlen) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  dispatch_kernel_variant(dtype, head_dim, [&](auto type_tag, auto dim) {
    using Tile = FwdTile<decltype(dim)::value>;
    launch_over_tiles(rope_attention_fwd_kernel<decltype(type_tag), decltype(dim)::value>, params,
                      Tile::kThreads, Tile::kSmemBytes, Tile::kBlockM, max_seqlen, num_items,
                      stream);
  });
}

}  // namespace attention
}  // namespace omnivmed
