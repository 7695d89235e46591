// Backward of the fused rope_attention (flash-attention-2's schedule): one block per
// (key tile, head, item), 16 keys per warp, looping over the item's query tiles. For each
// query tile it recomputes P^T = exp(K Q^T * scale - lse) from the rotated tiles, then
//   dV += P^T dO,  dS^T = P^T (V dO^T - delta),  dK += dS^T Q,  dQ += dS K (fp32 atomics).
// dK leaves through shared memory with the inverse rotation applied; dQ is finished by a
// small kernel (scale, inverse rotation, cast) once every key tile has added to it.
#include <cmath>

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "rope_attention_cuda.h"
#include "tile_ops.cuh"

namespace omnivmed {
namespace attention {
namespace {

template <int D>
struct BwdTile {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kBlockN = 16 * kWarps;        // keys per block
  static constexpr int kBlockM = D <= 80 ? 64 : 32;  // queries per step (register budget)
  static constexpr int kStride = smem_stride(D);
  static constexpr int kScoreStride = smem_stride(kBlockN);
  static constexpr int kFloatStride = D + 4;  // dK in fp32 before its rotation
  static constexpr size_t kTileBytes =
      size_t(2 * kBlockN + 2 * kBlockM) * kStride * 2 + size_t(kBlockM) * kScoreStride * 2 +
      2 * kBlockM * sizeof(float);
  static constexpr size_t kSmemBytes =
      std::max(kTileBytes, size_t(kBlockN) * kFloatStride * sizeof(float));
};

template <typename T, int D>
__global__ void __launch_bounds__(BwdTile<D>::kThreads, 1)
    rope_attention_bwd_kernel(const BwdParams p) {
  using Tile = BwdTile<D>;
  constexpr int BN = Tile::kBlockN, BM = Tile::kBlockM, S = Tile::kStride;
  constexpr int SP = Tile::kScoreStride;
  constexpr int MT = BM / 8;  // score tiles along the queries
  constexpr int DT = D / 8;
  const BlockTask task = block_task(p.cu_seqlens);
  const int64_t start = task.start;
  const int len = task.len, head = task.head;
  const int warp = task.warp, lane = task.lane, g = task.g, c = task.c;

  extern __shared__ __align__(16) unsigned char smem[];
  T* k_s = reinterpret_cast<T*>(smem);
  T* v_s = k_s + BN * S;
  T* q_s = v_s + BN * S;
  T* do_s = q_s + BM * S;
  T* ds_s = do_s + BM * S;  // dS as [query][key]
  float* lse_s = reinterpret_cast<float*>(ds_s + BM * SP);
  float* delta_s = lse_s + BM;
  float* dk_f = reinterpret_cast<float*>(smem);  // epilogue only, over everything above

  const T* q = static_cast<const T*>(p.q) + head * D;
  const T* k = static_cast<const T*>(p.k) + head * D;
  const T* v = static_cast<const T*>(p.v) + head * D;
  const T* dout = static_cast<const T*>(p.grad) + head * D;
  const float* lse = p.lse + head * p.total;
  const float* delta = p.delta + head * p.total;
  constexpr float kLog2e = 1.4426950408889634f;

  for (int n0 = blockIdx.x * BN; n0 < len; n0 += gridDim.x * BN) {
    const int valid_n = min(BN, len - n0);
    load_tile_async<T, D, S, BN, Tile::kThreads>(k_s, k, p.row_stride, start + n0, valid_n);
    load_tile_async<T, D, S, BN, Tile::kThreads>(v_s, v, p.row_stride, start + n0, valid_n);
    load_tile_async<T, D, S, BM, Tile::kThreads>(q_s, q, p.row_stride, start, min(BM, len));
    load_tile_async<T, D, S, BM, Tile::kThreads>(do_s, dout, p.row_stride, start, min(BM, len));
    commit_async();

    float dv[DT][4] = {};
    float dk[DT][4] = {};
    const int key_row0 = warp * 16;
    const bool keys_active = key_row0 < valid_n;  // warp-uniform

    for (int m0 = 0; m0 < len; m0 += BM) {
      const int valid_m = min(BM, len - m0);
      for (int r = threadIdx.x; r < BM; r += Tile::kThreads) {
        // Queries past the item get lse = +inf: their P is exactly 0.
        lse_s[r] = r < valid_m ? lse[start + m0 + r] * kLog2e : INFINITY;
        delta_s[r] = r < valid_m ? delta[start + m0 + r] : 0.f;
      }
      wait_async<0>();  // Q and dO of this tile (and K, V on the first)
      __syncthreads();
      if (m0 == 0) rotate_tile<T, D, S, Tile::kThreads>(k_s, p.cos_sin, start + n0, valid_n);
      rotate_tile<T, D, S, Tile::kThreads>(q_s, p.cos_sin, start + m0, valid_m);
      __syncthreads();

      if (keys_active) {
        // P^T (keys x queries) for this warp's 16 keys.
        float pt[MT][4] = {};
        mma_rows_by_rows<T, D, MT, S, S>(pt, k_s + key_row0 * S, q_s, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int query = mt * 8 + 2 * c + (e & 1);
            const int key = key_row0 + g + 8 * (e >> 1);
            pt[mt][e] = key < valid_n ? exp2f(pt[mt][e] * p.scale_log2 - lse_s[query]) : 0.f;
          }
        }
        // dV += P^T dO
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          uint32_t a[4];
          pack_a_fragment<T, MT>(pt, kk, a);
          mma_a_by_tile<T, D, S>(dv, a, do_s + kk * 16 * S, lane);
        }
        // dS^T = P^T * (V dO^T - delta)
        float ds[MT][4] = {};
        mma_rows_by_rows<T, D, MT, S, S>(ds, v_s + key_row0 * S, do_s, lane);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int query = mt * 8 + 2 * c + (e & 1);
            ds[mt][e] = pt[mt][e] * (ds[mt][e] - delta_s[query]);
          }
        }
        // dK += dS^T Q (scaled in the epilogue); dS goes to shared memory for dQ.
#pragma unroll
        for (int kk = 0; kk < BM / 16; ++kk) {
          uint32_t a[4];
          pack_a_fragment<T, MT>(ds, kk, a);
          mma_a_by_tile<T, D, S>(dk, a, q_s + kk * 16 * S, lane);
        }
        store_transposed<T, MT, SP>(ds_s, ds, key_row0, lane);
      } else {
        // Keys past the item: their dS columns are zeros (dQ reads every column).
        const float zeros[MT][4] = {};
        store_transposed<T, MT, SP>(ds_s, zeros, key_row0, lane);
      }
      __syncthreads();  // dS is complete; Q and dO of this tile are no longer read

      // The next query tile's Q and dO load while dQ is accumulated.
      if (m0 + BM < len) {
        load_tile_async<T, D, S, BM, Tile::kThreads>(q_s, q, p.row_stride, start + m0 + BM,
                                                      min(BM, len - m0 - BM));
        load_tile_async<T, D, S, BM, Tile::kThreads>(do_s, dout, p.row_stride, start + m0 + BM,
                                                      min(BM, len - m0 - BM));
      }
      commit_async();  // possibly empty

      // dQ (queries x D) += dS K over this block's keys: (16-query, 8-column) units shared
      // out over the warps, each added to the fp32 accumulator with atomics.
      constexpr int kUnits = (BM / 16) * DT;
      for (int unit = warp; unit < kUnits; unit += Tile::kWarps) {
        const int mq = unit / DT;
        const int dt = unit - mq * DT;
        if (mq * 16 >= valid_m) continue;  // warp-uniform: rows past the item
        float acc[1][4] = {};
#pragma unroll
        for (int kk = 0; kk < BN / 16; ++kk) {
          uint32_t a[4];
          const T* arow = ds_s + (mq * 16 + g) * SP + kk * 16 + 2 * c;
          a[0] = load_pair(arow);
          a[1] = load_pair(arow + 8 * SP);
          a[2] = load_pair(arow + 8);
          a[3] = load_pair(arow + 8 * SP + 8);
          uint32_t b0, b1;
          ldmatrix_x2_trans(b0, b1,
                            k_s + (kk * 16 + ((lane >> 3) & 1) * 8 + (lane & 7)) * S + dt * 8);
          Mma<T>::m16n8k16(acc[0], a, b0, b1);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int query = mq * 16 + g + 8 * r;
          if (query < valid_m) {
            float* dst =
                p.dq_accum + (start + m0 + query) * p.row_stride + head * D + dt * 8 + 2 * c;
            atomicAdd(dst, acc[0][2 * r]);
            atomicAdd(dst + 1, acc[0][2 * r + 1]);
          }
        }
      }
      // No barrier here: the next tile rewrites lse/delta (last read before the barrier
      // above) and dS (only after its own two barriers, which every warp reaches after
      // finishing its dQ units).
    }
    wait_async<0>();  // only empty groups can be pending here
    __syncthreads();  // dQ is done with dS and K: the epilogue reuses all shared memory

    // dV out; dK through shared memory (fp32) for its inverse rotation.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int key = key_row0 + g + 8 * r;
      if (key < valid_n) {
        T* dst = static_cast<T*>(p.dv) + (start + n0 + key) * p.row_stride + head * D;
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
          *reinterpret_cast<uint32_t*>(dst + dt * 8 + 2 * c) =
              Mma<T>::pack(dv[dt][2 * r], dv[dt][2 * r + 1]);
        }
      }
#pragma unroll
      for (int dt = 0; dt < DT; ++dt) {
        dk_f[key * Tile::kFloatStride + dt * 8 + 2 * c] = dk[dt][2 * r] * p.scale;
        dk_f[key * Tile::kFloatStride + dt * 8 + 2 * c + 1] = dk[dt][2 * r + 1] * p.scale;
      }
    }
    __syncthreads();
    constexpr int kHalf = D / 2;
    for (int i = threadIdx.x; i < valid_n * kHalf; i += Tile::kThreads) {
      const int key = i / kHalf;
      const int pr = i - key * kHalf;
      const int64_t token = start + n0 + key;
      const float2 cs = p.cos_sin[token * kHalf + pr];
      float y1, y2;
      rope::rotate_pair<float>(dk_f[key * Tile::kFloatStride + pr],
                               dk_f[key * Tile::kFloatStride + pr + kHalf], cs.x, -cs.y, &y1,
                               &y2);
      T* dst = static_cast<T*>(p.dk) + token * p.row_stride + head * D;
      dst[pr] = Mma<T>::from_float(y1);
      dst[pr + kHalf] = Mma<T>::from_float(y2);
    }
    __syncthreads();  // the next key tile reuses the shared memory
  }
}

// delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] in fp32: one warp per (token, head) row,
// striding over the rows.
template <typename T>
__global__ void rope_attention_delta_kernel(const T* __restrict__ grad, const T* __restrict__ out,
                                            float* __restrict__ delta, int64_t rows, int heads,
                                            int head_dim) {
  const int lane = threadIdx.x % 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / 32);
  const int64_t tokens = rows / heads;
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
       row < rows; row += warps) {
    const T* a = grad + row * head_dim;
    const T* b = out + row * head_dim;
    float sum = 0.f;
    for (int d = lane; d < head_dim; d += 32) {
      sum += Mma<T>::to_float(a[d]) * Mma<T>::to_float(b[d]);
    }
    for (int offset = 16; offset > 0; offset /= 2) {
      sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0) {
      const int64_t token = row / heads;
      delta[(row - token * heads) * tokens + token] = sum;
    }
  }
}

// dq = inverse_rope(dq_accum * scale), cast to T: one thread per (token, head, pair).
template <typename T>
__global__ void rope_attention_dq_kernel(const float* __restrict__ dq_accum,
                                         const float2* __restrict__ cos_sin, T* __restrict__ dq,
                                         int64_t rows, int heads, int head_dim, float scale) {
  const int half = head_dim / 2;
  const int64_t n = rows * half;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / half;
    const int pr = static_cast<int>(i - row * half);
    const int64_t token = row / heads;
    const float2 cs = cos_sin[token * half + pr];
    float y1, y2;
    rope::rotate_pair<float>(dq_accum[row * head_dim + pr] * scale,
                             dq_accum[row * head_dim + pr + half] * scale, cs.x, -cs.y, &y1, &y2);
    dq[row * head_dim + pr] = Mma<T>::from_float(y1);
    dq[row * head_dim + pr + half] = Mma<T>::from_float(y2);
  }
}

int blocks_for(int64_t work, int threads) {
  return static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 1 << 20));
}

}  // namespace

void launch_rope_attention_backward(const BwdParams& params, at::ScalarType dtype, int head_dim,
                                    int num_items, int64_t max_seqlen) {
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int64_t rows = params.total * params.heads;
  if (rows == 0) return;
  dispatch_kernel_variant(dtype, head_dim, [&](auto type_tag, auto dim) {
    using T = decltype(type_tag);
    rope_attention_delta_kernel<T><<<blocks_for(rows * 32, 256), 256, 0, stream>>>(
        static_cast<const T*>(params.grad), static_cast<const T*>(params.out), params.delta,
        rows, params.heads, head_dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    using Tile = BwdTile<decltype(dim)::value>;
    launch_over_tiles(rope_attention_bwd_kernel<T, decltype(dim)::value>, params, Tile::kThreads,
                      Tile::kSmemBytes, Tile::kBlockN, max_seqlen, num_items, stream);
    rope_attention_dq_kernel<T><<<blocks_for(rows * head_dim / 2, 256), 256, 0, stream>>>(
        params.dq_accum, params.cos_sin, static_cast<T*>(params.dq), rows, params.heads, head_dim,
        params.scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace attention
}  // namespace omnivmed
