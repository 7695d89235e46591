// Warp-level building blocks of the fused rope_attention kernels (sm_80 and newer):
// tensor-core mma, ldmatrix, asynchronous 16-byte copies into shared memory, and the
// rotation of tiles already in shared memory.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with 16-bit inputs, fp32 accumulators), with
// lane = 4 * g + c (g = lane / 4 in 0..7, c = lane % 4):
//   A (16 x 16, row major): a[0] = (row g,   cols 2c, 2c+1)   a[1] = (row g+8, cols 2c, 2c+1)
//                           a[2] = (row g,   cols 2c+8, +9)   a[3] = (row g+8, cols 2c+8, +9)
//   B (16 x 8, "col"):      b[0] = (rows 2c, 2c+1, col g)     b[1] = (rows 2c+8, 2c+9, col g)
//   C (16 x 8, fp32):       c[0], c[1] = (row g, cols 2c, 2c+1); c[2], c[3] = (row g+8, same)
// m16n8k8 uses a[0], a[1] and b[0] alone. Two C tiles side by side (columns 0-7 and 8-15)
// are, once packed to 16 bits, exactly an A fragment: P never leaves registers.
#pragma once

#include <cstdint>
#include <type_traits>

#include <algorithm>

#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../rope/rope_math.h"

namespace omnivmed {
namespace attention {

// Shared-memory row stride (in elements) for rows of `cols` 16-bit values: a multiple of
// 8 elements (16-byte rows for cp.async and ldmatrix) whose length in 32-bit words is 4
// mod 8, so the 8 rows a fragment load or an ldmatrix touches fall in distinct banks.
constexpr int smem_stride(int cols) {
  int stride = cols + 8;
  while ((stride / 2) % 8 != 4) stride += 8;
  return stride;
}

__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared without passing through registers; `valid == false` writes
// zeros (src-size 0) and reads nothing.
__device__ __forceinline__ void copy_16_async(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void commit_async() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void wait_async() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Two transposed 8x8 matrices: lanes 0-7 give the row addresses of the first, lanes 8-15
// those of the second (lanes 16-31 repeat them). Result: b[0], b[1] of a B fragment whose
// K rows are the shared-memory rows.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t& r0, uint32_t& r1, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(smem_address(row))
               : "memory");
}

template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

// Per-type conversions and mma instructions.
template <typename T>
struct Mma;

template <>
struct Mma<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void m16n8k16(float* c, const uint32_t* a, uint32_t b0,
                                                  uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void m16n8k8(float* c, uint32_t a0, uint32_t a1,
                                                 uint32_t b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
};

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
  static __device__ __forceinline__ void m16n8k16(float* c, const uint32_t* a, uint32_t b0,
                                                  uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ void m16n8k8(float* c, uint32_t a0, uint32_t a1,
                                                 uint32_t b0) {
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(b0));
  }
};

// C[16 x 8*NT] += A[16 x D] * B^T where A's 16 rows start at `a` and B's 8*NT rows at `b`,
// both row major in shared memory with the given strides (contraction over D columns).
// This is Q K^T (and K Q^T, V dO^T in the backward). D % 8 == 0: 80 is five k16 steps and
// 72 four plus one m16n8k8 step, so neither is padded to 96.
template <typename T, int D, int NT, int SA, int SB>
__device__ __forceinline__ void mma_rows_by_rows(float (&acc)[NT][4], const T* a, const T* b,
                                                 int lane) {
  const int g = lane >> 2;
  const int c = lane & 3;
#pragma unroll
  for (int k0 = 0; k0 + 16 <= D; k0 += 16) {
    uint32_t frag[4];
    frag[0] = load_pair(a + g * SA + k0 + 2 * c);
    frag[1] = load_pair(a + (g + 8) * SA + k0 + 2 * c);
    frag[2] = load_pair(a + g * SA + k0 + 8 + 2 * c);
    frag[3] = load_pair(a + (g + 8) * SA + k0 + 8 + 2 * c);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const T* brow = b + (nt * 8 + g) * SB + k0 + 2 * c;
      Mma<T>::m16n8k16(acc[nt], frag, load_pair(brow), load_pair(brow + 8));
    }
  }
  if constexpr (D % 16 == 8) {
    constexpr int k0 = D - 8;
    const uint32_t a0 = load_pair(a + g * SA + k0 + 2 * c);
    const uint32_t a1 = load_pair(a + (g + 8) * SA + k0 + 2 * c);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      Mma<T>::m16n8k8(acc[nt], a0, a1, load_pair(b + (nt * 8 + g) * SB + k0 + 2 * c));
    }
  }
}

// A fragment over columns 16*kk .. 16*kk+15 of a row of fp32 C tiles (tiles 2kk, 2kk+1),
// rounded to T.
template <typename T, int NT>
__device__ __forceinline__ void pack_a_fragment(const float (&c)[NT][4], int kk, uint32_t* a) {
  a[0] = Mma<T>::pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = Mma<T>::pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = Mma<T>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = Mma<T>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// acc[16 x D] += A[16 x 16] * B[16 x D], B = 16 rows of a row-major shared tile starting at
// `b` (P V, P^T dO, dS^T Q, dS K): B fragments come from ldmatrix.trans, one per 8 columns.
template <typename T, int D, int SB>
__device__ __forceinline__ void mma_a_by_tile(float (&acc)[D / 8][4], const uint32_t* a,
                                              const T* b, int lane) {
  const T* row = b + (((lane >> 3) & 1) * 8 + (lane & 7)) * SB;
#pragma unroll
  for (int nt = 0; nt < D / 8; ++nt) {
    uint32_t b0, b1;
    ldmatrix_x2_trans(b0, b1, row + nt * 8);
    Mma<T>::m16n8k16(acc[nt], a, b0, b1);
  }
}

// Writes a warp's fp32 C tiles (16 rows from `row0`, MT tiles of 8 columns) transposed into
// a shared [column][row] tile of stride S, rounded to T: the backward's dS^T -> dS.
template <typename T, int MT, int S>
__device__ __forceinline__ void store_transposed(T* tile, const float (&c_tiles)[MT][4], int row0,
                                                 int lane) {
  const int g = lane >> 2;
  const int c = lane & 3;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int col = mt * 8 + 2 * c + (e & 1);
      const int row = row0 + g + 8 * (e >> 1);
      tile[col * S + row] = Mma<T>::from_float(c_tiles[mt][e]);
    }
  }
}

// Copies `rows` rows of D 16-bit values (global row stride `stride`, rows from `first`)
// into a shared tile of stride S; rows at or past `valid` become zeros.
template <typename T, int D, int S, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile_async(T* tile, const T* base, int64_t stride,
                                                int64_t first, int valid) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += THREADS) {
    const int r = i / kChunks;
    const int chunk = i - r * kChunks;
    const bool ok = r < valid;
    const T* src = ok ? base + (first + r) * stride + chunk * 8 : base;
    copy_16_async(tile + r * S + chunk * 8, src, ok);
  }
}

// Rotates the first `valid` rows of a shared tile in place with the per-token cos/sin
// table (token `first + r` for row r): rope_nd's angles and rotation in fp32, rounded once
// to T (equal to rope_nd's output up to the compiler's choice of fused multiply-adds).
template <typename T, int D, int S, int THREADS>
__device__ __forceinline__ void rotate_tile(T* tile, const float2* __restrict__ cos_sin,
                                            int64_t first, int valid) {
  constexpr int kHalf = D / 2;
  for (int i = threadIdx.x; i < valid * kHalf; i += THREADS) {
    const int r = i / kHalf;
    const int p = i - r * kHalf;
    const float2 cs = cos_sin[(first + r) * kHalf + p];
    T* row = tile + r * S;
    float y1, y2;
    rope::rotate_pair<float>(Mma<T>::to_float(row[p]), Mma<T>::to_float(row[p + kHalf]), cs.x,
                             cs.y, &y1, &y2);
    row[p] = Mma<T>::from_float(y1);
    row[p + kHalf] = Mma<T>::from_float(y2);
  }
}

// What a block of the (tiles, heads, items) grid works on: its item's first token and
// length, its head, and the lane coordinates of the fragment layouts.
struct BlockTask {
  int64_t start;  // first token of the item
  int len;        // tokens in the item
  int head;
  int warp, lane, g, c;
};

__device__ __forceinline__ BlockTask block_task(const int* __restrict__ cu_seqlens) {
  BlockTask t;
  t.start = cu_seqlens[blockIdx.z];
  t.len = static_cast<int>(cu_seqlens[blockIdx.z + 1] - t.start);
  t.head = blockIdx.y;
  t.warp = threadIdx.x / 32;
  t.lane = threadIdx.x % 32;
  t.g = t.lane >> 2;
  t.c = t.lane & 3;
  return t;
}

// Sums over the 4 lanes of a quad (the lanes holding one fragment row).
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// Launches `kernel` on a (tiles, heads, items) grid: enough tiles of `tile_rows` for an
// item of max_seqlen tokens (blocks stride over longer items), with its dynamic shared
// memory allowed past the 48 KB default.
template <typename Kernel, typename Params>
void launch_over_tiles(Kernel kernel, const Params& params, int threads, size_t smem_bytes,
                       int tile_rows, int64_t max_seqlen, int num_items, cudaStream_t stream) {
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem_bytes)));
  const int64_t tiles = std::max<int64_t>(1, (max_seqlen + tile_rows - 1) / tile_rows);
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(tiles, 1 << 30)), params.heads,
                  num_items);
  kernel<<<grid, threads, smem_bytes, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Host-side dispatch shared by the forward and backward launchers: f(T{}, D) with T the
// CUDA 16-bit type and D a std::integral_constant head dim (one kernel per pair).
template <typename F>
void dispatch_kernel_variant(c10::ScalarType dtype, int head_dim, F&& f) {
  auto with_dim = [&](auto type_tag) {
    switch (head_dim) {
      case 64: return f(type_tag, std::integral_constant<int, 64>{});
      case 72: return f(type_tag, std::integral_constant<int, 72>{});
      case 80: return f(type_tag, std::integral_constant<int, 80>{});
      case 96: return f(type_tag, std::integral_constant<int, 96>{});
      case 128: return f(type_tag, std::integral_constant<int, 128>{});
      default: TORCH_CHECK(false, "rope_attention: no CUDA kernel for head dim ", head_dim);
    }
  };
  if (dtype == c10::ScalarType::Half) return with_dim(__half{});
  TORCH_CHECK(dtype == c10::ScalarType::BFloat16,
              "rope_attention: the fused kernel takes float16 or bfloat16, got ", dtype);
  return with_dim(__nv_bfloat16{});
}

}  // namespace attention
}  // namespace omnivmed
