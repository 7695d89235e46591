// Every op schema of the omnivmed namespace, in one place. Backends add their kernels
// with TORCH_LIBRARY_IMPL next to the kernels themselves.
#include <torch/library.h>

TORCH_LIBRARY(omnivmed, m) {
  // Multi-axis rotary embedding over [L, H, D] (see csrc/rope/rope_math.h for the layout).
  m.def(
      "rope_nd(Tensor x, Tensor positions, int[] sections, float theta=10000.0, "
      "bool inverse=False) -> Tensor");
  // Bidirectional attention inside each packed item with rope_nd applied to q and k.
  m.def(
      "rope_attention(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor cu_seqlens, "
      "int max_seqlen, int[] sections, float theta=10000.0, float? softmax_scale=None) -> Tensor");
  m.def(
      "rope_attention_backward(Tensor grad, Tensor q, Tensor k, Tensor v, Tensor positions, "
      "Tensor cu_seqlens, int max_seqlen, int[] sections, float theta, float? softmax_scale) -> "
      "(Tensor dq, Tensor dk, Tensor dv)");
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
