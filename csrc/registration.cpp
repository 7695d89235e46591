// Every op schema of the omnivmed namespace declared in C++, in one place. Backends add
// their kernels with TORCH_LIBRARY_IMPL next to the kernels themselves, and the library
// registers a kernel for every schema it declares: a CPU one for each op (or a composite
// one), plus CUDA ones when built with CUDA; only the private _rope_attention_fused_* ops
// are CUDA-only. What Python adds (omnivmed_ext): fake kernels, autograd, and CUDA
// backends of rope_attention written with torch ops under their own private names.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

TORCH_LIBRARY(omnivmed, m) {
  // Multi-axis rotary embedding over [L, H, D] (see csrc/rope/rope_math.h for the layout).
  m.def(
      "rope_nd(Tensor x, Tensor positions, int[] sections, float theta=10000.0, "
      "bool inverse=False) -> Tensor");
  // Bidirectional attention inside each packed item with rope_nd applied to q and k.
  // rope_attention is rope_attention_forward's output alone (CompositeImplicitAutograd);
  // the forward also returns the log-sum-exp [H, L] (fp32) that the backward reads.
  m.def(
      "rope_attention(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cu_seqlens, "
      "int max_seqlen, int[] sections, float theta=10000.0, float? softmax_scale=None) -> Tensor");
  m.def(
      "rope_attention_forward(Tensor q, Tensor k, Tensor v, Tensor positions, "
      "Tensor cu_seqlens, int max_seqlen, int[] sections, float theta=10000.0, "
      "float? softmax_scale=None) -> (Tensor out, Tensor lse)");
  m.def(
      "rope_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor positions, Tensor cu_seqlens, int max_seqlen, int[] sections, "
      "float theta, float? softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // CPU kernels: rope_nd + ATen's CPU flash attention per item (csrc/attention/
  // rope_attention_cpu.cpp); CUDA kernels: the fused ones below. From Python, the autograd
  // kernel of rope_attention_forward picks the CUDA backend per call
  // (omnivmed_ext.attention).
  //
  // The fused CUDA kernels (float16/bfloat16, sync-free) under their own names, same
  // schemas, CUDA only.
  m.def(
      "_rope_attention_fused_forward(Tensor q, Tensor k, Tensor v, Tensor positions, "
      "Tensor cu_seqlens, int max_seqlen, int[] sections, float theta=10000.0, "
      "float? softmax_scale=None) -> (Tensor out, Tensor lse)");
  m.def(
      "_rope_attention_fused_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor out, "
      "Tensor lse, Tensor positions, Tensor cu_seqlens, int max_seqlen, int[] sections, "
      "float theta, float? softmax_scale) -> (Tensor dq, Tensor dk, Tensor dv)");
  // Medical-aware token pruning (see csrc/prune/prune_math.h). Returns the keep mask
  // [F, N], kept flat indices [K], their (t, h, w) positions [K, 3], the new cu_seqlens
  // [B+1] and the kept values [K, P]; K depends on the data.
  m.def(
      "l1_prune(Tensor patches, Tensor cu_frames, int grid_h, int grid_w, float threshold=0.1, "
      "str mode='previous', int unit=1, int min_keep_per_frame=0) -> "
      "(Tensor keep, Tensor index, Tensor positions, Tensor cu_seqlens, Tensor values)");
  // The same, sized to the upper bound K = F*N with the true count as a 0-d tensor on the
  // input's device: no host synchronisation on a GPU.
  m.def(
      "l1_prune_padded(Tensor patches, Tensor cu_frames, int grid_h, int grid_w, "
      "float threshold=0.1, str mode='previous', int unit=1, int min_keep_per_frame=0) -> "
      "(Tensor keep, Tensor index, Tensor positions, Tensor cu_seqlens, Tensor values, "
      "Tensor count)");
}

namespace {

at::Tensor rope_attention_composite(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& positions, const at::Tensor& cu_seqlens,
                                    int64_t max_seqlen, c10::IntArrayRef sections, double theta,
                                    std::optional<double> softmax_scale) {
  static const auto forward = c10::Dispatcher::singleton()
                                  .findSchemaOrThrow("omnivmed::rope_attention_forward", "")
                                  .typed<std::tuple<at::Tensor, at::Tensor>(
                                      const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                      const at::Tensor&, const at::Tensor&, int64_t,
                                      c10::IntArrayRef, double, std::optional<double>)>();
  return std::get<0>(
      forward.call(q, k, v, positions, cu_seqlens, max_seqlen, sections, theta, softmax_scale));
}

}  // namespace

TORCH_LIBRARY_IMPL(omnivmed, CompositeImplicitAutograd, m) {
  m.impl("rope_attention", &rope_attention_composite);
}
