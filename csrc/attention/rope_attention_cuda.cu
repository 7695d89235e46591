// Host side of the fused CUDA rope_attention: argument checks, the cos/sin table, output
// allocation and the launches. Nothing here reads device memory, so the op never waits
// for the GPU and can be captured in a CUDA graph.
#include <algorithm>
#include <cmath>

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "../rope/rope_math.h"
#include "../rope/rope_nd.h"
#include "rope_attention.h"
#include "rope_attention_cuda.h"

namespace omnivmed {
namespace attention {
namespace {

template <typename pos_t>
__global__ void cos_sin_table_kernel(const pos_t* __restrict__ positions, int64_t tokens,
                                     int64_t stride_token, int64_t stride_axis,
                                     const rope::RopeTable<float> table, float2* __restrict__ out) {
  const int half = table.num_pairs;
  const int64_t n = tokens * half;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t t = i / half;
    const int p = static_cast<int>(i - t * half);
    const float position =
        static_cast<float>(positions[t * stride_token + table.axis[p] * stride_axis]);
    float c, s;
    rope::pair_cos_sin<float>(position, table.inv_freq[p], false, &c, &s);
    out[i] = make_float2(c, s);
  }
}

// The fused kernel's own limits first (RuntimeError, as this op always raised), then the
// checks every backend shares (rope_attention_checks.cpp).
void check_fused_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& positions,
                      const at::Tensor& cu_seqlens, int64_t max_seqlen,
                      c10::IntArrayRef sections, double theta) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": the fused kernel takes float16 or bfloat16, got ", q.scalar_type());
  if (q.dim() == 3) {
    bool compiled = false;  // the head dims launch_rope_attention_* instantiate
    for (int64_t d : kSupportedHeadDims) compiled |= q.size(2) == d;
    TORCH_CHECK(compiled, op, ": head dim ", q.size(2),
                " is not supported (64, 72, 80, 96, 128)");
  }
  check_rope_attention_args(op, q, k, v, positions, cu_seqlens, max_seqlen, sections, theta);
  TORCH_CHECK(q.is_cuda(), op, ": expected CUDA tensors, got ", q.device());
  TORCH_CHECK(cu_seqlens.size(0) - 1 <= 65535, op, ": at most 65535 items per call, got ",
              cu_seqlens.size(0) - 1);
  TORCH_CHECK(q.size(1) >= 1 && q.size(1) <= 65535, op, ": 1 to 65535 heads, got ", q.size(1));
  // Tile offsets are 32-bit in the kernels (with room for one stride past the end).
  TORCH_CHECK(q.size(0) < (int64_t(1) << 30), op, ": at most 2^30 - 1 tokens, got ", q.size(0));
}

// Contiguous and 16-byte aligned (cp.async reads whole 16-byte chunks).
at::Tensor dense(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

}  // namespace

at::Tensor cos_sin_table_cuda(const at::Tensor& positions, int64_t head_dim,
                              c10::IntArrayRef sections, double theta) {
  rope::RopeTable<float> table;
  TORCH_CHECK(rope::make_rope_table<float>(sections.data(), static_cast<int>(sections.size()),
                                           theta, &table) &&
                  table.num_pairs == head_dim / 2,
              "rope_attention: invalid sections ", sections, " for head dim ", head_dim);
  const int64_t tokens = positions.size(0);
  // [L, D/2] (cos, sin) as a float tensor of 2 values per pair.
  at::Tensor out = at::empty({tokens, head_dim / 2, 2}, positions.options().dtype(at::kFloat));
  if (tokens == 0) return out;
  const int threads = 256;
  const int64_t work = tokens * (head_dim / 2);
  const int blocks = static_cast<int>(std::min<int64_t>((work + threads - 1) / threads, 1 << 16));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  auto* dst = reinterpret_cast<float2*>(out.data_ptr<float>());
  if (positions.scalar_type() == at::kInt) {
    cos_sin_table_kernel<int32_t><<<blocks, threads, 0, stream>>>(
        positions.data_ptr<int32_t>(), tokens, positions.stride(0), positions.stride(1), table,
        dst);
  } else {
    cos_sin_table_kernel<int64_t><<<blocks, threads, 0, stream>>>(
        positions.data_ptr<int64_t>(), tokens, positions.stride(0), positions.stride(1), table,
        dst);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> rope_attention_fused_forward_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& positions, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    c10::IntArrayRef sections, double theta, std::optional<double> softmax_scale) {
  check_fused_args("rope_attention", q_in, k_in, v_in, positions, cu_seqlens, max_seqlen,
                   sections, theta);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in);
  const int64_t total = q.size(0), heads = q.size(1), head_dim = q.size(2);
  // Zeros: tokens outside every item (only with an invalid cu_seqlens) are never written.
  at::Tensor out = at::zeros_like(q, at::MemoryFormat::Contiguous);
  at::Tensor lse = at::zeros({heads, total}, q.options().dtype(at::kFloat));
  if (total == 0) return {out, lse};
  const at::Tensor cos_sin = cos_sin_table_cuda(positions, head_dim, sections, theta);
  const at::Tensor cu = cu_seqlens.contiguous();
  FwdParams params;
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.cos_sin = reinterpret_cast<const float2*>(cos_sin.data_ptr<float>());
  params.cu_seqlens = cu.data_ptr<int>();
  params.total = total;
  params.heads = static_cast<int>(heads);
  params.row_stride = heads * head_dim;
  params.scale_log2 = static_cast<float>(resolve_scale(softmax_scale, head_dim) * M_LOG2E);
  // max_seqlen only sizes the grid (blocks stride over longer items); no item is longer
  // than L.
  launch_rope_attention_forward(params, q.scalar_type(), static_cast<int>(head_dim),
                                static_cast<int>(cu.size(0) - 1), std::min(max_seqlen, total));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_fused_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& q_in, const at::Tensor& k_in,
    const at::Tensor& v_in, const at::Tensor& out_in, const at::Tensor& lse_in,
    const at::Tensor& positions, const at::Tensor& cu_seqlens, int64_t max_seqlen,
    c10::IntArrayRef sections, double theta, std::optional<double> softmax_scale) {
  check_fused_args("rope_attention_backward", q_in, k_in, v_in, positions, cu_seqlens,
                   max_seqlen, sections, theta);
  check_rope_attention_backward_args("rope_attention_backward", grad_in, q_in, out_in, lse_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = dense(q_in), k = dense(k_in), v = dense(v_in), grad = dense(grad_in),
                   out = dense(out_in), lse = lse_in.contiguous();
  const int64_t total = q.size(0), heads = q.size(1), head_dim = q.size(2);
  at::Tensor dq = at::empty_like(q, at::MemoryFormat::Contiguous);
  at::Tensor dk = at::empty_like(k, at::MemoryFormat::Contiguous);
  at::Tensor dv = at::empty_like(v, at::MemoryFormat::Contiguous);
  if (total == 0) return {dq, dk, dv};
  // Tokens outside every item get no gradient from the kernels: start from zeros.
  dk.zero_();
  dv.zero_();
  at::Tensor dq_accum = at::zeros(q.sizes(), q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({heads, total}, q.options().dtype(at::kFloat));
  const at::Tensor cos_sin = cos_sin_table_cuda(positions, head_dim, sections, theta);
  const at::Tensor cu = cu_seqlens.contiguous();
  const double scale = resolve_scale(softmax_scale, head_dim);
  BwdParams params;
  params.q = q.data_ptr();
  params.k = k.data_ptr();
  params.v = v.data_ptr();
  params.grad = grad.data_ptr();
  params.out = out.data_ptr();
  params.lse = lse.data_ptr<float>();
  params.delta = delta.data_ptr<float>();
  params.cos_sin = reinterpret_cast<const float2*>(cos_sin.data_ptr<float>());
  params.cu_seqlens = cu.data_ptr<int>();
  params.dq_accum = dq_accum.data_ptr<float>();
  params.dq = dq.data_ptr();
  params.dk = dk.data_ptr();
  params.dv = dv.data_ptr();
  params.total = total;
  params.heads = static_cast<int>(heads);
  params.row_stride = heads * head_dim;
  params.scale = static_cast<float>(scale);
  params.scale_log2 = static_cast<float>(scale * M_LOG2E);
  launch_rope_attention_backward(params, q.scalar_type(), static_cast<int>(head_dim),
                                 static_cast<int>(cu.size(0) - 1), std::min(max_seqlen, total));
  return {dq, dk, dv};
}

// The fused kernels are the library's CUDA kernels of rope_attention_forward/_backward;
// the private names reach them directly whatever backend omnivmed_ext.attention selects.
TORCH_LIBRARY_IMPL(omnivmed, CUDA, m) {
  m.impl("rope_attention_forward", &rope_attention_fused_forward_cuda);
  m.impl("rope_attention_backward", &rope_attention_fused_backward_cuda);
  m.impl("_rope_attention_fused_forward", &rope_attention_fused_forward_cuda);
  m.impl("_rope_attention_fused_backward", &rope_attention_fused_backward_cuda);
}

}  // namespace attention
}  // namespace omnivmed
