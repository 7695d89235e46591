// The fused CUDA rope_attention (flash-attention-2 style, rotary applied on the fly):
// launch parameters shared by the forward and backward translation units.
//
// Layout: q, k, v, out, dq, dk, dv are [L, H, D] contiguous; the log-sum-exp and the
// backward's delta are [H, L] fp32; cos_sin is [L, D/2] (cos, sin) pairs in fp32, the
// rope_nd angles of each token (rotated q and k themselves are never stored).
//
// Sync-free: the kernels read cu_seqlens on the device. max_seqlen only sizes the grid;
// a block strides over the tiles of its item, so an item longer than max_seqlen is still
// computed whole (just by fewer blocks).
#pragma once

#include <cstdint>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

namespace omnivmed {
namespace attention {

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  float* lse;
  const float2* cos_sin;
  const int* cu_seqlens;
  int64_t total;       // L
  int heads;           // H
  int64_t row_stride;  // H * D
  float scale_log2;    // softmax_scale * log2(e)
};

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* grad;  // dO
  const void* out;   // O
  const float* lse;
  float* delta;  // workspace for rowsum(dO * O), [H, L]
  const float2* cos_sin;
  const int* cu_seqlens;
  float* dq_accum;  // [L, H, D] fp32, zeroed; rotated-frame dQ / scale
  void* dq;
  void* dk;
  void* dv;
  int64_t total;
  int heads;
  int64_t row_stride;
  float scale;       // softmax_scale
  float scale_log2;  // softmax_scale * log2(e)
};

// cos/sin of every token and pair, [L, D/2] float2 (rope_nd's angles, fp32 math).
at::Tensor cos_sin_table_cuda(const at::Tensor& positions, int64_t head_dim,
                              c10::IntArrayRef sections, double theta);

// dtype in {Half, BFloat16}; head_dim in {64, 72, 80, 96, 128}.
void launch_rope_attention_forward(const FwdParams& params, at::ScalarType dtype, int head_dim,
                                   int num_items, int64_t max_seqlen);
void launch_rope_attention_backward(const BwdParams& params, at::ScalarType dtype, int head_dim,
                                    int num_items, int64_t max_seqlen);

// The ops (registered for CUDA under omnivmed::_rope_attention_fused_forward/_backward).
std::tuple<at::Tensor, at::Tensor> rope_attention_fused_forward_cuda(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, c10::IntArrayRef sections, double theta,
    std::optional<double> softmax_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_fused_backward_cuda(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& positions,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, c10::IntArrayRef sections, double theta,
    std::optional<double> softmax_scale);

}  // namespace attention
}  // namespace omnivmed
