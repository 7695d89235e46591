// Host-side entry points of the rope_attention op family: the argument checks every
// backend shares and the CPU kernels. (The fused CUDA kernels' launch interface is in
// rope_attention_cuda.h.)
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace omnivmed {
namespace attention {

// Head dims the op supports on every backend.
inline constexpr int64_t kSupportedHeadDims[] = {64, 72, 80, 96, 128};

// Shapes, dtypes (float32/float16/bfloat16), devices, cu_seqlens' form and rope_nd's
// arguments; reads no tensor value. `op` prefixes the messages. Raises ValueError /
// TypeError in Python, as omnivmed_ext.attention.check_rope_attention_args does.
void check_rope_attention_args(const char* op, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& positions,
                               const at::Tensor& cu_seqlens, int64_t max_seqlen,
                               c10::IntArrayRef sections, double theta);

// The backward's extra tensors: grad and out like q, lse float32 [H, L].
void check_rope_attention_backward_args(const char* op, const at::Tensor& grad,
                                        const at::Tensor& q, const at::Tensor& out,
                                        const at::Tensor& lse);

// The item offsets read on the host, after checking they start at 0, never decrease, end
// at `total` and hold no item longer than `max_seqlen` (on a GPU this synchronises).
std::vector<int64_t> item_bounds(const char* op, const at::Tensor& cu_seqlens, int64_t total,
                                 int64_t max_seqlen);

// softmax_scale, or 1/sqrt(D) when it is not given.
double resolve_scale(std::optional<double> softmax_scale, int64_t head_dim);

// CPU: rope_nd on q and k, then ATen's CPU flash attention item by item (items of one
// length in a row go in one batched call); the backward reuses out and lse and turns dq
// and dk back with the inverse rotation.
std::tuple<at::Tensor, at::Tensor> rope_attention_forward_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, c10::IntArrayRef sections, double theta,
    std::optional<double> softmax_scale);

std::tuple<at::Tensor, at::Tensor, at::Tensor> rope_attention_backward_cpu(
    const at::Tensor& grad, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& positions,
    const at::Tensor& cu_seqlens, int64_t max_seqlen, c10::IntArrayRef sections, double theta,
    std::optional<double> softmax_scale);

}  // namespace attention
}  // namespace omnivmed
